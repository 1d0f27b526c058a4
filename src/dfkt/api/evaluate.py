"""``dfkt evaluate``: accuracy, per-class accuracy and confusion matrix of a model on real test data."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfkt.api.common import evaluation_data, normalized
from dfkt.config import DataConfig, EngineConfig
from dfkt.engine import Engine
from dfkt.errors import ModelFileError
from dfkt.models.files import ModelInfo, load_model, model_path
from dfkt.runs import write_json
from dfkt.supervised import evaluate_model


def evaluate(target: str | Path, data: str | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix of a model file, or of a run folder's model,
    on the real test set. A run folder gets ``evaluation.json``. An ``.onnx`` file (from ``dfkt export`` or
    ``dfkt quantize``) runs in ONNX Runtime, fed as its dfkt metadata says."""
    if Path(target).suffix == ".onnx" and Path(target).is_file():
        return _evaluate_onnx(Path(target), data, data_root)
    path = model_path(target)
    # Building the model draws from torch's global generator; the engine reseeds all of them and sets
    # torch.use_deterministic_algorithms, as a run needs: the caller gets them back as they were.
    with _callers_global_state_kept():
        model, info = load_model(path)
        dataset = evaluation_data(DataConfig(name=data, root=data_root), info)
        with Engine(EngineConfig(progress=False, precision=_run_precision(target))) as engine:
            model = engine.prepare(model, trainable=False)
            result = {
                "model": str(path),
                "arch": info.arch,
                "dataset": dataset.name,
                **evaluate_model(
                    model, normalized(dataset.test_images, info), dataset.test_labels, engine, info.num_classes
                ),
            }
    if Path(target).is_dir():
        write_json(Path(target) / "evaluation.json", result)
    return result


def _evaluate_onnx(path: Path, data: str | None, data_root: str | None) -> dict[str, Any]:
    from dfkt.api.export import require_onnx
    from dfkt.quantize import backend

    require_onnx("evaluating an ONNX file")
    meta = backend.read_metadata(path)
    if "dfkt_num_classes" not in meta or "dfkt_mean" not in meta:
        raise ModelFileError(
            f"{path} has no dfkt metadata (dfkt_mean, dfkt_num_classes); evaluate ONNX files "
            "written by 'dfkt export' or 'dfkt quantize'"
        )
    session = backend.session(path)
    shape = session.get_inputs()[0].shape  # files from before dfkt_image_size: the input's declared shape
    info = ModelInfo(
        meta.get("dfkt_arch", "onnx"),
        int(meta["dfkt_num_classes"]),
        int(meta.get("dfkt_in_channels", shape[1])),
        int(meta.get("dfkt_image_size", shape[-1])),
        tuple(json.loads(meta["dfkt_mean"])),
        tuple(json.loads(meta["dfkt_std"])),
        meta.get("dfkt_dataset", ""),
    )
    dataset = evaluation_data(DataConfig(name=data, root=data_root), info)
    images, labels = normalized(dataset.test_images, info), dataset.test_labels
    predicted = torch.from_numpy(backend.logits(session, images, batch=500).argmax(1))
    k = info.num_classes
    confusion = torch.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    quantization = json.loads(meta["dfkt_quantization"]) if "dfkt_quantization" in meta else None
    return {
        "model": str(path),
        "arch": info.arch,
        "dataset": dataset.name,
        "format": "int8 ONNX" if quantization else "ONNX",
        "quantization": quantization,
        "accuracy": confusion.diag().sum().item() / max(1, confusion.sum().item()),
        "per_class": (confusion.diag().float() / confusion.sum(dim=1).clamp_min(1)).tolist(),
        "confusion": confusion.tolist(),
    }


def _run_precision(target: str | Path) -> str:
    """A run folder is evaluated in the precision it ran in (env.json), so its summary's accuracy is
    reproduced; a bare model file in fp32."""
    env = Path(target) / "env.json"
    return json.loads(env.read_text()).get("precision", "32-true") if env.is_file() else "32-true"


@contextlib.contextmanager
def _callers_global_state_kept() -> Iterator[None]:
    """Give back the caller's global random generators (torch, CUDA, numpy, random) and deterministic
    algorithms setting as they were, whether the block finishes or fails."""
    torch_state, numpy_state, python_state = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.random.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
