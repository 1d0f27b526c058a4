"""``dfkt evaluate``: accuracy, per-class accuracy and confusion matrix of a model on real test data."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from dfkt.api.common import evaluation_data, normalized
from dfkt.config import DataConfig, EngineConfig
from dfkt.engine import Engine
from dfkt.models.files import load_model, model_path
from dfkt.runs import write_json
from dfkt.supervised import evaluate_model


def evaluate(target: str | Path, data: str | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix of a model file, or of a run folder's model,
    on the real test set. A run folder gets ``evaluation.json``."""
    path = model_path(target)
    # Building the model draws from torch's global generator; the engine reseeds all of them and sets
    # torch.use_deterministic_algorithms, as a run needs: the caller gets them back as they were.
    with _callers_global_state_kept():
        model, info = load_model(path)
        dataset = evaluation_data(DataConfig(name=data, root=data_root), info)
        engine = Engine(EngineConfig(progress=False, precision=_run_precision(target)))
        model = engine.prepare(model, trainable=False)
        result = {"model": str(path), "arch": info.arch, "dataset": dataset.name,
                  **evaluate_model(model, normalized(dataset.test_images, info), dataset.test_labels, engine,
                                   info.num_classes)}
    if Path(target).is_dir():
        write_json(Path(target) / "evaluation.json", result)
    return result


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
