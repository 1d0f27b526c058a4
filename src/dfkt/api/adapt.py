"""``dfkt adapt``: source-free domain adaptation of a source model to an unlabelled target."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

from dfkt.api.common import method_config, normalized
from dfkt.commands import ADAPT
from dfkt.config import AdaptRunConfig, DataConfig, dump_yaml
from dfkt.data import ImageData, fit_size, load_dataset
from dfkt.data.folder import load_image_folder
from dfkt.data.shifted import parse_shift
from dfkt.engine import Engine
from dfkt.errors import ConfigError, DfktError
from dfkt.models.files import ModelInfo, model_sha256, load_model, model_path, read_info, save_model
from dfkt.registry import ADAPT_METHODS
from dfkt.runs import make_run_dir, write_json
from dfkt.selection import SCORE_CRITERION, SCORE_NAME, TargetScoreSelection
from dfkt.sfda.base import AdaptSetup
from dfkt.supervised import evaluate_model


def target_halves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the half a method adapts on and the half held out: a fixed seeded split."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n // 2], order[n // 2:]


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
    info.check_fits(dataset.num_classes, dataset.channels, dataset.image_size, f"dataset {dataset.name}",
                    "target.image_size")
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
        info.check_fits(info.num_classes if labels is None else max(info.num_classes, int(labels.max()) + 1),
                        images.shape[1], images.shape[2], f"target folder {folder}", size_key="target.image_size")
        return TargetImages(str(folder), images, labels, resized)
    if "/" in target.name or folder.exists():
        raise ConfigError(f"target folder {folder} does not exist (or is not a folder); name a folder of images "
                          "or a dataset such as fmnist-c:rotate:3")
    if ":" not in target.name:
        dataset, resized = _target_dataset(target, target.name, info)
        return TargetImages(dataset.name, dataset.test_images, dataset.test_labels, resized)
    # A shifted dataset: only its test split is needed, so only that split is corrupted (after resizing).
    shift = parse_shift(target.name)
    base, resized = _target_dataset(target, shift.base, info)
    return TargetImages(shift.name, shift.apply(base.test_images, seed=2), base.test_labels, resized)


def resolve_adapt_config(*args: Any, config: str | Path | dict | None = None, overrides: Sequence[str] = (),
                         **settings: Any) -> tuple[AdaptRunConfig, Any]:
    """The validated run config and the method's own validated config (preset <- params), from the
    arguments ``adapt`` takes."""
    cfg = ADAPT.resolve(args, settings, config, overrides)
    if not cfg.source:
        raise ConfigError("no source model given; pass --source FILE (a model.safetensors from 'dfkt train-source')")
    if not cfg.target.name:
        raise ConfigError("no target given; pass --target NAME, e.g. fmnist-c:rotate:3 (see 'dfkt list datasets')")
    return cfg, method_config(ADAPT_METHODS.get(cfg.method), cfg.method, cfg.preset, cfg.params)


def adapt(*args: Any, config: str | Path | dict | None = None, overrides: Sequence[str] = (),
          out: str | Path | None = None, resume: bool = False, **settings: Any) -> dict[str, Any]:
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
    adapted half (``dfkt.selection.information_maximization_score``); the best-scoring weights are
    written as ``model_selected.safetensors`` beside the final ``model.safetensors``, and a warning
    (in ``summary["warnings"]``) says when the final or the selected model scores below the source
    model.
    """
    cfg, method_cfg = resolve_adapt_config(*args, config=config, overrides=overrides, **settings)
    method_cls = ADAPT_METHODS.get(cfg.method)
    source_path = model_path(cfg.source)
    info = read_info(source_path)
    target_name, raw_images, labels, resized = target_images(cfg.target, info)
    images = normalized(raw_images, info)
    if len(images) < 4:
        raise ConfigError(f"target {target_name} has {len(images)} image(s); adaptation needs at least 4 "
                          "(half to adapt on, half held out)")
    adapted_half, held_out = target_halves(len(images), cfg.split_seed)
    run_dir = make_run_dir(out, f"adapt-{cfg.method}", resume)
    engine = Engine(cfg.engine, run_dir)
    run_dir = engine.run_dir
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
    selection = TargetScoreSelection(runner, model, setup.images, engine)
    source_score = selection.score(source_model)
    steps_per_epoch = runner.batches.steps_per_epoch

    def accuracy(net: nn.Module, index: torch.Tensor) -> float | None:
        if labels is None:  # an unlabelled folder: nothing to score
            return None
        return evaluate_model(net, images[index], labels[index], engine, info.num_classes)["accuracy"]

    def on_eval() -> dict[str, Any]:
        # The engine's first point is the stage's start: the source model itself, scored for the curve but
        # not a candidate (the warning compares the candidates with the source).
        at_start = engine.stage_progress == 0.0
        score = selection.score(setup.model) if at_start else selection.update()
        return {"label_free_score": score, "adapted_acc": accuracy(setup.model, adapted_half)}

    run_config = {"method": cfg.method, "method_params": method_cfg.model_dump(mode="json"), "target": target_name,
                  "split_seed": cfg.split_seed, "source_sha256": model_sha256(source_path), **engine.fingerprint()}
    scaling = engine.scaling({"batch_size": method_cfg.batch_size})
    started = time.perf_counter()
    result = engine.run(runner.stages(), runner, run_config, on_eval, cfg.eval_every or steps_per_epoch,
                        cfg.max_seconds, resume, on_start=lambda: dump_yaml(resolved, run_dir / "config.yaml"),
                        eval_seconds=cfg.eval_seconds)
    scored = len(adapted_half)
    if runner.online:  # scored on the predictions made as the stream went by
        # Several processes split the stream evenly, so up to world size - 1 images go unseen.
        predictions = runner.buffers["online_predictions"].cpu()
        seen = predictions >= 0
        scored = int(seen.sum())
        transductive = None if labels is None or not seen.any() else (
            (predictions[seen] == labels[adapted_half][seen]).float().mean().item())
    else:
        transductive = accuracy(setup.model, adapted_half)
    curve = [{**e, "epoch": e["step"] / steps_per_epoch} for e in result.evaluations]
    final_score = curve[-1]["label_free_score"] if curve else selection.score(model)
    # No evaluation (source_only, or a budget spent before the first): the final weights are the choice.
    selected = model if selection.chosen is None else selection.chosen
    starts = sum(1 for e in curve if e["step"] == 0)  # scored, never chosen
    chosen = None if selection.chosen_at is None else curve[selection.chosen_at + starts]
    summary = {"method": cfg.method, "online": runner.online, "source": str(source_path), "target": target_name,
               "target_resized": resized,
               "images": {"adapted": len(adapted_half), "scored_transductive": scored, "held_out": len(held_out)},
               "source_only": {"transductive": accuracy(source_model, adapted_half),
                               "inductive": accuracy(source_model, held_out), "label_free_score": source_score},
               "adapted": {"transductive": transductive, "inductive": accuracy(setup.model, held_out),
                           "label_free_score": final_score},
               "selected": {"transductive": accuracy(selected, adapted_half),
                            "inductive": accuracy(selected, held_out),
                            "label_free_score": final_score if chosen is None else selection.best_score,
                            "step": None if chosen is None else chosen["step"],
                            "epoch": None if chosen is None else chosen["epoch"]},
               "selection": {"score": SCORE_NAME, "criterion": SCORE_CRITERION,
                             "file": "model_selected.safetensors",
                             "note": "the evaluation (by default each epoch) with the highest score; the final "
                                     "weights when there was none"},
               "warnings": adaptation_warnings(source_score, final_score,
                                               final_score if chosen is None else selection.best_score),
               "seconds": {"adapt": sum(result.seconds.values()), "evaluation": result.evaluation_seconds,
                           "wall": time.perf_counter() - started},
               "stopped_by_budget": result.stopped_by_budget, "curve": curve,
               "distributed": {**scaling, "replica_sha256": result.replica_sha256}}
    for warning in summary["warnings"]:
        engine.metrics.write({"event": "warning", "message": warning})
    if engine.is_main:
        save_model(model, info, run_dir / "model.safetensors")
        save_model(selected, info, run_dir / "model_selected.safetensors")
        write_json(run_dir / "summary.json", summary)
    engine.close()
    return summary


def adaptation_warnings(source_score: float, final_score: float, selected_score: float) -> list[str]:
    """At most one line: when the label-free score says the adapted model (final, or also the selected
    one) is worse than the source model."""
    if final_score >= source_score and selected_score >= source_score:
        return []
    if selected_score < source_score:
        return [f"the label-free score ({SCORE_NAME}) says adapting made the model worse than the source model "
                f"(source {source_score:.3f}, final {final_score:.3f}, best epoch {selected_score:.3f}): keep the "
                "source model, or try another method or setting"]
    return [f"the label-free score ({SCORE_NAME}) says the final adapted model is worse than the source model "
            f"(source {source_score:.3f}, final {final_score:.3f}); model_selected.safetensors scores "
            f"{selected_score:.3f}: use it"]
