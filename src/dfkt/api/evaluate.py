"""``dfkt evaluate``: accuracy, per-class accuracy and confusion matrix of a model on real test data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
