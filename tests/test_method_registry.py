"""Every registered method and every preset of it, read from the registries: a new method or preset is
validated and built here without adding it to a list. Untrained digit networks: mechanics, in seconds."""

import pytest
import torch

import dfkt  # noqa: F401 - importing dfkt registers every method
from dfkt.config import EngineConfig, validate
from dfkt.dfkd.base import DistillSetup
from dfkt.engine import Engine, Stage
from dfkt.models import build_model
from dfkt.registry import ADAPT_METHODS, METHODS
from dfkt.sfda.base import AdaptSetup
from dfkt.synthesis import PixelInversion

DISTILL_PRESETS = [(name, preset) for name in METHODS.names() for preset in METHODS.get(name).presets]
ADAPT_PRESETS = [(name, preset) for name in ADAPT_METHODS.names() for preset in ADAPT_METHODS.get(name).presets]


def test_the_registries_hold_the_methods_the_cli_lists():
    assert len(DISTILL_PRESETS) >= 2 * len(METHODS.names()) and len(ADAPT_PRESETS) >= len(ADAPT_METHODS.names())
    assert dfkt.list_names("methods") == METHODS.names() and dfkt.list_names("adapt-methods") == ADAPT_METHODS.names()


@pytest.mark.parametrize("name", METHODS.names())
def test_every_distillation_method_has_paper_and_cpu_presets_and_describes_itself(name):
    cls = METHODS.get(name)
    assert {"paper", "cpu"} <= set(cls.presets) and cls.summary, name


@pytest.mark.parametrize("name", ADAPT_METHODS.names())
def test_every_adaptation_method_has_paper_and_cpu_presets(name):
    assert {"paper", "cpu"} <= set(ADAPT_METHODS.get(name).presets), name


def well_formed(stages: list) -> bool:
    return all(isinstance(s, Stage) and s.steps >= 1 and callable(s.step) for s in stages)


def streams_are_distinct(runner) -> bool:
    """No two of the random streams the method keeps start alike: each has its own name and seed."""
    states = [g.get_state() for g in runner.rngs.values()]
    return all(not torch.equal(a, b) for i, a in enumerate(states) for b in states[i + 1 :])


@pytest.mark.parametrize("name, preset", DISTILL_PRESETS)
def test_every_distillation_preset_validates_and_builds_the_method(name, preset):
    cls = METHODS.get(name)
    cfg = validate(cls.Config, cls.presets[preset], where=f"{name} preset {preset}")
    torch.manual_seed(0)
    engine = Engine(EngineConfig(precision="32-true", progress=False))
    size = 16  # the smallest the deep generator of the paper-imagenet presets builds
    teacher = engine.prepare(build_model("digits_cnn", 10, 1, size), trainable=False)
    student = engine.prepare(build_model("digits_cnn_half", 10, 1, size), trainable=True)
    runner = cls(cfg, DistillSetup(teacher, student, 10, 1, size, engine, (0.3,), (0.4,)))
    stages = runner.stages()
    assert stages and well_formed(stages), stages
    # The student learns last, scored by the engine; the teacher is never trained.
    assert stages[-1].name == "student" and stages[-1].evaluate and student in stages[-1].train
    assert all(teacher not in s.train for s in stages)
    assert runner.student_trainer.steps == cfg.student_epochs * cfg.student_steps_per_epoch == stages[-1].steps
    assert {"student"} <= set(runner.rngs) and streams_are_distinct(runner), sorted(runner.rngs)
    # Before any step: no batch seen yet; a generator's cost unless the method optimises pixels.
    report = runner.report()
    assert report.first_batch_sha256 is None
    assert (report.generator_multiply_adds_per_image is None) == isinstance(runner.source, PixelInversion)


@pytest.mark.parametrize("name, preset", ADAPT_PRESETS)
def test_every_adaptation_preset_validates_and_builds_the_method(name, preset):
    cls = ADAPT_METHODS.get(name)
    cfg = validate(cls.Config, cls.presets[preset], where=f"{name} preset {preset}")
    torch.manual_seed(0)
    engine = Engine(EngineConfig(precision="32-true", progress=False))
    model = engine.prepare(build_model("shot_dtn", 10, 1, 8), trainable=True)  # BatchNorm2d and 1d, for Tent
    runner = cls(cfg, AdaptSetup(model, torch.randn(16, 1, 8, 8), engine))
    assert well_formed(runner.stages())  # none at all for source_only, which evaluates the model as it is
    assert {"order"} <= set(runner.rngs) and streams_are_distinct(runner), sorted(runner.rngs)
    predictions = runner.report().stream_predictions
    assert (predictions.tolist() == [-1] * 16) if cls.online else (predictions is None)  # online: none made yet


def test_a_method_file_registers_itself_without_an_import_line(tmp_path, monkeypatch):
    """The method packages import each of their modules (dfkt.registry.import_package_modules): a package with a
    new file, and nothing else changed, registers what that file defines."""
    import importlib
    import sys

    package = tmp_path / "methods_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from dfkt.registry import import_package_modules\nimport_package_modules(__name__, __path__)\n"
    )
    (package / "shared.py").write_text("from dfkt.registry import Registry\nFOUND = Registry('test method')\n")
    (package / "new_method.py").write_text(
        "from methods_pkg.shared import FOUND\n\n@FOUND.register('new')\nclass NewMethod:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.import_module("methods_pkg").shared.FOUND.names() == ["new"]
    for name in ("methods_pkg", "methods_pkg.shared", "methods_pkg.new_method"):
        monkeypatch.delitem(sys.modules, name)
