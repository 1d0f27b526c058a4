"""Named random streams: a stream's seed follows from the run's seed and the stream's name alone,
so adding, removing or reordering streams never shifts another one."""

from __future__ import annotations

import hashlib


def stream_seed(run_seed: int, name: str, rank: int | None = None) -> int:
    """The seed of stream ``name`` in a run seeded ``run_seed``: ``rank``'s own stream, or with
    ``rank=None`` the one every rank shares. A SHA-256 digest rather than ``hash()``, which Python
    salts per process: every process, machine and rerun derives the same seed, and distinct names
    give unrelated seeds (63 bits, so it fits a signed 64-bit integer)."""
    key = f"{run_seed}/{name}/{'shared' if rank is None else f'rank{rank}'}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1
