"""One config per command: the Python functions and the CLI flags reach the same pydantic config,
and the flags are made from the config's fields (dfkt.commands)."""

import importlib
from pathlib import Path

import pytest

import dfkt
from dfkt import api
from dfkt.cli import build_parser, main
from dfkt.commands import COMMANDS
from dfkt.errors import ArgumentError, ConfigError


def subparser(name: str):
    return build_parser()._subparsers._group_actions[0].choices[name]


def flags_and_help(name: str) -> tuple[set[str], str]:
    parser = subparser(name)
    options = {option for action in parser._actions for option in action.option_strings}
    options |= {action.dest for action in parser._actions if not action.option_strings}
    return options, "".join(parser.format_help().split())  # argparse wraps lines, also at hyphens


def squeezed(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_setting_of_a_command_is_a_flag_explained_by_its_description(name):
    """Each field of the command's config that is not a section, and each setting inside a section with
    a keyword of its own (--data for data.name), is a flag whose --help shows the field's description."""
    command = COMMANDS[name]
    options, help_text = flags_and_help(name)
    inner = {inner.key.split(".")[0] for inner in command.inner.values()}
    flags = 0
    for field, info in command.config.model_fields.items():
        if field in command.by_hand or field in inner:
            continue
        setting = command.settings()[field]
        if setting.value is None:  # a section: --set or --config
            continue
        flag = field if field == command.argument else "--" + field.replace("_", "-")
        assert flag in options, f"{name}: no flag for {field}"
        assert setting.description, f"{name}: {field} has no description for --help"
        assert squeezed(setting.description) in help_text, f"{name}: --help lacks {field}'s description"
        flags += 1
    for keyword, setting in command.settings().items():
        if "." in setting.key:
            assert "--" + keyword.replace("_", "-") in options
            assert squeezed(setting.description) in help_text
    assert flags >= 5
    if "overrides" in command.by_hand:  # a sweep's --set adds to its file's overrides
        assert "--set" in options


def test_generated_flags_keep_their_spelling_and_help():
    """Flags the README and scripts use keep their names; help keeps defaults and the bool's --no- form."""
    options, help_text = flags_and_help("distill")
    assert {
        "--method",
        "--teacher",
        "--teacher-weights",
        "--student",
        "--preset",
        "--data",
        "--max-seconds",
        "--references",
        "--config",
        "--set",
        "--out",
        "--resume",
        "--data-root",
        "--devices",
        "--num-nodes",
    } <= options
    assert squeezed("DFKD method (see 'dfkt list methods'); default rdskd") in help_text
    assert squeezed("under 5% of its time") in help_text  # a % in a description survives argparse's formatting
    options, help_text = flags_and_help("quantize")
    assert {
        "model",
        "--calibration",
        "--calibration-images",
        "--calibrate-method",
        "--check-images",
        "--min-agreement",
        "--run-model",
        "--model-weights",
        "--data",
        "--data-root",
        "--seed",
        "--config",
        "--set",
        "--out",
        "--no-per-channel",
    } <= options
    assert squeezed("images fed to the calibrator; default 256") in help_text
    options, _ = flags_and_help("train-source")
    assert {"--model", "--data", "--epochs", "--download", "--data-root", "--devices", "--num-nodes"} <= options
    _, help_text = flags_and_help("train-source")
    assert (
        squeezed("architecture (see 'dfkt list models'); default shot_lenet") in help_text
    )  # description of the base class
    options, _ = flags_and_help("sweep")
    assert {
        "--grid",
        "--method",
        "--teacher",
        "--preset",
        "--seeds",
        "--max-seconds",
        "--set",
        "--out",
        "--storage",
        "--workers",
        "--retry-failed",
    } <= options


class Resolved(Exception):
    """Raised with the config a command built, before anything runs."""


def capture(monkeypatch, name):
    """Make command ``name`` stop with its config once resolved, whether called from the CLI or Python."""

    def stop_with(result):
        raise Resolved(result[0] if isinstance(result, tuple) else result)

    if name in ("train-teacher", "train-source"):
        monkeypatch.setattr(
            importlib.import_module("dfkt.api.train"), "LabelTraining", lambda cfg, *rest: stop_with(cfg)
        )
    else:
        module = importlib.import_module(f"dfkt.api.{name}")
        original = getattr(module, f"resolve_{name}_config")
        monkeypatch.setattr(module, f"resolve_{name}_config", lambda *a, **k: stop_with(original(*a, **k)))


def config_of(call):
    with pytest.raises(Resolved) as caught:
        call()
    return caught.value.args[0]


def value_at(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


CASES = {
    "distill": (
        [
            "--method",
            "dafl",
            "--teacher",
            "t.safetensors",
            "--student",
            "lenet5_half",
            "--data",
            "digits",
            "--data-root",
            "/d",
            "--devices",
            "2",
            "--references",
            "--max-seconds",
            "30",
            "--eval-every",
            "5",
            "--set",
            "engine.seed=3",
            "--set",
            "params.gen_lr=0.01",
        ],
        lambda: dfkt.distill(
            "dafl",
            "t.safetensors",
            "lenet5_half",
            data="digits",
            data_root=Path("/d"),
            devices=2,
            references=True,
            max_seconds=30,
            eval_every=5,
            engine={"seed": 3},
            params={"gen_lr": 0.01},
        ),
        {
            "method": "dafl",
            "student": "lenet5_half",
            "data.name": "digits",
            "data.root": "/d",
            "engine.devices": 2,
            "engine.seed": 3,
            "references": True,
            "max_seconds": 30.0,
            "eval_every": 5,
            "params": {"gen_lr": 0.01},
        },
    ),
    "adapt": (
        [
            "--method",
            "tent",
            "--source",
            "s.safetensors",
            "--target",
            "digits-c:contrast:5",
            "--preset",
            "paper",
            "--split-seed",
            "4",
            "--num-nodes",
            "1",
            "--data-root",
            "/d",
        ],
        lambda: dfkt.adapt(
            "tent",
            Path("s.safetensors"),
            "digits-c:contrast:5",
            preset="paper",
            split_seed=4,
            num_nodes=1,
            data_root="/d",
        ),
        {
            "method": "tent",
            "source": "s.safetensors",
            "target.name": "digits-c:contrast:5",
            "target.root": "/d",
            "preset": "paper",
            "split_seed": 4,
        },
    ),
    "train-teacher": (
        [
            "--model",
            "lenet5",
            "--data",
            "fmnist",
            "--epochs",
            "3",
            "--download",
            "--lr",
            "0.01",
            "--optimizer",
            "sgd",
            "--no-augment",
        ],
        lambda: dfkt.train_teacher("lenet5", "fmnist", 3, download=True, lr=0.01, optimizer="sgd", augment=False),
        {
            "model": "lenet5",
            "data.name": "fmnist",
            "epochs": 3,
            "data.download": True,
            "lr": 0.01,
            "optimizer": "sgd",
            "augment": False,
        },
    ),
    "train-source": (
        ["--data", "digits", "--holdout", "0.2", "--batch-size", "32"],
        lambda: dfkt.train_source(data="digits", holdout=0.2, batch_size=32),
        {"model": "shot_lenet", "data.name": "digits", "holdout": 0.2, "batch_size": 32, "lr": 0.01},
    ),
    "quantize": (
        [
            "m.safetensors",
            "--calibration",
            "gaussian",
            "--out",
            "m.onnx",
            "--calibration-images",
            "32",
            "--calibrate-method",
            "entropy",
            "--no-per-channel",
            "--data",
            "digits",
            "--set",
            "activation_type=int8",
        ],
        lambda: dfkt.quantize(
            "m.safetensors",
            "gaussian",
            "m.onnx",
            32,
            calibrate_method="entropy",
            per_channel=False,
            data="digits",
            overrides=["activation_type=int8"],
        ),
        {
            "model": "m.safetensors",
            "calibration": "gaussian",
            "out": "m.onnx",
            "calibration_images": 32,
            "calibrate_method": "entropy",
            "per_channel": False,
            "data.name": "digits",
            "activation_type": "int8",
        },
    ),
    "sweep": (
        ["--teacher", "t.safetensors", "--seeds", "4", "5", "--random-trials", "2", "--set", "engine.threads=1"],
        lambda: dfkt.sweep(
            None, "rdskd", "t.safetensors", seeds=(4, 5), random_trials=2, overrides=["engine.threads=1"]
        ),
        {"teacher": "t.safetensors", "seeds": [4, 5], "random_trials": 2, "overrides": ["engine.threads=1"]},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_and_python_build_the_same_config(monkeypatch, name):
    argv, call, expected = CASES[name]
    capture(monkeypatch, name)
    from_cli = config_of(lambda: main([name, *argv]))
    from_python = config_of(call)
    assert from_cli == from_python
    for key, value in expected.items():  # and each flag reached its setting
        assert value_at(from_cli, key) == value, key


@pytest.mark.parametrize(
    "function, name",
    [
        (dfkt.distill, "distill"),
        (dfkt.adapt, "adapt"),
        (dfkt.train_teacher, "train-teacher"),
        (dfkt.train_source, "train-source"),
        (dfkt.quantize, "quantize"),
        (dfkt.sweep, "sweep"),
    ],
)
def test_an_unknown_keyword_is_a_clear_error(function, name, tmp_path):
    with pytest.raises(ArgumentError, match=f"^unknown setting 'studnet' for {name}; valid: ") as caught:
        function(studnet="lenet5_half", out=str(tmp_path / "x.onnx") if name == "quantize" else tmp_path)
    assert str(caught.value).endswith(", ".join(COMMANDS[name].settings()))  # every keyword it takes
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, ConfigError)


def test_positional_settings_are_checked():
    with pytest.raises(ArgumentError, match=r"at most 4 \(method, teacher, student, preset\), 5 given"):
        api.resolve_distill_config("rdskd", "t", "s", "cpu", "extra")
    with pytest.raises(ArgumentError, match="'teacher' both by position and by keyword"):
        api.resolve_distill_config("rdskd", "t", teacher="u")


def test_layers_file_then_keywords_then_overrides():
    """A keyword beats the file, --set beats both; a section given by keyword merges into the file's."""
    file = {"max_seconds": 5, "teacher": "t", "engine": {"precision": "32-true", "seed": 9}}
    cfg, _ = api.resolve_distill_config(config=file, max_seconds=6, engine={"seed": 3})
    assert cfg.max_seconds == 6 and cfg.engine.seed == 3 and cfg.engine.precision == "32-true"
    cfg, _ = api.resolve_distill_config(config=file, max_seconds=6, overrides=["max_seconds=7"])
    assert cfg.max_seconds == 7
    cfg, _ = api.resolve_distill_config(config=file, student=None)  # None: not given, the file decides
    assert cfg.student is None and cfg.max_seconds == 5
