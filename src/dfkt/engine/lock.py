"""One process per run folder: two runs writing one folder would mix their checkpoints and metrics."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path
from typing import IO

from dfkt.errors import DfktError

LOCK = ".lock"


def lock_run_dir(run_dir: Path) -> IO[str] | None:
    """Hold an exclusive lock on ``run_dir`` until the returned file is closed (or the process ends);
    an error naming the holder's PID when another process holds it. None where file locks are not
    available (not POSIX, or a file system without flock)."""
    try:
        import fcntl
    except ImportError:
        return None
    handle = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            # A file system without flock (some NFS, FUSE or Lustre mounts): run unguarded, not refused.
            handle.close()
            warnings.warn(f"cannot lock run folder {run_dir} ({exc.strerror}); runs into it are not guarded")
            return None
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise DfktError(
            f"run folder {run_dir} is in use by another dfkt process (PID {holder}); wait for it to end, "
            "or choose another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
