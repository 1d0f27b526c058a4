"""Run-folder records: metrics as JSON lines, environment facts as env.json."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from dfkt.engine.cpu import cpu_model


class MetricsLog:
    """Appends one JSON object per line; line-buffered so a killed run keeps what it logged."""

    def __init__(self, path: Path | None):
        self.path = path
        self._handle = open(path, "a", buffering=1) if path is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self._handle is not None:
            self._handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def environment(device: torch.device, precision: str, world_size: int) -> dict[str, Any]:
    import torchvision

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "precision": precision,
        "world_size": world_size,
    }
