"""The public functions. Every CLI subcommand is a thin shell over one of these."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dfkt import dfkd, sfda  # noqa: F401  (importing registers the methods)
from dfkt.config import (AdaptRunConfig, DataConfig, DistillConfig, EngineConfig, RealTrainingConfig, SourceConfig,
                         TeacherConfig, apply_overrides, dump_yaml, load_yaml, merge, validate)
from dfkt.data import ImageData, load_dataset, normalize
from dfkt.data.corruptions import corrupt
from dfkt.data.folder import load_image_folder
from dfkt.data.shifted import parse_shift
from dfkt.diagnostics import collapse_warnings
from dfkt.dfkd.base import DistillSetup
from dfkt.sfda.base import AdaptSetup
from dfkt.engine import Engine
from dfkt.errors import ConfigError, DfktError
from dfkt.models import build_model
from dfkt.models.files import ModelInfo, model_sha256, load_model, model_path, read_info, save_model
from dfkt.registry import ADAPT_METHODS, DATASETS, METHODS, MODELS
from dfkt.report.grid import save_class_grid
from dfkt.runs import make_run_dir, write_json
from dfkt.supervised import RealDataTraining, evaluate_model

# The half-width student paired with each teacher in the papers.
DEFAULT_STUDENT = {"lenet5": "lenet5_half", "digits_cnn": "digits_cnn_half", "resnet34": "resnet18",
                   "wrn40_2": "wrn16_1", "wrn16_2": "wrn16_1"}
GRID_SAMPLES = 500


def list_names(kind: str) -> list[str]:
    registries = {"methods": METHODS, "adapt-methods": ADAPT_METHODS, "models": MODELS, "datasets": DATASETS}
    if kind not in registries:
        raise ConfigError(f"unknown list {kind!r}; choose one of: {', '.join(registries)}")
    return registries[kind].names()


def _layer(config: str | Path | dict | None, flags: dict[str, Any], overrides: Sequence[str]) -> dict:
    """defaults <- YAML file <- command-line flags <- --set overrides."""
    raw = load_yaml(config) if isinstance(config, (str, Path)) else dict(config or {})
    for key, value in flags.items():
        if value is not None:
            node, *rest = key.split(".")
            raw = merge(raw, {node: {rest[0]: value}} if rest else {node: value})
    return apply_overrides(raw, overrides)


# Settings that change neither numbers nor weights: a resume may alter them freely.
RUN_ONLY = {"engine", "eval_every", "max_seconds", "references", "reference", "preset", "params", "teacher", "data"}


def _result_settings(cfg: TeacherConfig | DistillConfig, engine: Engine) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint: the config less run-only settings."""
    kept = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RUN_ONLY}
    if isinstance(cfg, TeacherConfig):
        kept["data"] = {"name": cfg.data.name, "image_size": cfg.data.image_size}
    return {**kept, **engine.fingerprint()}


def _evaluation_data(data: DataConfig, info: ModelInfo, size_key: str = "data.image_size") -> ImageData:
    """The test data for a model: by default its own dataset (or a shifted version of it) at its own
    image size; another dataset must fit the model as it comes (or with ``size_key``, e.g.
    data.image_size), never silently resized."""
    own = data.name is None or data.name.split("-c:")[0] == info.dataset
    size = data.image_size or (info.image_size if own else None)
    dataset = load_dataset(data.name or info.dataset, data.root, data.download, size)
    info.check_fits(dataset.num_classes, dataset.channels, dataset.image_size, f"dataset {dataset.name}", size_key)
    return dataset


def _normalized(images: torch.Tensor, info: ModelInfo) -> torch.Tensor:
    return normalize(images, info.mean, info.std)


