"""``dfkt adapt``: source-free domain adaptation of a source model to an unlabelled target."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from dfkt.api import pipeline
from dfkt.api.common import method_config, normalized
from dfkt.api.pipeline import Outcome, Training
from dfkt.commands import ADAPT
from dfkt.config import AdaptRunConfig, DataConfig
from dfkt.data import ImageData, fit_size, load_dataset
from dfkt.data.folder import load_image_folder
from dfkt.data.shifted import parse_shift
from dfkt.engine import Engine, RunResult
from dfkt.errors import ConfigError
from dfkt.models.files import ModelInfo, load_model, model_path, model_sha256, read_info
from dfkt.registry import ADAPT_METHODS
from dfkt.selection import TARGET_SCORES, TargetScoreSelection
from dfkt.sfda.agreement import agrees_only_by_chance, chance_corrected_agreement
from dfkt.sfda.base import AdaptSetup
from dfkt.sfda.interpolation import SHARE_RULES, interpolate_with_source, reestimate_batchnorm, share_rule
from dfkt.supervised import evaluate_model, predict_classes


def target_halves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the half a method adapts on and the half held out: a fixed seeded split."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n // 2], order[n // 2 :]


class TargetImages(NamedTuple):
    name: str
    images: torch.Tensor  # uint8 N×C×H×W at the source model's image size
    labels: torch.Tensor | None  # None when unlabelled
    resized: dict[str, Any] | None  # {"from": px, "to": px} when brought to the source model's size, else None


def _target_dataset(target: DataConfig, name: str, info: ModelInfo) -> tuple[ImageData, dict[str, Any] | None]:
    """Dataset ``name`` at the source model's image size. The model's own dataset loads at it
    directly; another loads at its own default size first and, when that differs (e.g. 8×8
    digits for a 32×32 model), again at the model's, the dataset's loader choosing how
    (resampling or padding). ``target.image_size`` set by the user is taken as it is."""
    own = name == info.dataset
    size = target.image_size or (info.image_size if own else None)
    dataset = load_dataset(name, target.root, target.download, size)
    resized = None
    if size is None and dataset.image_size != info.image_size:
        resized = {"from": dataset.image_size, "to": info.image_size}
        dataset = load_dataset(name, target.root, target.download, info.image_size)
    info.check_fits(
        dataset.num_classes, dataset.channels, dataset.image_size, f"dataset {dataset.name}", "target.image_size"
    )
    return dataset, resized


def target_images(target: DataConfig, info: ModelInfo) -> TargetImages:
    """The images to adapt on, at the source model's image size, and their labels: a folder of the
    user's images, or a dataset's test split (e.g. a shifted one, fmnist-c:rotate:3). Images of
    another size than the model's input are resized to it (``resized`` says from what), unless
    ``target.image_size`` is set; classes and channels must fit as they are."""
    folder = Path(target.name)
    if folder.is_dir():
        images, labels = load_image_folder(folder, info.in_channels, target.image_size)
        resized = None
        if target.image_size is None and images.shape[2] != info.image_size:
            resized = {"from": int(images.shape[2]), "to": info.image_size}
            images = fit_size(images, info.image_size, "resize")
        info.check_fits(
            info.num_classes if labels is None else max(info.num_classes, int(labels.max()) + 1),
            images.shape[1],
            images.shape[2],
            f"target folder {folder}",
            size_key="target.image_size",
        )
        return TargetImages(str(folder), images, labels, resized)
    if "/" in target.name or folder.exists():
        raise ConfigError(
            f"target folder {folder} does not exist (or is not a folder); name a folder of images "
            "or a dataset such as fmnist-c:rotate:3"
        )
    if ":" not in target.name:
        dataset, resized = _target_dataset(target, target.name, info)
        return TargetImages(dataset.name, dataset.test_images, dataset.test_labels, resized)
    # A shifted dataset: only its test split is needed, so only that split is corrupted (after resizing).
    shift = parse_shift(target.name)
    base, resized = _target_dataset(target, shift.base, info)
    return TargetImages(shift.name, shift.apply(base.test_images, seed=2), base.test_labels, resized)


def resolve_adapt_config(
    *args: Any, config: str | Path | dict | None = None, overrides: Sequence[str] = (), **settings: Any
) -> tuple[AdaptRunConfig, Any]:
    """The validated run config and the method's own validated config (preset <- params), from the
    arguments ``adapt`` takes."""
    cfg = ADAPT.resolve(args, settings, config, overrides)
    if not cfg.source:
        raise ConfigError("no source model given; pass --source FILE (a model.safetensors from 'dfkt train-source')")
    if not cfg.target.name:
        raise ConfigError("no target given; pass --target NAME, e.g. fmnist-c:rotate:3 (see 'dfkt list datasets')")
    return cfg, method_config(ADAPT_METHODS.get(cfg.method), cfg.method, cfg.preset, cfg.params)


def adapt(
    *args: Any,
    config: str | Path | dict | None = None,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    resume: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """Adapt a source model to an unlabelled target without the source data. Returns the summary.

    The settings are those of ``dfkt adapt --help``, by keyword (``max_seconds=60``; a section as a
    mapping, e.g. ``params={"epochs": 2}``) or the first ones by position: method, source, target. They
    resolve in layers: defaults <- ``config`` (a YAML file or a dict) <- settings <- ``overrides``
    (``"engine.seed=2"``). The run folder is ``out``; ``resume`` continues the run in it.

    The target images (the test split of ``target``, e.g. ``fmnist-c:rotate:3``, brought to the source
    model's image size) are split in two fixed halves: the method adapts on the first; accuracy is
    reported on it (transductive; for online methods, of the predictions made as the stream went by)
    and on the second (inductive). Labels are used only to score.

    At every evaluation (by default after each epoch) the adapted model gets a label-free score on the
    adapted half (``selection_score``: by default ``dfkt.selection.mixval_score``); the best-scoring weights are
    written as ``model_selected.safetensors`` beside the final ``model.safetensors``. Warnings (in
    ``summary["warnings"]``) say when the final or the selected model scores below the source model, and
    when either agrees with the source model's predictions no more than chance (a collapse the score
    can miss; ``summary["agreement_with_source"]``).
    """
    cfg, method_cfg = resolve_adapt_config(*args, config=config, overrides=overrides, **settings)
    return pipeline.run(Adaptation(cfg, method_cfg), out, resume)


class Adaptation:
    """``dfkt adapt`` as a job of the run pipeline. Made before anything is written: it reads the
    source model's description and loads and splits the target images."""

    def __init__(self, cfg: AdaptRunConfig, method_cfg: Any):
        self.source_path = model_path(cfg.source)
        self.info = read_info(self.source_path)
        self.target_name, raw_images, self.labels, self.resized = target_images(cfg.target, self.info)
        self.images = normalized(raw_images, self.info)
        if len(self.images) < 4:
            raise ConfigError(
                f"target {self.target_name} has {len(self.images)} image(s); adaptation needs at "
                "least 4 (half to adapt on, half held out)"
            )
        self.adapted_half, self.held_out = target_halves(len(self.images), cfg.split_seed)
        self.cfg, self.method_cfg = cfg, method_cfg
        self.kind, self.engine_config = f"adapt-{cfg.method}", cfg.engine
        self.resolved = cfg.model_copy(
            update={"preset": None, "params": method_cfg.model_dump(mode="json"), "source": str(self.source_path)}
        )

    def start(self, engine: Engine) -> Training:
        cfg = self.cfg
        self.model = load_model(self.source_path)[0]
        self.source_model = engine.prepare(load_model(self.source_path)[0], trainable=False)
        self.setup = AdaptSetup(
            engine.prepare(self.model, trainable=True), engine.to_device(self.images[self.adapted_half]), engine
        )
        self.runner = ADAPT_METHODS.get(cfg.method)(self.method_cfg, self.setup)
        self.target_score = TARGET_SCORES[cfg.selection_score]
        self.selection = TargetScoreSelection(self.runner, self.model, self.setup.images, engine, self.target_score)
        self.source_score = self.selection.score(self.source_model)
        self.steps_per_epoch = self.runner.steps_per_epoch

        def on_eval() -> dict[str, Any]:
            # The engine's first point is the stage's start: the source model itself, scored for the curve
            # but not a candidate (the warning compares the candidates with the source).
            at_start = engine.stage_progress == 0.0
            score = self.selection.score(self.setup.model) if at_start else self.selection.update()
            return {
                "label_free_score": score,
                "adapted_acc": self.accuracy(engine, self.setup.model, self.adapted_half),
            }

        settings = {
            "method": cfg.method,
            "method_params": self.method_cfg.model_dump(mode="json"),
            "target": self.target_name,
            "split_seed": cfg.split_seed,
            "selection_score": cfg.selection_score,  # a resume must not compare scores of two kinds
            "source_sha256": model_sha256(self.source_path),
            **engine.fingerprint(),
        }
        self.scaling = engine.scaling({"batch_size": self.method_cfg.batch_size})
        self.started = time.perf_counter()
        return Training(
            self.runner,
            self.runner.stages(),
            settings,
            on_eval,
            cfg.eval_every or self.steps_per_epoch,
            cfg.eval_seconds,
            cfg.max_seconds,
        )

    def accuracy(self, engine: Engine, net: nn.Module, index: torch.Tensor) -> float | None:
        if self.labels is None:  # an unlabelled folder: nothing to score
            return None
        return evaluate_model(net, self.images[index], self.labels[index], engine, self.info.num_classes)["accuracy"]

    def summarize(self, engine: Engine, result: RunResult) -> Outcome:
        selection, model, labels = self.selection, self.model, self.labels
        adapted_half, held_out = self.adapted_half, self.held_out
        scored = len(adapted_half)
        predictions = self.runner.report().stream_predictions
        if predictions is not None:  # an online method: scored on the predictions made as the stream went by
            seen = predictions >= 0
            scored = int(seen.sum())
            transductive = (
                None
                if labels is None or not seen.any()
                else ((predictions[seen] == labels[adapted_half][seen]).float().mean().item())
            )
        else:
            transductive = self.accuracy(engine, self.setup.model, adapted_half)
        curve = [{**e, "epoch": e["step"] / self.steps_per_epoch} for e in result.evaluations]
        final_score = curve[-1]["label_free_score"] if curve else selection.score(model)
        # No evaluation (source_only, or a budget spent before the first): the final weights are the choice.
        selected = model if selection.chosen is None else selection.chosen
        starts = sum(1 for e in curve if e["step"] == 0)  # scored, never chosen
        chosen = None if selection.chosen_at is None else curve[selection.chosen_at + starts]
        selected_score = final_score if chosen is None else selection.best_score
        setting = getattr(self.method_cfg, "source_share", 0.0)  # offline methods only
        reestimate = getattr(self.method_cfg, "reestimate_batchnorm", False)
        rule = share_rule(setting, self.source_model) if isinstance(setting, str) else None
        as_adapted, shares = None, {"setting": setting, "rule": rule, "final": 0.0, "selected": 0.0}
        source_classes = predict_classes(self.source_model, self.setup.images, engine)
        if setting or reestimate:
            as_adapted = {
                "adapted": {
                    "transductive": transductive,
                    "inductive": self.accuracy(engine, model, held_out),
                    "label_free_score": final_score,
                },
                "selected": {
                    "transductive": self.accuracy(engine, selected, adapted_half),
                    "inductive": self.accuracy(engine, selected, held_out),
                    "label_free_score": selected_score,
                },
            }
            for part, net in (("final", model), ("selected", selected)):
                shares[part] = (
                    SHARE_RULES[rule](source_classes, predict_classes(net, self.setup.images, engine))
                    if rule
                    else setting
                )
            model, selected = (
                interpolate_with_source(self.source_model, net, shares[part])
                for part, net in (("final", model), ("selected", selected))
            )
            if reestimate:
                for net in (model, selected):
                    reestimate_batchnorm(net, self.setup.images)
            transductive = self.accuracy(engine, model, adapted_half)  # offline methods only have a share
            final_score, selected_score = selection.score(model), selection.score(selected)
        agreement = {
            part: chance_corrected_agreement(
                source_classes, predict_classes(net, self.setup.images, engine), self.info.num_classes
            )
            for part, net in (("final", model), ("selected", selected))
        }
        summary = {
            "method": self.cfg.method,
            "online": self.runner.online,
            "source": str(self.source_path),
            "target": self.target_name,
            "target_resized": self.resized,
            "images": {"adapted": len(adapted_half), "scored_transductive": scored, "held_out": len(held_out)},
            "source_only": {
                "transductive": self.accuracy(engine, self.source_model, adapted_half),
                "inductive": self.accuracy(engine, self.source_model, held_out),
                "label_free_score": self.source_score,
            },
            "adapted": {
                "transductive": transductive,
                "inductive": self.accuracy(engine, model, held_out),
                "label_free_score": final_score,
            },
            "selected": {
                "transductive": self.accuracy(engine, selected, adapted_half),
                "inductive": self.accuracy(engine, selected, held_out),
                "label_free_score": selected_score,
                "step": None if chosen is None else chosen["step"],
                "epoch": None if chosen is None else chosen["epoch"],
            },
            "source_share": shares,
            "batchnorm_reestimated": reestimate,
            # Of the written weights, on the adapted half: κ near 0 means the source's predictions were discarded.
            "agreement_with_source": agreement,
            # The figures of the weights as adapting left them, when the written ones differ (source_share,
            # reestimate_batchnorm); None otherwise.
            "as_adapted": as_adapted,
            "selection": {
                "score": self.target_score.name,
                "criterion": self.target_score.criterion,
                "file": "model_selected.safetensors",
                "note": "the evaluation (by default each epoch) with the highest score; the final "
                "weights when there was none",
            },
            "warnings": adaptation_warnings(
                self.target_score.name, self.source_score, {"final": final_score, "selected": selected_score}, agreement
            ),
            "seconds": {
                "adapt": sum(result.seconds.values()),
                "evaluation": result.evaluation_seconds,
                "wall": time.perf_counter() - self.started,
            },
            "stopped_by_budget": result.stopped_by_budget,
            "curve": curve,
            "distributed": {**self.scaling, "replica_sha256": result.replica_sha256},
        }
        for warning in summary["warnings"]:
            engine.metrics.write({"event": "warning", "message": warning})
        return Outcome(
            summary, {"model.safetensors": (model, self.info), "model_selected.safetensors": (selected, self.info)}
        )


