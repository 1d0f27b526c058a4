"""Run folders: where a run's config, checkpoint, metrics, weights and summary live."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from dfkt.engine import CHECKPOINT
from dfkt.errors import DfktError, disk_full_error, is_disk_full

DEFAULT_ROOT = Path("runs")


def make_run_dir(out: str | Path | None, prefix: str, resume: bool) -> Path:
    """The folder for a run (not created yet). An existing checkpoint is never overwritten without ``resume``."""
    if out is None:
        if resume:
            raise DfktError("--resume needs --out naming the run folder to continue")
        out = DEFAULT_ROOT / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise DfktError(f"--out {run_dir} is a file; name a folder")
    if not resume and (run_dir / CHECKPOINT).exists():
        raise DfktError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    return run_dir  # the engine creates it, on rank 0 only


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes writing one file never share a temp
    text = json.dumps(data, indent=2)
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException as exc:  # never half a file: the temporary goes, a previous file stays as it was
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path, len(text.encode()), exc) from exc
        raise
