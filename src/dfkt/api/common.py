"""Pieces the public functions share: result-affecting settings, test data, method configs."""

from __future__ import annotations

from typing import Any

import torch

from dfkt.config import DataConfig, DistillConfig, TeacherConfig, merge, validate
from dfkt.data import ImageData, load_dataset, normalize
from dfkt.engine import Engine
from dfkt.errors import ConfigError
from dfkt.models.files import ModelInfo
from dfkt.registry import ADAPT_METHODS, CALIBRATION_SOURCES, DATASETS, METHODS, MODELS


def list_names(kind: str) -> list[str]:
    registries = {
        "methods": METHODS,
        "adapt-methods": ADAPT_METHODS,
        "models": MODELS,
        "datasets": DATASETS,
        "calibration-sources": CALIBRATION_SOURCES,
    }
    if kind not in registries:
        raise ConfigError(f"unknown list {kind!r}; choose one of: {', '.join(registries)}")
    return registries[kind].names()


def method_params(method: str | None) -> list[dict[str, Any]]:
    """A method's settings: name, default, the value in each preset and the description (for
    'dfkt list params METHOD')."""
    if not method:
        raise ConfigError(
            "name the method: dfkt list params METHOD (see 'dfkt list methods' and 'dfkt list adapt-methods')"
        )
    cls = METHODS.get(method) if method in METHODS.names() else ADAPT_METHODS.get(method)
    rows = []
    for name, field in cls.Config.model_fields.items():
        default = field.get_default(call_default_factory=True)
        row = {"name": name, "default": default}
        row.update({preset: values.get(name, default) for preset, values in cls.presets.items()})
        rows.append({**row, "description": field.description or ""})
    return rows


# Settings that change neither numbers nor weights: a resume may alter them freely.
RUN_ONLY = {
    "engine",
    "eval_every",
    "eval_seconds",
    "max_seconds",
    "references",
    "reference",
    "preset",
    "params",
    "teacher",
    "teacher_weights",
    "data",
}


def result_settings(cfg: TeacherConfig | DistillConfig, engine: Engine) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint: the config less run-only settings."""
    kept = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RUN_ONLY}
    if isinstance(cfg, TeacherConfig):
        kept["data"] = {"name": cfg.data.name, "image_size": cfg.data.image_size}
    return {**kept, **engine.fingerprint()}


def evaluation_data(data: DataConfig, info: ModelInfo, size_key: str = "data.image_size") -> ImageData:
    """The test data for a model: by default its own dataset (or a shifted version of it) at its own
    image size; another dataset must fit the model as it comes (or with ``size_key``, e.g.
    data.image_size), never silently resized."""
    own = data.name is None or data.name.split("-c:")[0] == info.dataset
    size = data.image_size or (info.image_size if own else None)
    dataset = load_dataset(data.name or info.dataset, data.root, data.download, size)
    info.check_fits(dataset.num_classes, dataset.channels, dataset.image_size, f"dataset {dataset.name}", size_key)
    return dataset


def normalized(images: torch.Tensor, info: ModelInfo) -> torch.Tensor:
    return normalize(images, info.mean, info.std)


def method_config(method_cls: Any, name: str, preset: str | None, params: dict) -> Any:
    """A method's validated config: its preset, then the run's ``params`` on top."""
    if preset is not None and preset not in method_cls.presets:
        raise ConfigError(f"unknown preset {preset!r} for {name}; valid presets: {', '.join(method_cls.presets)}")
    return validate(
        method_cls.Config, merge(method_cls.presets.get(preset, {}) if preset else {}, params), where=f"{name} params"
    )
