"""``dfkt adapt``: source-free domain adaptation of a source model to an unlabelled target."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dfkt.api.common import evaluation_data, layered, method_config, normalized
from dfkt.config import AdaptRunConfig, DataConfig, dump_yaml, validate
from dfkt.data.corruptions import corrupt
from dfkt.data.folder import load_image_folder
from dfkt.data.shifted import parse_shift
from dfkt.engine import Engine
from dfkt.errors import ConfigError, DfktError
from dfkt.models.files import ModelInfo, model_sha256, load_model, model_path, read_info, save_model
from dfkt.registry import ADAPT_METHODS
from dfkt.runs import make_run_dir, write_json
from dfkt.sfda.base import AdaptSetup
from dfkt.supervised import evaluate_model


def target_halves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the half a method adapts on and the half held out: a fixed seeded split."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n // 2], order[n // 2:]


def target_images(target: DataConfig, info: ModelInfo) -> tuple[str, torch.Tensor, torch.Tensor | None]:
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
        dataset = evaluation_data(target, info, size_key="target.image_size")
        return dataset.name, dataset.test_images, dataset.test_labels
    # A shifted dataset: only its test split is needed, so only that split is corrupted.
    base_name, corruption, severity = parse_shift(target.name)
    base = evaluation_data(target.model_copy(update={"name": base_name}), info, size_key="target.image_size")
    return (f"{base_name}-c:{corruption}:{severity}", corrupt(base.test_images, corruption, severity, seed=2),
            base.test_labels)


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
    raw = layered(config, {"method": method, "source": str(source) if source else None, "preset": preset,
                          "max_seconds": max_seconds, "target.name": target, "target.root": data_root}, overrides)
    cfg = validate(AdaptRunConfig, raw)
    if not cfg.source:
        raise ConfigError("no source model given; pass --source FILE (a model.safetensors from 'dfkt train-source')")
    if not cfg.target.name:
        raise ConfigError("no target given; pass --target NAME, e.g. fmnist-c:rotate:3 (see 'dfkt list datasets')")
    method_cls = ADAPT_METHODS.get(cfg.method)
    method_cfg = method_config(method_cls, cfg.method, cfg.preset, cfg.params)
    source_path = model_path(cfg.source)
    info = read_info(source_path)
    target_name, raw_images, labels = target_images(cfg.target, info)
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

    def accuracy(net: nn.Module, index: torch.Tensor) -> float | None:
        if labels is None:  # an unlabelled folder: nothing to score
            return None
        return evaluate_model(net, images[index], labels[index], engine, info.num_classes)["accuracy"]

    run_config = {"method": cfg.method, "method_params": method_cfg.model_dump(mode="json"), "target": target_name,
                  "split_seed": cfg.split_seed, "source_sha256": model_sha256(source_path), **engine.fingerprint()}
    scaling = engine.scaling({"batch_size": method_cfg.batch_size})
    started = time.perf_counter()
    on_eval = None if labels is None else lambda: {"adapted_acc": accuracy(setup.model, adapted_half)}
    result = engine.run(runner.stages(), runner, run_config, on_eval, cfg.eval_every, cfg.max_seconds, resume,
                        on_start=lambda: dump_yaml(resolved, run_dir / "config.yaml"), eval_seconds=cfg.eval_seconds)
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
    summary = {"method": cfg.method, "online": runner.online, "source": str(source_path), "target": target_name,
               "images": {"adapted": len(adapted_half), "scored_transductive": scored, "held_out": len(held_out)},
               "source_only": {"transductive": accuracy(source_model, adapted_half),
                               "inductive": accuracy(source_model, held_out)},
               "adapted": {"transductive": transductive, "inductive": accuracy(setup.model, held_out)},
               "seconds": {"adapt": sum(result.seconds.values()), "evaluation": result.evaluation_seconds,
                           "wall": time.perf_counter() - started},
               "stopped_by_budget": result.stopped_by_budget, "curve": result.evaluations,
               "distributed": {**scaling, "replica_sha256": result.replica_sha256}}
    if engine.is_main:
        save_model(model, info, run_dir / "model.safetensors")
        write_json(run_dir / "summary.json", summary)
    engine.close()
    return summary
