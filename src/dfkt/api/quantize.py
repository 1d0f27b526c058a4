"""``dfkt quantize``: int8 post-training quantization without the training data.

resolve the config → load the model → make calibration and held-out images from the source →
export fp32 ONNX → ONNX Runtime static quantization (QDQ, per-channel weights) → compare int8 and
fp32 top-1 on the held-out images → write ``out`` with dfkt's metadata (temp file, then rename).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dfkt.api.evaluate import _callers_global_state_kept
from dfkt.api.export import TOLERANCE, export_onnx, onnx_metadata, require_onnx
from dfkt.commands import QUANTIZE
from dfkt.config import DeclaredInfo, DistillConfig, QuantizeConfig
from dfkt.errors import ConfigError, DfktError, disk_full_error, is_disk_full
from dfkt.models.files import ModelInfo, load_model, model_path
from dfkt.registry import CALIBRATION_SOURCES

RUN_MODEL_FILES = {"student": "student.safetensors", "selected": "student_selected.safetensors"}


def resolve_quantize_config(
    *args: Any, config: str | Path | dict | None = None, overrides: Sequence[str] = (), **settings: Any
) -> QuantizeConfig:
    """The validated config, from the arguments ``quantize`` takes."""
    cfg = QUANTIZE.resolve(args, settings, config, overrides)
    if not cfg.model:
        raise ConfigError(
            "no model given; pass MODEL: a dfkt model file, a run folder, or a teacher as "
            "'dfkt distill --teacher' takes it"
        )
    if not cfg.out:
        raise ConfigError("no output file given; pass --out FILE.onnx")
    CALIBRATION_SOURCES.get(cfg.calibration)  # an unknown name lists the valid ones
    return cfg


def quantize(
    *args: Any, config: str | Path | dict | None = None, overrides: Sequence[str] = (), **settings: Any
) -> dict[str, Any]:
    """Quantize a model to int8 ONNX, calibrated on images from a calibration source (a name in
    ``dfkt list calibration-sources``). Returns what was done: sizes, calibration, the int8/fp32 top-1
    agreement on held-out images of the same source.

    The settings are those of ``dfkt quantize --help``, by keyword (``check_images=64``) or the first
    ones by position: model, calibration, out, calibration_images. They resolve in layers: defaults <-
    ``config`` (a YAML file or a dict) <- settings <- ``overrides`` (``"params.iterations=100"``)."""
    from dfkt.quantize import backend
    from dfkt.quantize.sources import CalibrationContext, source_config

    cfg = resolve_quantize_config(*args, config=config, overrides=overrides, **settings)
    require_onnx("dfkt quantize")
    params = source_config(cfg.calibration, cfg.params)
    out = Path(cfg.out)
    placeholder = _claim(out)  # an unwritable --out fails now, before minutes of synthesis
    try:
        with (
            _callers_global_state_kept(),
            _threads(cfg.threads),
            tempfile.TemporaryDirectory(prefix="dfkt-quantize-") as work,
        ):
            net, info, run_dir, name = load_quantize_model(cfg)
            net = net.cpu().float().eval().requires_grad_(False)
            ctx = CalibrationContext(net, info, cfg.seed, cfg.data, run_dir, cfg.progress)
            source = CALIBRATION_SOURCES.get(cfg.calibration)(params, ctx)  # refuses what it cannot serve
            work = Path(work)
            # Exported before synthesis, so a model ONNX cannot take fails first; without the exporter's slow
            # optimiser, so BatchNorm is folded into the convolution before it here (where the graph allows).
            fp32 = export_onnx(_fold_batchnorm(net), info, work / "fp32.onnx", optimize=False)
            torch.manual_seed(cfg.seed)
            started = time.perf_counter()
            images = source.images(cfg.calibration_images + cfg.check_images).float().cpu().contiguous()
            synthesis_seconds = time.perf_counter() - started
            if not torch.isfinite(images).all():
                raise DfktError(
                    f"calibration source {cfg.calibration} made images with inf/NaN values; "
                    "change its settings (--set params.NAME=VALUE)"
                )
            calib, held_out = images[: cfg.calibration_images], images[cfg.calibration_images :]
            fp32_session = backend.session(fp32)
            fp32_logits = backend.logits(fp32_session, held_out)
            with torch.no_grad():
                torch_logits = net(held_out).numpy()
            difference = float(np.abs(fp32_logits - torch_logits).max())
            if difference > TOLERANCE * max(float(np.abs(torch_logits).max()), 1.0):
                raise DfktError(
                    f"the fp32 ONNX export differs from PyTorch by up to {difference:.2g}; nothing was quantized"
                )
            started = time.perf_counter()
            record = backend.quantize_onnx(
                fp32,
                placeholder,
                calib,
                cfg.calibrate_method,
                cfg.percentile,
                cfg.per_channel,
                cfg.activation_type,
                work,
                cfg.reduce_range,
            )
            quantize_seconds = time.perf_counter() - started
            int8_logits = backend.logits(backend.session(placeholder), held_out)
            agreement = float((int8_logits.argmax(1) == fp32_logits.argmax(1)).mean())
            fp32_bytes = fp32.stat().st_size
            if agreement < cfg.min_agreement:
                raise DfktError(
                    f"the int8 model agrees with fp32 on only {agreement:.1%} of {len(held_out)} held-out "
                    f"{cfg.calibration} images (min_agreement {cfg.min_agreement:g}); nothing written to "
                    f"{out}. Try another --calibration or --calibrate-method, more --calibration-images, "
                    "or --min-agreement 0 to write it anyway"
                )
            record = {
                **record,
                "calibration": cfg.calibration,
                "calibration_images": len(calib),
                "calibration_params": params.model_dump(mode="json"),
                "seed": cfg.seed,
                "check_images": len(held_out),
                "top1_agreement_with_fp32": agreement,
            }
            backend.add_metadata(placeholder, {**onnx_metadata(info), **backend.quantization_metadata(record)})
            int8_bytes = placeholder.stat().st_size
            os.replace(placeholder, out)
    except BaseException as exc:
        placeholder.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(out, None, exc) from exc
        raise
    return {
        "model": name,
        "arch": info.arch,
        "file": str(out),
        "calibration": cfg.calibration,
        "calibration_images": len(calib),
        "check_images": len(held_out),
        "top1_agreement_with_fp32": agreement,
        "quantization": record,
        "bytes": {"fp32": fp32_bytes, "int8": int8_bytes},
        "seconds": {"synthesis": synthesis_seconds, "quantization": quantize_seconds},
    }


def _fold_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net`` with each BatchNorm that follows a convolution folded into it (torch.fx), so the
    int8 graph has one quantized convolution where it had convolution + BatchNorm; ``net`` itself when it
    cannot be traced. A BatchNorm before its convolution (pre-activation networks) stays as it is."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(net, inplace=False)
    except Exception:  # untraceable Python control flow: export it as it is
        return net


def _claim(out: Path) -> Path:
    """A temporary file beside ``out`` (same folder, so the final rename is atomic); a one-line error
    when ``out`` cannot be written."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name the file to write, e.g. {out / 'model.int8.onnx'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise ConfigError(f"cannot write --out {out}: {exc.strerror or exc}; choose a writable path") from None
    return Path(tmp)


