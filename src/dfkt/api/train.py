"""Training on real labelled data: teachers, source models, and the reference students beside DFKD."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkt.api import pipeline
from dfkt.api.common import normalized, result_settings
from dfkt.api.pipeline import Outcome, Training
from dfkt.commands import TRAIN_SOURCE, TRAIN_TEACHER
from dfkt.config import EngineConfig, RealTrainingConfig, TeacherConfig
from dfkt.data import ImageData, load_dataset
from dfkt.engine import Engine, RunResult
from dfkt.errors import ConfigError
from dfkt.models import build_model
from dfkt.models.files import ModelInfo
from dfkt.registry import MODELS
from dfkt.supervised import RealDataTraining, evaluate_model


def train_teacher(
    *args: Any,
    config: str | Path | dict | None = None,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    resume: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """Train a classifier on real labelled data; writes ``model.safetensors`` and ``summary.json``.

    The settings are those of ``dfkt train-teacher --help``, by keyword (``epochs=8``) or the first ones
    by position: model, data, epochs. They resolve in layers: defaults <- ``config`` (a YAML file or a
    dict) <- settings <- ``overrides`` (``"engine.seed=2"``). The run folder is ``out``; ``resume``
    continues the run in it."""
    cfg = TRAIN_TEACHER.resolve(args, settings, config, overrides)
    return pipeline.run(LabelTraining(cfg, "teacher"), out, resume)


def train_source(
    *args: Any,
    config: str | Path | dict | None = None,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    resume: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """Train a source model for adaptation (SHOT's recipe: label smoothing, SGD with SHOT's decay,
    the epoch chosen on held-out source images); writes ``model.safetensors`` and ``summary.json``.
    Its arguments are those of ``train_teacher`` (``dfkt train-source --help``)."""
    cfg = TRAIN_SOURCE.resolve(args, settings, config, overrides)
    return pipeline.run(LabelTraining(cfg, "source"), out, resume)


def _holdout_split(n: int, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, holdout): a fixed seeded permutation, the last ``share`` held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    keep = n - int(round(share * n))
    return order[:keep], order[keep:]


class LabelTraining:
    """``dfkt train-teacher`` and ``train-source`` as a job of the run pipeline. Made before anything is
    written: it loads the dataset and sets the holdout images apart."""

    def __init__(self, cfg: TeacherConfig, kind: str):
        MODELS.get(cfg.model)
        self.dataset = dataset = load_dataset(cfg.data.name, cfg.data.root, cfg.data.download, cfg.data.image_size)
        self.info = ModelInfo(
            cfg.model,
            dataset.num_classes,
            dataset.channels,
            dataset.image_size,
            dataset.mean,
            dataset.std,
            dataset.name,
        )
        self.test_images = normalized(dataset.test_images, self.info)
        self.train_images, self.train_labels = normalized(dataset.train_images, self.info), dataset.train_labels
        self.kept = self.held = None
        if cfg.holdout > 0:
            self.kept, self.held = _holdout_split(len(self.train_labels), cfg.holdout)
            if len(self.held) == 0:
                raise ConfigError(
                    f"holdout {cfg.holdout} of {len(self.train_labels)} training images keeps none "
                    "apart; raise holdout or set it to 0 to keep the last epoch"
                )
        self.cfg, self.name = cfg, kind
        self.kind, self.engine_config, self.resolved = f"{kind}-{cfg.model}-{cfg.data.name}", cfg.engine, cfg

    def start(self, engine: Engine) -> Training:
        cfg, images, labels = self.cfg, self.train_images, self.train_labels
        net = build_model(cfg.model, self.dataset.num_classes, self.dataset.channels, self.dataset.image_size)
        holdout = None
        if self.held is not None:
            holdout = engine.to_device(images[self.held]), labels[self.held].to(engine.device)
            images, labels = images[self.kept], labels[self.kept]
        self.task = RealDataTraining(engine, net, images, labels, cfg, name=self.name, holdout=holdout)
        self.scaling = engine.scaling({"batch_size": cfg.batch_size})
        self.started = time.perf_counter()
        return Training(
            self.task,
            self.task.stages(),
            result_settings(cfg, engine),
            lambda: {"test_acc": self.evaluate(engine, self.task.model)["accuracy"]},
            eval_every=self.task.steps_per_epoch * max(1, cfg.epochs // 5),
        )

    def evaluate(self, engine: Engine, model: nn.Module) -> dict[str, Any]:
        return evaluate_model(model, self.test_images, self.dataset.test_labels, engine, self.dataset.num_classes)

    def summarize(self, engine: Engine, result: RunResult) -> Outcome:
        chosen = self.task.chosen()
        final = self.evaluate(engine, chosen)
        summary = {
            "model": self.cfg.model,
            "dataset": self.dataset.name,
            f"{self.name}_acc": final["accuracy"],
            "per_class_acc": final["per_class"],
            "seconds": {"train": result.seconds.get(self.name, 0.0), "wall": time.perf_counter() - self.started},
            "model_file": str(engine.run_dir / "model.safetensors"),
            "distributed": {**self.scaling, "replica_sha256": result.replica_sha256},
        }
        if self.held is not None:
            summary["holdout_acc"] = self.task.holdout_acc
            summary["selection"] = f"epoch with the best accuracy on {len(self.held)} held-out training images"
        return Outcome(summary, {"model.safetensors": (chosen, self.info)})


def train_references(
    engine_cfg: EngineConfig,
    training: RealTrainingConfig,
    info: ModelInfo,
    dataset: ImageData,
    student_arch: str,
    teacher: nn.Module,
    run_dir: Path,
    resume: bool,
) -> dict[str, Any]:
    """The two students reported beside every DFKD result: KD on real data, and trained on labels."""
    out: dict[str, Any] = {}
    train_x = normalized(dataset.train_images, info)
    test_x = normalized(dataset.test_images, info)
    for name in ("kd_real", "labels"):
        with Engine(engine_cfg, run_dir / f"reference-{name}") as engine:
            net = build_model(student_arch, info.num_classes, info.in_channels, info.image_size)
            task = RealDataTraining(
                engine, net, train_x, dataset.train_labels, training, teacher if name == "kd_real" else None, name
            )
            settings = {
                "reference": name,
                "student": student_arch,
                "data": dataset.name,
                "training": training.model_dump(mode="json"),
                **engine.fingerprint(),
            }
            result = engine.run(task.stages(), task, settings, resume=resume)
            acc = evaluate_model(task.model, test_x, dataset.test_labels, engine, info.num_classes)["accuracy"]
        out[name] = {"student_acc": acc, "seconds": result.seconds.get(name, 0.0)}
    return out
