"""Errors a user can fix. The CLI prints them as one line, without a traceback."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class DfktError(Exception):
    """Base class: the message says what went wrong and how to fix it."""


class ConfigError(DfktError):
    """A config file, preset or override is invalid."""


class ArgumentError(ConfigError, TypeError):
    """A Python call gave a command a setting it does not have, or one setting twice (a TypeError,
    as Python's own for an unexpected keyword)."""


class UnknownNameError(DfktError, KeyError):
    """A method, model or dataset name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DatasetUnavailableError(DfktError):
    """A dataset's files are missing and cannot be downloaded."""


class ModelFileError(DfktError):
    """A model file is missing, corrupt, or does not fit the data."""


class TrainingDivergedError(DfktError):
    """A loss became inf or NaN."""


class DiskFullError(DfktError):
    """A file could not be written because its disk (or the user's quota) is full."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What writers that lose the OSError say: torch.save's C++ writer, and safetensors ("... (os error 28)").
DISK_FULL_MESSAGES = ("unexpected pos", "file write failed", *(f"(os error {n})" for n in DISK_FULL_ERRNOS))


def is_disk_full(exc: BaseException) -> bool:
    """An OSError for a full disk or quota, or a writer's error that stands for one."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    return isinstance(exc, Exception) and any(s in str(exc) for s in DISK_FULL_MESSAGES)


def disk_full_error(path: str | os.PathLike, needed: int | None, exc: BaseException) -> DiskFullError:
    """One line naming the file's folder, the bytes it needed (when known) and the space left there."""
    folder = Path(path).parent.resolve()
    try:
        free = f"{_size(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    quota = getattr(exc, "errno", None) == errno.EDQUOT or f"(os error {errno.EDQUOT})" in str(exc)
    what = "the disk quota is exceeded" if quota else "the disk is full"
    need = f"{_size(needed)} needed, " if needed is not None else ""
    return DiskFullError(
        f"cannot write {Path(path).name} in {folder}: {what} ({need}{free}); free some space "
        "or write to another folder (--out)"
    )


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1024
        if n < 1024 or unit == "TB":
            break
    return f"{n:.1f} {unit}"
