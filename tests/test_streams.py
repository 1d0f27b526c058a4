"""Named random streams and what a method keeps in its checkpoint: every stream a method draws from
has its own seed, the same in every process, and a resumed run continues each stream exactly."""

import os
import subprocess
import sys

import pytest
import torch

from dfkt.config import EngineConfig
from dfkt.engine import Engine, Stage
from dfkt.engine.state import TrainState
from dfkt.engine.streams import stream_seed


def test_a_stream_seed_follows_the_run_seed_the_name_and_the_rank_alone():
    seeds = {
        stream_seed(run, name, rank)
        for run in (0, 1)
        for name in ("generator", "student", "crops")
        for rank in (None, 0, 1)
    }
    assert len(seeds) == 2 * 3 * 3 and all(0 <= s < 2**63 for s in seeds)
    # Another process with its own string-hash salt derives the same seed.
    code = "from dfkt.engine.streams import stream_seed; print(stream_seed(7, 'generator', 1))"
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(other.stdout) == stream_seed(7, "generator", 1)


def test_engine_streams_differ_by_name_and_rank_but_not_by_when_they_are_made():
    engine = Engine(EngineConfig(seed=3, precision="32-true", progress=False))
    draw = lambda gen: torch.randn(4, generator=gen)  # noqa: E731
    assert torch.equal(draw(engine.rng("generator")), draw(engine.rng("generator")))
    assert not torch.equal(draw(engine.rng("generator")), draw(engine.rng("student")))
    assert not torch.equal(draw(engine.rng("order")), draw(engine.rng("order", per_rank=False)))


def test_keep_files_each_thing_by_kind_and_refuses_a_name_taken_twice():
    state, module = TrainState(), torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    state.keep("generator", module, optimizer, torch.Generator(), torch.zeros(1))
    assert state.modules["generator"] is module and state.optimizers["generator"] is optimizer
    assert set(state.rngs) == set(state.buffers) == {"generator"}
    with pytest.raises(ValueError, match="already keeps a Generator named 'generator'"):
        state.keep("generator", torch.Generator())
    with pytest.raises(TypeError, match="cannot keep a str"):
        state.keep("label", "text")


class TwoStreams(TrainState):
    """Each step draws from a per-rank and a shared stream, recording what it drew."""

    def __init__(self, engine: Engine, stop_after: int | None = None):
        super().__init__(engine.device)
        self.keep("noise", engine.rng("noise"))
        self.keep("order", engine.rng("order", per_rank=False))
        self.drawn: list[list[float]] = []
        self.stop_after = stop_after

    def step(self, i: int) -> dict:
        if len(self.drawn) == self.stop_after:
            raise KeyboardInterrupt  # the process dies here; the checkpoint of the step before remains
        self.drawn.append(
            torch.randn(2, generator=self.rngs["noise"]).tolist() + torch.rand(1, generator=self.rngs["order"]).tolist()
        )
        return {}


def run_streams(run_dir, stop_after=None, resume=False) -> TwoStreams:
    engine = Engine(EngineConfig(seed=5, precision="32-true", progress=False, checkpoint_every=1), run_dir)
    state = TwoStreams(engine, stop_after)
    try:
        engine.run([Stage("draw", 4, state.step), Stage("draw_more", 4, state.step)], state, {}, resume=resume)
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()
    return state


def test_a_resumed_run_continues_every_stream_exactly(tmp_path):
    uninterrupted = run_streams(tmp_path / "whole")
    killed = run_streams(tmp_path / "killed", stop_after=6)  # the first stage's 4 steps and 2 of the second
    resumed = run_streams(tmp_path / "killed", resume=True)
    assert (len(uninterrupted.drawn), len(killed.drawn), len(resumed.drawn)) == (8, 6, 2)
    assert killed.drawn + resumed.drawn == uninterrupted.drawn
    for name in ("noise", "order"):
        assert torch.equal(resumed.rngs[name].get_state(), uninterrupted.rngs[name].get_state())
