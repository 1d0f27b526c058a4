"""The one run pipeline of distill, adapt and the trainers (dfkt.api.pipeline): run folder, engine
(closed however the run ends), method, run, summary, weights."""

import contextlib
import functools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import dfkt
from dfkt.api import pipeline
from dfkt.config import EngineConfig
from dfkt.engine import Engine, Stage
from dfkt.errors import DfktError
from dfkt.models import build_model
from dfkt.models.files import ModelInfo, save_model
from dfkt.registry import ADAPT_METHODS, METHODS
from tests.conftest import FAST_ENGINE

DIGITS = ModelInfo("digits_cnn", 10, 1, 8, (0.3,), (0.4,), "digits")


@pytest.fixture
def engines(monkeypatch):
    """Every engine made while the test runs."""
    made = []
    make = Engine.__init__

    def recording(self, *args, **kwargs):
        make(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(Engine, "__init__", recording)
    return made


def closed(engine: Engine) -> bool:
    return engine.metrics._handle is None


class Counter(torch.nn.Module):
    """A stand-in method: one parameter, a step that adds one (or raises)."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.fail_at = fail_at

    def step(self, i: int) -> dict[str, float]:
        if i == self.fail_at:
            raise RuntimeError("the method broke")
        with torch.no_grad():
            self.weight += 1
        return {"weight": self.weight.item()}


class CountingJob:
    kind = "count"
    engine_config = EngineConfig(precision="32-true", progress=False)
    resolved = EngineConfig(seed=5)  # any config: it is written as config.yaml

    def __init__(self, fail_at: int | None = None):
        self.counter = Counter(fail_at)

    def start(self, engine):
        return pipeline.Training(self.counter, [Stage("count", 3, self.counter.step)], {"kind": "count"})

    def summarize(self, engine, result):
        model = build_model("digits_cnn", 10, 1, 8)
        return pipeline.Outcome(
            {"weight": self.counter.weight.item(), "seconds": result.seconds}, {"model.safetensors": (model, DIGITS)}
        )


def test_a_job_runs_in_its_folder_and_leaves_config_weights_and_summary(tmp_path, engines):
    summary = pipeline.run(CountingJob(), tmp_path / "run", resume=False)
    assert summary["weight"] == 3.0
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "checkpoint.pt").is_file()
    assert "seed: 5" in (tmp_path / "run" / "config.yaml").read_text()
    assert len(engines) == 1 and closed(engines[0])


def test_the_engine_closes_when_the_method_raises(tmp_path, engines):
    with pytest.raises(RuntimeError, match="the method broke"):
        pipeline.run(CountingJob(fail_at=1), tmp_path / "run", resume=False)
    assert len(engines) == 1 and closed(engines[0])
    assert not (tmp_path / "run" / "summary.json").exists()


class BrokenOnStart:
    """A method whose construction fails, as a method refusing its model does."""

    def __init__(self, *args, **kwargs):
        raise DfktError("the method refuses this model")


def broken(method: type) -> type:
    """``method`` (its config, presets and flags) failing when made."""
    return type(f"Broken{method.__name__}", (BrokenOnStart, method), {})


@pytest.mark.parametrize("command", ["distill", "adapt", "train_teacher"])
def test_each_training_command_closes_its_engine_when_its_method_fails(command, tmp_path, monkeypatch, engines):
    """Through the public functions: the method (or trainer) is made on the open engine and raises."""
    model = save_model(build_model("digits_cnn", 10, 1, 8), DIGITS, tmp_path / "model.safetensors")
    if command == "distill":
        monkeypatch.setitem(METHODS._entries, "rdskd", broken(METHODS.get("rdskd")))
        run = functools.partial(dfkt.distill, "rdskd", model)
    elif command == "adapt":
        monkeypatch.setitem(ADAPT_METHODS._entries, "shot", broken(ADAPT_METHODS.get("shot")))
        run = functools.partial(dfkt.adapt, "shot", model, "digits-c:contrast:5")
    else:
        monkeypatch.setattr("dfkt.api.train.RealDataTraining", BrokenOnStart)
        run = functools.partial(dfkt.train_teacher, "digits_cnn", "digits", 1)
    with pytest.raises(DfktError, match="the method refuses this model"):
        run(overrides=FAST_ENGINE, out=tmp_path / "run")
    assert len(engines) == 1 and closed(engines[0])
    assert (tmp_path / "run" / "env.json").is_file()  # the run had begun: folder and engine


@contextlib.contextmanager
def held_by_another_process(folder: Path) -> Iterator[int]:
    """``folder`` locked by a separate Python process (its PID yielded) until the block ends."""
    folder.mkdir()
    hold = "import sys, time; from pathlib import Path; from dfkt.engine.lock import lock_run_dir; "
    hold += "held = lock_run_dir(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


TEACHER_ARGS = ["train-teacher", "--model", "digits_cnn", "--data", "digits", "--epochs", "1"]


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path, capsys):
    from dfkt.cli import main

    out = tmp_path / "run"
    args = [*TEACHER_ARGS, "--out", str(out), *[x for s in FAST_ENGINE for x in ("--set", s)]]
    with held_by_another_process(out) as pid:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"in use by another dfkt process (PID {pid})" in err and not (out / "checkpoint.pt").exists()
    assert main(args) == 0  # free again once it has ended
    assert (out / "summary.json").is_file()


def test_a_run_folder_in_use_stops_every_rank_of_a_multi_process_run(tmp_path):
    """Rank 0 holds the lock; the other ranks must stop with its reason, not in a broken collective."""
    out = tmp_path / "run"
    args = [*TEACHER_ARGS, "--out", str(out)]
    for setting in (*FAST_ENGINE, "engine.devices=2", "engine.threads=1"):
        args += ["--set", setting]
    with held_by_another_process(out) as pid:
        run = subprocess.run([sys.executable, "-m", "dfkt.cli", *args], capture_output=True, text=True, timeout=240)
    assert run.returncode == 2
    assert run.stderr.count(f"in use by another dfkt process (PID {pid})") == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch):
    import errno
    import fcntl

    from dfkt.engine.lock import lock_run_dir

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="not guarded"):
        assert lock_run_dir(tmp_path) is None