def adaptation_warnings(
    score_name: str, source_score: float, scores: dict[str, float], agreement: dict[str, dict[str, float]]
) -> list[str]:
    """Up to two lines, for the final and the selected model (``scores`` and ``agreement`` map "final" and
    "selected" to their label-free score and :func:`chance_corrected_agreement`'s figures): one when the
    score says a model is worse than the source model, one when a model agrees with the source model no
    more than chance. Both end with the same advice: the written model that passes both checks, or the
    source model when neither does."""
    worse = [part for part in ("final", "selected") if scores[part] < source_score]
    by_chance = [part for part in ("final", "selected") if agrees_only_by_chance(agreement[part])]
    if not worse and not by_chance:
        return []
    passing = [part for part in ("final", "selected") if part not in worse and part not in by_chance]
    if not passing:
        advice = "keep the source model, or try another method or setting"
    elif passing[0] == "selected":  # the final model failed a check
        advice = "model_selected.safetensors passes both checks: use it"
    else:
        advice = "the final weights (model.safetensors) pass both checks: use them"
    lines = []
    if worse:
        figures = ", ".join(f"{part} {scores[part]:.3f}" for part in worse)
        which = "adapting made the model" if len(worse) == 2 else f"the {worse[0]} adapted model is"
        lines.append(
            f"the label-free score ({score_name}) says {which} worse than the source model "
            f"(source {source_score:.3f}, {figures}); {advice}"
        )
    if by_chance:
        figures = "; ".join(
            f"{part}: {agreement[part]['agreement']:.0%} of the images in the source's class, "
            f"{agreement[part]['chance']:.0%} expected by chance, Cohen's kappa {agreement[part]['kappa']:.2f}"
            for part in by_chance
        )
        which = "the final and the selected model agree" if len(by_chance) == 2 else f"the {by_chance[0]} model agrees"
        lines.append(
            f"{which} with the source model on the target no more than chance would ({figures}): adapting "
            f"discarded what the source model predicted, which means a collapse or a source model with little "
            f"signal on this target; {advice}"
        )
    return lines
