"""Training on real labelled data: teachers, source models, and the reference students beside DFKD."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dfkt.api.common import normalized, result_settings
from dfkt.commands import TRAIN_SOURCE, TRAIN_TEACHER
from dfkt.config import EngineConfig, RealTrainingConfig, TeacherConfig, dump_yaml
from dfkt.data import ImageData, load_dataset
from dfkt.engine import Engine
from dfkt.errors import ConfigError
from dfkt.models import build_model
from dfkt.models.files import ModelInfo, save_model
from dfkt.registry import MODELS
from dfkt.runs import make_run_dir, write_json
from dfkt.supervised import RealDataTraining, evaluate_model


def train_teacher(*args: Any, config: str | Path | dict | None = None, overrides: Sequence[str] = (),
                  out: str | Path | None = None, resume: bool = False, **settings: Any) -> dict[str, Any]:
    """Train a classifier on real labelled data; writes ``model.safetensors`` and ``summary.json``.

    The settings are those of ``dfkt train-teacher --help``, by keyword (``epochs=8``) or the first ones
    by position: model, data, epochs. They resolve in layers: defaults <- ``config`` (a YAML file or a
    dict) <- settings <- ``overrides`` (``"engine.seed=2"``). The run folder is ``out``; ``resume``
    continues the run in it."""
    return _train_on_labels(TRAIN_TEACHER.resolve(args, settings, config, overrides), "teacher", out, resume)


def train_source(*args: Any, config: str | Path | dict | None = None, overrides: Sequence[str] = (),
                 out: str | Path | None = None, resume: bool = False, **settings: Any) -> dict[str, Any]:
    """Train a source model for adaptation (SHOT's recipe: label smoothing, SGD with SHOT's decay,
    the epoch chosen on held-out source images); writes ``model.safetensors`` and ``summary.json``.
    Its arguments are those of ``train_teacher`` (``dfkt train-source --help``)."""
    return _train_on_labels(TRAIN_SOURCE.resolve(args, settings, config, overrides), "source", out, resume)


def _holdout_split(n: int, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, holdout): a fixed seeded permutation, the last ``share`` held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    keep = n - int(round(share * n))
    return order[:keep], order[keep:]


def _train_on_labels(cfg: TeacherConfig, kind: str, out: str | Path | None, resume: bool) -> dict[str, Any]:
    MODELS.get(cfg.model)
    dataset = load_dataset(cfg.data.name, cfg.data.root, cfg.data.download, cfg.data.image_size)
    run_dir = make_run_dir(out, f"{kind}-{cfg.model}-{cfg.data.name}", resume)
    engine = Engine(cfg.engine, run_dir)
    run_dir = engine.run_dir
    net = build_model(cfg.model, dataset.num_classes, dataset.channels, dataset.image_size)
    info = ModelInfo(cfg.model, dataset.num_classes, dataset.channels, dataset.image_size,
                     dataset.mean, dataset.std, dataset.name)
    test_x, test_y = normalized(dataset.test_images, info), dataset.test_labels
    train_x, train_y = normalized(dataset.train_images, info), dataset.train_labels
    holdout = None
    if cfg.holdout > 0:
        kept, held = _holdout_split(len(train_y), cfg.holdout)
        if len(held) == 0:
            raise ConfigError(f"holdout {cfg.holdout} of {len(train_y)} training images keeps none apart; raise "
                              "holdout or set it to 0 to keep the last epoch")
        holdout = engine.to_device(train_x[held]), train_y[held].to(engine.device)
        train_x, train_y = train_x[kept], train_y[kept]
    task = RealDataTraining(engine, net, train_x, train_y, cfg, name=kind, holdout=holdout)
    scaling = engine.scaling({"batch_size": cfg.batch_size})

    def on_eval() -> dict[str, float]:
        return {"test_acc": evaluate_model(task.model, test_x, test_y, engine, dataset.num_classes)["accuracy"]}
    started = time.perf_counter()
    result = engine.run(task.stages(), task, result_settings(cfg, engine), on_eval,
                        eval_every=task.steps_per_epoch * max(1, cfg.epochs // 5), resume=resume,
                        on_start=lambda: dump_yaml(cfg, run_dir / "config.yaml"))
    chosen = task.chosen()
    final = evaluate_model(chosen, test_x, test_y, engine, dataset.num_classes)
    path = run_dir / "model.safetensors"
    summary = {"model": cfg.model, "dataset": dataset.name, f"{kind}_acc": final["accuracy"],
               "per_class_acc": final["per_class"], "seconds": {"train": result.seconds.get(kind, 0.0),
                                                                 "wall": time.perf_counter() - started},
               "model_file": str(path), "distributed": {**scaling, "replica_sha256": result.replica_sha256}}
    if holdout is not None:
        summary["holdout_acc"] = task.buffers["best_holdout_acc"].item()
        summary["selection"] = f"epoch with the best accuracy on {len(holdout[1])} held-out training images"
    if engine.is_main:
        save_model(chosen, info, path)
        write_json(run_dir / "summary.json", summary)
    engine.close()
    return summary


def train_references(engine_cfg: EngineConfig, training: RealTrainingConfig, info: ModelInfo, dataset: ImageData,
                     student_arch: str, teacher: nn.Module, run_dir: Path, resume: bool) -> dict[str, Any]:
    """The two students reported beside every DFKD result: KD on real data, and trained on labels."""
    out: dict[str, Any] = {}
    train_x = normalized(dataset.train_images, info)
    test_x = normalized(dataset.test_images, info)
    for name in ("kd_real", "labels"):
        engine = Engine(engine_cfg, run_dir / f"reference-{name}")
        net = build_model(student_arch, info.num_classes, info.in_channels, info.image_size)
        task = RealDataTraining(engine, net, train_x, dataset.train_labels, training,
                                teacher if name == "kd_real" else None, name)
        settings = {"reference": name, "student": student_arch, "data": dataset.name,
                    "training": training.model_dump(mode="json"), **engine.fingerprint()}
        result = engine.run(task.stages(), task, settings, resume=resume)
        acc = evaluate_model(task.model, test_x, dataset.test_labels, engine, info.num_classes)["accuracy"]
        out[name] = {"student_acc": acc, "seconds": result.seconds.get(name, 0.0)}
        engine.close()
    return out