# -- train-teacher, train-source -----------------------------------------------------------------
def train_teacher(model: str | None = None, data: str | None = None, epochs: int | None = None,
                  data_root: str | None = None, download: bool | None = None,
                  config: str | Path | dict | None = None, overrides: Sequence[str] = (),
                  out: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Train a classifier on real labelled data; writes ``model.safetensors`` and ``summary.json``."""
    return _train_on_labels(TeacherConfig, "teacher", model, data, epochs, data_root, download, config, overrides,
                            out, resume)


def train_source(model: str | None = None, data: str | None = None, epochs: int | None = None,
                 data_root: str | None = None, download: bool | None = None,
                 config: str | Path | dict | None = None, overrides: Sequence[str] = (),
                 out: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Train a source model for adaptation (SHOT's recipe: label smoothing, SGD with SHOT's decay,
    the epoch chosen on held-out source images); writes ``model.safetensors`` and ``summary.json``."""
    return _train_on_labels(SourceConfig, "source", model, data, epochs, data_root, download, config, overrides,
                            out, resume)


def _holdout_split(n: int, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, holdout): a fixed seeded permutation, the last ``share`` held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    keep = n - int(round(share * n))
    return order[:keep], order[keep:]


def _train_on_labels(config_cls: type[TeacherConfig], kind: str, model: str | None, data: str | None,
                     epochs: int | None, data_root: str | None, download: bool | None,
                     config: str | Path | dict | None, overrides: Sequence[str], out: str | Path | None,
                     resume: bool) -> dict[str, Any]:
    raw = _layer(config, {"model": model, "data.name": data, "data.root": data_root,
                          "data.download": download, "epochs": epochs}, overrides)
    cfg = validate(config_cls, raw)
    MODELS.get(cfg.model)
    dataset = load_dataset(cfg.data.name, cfg.data.root, cfg.data.download, cfg.data.image_size)
    run_dir = make_run_dir(out, f"{kind}-{cfg.model}-{cfg.data.name}", resume)
    engine = Engine(cfg.engine, run_dir)
    net = build_model(cfg.model, dataset.num_classes, dataset.channels, dataset.image_size)
    info = ModelInfo(cfg.model, dataset.num_classes, dataset.channels, dataset.image_size,
                     dataset.mean, dataset.std, dataset.name)
    test_x, test_y = _normalized(dataset.test_images, info), dataset.test_labels
    train_x, train_y = _normalized(dataset.train_images, info), dataset.train_labels
    holdout = None
    if cfg.holdout > 0:
        kept, held = _holdout_split(len(train_y), cfg.holdout)
        if len(held) == 0:
            raise ConfigError(f"holdout {cfg.holdout} of {len(train_y)} training images keeps none apart; raise "
                              "holdout or set it to 0 to keep the last epoch")
        holdout = engine.to_device(train_x[held]), train_y[held].to(engine.device)
        train_x, train_y = train_x[kept], train_y[kept]
    task = RealDataTraining(engine, net, train_x, train_y, cfg, name=kind, holdout=holdout)
    def on_eval() -> dict[str, float]:
        return {"test_acc": evaluate_model(task.model, test_x, test_y, engine, dataset.num_classes)["accuracy"]}
    started = time.perf_counter()
    result = engine.run(task.stages(), task, _result_settings(cfg, engine), on_eval,
                        eval_every=task.steps_per_epoch * max(1, cfg.epochs // 5), resume=resume,
                        on_start=lambda: dump_yaml(cfg, run_dir / "config.yaml"))
    chosen = task.chosen()
    final = evaluate_model(chosen, test_x, test_y, engine, dataset.num_classes)
    path = save_model(chosen, info, run_dir / "model.safetensors")
    summary = {"model": cfg.model, "dataset": dataset.name, f"{kind}_acc": final["accuracy"],
               "per_class_acc": final["per_class"], "seconds": {"train": result.seconds.get(kind, 0.0),
                                                                 "wall": time.perf_counter() - started},
               "model_file": str(path)}
    if holdout is not None:
        summary["holdout_acc"] = task.buffers["best_holdout_acc"].item()
        summary["selection"] = f"epoch with the best accuracy on {len(holdout[1])} held-out training images"
    write_json(run_dir / "summary.json", summary)
    engine.close()
    return summary


# -- distill -------------------------------------------------------------------------------------
def resolve_distill_config(method: str | None = None, teacher: str | Path | None = None,
                           student: str | None = None, preset: str | None = None, data: str | None = None,
                           data_root: str | None = None, config: str | Path | dict | None = None,
                           overrides: Sequence[str] = (), max_seconds: float | None = None,
                           references: bool | None = None) -> tuple[DistillConfig, Any]:
    """The validated run config and the method's own validated config (preset <- params)."""
    raw = _layer(config, {"method": method, "teacher": str(teacher) if teacher else None, "student": student,
                          "preset": preset, "max_seconds": max_seconds, "references": references,
                          "data.name": data, "data.root": data_root}, overrides)
    cfg = validate(DistillConfig, raw)
    if not cfg.teacher:
        raise ConfigError("no teacher given; pass --teacher FILE (a model.safetensors from 'dfkt train-teacher')")
    return cfg, _method_config(METHODS.get(cfg.method), cfg.method, cfg.preset, cfg.params)


def _method_config(method_cls: Any, name: str, preset: str | None, params: dict) -> Any:
    """A method's validated config: its preset, then the run's ``params`` on top."""
    if preset is not None and preset not in method_cls.presets:
        raise ConfigError(f"unknown preset {preset!r} for {name}; valid presets: {', '.join(method_cls.presets)}")
    return validate(method_cls.Config, merge(method_cls.presets.get(preset, {}) if preset else {}, params),
                    where=f"{name} params")


def distill(method: str | None = None, teacher: str | Path | None = None, student: str | None = None,
            preset: str | None = None, data: str | None = None, data_root: str | None = None,
            config: str | Path | dict | None = None, overrides: Sequence[str] = (),
            out: str | Path | None = None, resume: bool = False, max_seconds: float | None = None,
            references: bool | None = None) -> dict[str, Any]:
    """Distil ``teacher`` into a student without its training data. Returns the summary."""
    cfg, method_cfg = resolve_distill_config(method, teacher, student, preset, data, data_root, config,
                                             overrides, max_seconds, references)
    teacher_path = model_path(cfg.teacher)
    info = read_info(teacher_path)
    student_arch = cfg.student or DEFAULT_STUDENT.get(info.arch)
    if student_arch is None:
        raise ConfigError(f"no default student for a {info.arch} teacher; pass --student (see 'dfkt list models')")
    MODELS.get(student_arch)
    dataset = _evaluation_data(cfg.data, info)
    run_dir = make_run_dir(out, f"distill-{cfg.method}", resume)
    engine = Engine(cfg.engine, run_dir)
    # Saved in the shape --config reads, with the preset already folded into params.
    resolved = cfg.model_copy(update={"preset": None, "params": method_cfg.model_dump(mode="json"),
                                      "teacher": str(teacher_path), "student": student_arch})
    teacher_net = engine.prepare(load_model(teacher_path)[0], trainable=False)
    student_net = build_model(student_arch, info.num_classes, info.in_channels, info.image_size)
    setup = DistillSetup(teacher_net, engine.prepare(student_net, trainable=True), info.num_classes,
                         info.in_channels, info.image_size, engine)
    runner = METHODS.get(cfg.method)(method_cfg, setup)
    test_x, test_y = _normalized(dataset.test_images, info), dataset.test_labels

    def test_acc(model) -> float:
        return evaluate_model(model, test_x, test_y, engine, info.num_classes)["accuracy"]

    run_config = {**_result_settings(cfg, engine), "student": student_arch, "data": dataset.name,
                  "method_params": method_cfg.model_dump(mode="json"), "teacher_sha256": model_sha256(teacher_path)}
    started = time.perf_counter()
    stages = runner.stages()
    result = engine.run(stages, runner, run_config, lambda: {"test_acc": test_acc(setup.student)},
                        cfg.eval_every, cfg.max_seconds, resume,
                        on_start=lambda: dump_yaml(resolved, run_dir / "config.yaml"))
    if result.stopped_by_budget and stages[-1].name not in result.seconds:
        engine.close()
        raise DfktError(f"the time budget ({cfg.max_seconds:g} s) ran out before the {stages[-1].name} stage "
                        f"began; continue with --resume --out {run_dir} and a larger --max-seconds")
    final = evaluate_model(setup.student, test_x, test_y, engine, info.num_classes)
    student_info = ModelInfo(student_arch, info.num_classes, info.in_channels, info.image_size,
                             info.mean, info.std, info.dataset)
    save_model(student_net, student_info, run_dir / "student.safetensors")
    images, histogram, confidence = _sample_grid(runner, teacher_net, info, run_dir / "samples.png")
    warnings = collapse_warnings(images, histogram, method_cfg)
    for warning in warnings:
        engine.metrics.write({"event": "warning", "message": warning})
    in_student = result.sections.get("synthesis", 0.0)  # synthesis interleaved with student steps
    curve = [{k: e[k] for k in ("step", "train_seconds", "test_acc")} for e in result.evaluations]
    summary: dict[str, Any] = {
        "method": cfg.method, "preset": cfg.preset, "dataset": dataset.name, "teacher": str(teacher_path),
        "student": student_arch, "teacher_acc": test_acc(teacher_net), "student_acc": final["accuracy"],
        "student_best_on_test_acc": max([e["test_acc"] for e in curve] + [final["accuracy"]]),
        "best_on_test_note": "oracle: picked on the test set, not a deployable selection",
        "student_per_class_acc": final["per_class"],
        "seconds": {"synthesis": sum(s for name, s in result.seconds.items() if name != "student") + in_student,
                    "student": result.seconds.get("student", 0.0) - in_student,
                    "total": sum(result.seconds.values()),
                    "wall": time.perf_counter() - started, "by_stage": result.seconds},
        "stopped_by_budget": result.stopped_by_budget,
        "warnings": warnings,
        "samples": {"class_histogram": histogram, "teacher_confidence": confidence, "grid": "samples.png"},
        "curve": curve,
    }
    engine.close()
    if cfg.references:
        temperature = cfg.reference.temperature or getattr(method_cfg, "temperature", None)
        training = cfg.reference.model_copy(update={"temperature": temperature})
        summary["references"] = train_references(cfg.engine, training, info, dataset, student_arch, teacher_net,
                                                 run_dir, resume)
    write_json(run_dir / "summary.json", summary)
    return summary


def _sample_grid(runner, teacher, info: ModelInfo, path: Path) -> tuple[torch.Tensor, list[int], float]:
    images = runner.samples(GRID_SAMPLES)
    with torch.no_grad(), runner.engine.autocast():
        probs = torch.softmax(teacher(images).float(), dim=1)
    confidence, predicted = probs.max(dim=1)
    histogram = save_class_grid(images, predicted, info.mean, info.std, info.num_classes, path)
    return images, histogram, confidence.mean().item()


def train_references(engine_cfg: EngineConfig, training: RealTrainingConfig, info: ModelInfo, dataset: ImageData,
                     student_arch: str, teacher: nn.Module, run_dir: Path, resume: bool) -> dict[str, Any]:
    """The two students reported beside every DFKD result: KD on real data, and trained on labels."""
    out: dict[str, Any] = {}
    train_x = _normalized(dataset.train_images, info)
    test_x = _normalized(dataset.test_images, info)
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


# -- evaluate ------------------------------------------------------------------------------------
def evaluate(target: str | Path, data: str | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix of a model file, or of a run folder's model,
    on the real test set. A run folder gets ``evaluation.json``."""
    path = model_path(target)
    model, info = load_model(path)
    dataset = _evaluation_data(DataConfig(name=data, root=data_root), info)
    engine = Engine(EngineConfig(progress=False))
    model = engine.prepare(model, trainable=False)
    result = {"model": str(path), "arch": info.arch, "dataset": dataset.name,
              **evaluate_model(model, _normalized(dataset.test_images, info), dataset.test_labels, engine,
                               info.num_classes)}
    if Path(target).is_dir():
        write_json(Path(target) / "evaluation.json", result)
    return result


def _target_images(target: DataConfig, info: ModelInfo) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """The images to adapt on and their labels (None when unlabelled): a folder of the user's
    images, or a dataset's test split (e.g. a shifted one, fmnist-c:rotate:3)."""
    folder = Path(target.name)
    if folder.is_dir():
        images, labels = load_image_folder(folder, info.in_channels, target.image_size)
        info.check_fits(info.num_classes if labels is None else max(info.num_classes, int(labels.max()) + 1),
                        images.shape[1], images.shape[2], f"target folder {folder}", size_key="target.image_size")
        return str(folder), images, labels
    if "/" in target.name or folder.exists():
        raise ConfigError(f"target folder {folder} does not exist (or is not a folder); name a folder of images "
                          "or a dataset such as fmnist-c:rotate:3")
    if ":" not in target.name:
        dataset = _evaluation_data(target, info, size_key="target.image_size")
        return dataset.name, dataset.test_images, dataset.test_labels
    # A shifted dataset: only its test split is needed, so only that split is corrupted.
    base_name, corruption, severity = parse_shift(target.name)
    base = _evaluation_data(target.model_copy(update={"name": base_name}), info, size_key="target.image_size")
    return (f"{base_name}-c:{corruption}:{severity}", corrupt(base.test_images, corruption, severity, seed=2),
            base.test_labels)


# -- adapt ---------------------------------------------------------------------------------------
def adapt(method: str | None = None, source: str | Path | None = None, target: str | None = None,
          preset: str | None = None, data_root: str | None = None, config: str | Path | dict | None = None,
          overrides: Sequence[str] = (), out: str | Path | None = None, resume: bool = False,
          max_seconds: float | None = None) -> dict[str, Any]:
    """Adapt a source model to an unlabelled target without the source data. Returns the summary.

    The target images (the test split of ``target``, e.g. ``fmnist-c:rotate:3``) are split in two
    fixed halves: the method adapts on the first; accuracy is reported on it (transductive; for
    online methods, of the predictions made as the stream went by) and on the second (inductive).
    Labels are used only to score.
    """
    raw = _layer(config, {"method": method, "source": str(source) if source else None, "preset": preset,
                          "max_seconds": max_seconds, "target.name": target, "target.root": data_root}, overrides)
    cfg = validate(AdaptRunConfig, raw)
    if not cfg.source:
        raise ConfigError("no source model given; pass --source FILE (a model.safetensors from 'dfkt train-source')")
    if not cfg.target.name:
        raise ConfigError("no target given; pass --target NAME, e.g. fmnist-c:rotate:3 (see 'dfkt list datasets')")
    method_cls = ADAPT_METHODS.get(cfg.method)
    method_cfg = _method_config(method_cls, cfg.method, cfg.preset, cfg.params)
    source_path = model_path(cfg.source)
    info = read_info(source_path)
    target_name, raw_images, labels = _target_images(cfg.target, info)
    images = _normalized(raw_images, info)
    if len(images) < 4:
        raise ConfigError(f"target {target_name} has {len(images)} image(s); adaptation needs at least 4 "
                          "(half to adapt on, half held out)")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.split_seed))
    adapted_half, held_out = order[: len(order) // 2], order[len(order) // 2:]
    run_dir = make_run_dir(out, f"adapt-{cfg.method}", resume)
    engine = Engine(cfg.engine, run_dir)
    resolved = cfg.model_copy(update={"preset": None, "params": method_cfg.model_dump(mode="json"),
                                      "source": str(source_path)})
    model = load_model(source_path)[0]
    source_model = engine.prepare(load_model(source_path)[0], trainable=False)
    setup = AdaptSetup(engine.prepare(model, trainable=True), engine.to_device(images[adapted_half]), engine)
    try:
        runner = method_cls(method_cfg, setup)
    except DfktError:
        engine.close()
        raise

    def accuracy(net: nn.Module, index: torch.Tensor) -> float | None:
        if labels is None:  # an unlabelled folder: nothing to score
            return None
        return evaluate_model(net, images[index], labels[index], engine, info.num_classes)["accuracy"]

    run_config = {"method": cfg.method, "method_params": method_cfg.model_dump(mode="json"), "target": target_name,
                  "split_seed": cfg.split_seed, "source_sha256": model_sha256(source_path), **engine.fingerprint()}
    started = time.perf_counter()
    on_eval = None if labels is None else lambda: {"adapted_acc": accuracy(setup.model, adapted_half)}
    result = engine.run(runner.stages(), runner, run_config, on_eval, cfg.eval_every, cfg.max_seconds, resume,
                        on_start=lambda: dump_yaml(resolved, run_dir / "config.yaml"))
    if runner.online:  # scored on the predictions made as the stream went by
        seen = runner.buffers["online_predictions"].cpu()
        complete = labels is not None and bool((seen >= 0).all())
        transductive = (seen == labels[adapted_half]).float().mean().item() if complete else None
    else:
        transductive = accuracy(setup.model, adapted_half)
    save_model(model, info, run_dir / "model.safetensors")
    summary = {"method": cfg.method, "online": runner.online, "source": str(source_path), "target": target_name,
               "images": {"adapted": len(adapted_half), "held_out": len(held_out)},
               "source_only": {"transductive": accuracy(source_model, adapted_half),
                               "inductive": accuracy(source_model, held_out)},
               "adapted": {"transductive": transductive, "inductive": accuracy(setup.model, held_out)},
               "seconds": {"adapt": sum(result.seconds.values()), "wall": time.perf_counter() - started},
               "stopped_by_budget": result.stopped_by_budget, "curve": result.evaluations}
    write_json(run_dir / "summary.json", summary)
    engine.close()
    return summary