class _threads:
    def __init__(self, threads: int | None):
        self.threads, self.before = threads, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


def load_quantize_model(cfg: QuantizeConfig) -> tuple[torch.nn.Module, ModelInfo, Path | None, str]:
    """The model to quantize, its info, its run folder (if MODEL is one) and the name to report. A run
    folder gives its student (or selected student, or teacher: ``run_model``); a train-teacher run its
    model; anything else goes through the teacher loader of ``dfkt distill``."""
    from dfkt.api.distill import load_teacher

    path = Path(cfg.model)
    if path.is_dir():
        if cfg.run_model == "teacher":
            return (*_run_teacher(path, cfg), path, f"{path} (teacher)")
        file = path / RUN_MODEL_FILES[cfg.run_model]
        if not file.is_file():
            if cfg.run_model == "selected":
                raise ConfigError(f"{path} has no {file.name}; use run_model student or teacher")
            file = model_path(path)  # a train-teacher folder: model.safetensors
        net, info = load_model(file)
        return net, info, path, str(file)
    teacher = DistillConfig(
        teacher=cfg.model, teacher_weights=cfg.model_weights, teacher_info=cfg.model_info, data=cfg.data
    )
    from dfkt.models.foreign import foreign_kind

    if foreign_kind(cfg.model) is None:
        net, info = load_model(model_path(cfg.model))
        return net, info, None, str(model_path(cfg.model))
    loaded = load_teacher(teacher)
    return loaded.net, loaded.info, None, loaded.name


def _run_teacher(run: Path, cfg: QuantizeConfig) -> tuple[torch.nn.Module, ModelInfo]:
    from dfkt.api.distill import load_teacher

    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run} has no config.yaml naming a teacher; pass the teacher's file as MODEL")
    config = yaml.safe_load(config_file.read_text()) or {}
    spec = str(config.get("teacher") or "")
    if not spec:
        raise ConfigError(f"{run}/config.yaml names no teacher; pass the teacher's file as MODEL")
    if not Path(spec).exists() and not spec.startswith("torchvision:"):
        # A relative path is relative to where the run was started: try the run folder's ancestors.
        for base in run.resolve().parents:
            if (base / spec).exists():
                spec = str(base / spec)
                break
    data = cfg.data if cfg.data.name else cfg.data.model_copy(update={"name": (config.get("data") or {}).get("name")})
    teacher = DistillConfig(
        teacher=spec,
        teacher_weights=config.get("teacher_weights") or cfg.model_weights,
        teacher_info=DeclaredInfo(**(config.get("teacher_info") or {})),
        data=data,
    )
    loaded = load_teacher(teacher)
    return loaded.net, loaded.info
