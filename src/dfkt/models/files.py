"""Model files: safetensors weights plus metadata saying how to rebuild and feed the model.

Loading never unpickles anything: the architecture is rebuilt from the registry by name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dfkt.errors import ModelFileError, disk_full_error, is_disk_full

FORMAT = "dfkt-model/1"


@dataclass(frozen=True)
class ModelInfo:
    """What a model file says about the model: enough to rebuild it and to check data against it."""

    arch: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str = ""

    def check_fits(
        self, num_classes: int, channels: int, image_size: int, what: str, size_key: str = "data.image_size"
    ) -> None:
        """Raise a one-line error when data of this shape cannot be fed to the model."""
        problems = []
        if num_classes != self.num_classes:
            problems.append(f"{num_classes} classes vs the model's {self.num_classes}")
        if channels != self.in_channels:
            problems.append(f"{channels} channels vs the model's {self.in_channels}")
        if image_size != self.image_size:
            problems.append(f"{image_size}px images vs the model's {self.image_size}px")
        if problems:
            raise ModelFileError(
                f"{what} does not fit the model ({'; '.join(problems)}); "
                f"use the data the model was trained on ({self.dataset or 'unknown'}) "
                f"or set {size_key} to match"
            )


def save_model(model: nn.Module, info: ModelInfo, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "info": json.dumps(asdict(info))}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
    except BaseException as exc:  # never half a file: the temporary goes, a previous file stays as it was
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            needed = sum(t.numel() * t.element_size() for t in tensors.values()) + len(json.dumps(meta))
            raise disk_full_error(path, needed, exc) from exc
        raise
    return path


def model_path(path: str | Path) -> Path:
    """A model file, or a run folder holding one (student.safetensors or model.safetensors)."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("student.safetensors", "model.safetensors") if (path / n).is_file()]
        if not found:
            raise ModelFileError(f"{path} is a folder with no student.safetensors or model.safetensors in it")
        return found[0]
    return path


def read_info(path: str | Path) -> ModelInfo:
    from dfkt.registry import MODELS

    path = model_path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist; train one with 'dfkt train-teacher'")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for truncated files
        raise ModelFileError(
            f"model file {path} is corrupt or truncated ({exc.__class__.__name__}); "
            "re-create it with 'dfkt train-teacher'"
        ) from None
    if meta.get("format") != FORMAT:
        raise ModelFileError(
            f"model file {path} is a safetensors file without dfkt metadata; "
            "save it with dfkt.models.save_model(model, ModelInfo(...), path)"
        )
    try:
        raw = json.loads(meta["info"])
        raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        info = ModelInfo(**raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(
            f"model file {path} has damaged dfkt metadata ({exc.__class__.__name__}); "
            "re-create it with 'dfkt train-teacher'"
        ) from None
    if info.arch not in MODELS:
        raise ModelFileError(
            f"model file {path} names architecture {info.arch!r}, which this dfkt does not "
            f"know (known: {', '.join(MODELS.names())})"
        )
    return info


def load_model(path: str | Path) -> tuple[nn.Module, ModelInfo]:
    """Rebuild the architecture named in the file and load its weights."""
    from dfkt.models import build_model

    path = model_path(path)
    info = read_info(path)
    model = build_model(info.arch, info.num_classes, info.in_channels, info.image_size)
    try:
        with safe_open(str(path), framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        model.load_state_dict(state)
    except Exception as exc:
        raise ModelFileError(
            f"model file {path} does not hold valid weights for {info.arch} "
            f"({exc.__class__.__name__}); re-create it with 'dfkt train-teacher'"
        ) from None
    return model, info


def model_sha256(path: str | Path) -> str:
    """A hash of the model's metadata and weights. Not of the file's bytes: safetensors may
    order its header differently each time the same model is saved."""
    path = model_path(path)
    digest = hashlib.sha256(json.dumps(asdict(read_info(path)), sort_keys=True).encode())
    with safe_open(str(path), framework="pt") as handle:
        for key in sorted(handle.keys()):
            digest.update(key.encode())
            digest.update(handle.get_tensor(key).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
