"""Run as ``python tests/distributed_worker.py OUT_DIR SOURCE_MODEL``: the engine starts a second
process (rank 1) running this same script; each rank writes what it saw to OUT_DIR/rankR.json
for tests/test_distributed.py to compare."""

import json
import sys
from pathlib import Path

import torch

from dfkt.config import EngineConfig
from dfkt.engine import Engine
from dfkt.engine.state import TrainState
from dfkt.models.files import load_model
from dfkt.registry import ADAPT_METHODS
from dfkt.sfda.base import AdaptSetup
from dfkt.training import EpochBatches


def main(out: Path, source: str) -> None:
    engine = Engine(EngineConfig(devices=2, precision="32-true", progress=False, threads=1))
    rank = engine.fabric.global_rank
    noise = engine.rng("noise")
    shared = engine.rng("noise", per_rank=False)
    batches = EpochBatches(TrainState(), engine, 11, 3)
    epoch = torch.cat([batches(i) for i in range(batches.steps_per_epoch)])

    # SHOT's clustering pass: each rank computes its share of the rows, all receive all of them.
    images = torch.randn(13, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    shot = ADAPT_METHODS.get("shot")
    model = engine.prepare(load_model(source)[0], trainable=True)
    runner = shot(shot.Config(epochs=1), AdaptSetup(model, images, engine))
    gathered, _ = runner.features_and_probs()
    with torch.no_grad(), engine.eval_mode(model):
        alone = model.forward_features(images)

    record = {
        "rank": rank,
        "world_size": engine.world_size,
        "noise": torch.randn(4, generator=noise).tolist(),
        "shared": torch.randn(4, generator=shared).tolist(),
        "epoch": epoch.tolist(),
        "steps_per_epoch": batches.steps_per_epoch,
        "gathered_rows": len(gathered),
        "gathered_max_diff": (gathered - alone).abs().max().item(),
        "rows": engine.gather_rows(torch.tensor([[rank, rank]])).tolist(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
