"""``dfkt distill``: data-free knowledge distillation of a teacher into a student."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dfkt.api import pipeline
from dfkt.api.common import evaluation_data, method_config, normalized, result_settings
from dfkt.api.pipeline import Outcome, Training
from dfkt.api.train import train_references
from dfkt.commands import DISTILL
from dfkt.config import DistillConfig
from dfkt.data import ImageData, load_dataset
from dfkt.data.augment import mirror_safe
from dfkt.dfkd.base import DistillSetup
from dfkt.diagnostics import bn_statistics_gap, bn_statistics_warning, collapse_warnings, feature_diversity
from dfkt.engine import Engine, RunResult
from dfkt.engine.distributed import gather_objects
from dfkt.errors import ConfigError, DfktError
from dfkt.models import build_model
from dfkt.models.files import ModelInfo, load_model, model_path, model_sha256, read_info
from dfkt.models.foreign import ForeignClassifier, foreign_kind, foreign_sha256, infer_info, load_foreign, own_network
from dfkt.models.slicing import init_from_teacher, leading_slice_state
from dfkt.registry import METHODS, MODELS
from dfkt.report.grid import save_class_grid
from dfkt.selection import VALIDATION_IMAGES, TeacherAgreementSelection
from dfkt.supervised import evaluate_model

# The half-width student paired with each teacher in the papers.
DEFAULT_STUDENT = {
    "lenet5": "lenet5_half",
    "digits_cnn": "digits_cnn_half",
    "resnet34": "resnet18",
    "wrn40_2": "wrn16_1",
    "wrn16_2": "wrn16_1",
}
GRID_SAMPLES = 500  # at 32x32; fewer for larger images (memory), never under 50


def resolve_distill_config(
    *args: Any, config: str | Path | dict | None = None, overrides: Sequence[str] = (), **settings: Any
) -> tuple[DistillConfig, Any]:
    """The validated run config and the method's own validated config (preset <- params), from the
    arguments ``distill`` takes."""
    cfg = DISTILL.resolve(args, settings, config, overrides)
    if not cfg.teacher:
        raise ConfigError(
            "no teacher given; pass --teacher FILE (a model.safetensors from 'dfkt train-teacher', a "
            "TorchScript file), or torchvision:NAME or module:function with --teacher-weights FILE"
        )
    return cfg, method_config(METHODS.get(cfg.method), cfg.method, cfg.preset, cfg.params)


def distill(
    *args: Any,
    config: str | Path | dict | None = None,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    resume: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """Distil a teacher into a student without its training data. Returns the summary.

    The settings are those of ``dfkt distill --help``, by keyword (``max_seconds=60``; a section as a
    mapping, e.g. ``engine={"seed": 2}``) or the first ones by position: method, teacher, student, preset.
    They resolve in layers: defaults <- ``config`` (a YAML file or a dict) <- settings <- ``overrides``
    (``"params.gen_lr=1e-3"``). The run folder is ``out``; ``resume`` continues the run in it.
    """
    cfg, method_cfg = resolve_distill_config(*args, config=config, overrides=overrides, **settings)
    return pipeline.run(Distillation(cfg, method_cfg, resume), out, resume)


def student_start(setting: str, student_arch: str, info: ModelInfo, teacher: torch.nn.Module) -> str:
    """``random`` or ``teacher``: how the student starts. ``teacher`` is checked when the job is made,
    before any folder is written; ``auto`` starts from the teacher when the student is the teacher with
    fewer channels, else at random."""
    if setting == "random":
        return setting
    try:
        leading_slice_state(
            build_model(student_arch, info.num_classes, info.in_channels, info.image_size), own_network(teacher)
        )
    except ConfigError:
        if setting == "teacher":
            raise
        return "random"
    return "teacher"


class Distillation:
    """``dfkt distill`` as a job of the run pipeline. Made before anything is written: it loads the
    teacher and checks the student and the data."""

    def __init__(self, cfg: DistillConfig, method_cfg: Any, resume: bool):
        loaded = load_teacher(cfg)
        info = loaded.info
        student_arch = cfg.student or DEFAULT_STUDENT.get(info.arch)
        if student_arch is None:
            raise ConfigError(f"no default student for a {info.arch} teacher; pass --student (see 'dfkt list models')")
        MODELS.get(student_arch)
        if METHODS.get(cfg.method).needs_teacher_features and isinstance(loaded.net, ForeignClassifier):
            loaded.net.require_features()
        if cfg.references and Path(loaded.dataset.name).is_dir():
            raise ConfigError(
                f"--references trains students on real training images and {loaded.dataset.name} is "
                "a folder of test images; drop --references or pass a dataset with a train split"
            )
        self.cfg, self.method_cfg, self.resume, self.loaded = cfg, method_cfg, resume, loaded
        self.kind, self.engine_config = f"distill-{cfg.method}", cfg.engine
        # Saved in the shape --config reads, with the preset already folded into params.
        self.resolved = cfg.model_copy(
            update={
                "preset": None,
                "params": method_cfg.model_dump(mode="json"),
                "teacher": loaded.name,
                "student": student_arch,
            }
        )
        self.student_info = ModelInfo(
            student_arch, info.num_classes, info.in_channels, info.image_size, info.mean, info.std, info.dataset
        )
        self.student_start = student_start(method_cfg.student_init, student_arch, info, loaded.net)

    def start(self, engine: Engine) -> Training:
        cfg, loaded, info = self.cfg, self.loaded, self.loaded.info
        self.teacher = engine.prepare(loaded.net, trainable=False)
        self.student = build_model(self.student_info.arch, info.num_classes, info.in_channels, info.image_size)
        teacher_channels, wanted = None, self.method_cfg.student_channels
        if self.student_start == "teacher":
            # A fixed input on which the ranked teacher must compute what the teacher does (not the run's stream).
            example = torch.randn(
                8, info.in_channels, info.image_size, info.image_size, generator=torch.Generator().manual_seed(0)
            )
            teacher_channels = init_from_teacher(self.student, own_network(loaded.net), wanted, example)
            if wanted != "leading" and teacher_channels is None:
                engine.metrics.write(
                    {
                        "event": f"params.student_channels={wanted} ranks the channels of a teacher whose convolution "
                        "and linear layers form a chain, each feeding only the next; this teacher's do not (or its "
                        "reordered copy did not compute the same outputs), so the student keeps the leading channels"
                    }
                )
        self.student_channels = "leading" if teacher_channels is None else wanted
        self.setup = DistillSetup(
            self.teacher,
            engine.prepare(self.student, trainable=True),
            info.num_classes,
            info.in_channels,
            info.image_size,
            engine,
            tuple(info.mean),
            tuple(info.std),
            mirror_safe(info.dataset),
            self.student_start,
            teacher_channels or {},
        )
        self.runner = METHODS.get(cfg.method)(self.method_cfg, self.setup)
        self.evaluated = self.runner.evaluated_student()  # the student, or the average of its weights
        self.selection = TeacherAgreementSelection(
            self.runner, self.evaluated, self.teacher, engine, self.runner.validation_samples
        )
        self.test_images = normalized(loaded.dataset.test_images, info)
        settings = {
            **result_settings(cfg, engine),
            "student": self.student_info.arch,
            "data": loaded.dataset.name,
            "method_params": self.method_cfg.model_dump(mode="json"),
            "teacher_sha256": loaded.sha256,
        }
        self.scaling = engine.scaling({k: v for k, v in self.method_cfg.model_dump().items() if k.endswith("batch")})
        self.started = time.perf_counter()
        self.stages = self.runner.stages()
        return Training(
            self.runner,
            self.stages,
            settings,
            lambda: {
                "test_acc": self.test_acc(engine, self.evaluated),
                "teacher_agreement": self.selection.update(),
            },
            cfg.eval_every,
            cfg.eval_seconds,
            cfg.max_seconds,
        )

    def evaluate(self, engine: Engine, model: torch.nn.Module) -> dict[str, Any]:
        return evaluate_model(
            model, self.test_images, self.loaded.dataset.test_labels, engine, self.loaded.info.num_classes
        )

    def test_acc(self, engine: Engine, model: torch.nn.Module) -> float:
        return self.evaluate(engine, model)["accuracy"]

    def summarize(self, engine: Engine, result: RunResult) -> Outcome:
        cfg, loaded, selection = self.cfg, self.loaded, self.selection
        if result.stopped_by_budget and self.stages[-1].name not in result.seconds:
            raise DfktError(
                f"the time budget ({cfg.max_seconds:g} s) ran out before the {self.stages[-1].name} "
                f"stage began; continue with --resume --out {engine.run_dir} and a larger --max-seconds"
            )
        final = self.evaluate(engine, self.evaluated)
        selected = selection.chosen
        report = self.runner.report()
        samples, warnings = _sample_diagnostics(
            engine,
            self.runner.samples,
            self.teacher,
            loaded.info,
            cfg.method,
            self.method_cfg,
            engine.run_dir / "samples.png",
        )
        in_student = result.sections.get("synthesis", 0.0)  # synthesis interleaved with student steps
        curve = [
            {k: e.get(k) for k in ("step", "train_seconds", "test_acc", "teacher_agreement")}
            for e in result.evaluations
        ]
        summary: dict[str, Any] = {
            "method": cfg.method,
            "preset": cfg.preset,
            "dataset": loaded.dataset.name,
            "teacher": loaded.name,
            "student": self.student_info.arch,
            "student_init": self.student_start,
            "student_channels": self.student_channels if self.student_start == "teacher" else None,
            "feature_hint_layers": self.runner.student_trainer.hinted_layers,
            "teacher_acc": self.test_acc(engine, self.teacher),
            "student_acc": final["accuracy"],
            "student_best_on_test_acc": max([e["test_acc"] for e in curve] + [final["accuracy"]]),
            "best_on_test_note": "oracle: picked on the test set, not a deployable selection",
            "student_selected_acc": None if selected is None else self.test_acc(engine, selected),
            "selection": {
                "criterion": f"agreement with the teacher on {VALIDATION_IMAGES} held-out synthetic "
                "images (no labels); student_selected.safetensors",
                "step": None if selected is None else curve[selection.chosen_at]["step"],
                "teacher_agreement": selection.agreement,
            },
            "student_per_class_acc": final["per_class"],
            "seconds": {
                "synthesis": sum(s for name, s in result.seconds.items() if name != "student") + in_student,
                "student": result.seconds.get("student", 0.0) - in_student,
                "total": sum(result.seconds.values()),
                "evaluation": result.evaluation_seconds,  # test set and teacher agreement, not training
                "wall": time.perf_counter() - self.started,
                "by_stage": result.seconds,
            },
            "generator_multiply_adds_per_image": report.generator_multiply_adds_per_image,
            "stopped_by_budget": result.stopped_by_budget,
            "warnings": warnings,
            "samples": samples,
            "curve": curve,
            "distributed": {
                **self.scaling,
                "replica_sha256": result.replica_sha256,
                "first_batch_sha256": gather_objects(report.first_batch_sha256),
            },
        }
        if cfg.references:
            temperature = cfg.reference.temperature or getattr(self.method_cfg, "temperature", None)
            training = cfg.reference.model_copy(update={"temperature": temperature})
            summary["references"] = train_references(
                cfg.engine,
                training,
                loaded.info,
                loaded.dataset,
                self.student_info.arch,
                self.teacher,
                engine.run_dir,
                self.resume,
            )
        weights = {"student.safetensors": (self.evaluated, self.student_info)}
        if selected is not None:
            weights["student_selected.safetensors"] = (selected, self.student_info)
        return Outcome(summary, weights)


@dataclass(frozen=True)
class Teacher:
    net: torch.nn.Module
    info: ModelInfo
    sha256: str  # its identity for resume checks
    dataset: ImageData  # the test data that measures it
    name: str  # the model file, or the foreign teacher's spec


def load_teacher(cfg: DistillConfig) -> Teacher:
    """The teacher, a dfkt model file or a foreign one (``dfkt.models.foreign``), and its test data."""
    kind = foreign_kind(cfg.teacher)
    if kind is None:
        path = model_path(cfg.teacher)
        info = read_info(path)
        return Teacher(load_model(path)[0], info, model_sha256(path), evaluation_data(cfg.data, info), str(path))
    if not cfg.data.name:
        raise ConfigError(
            f"a {kind} teacher does not record its dataset; pass --data NAME, the dataset whose "
            "test split measures it (see 'dfkt list datasets')"
        )
    net = ForeignClassifier(load_foreign(cfg.teacher, kind, cfg.teacher_weights, cfg.teacher_info), kind)
    size = cfg.data.image_size or cfg.teacher_info.image_size
    dataset = load_dataset(cfg.data.name, cfg.data.root, cfg.data.download, size)
    info = infer_info(net, cfg.teacher, cfg.teacher_info, dataset)
    info.check_fits(dataset.num_classes, dataset.channels, dataset.image_size, f"dataset {dataset.name}")
    return Teacher(net, info, foreign_sha256(cfg.teacher, cfg.teacher_weights), dataset, cfg.teacher)


def _sample_diagnostics(
    engine: Engine,
    samples: Callable[[int], torch.Tensor],
    teacher,
    info: ModelInfo,
    method: str,
    method_cfg,
    grid: Path,
) -> tuple[dict[str, Any], list[str]]:
    """The method's synthetic ``samples`` judged by the teacher: class histogram, mean confidence, feature
    diversity and collapse warnings (also logged), and their grid PNG (rank 0 writes it)."""
    images = samples(max(50, min(GRID_SAMPLES, GRID_SAMPLES * 32 * 32 // info.image_size**2)))
    with torch.no_grad(), engine.autocast():
        probs = torch.softmax(teacher(images).float(), dim=1)
    confidence, predicted = probs.max(dim=1)
    if engine.is_main:
        save_class_grid(images, predicted, info.mean, info.std, info.num_classes, grid)
    histogram = torch.bincount(predicted.cpu(), minlength=info.num_classes).tolist()
    with engine.autocast():
        diversity = feature_diversity(teacher, images, predicted)
    with engine.autocast():
        gap = bn_statistics_gap(teacher, images)
    warnings = collapse_warnings(
        images, histogram, method, method_cfg, diversity, gap is not None
    ) + bn_statistics_warning(gap, method, method_cfg)
    for warning in warnings:
        engine.metrics.write({"event": "warning", "message": warning})
    return {
        "class_histogram": histogram,
        "teacher_confidence": confidence.mean().item(),
        "diversity": diversity,
        "bn_statistics_gap": gap,
        "grid": grid.name,
    }, warnings
