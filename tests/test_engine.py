import pytest
import torch

from dfkt.config import EngineConfig
from dfkt.engine import Engine, Stage
from dfkt.engine.checkpoint import load, save_atomic
from dfkt.engine.state import TrainState
from dfkt.errors import DfktError, TrainingDivergedError
from tests.conftest import fake_clock


class Quadratic(TrainState):
    """Minimise (w - 3)²: a run small enough to check the engine's bookkeeping."""

    def __init__(self, engine):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        holder = torch.nn.Module()
        holder.w = self.w
        self.modules["holder"] = holder
        self.optimizers["sgd"] = torch.optim.SGD([self.w], lr=0.1)
        self.engine = engine

    def step(self, i):
        loss = ((self.w - 3) ** 2).sum()
        self.engine.optimize(loss, self.optimizers["sgd"])
        return {"loss": loss}


def test_run_writes_checkpoint_and_refuses_changed_config_on_resume(tmp_path):
    engine = Engine(EngineConfig(precision="32-true", progress=False, checkpoint_every=5), tmp_path)
    task = Quadratic(engine)
    engine.run([Stage("fit", 20, task.step)], task, {"lr": 0.1})
    assert task.w.item() == pytest.approx(3.0, abs=0.1)
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "env.json").is_file()
    assert "loss" in (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(DfktError, match="config differs.*lr"):
        engine.run([Stage("fit", 20, task.step)], Quadratic(engine), {"lr": 0.2}, resume=True)


def test_resume_of_a_finished_run_restores_the_weights_without_training(tmp_path):
    engine = Engine(EngineConfig(precision="32-true", progress=False), tmp_path)
    task = Quadratic(engine)
    engine.run([Stage("fit", 10, task.step)], task, {})
    fresh = Quadratic(engine)
    with torch.no_grad():
        fresh.w.fill_(-50.0)
    calls = []
    engine.run([Stage("fit", 10, lambda i: calls.append(i) or fresh.step(i))], fresh, {}, resume=True)
    assert calls == [] and fresh.w.item() == task.w.item()


def test_finite_loss_with_nan_gradient_is_refused_before_the_step(tmp_path):
    engine = Engine(EngineConfig(precision="32-true", progress=False))
    param = torch.nn.Parameter(torch.zeros(1))
    loss = torch.sqrt(param).sum()  # value 0, gradient inf at 0
    with pytest.raises(TrainingDivergedError, match="gradients"):
        engine.optimize(loss, torch.optim.SGD([param], lr=0.1))
    assert param.item() == 0.0


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    engine = Engine(EngineConfig(precision="32-true", progress=False))
    param = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(TrainingDivergedError, match="lower the learning rate"):
        engine.optimize(param * float("nan"), torch.optim.SGD([param], lr=0.1))


def test_checkpoint_write_is_atomic_and_damage_is_reported(tmp_path):
    path = tmp_path / "c.pt"
    save_atomic({"x": torch.arange(3)}, path)
    assert torch.equal(load(path)["x"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DfktError, match="cannot be read"):
        load(path)


def test_budget_stops_the_run(monkeypatch, tmp_path):
    clock = fake_clock(monkeypatch)
    engine = Engine(EngineConfig(precision="32-true", progress=False), tmp_path)
    task = Quadratic(engine)
    steps = []
    result = engine.run([Stage("fit", 10**7, clock.ticking(0.125, task.step, steps))], task, {}, max_seconds=0.5)
    assert result.stopped_by_budget and result.seconds == {"fit": 0.5}
    assert steps == [0, 1, 2, 3]  # the step that reaches the budget is the last one


def test_stage_setup_time_is_recorded_and_counts_toward_the_budget(monkeypatch, tmp_path):
    clock = fake_clock(monkeypatch)
    engine = Engine(EngineConfig(precision="32-true", progress=False), tmp_path)
    task = Quadratic(engine)
    steps = []
    stage = Stage("fit", 10**7, clock.ticking(0.125, task.step, steps), begin=lambda: clock.advance(0.25))
    result = engine.run([stage], task, {}, max_seconds=0.5)
    assert result.seconds == {"fit.begin": 0.25, "fit": 0.25}
    assert steps == [0, 1]  # begin() took half the budget: two steps, not four


def test_evaluation_uses_eval_mode_and_restores_training_mode():
    from dfkt.supervised import evaluate_model

    engine = Engine(EngineConfig(precision="32-true", progress=False))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(2))
    model.train()
    seen = []
    model.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    evaluate_model(model, torch.randn(4, 2, 1, 1), torch.tensor([0, 1, 0, 1]), engine, num_classes=2)
    assert seen == [False] and model.training
    assert model[1].num_batches_tracked.item() == 0  # running statistics untouched


def test_slow_steps_are_evaluated_by_time_as_well_as_by_step_count(monkeypatch):
    clock = fake_clock(monkeypatch)
    engine = Engine(EngineConfig(precision="32-true", progress=False))
    stage = Stage("s", 8, clock.ticking(0.25, lambda i: {}), evaluate=True)
    result = engine.run([stage], None, {}, on_eval=lambda: {"acc": 0.0}, eval_every=1000, eval_seconds=0.6)
    # 0.6 s of training between evaluations is every third 0.25 s step; the start and the end are always scored.
    assert [e["step"] for e in result.evaluations] == [0, 3, 6, 8]


def clocked_run(monkeypatch, steps, step_seconds, eval_seconds_each, **run):
    clock = fake_clock(monkeypatch)

    def step(i):
        clock.now += step_seconds
        return {}

    def on_eval():
        clock.now += eval_seconds_each
        return {"acc": 0.0}

    engine = Engine(EngineConfig(precision="32-true", progress=False, checkpoint_seconds=1e9))
    return engine.run([Stage("student", steps, step, evaluate=True)], None, {}, on_eval=on_eval, **run)


def test_a_stage_gets_about_twenty_evaluations_from_its_steps_or_its_budget(monkeypatch):
    from dfkt.engine.engine import EVAL_POINTS

    by_steps = clocked_run(monkeypatch, 200, 1.0, 0.0)
    steps = [e["step"] for e in by_steps.evaluations]
    assert steps == list(range(0, 201, 200 // EVAL_POINTS))  # the stage's start, evenly between, its end
    by_budget = clocked_run(monkeypatch, 10**6, 1.0, 0.0, max_seconds=100.0)  # the budget ends it first
    seconds = [e["train_seconds"] for e in by_budget.evaluations]
    assert EVAL_POINTS - 1 <= len(seconds) <= EVAL_POINTS + 2 and seconds[0] == 0 and seconds[-1] == 100
    assert by_budget.evaluation_seconds == 0.0


def test_costly_evaluations_are_spaced_to_a_small_share_of_the_training_time(monkeypatch):
    from dfkt.engine.engine import EVAL_SHARE

    result = clocked_run(monkeypatch, 200, 1.0, 2.0)  # each evaluation costs 2 steps: 20 would take 20%
    inside = result.evaluations[1:-1]  # the stage's start and end are always scored
    assert 4 <= len(inside) and len(inside) * 2.0 <= EVAL_SHARE * 200
    assert result.evaluation_seconds == 2.0 * len(result.evaluations)
    assert [e["train_seconds"] for e in result.evaluations][-1] == 200  # evaluation is not training time
    explicit = clocked_run(monkeypatch, 200, 1.0, 2.0, eval_every=10)  # a set interval is kept as set
    assert [e["step"] for e in explicit.evaluations] == list(range(0, 201, 10))


@pytest.mark.parametrize(
    "text, model, native_bf16",
    [
        ("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16\n", "Xeon", True),
        ("processor\t: 0\nmodel name\t: EPYC\nflags\t\t: avx2 fma\n", "EPYC", False),
        ("processor\t: 0\nFeatures\t: fp asimd bf16\n", None, False),  # Arm: bf16 is not AVX512-BF16
    ],
)
def test_cpu_name_and_flags_from_cpuinfo(tmp_path, text, model, native_bf16):
    from dfkt.engine.cpu import cpu_flags, cpu_has_native_bf16, cpu_model

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert cpu_has_native_bf16(cpuinfo) is native_bf16
    assert "avx2" in cpu_flags(cpuinfo) or "asimd" in cpu_flags(cpuinfo)
    assert cpu_model(cpuinfo) == model or (model is None and cpu_model(cpuinfo))
    assert cpu_flags(tmp_path / "missing") == set() and cpu_has_native_bf16(tmp_path / "missing") is False
