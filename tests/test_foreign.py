"""Teachers from outside dfkt: torchvision, TorchScript and module:function, through the CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image
from safetensors.torch import save_file

from dfkt.cli import main
from dfkt.config import DeclaredInfo, EngineConfig
from dfkt.data import load_dataset, normalize
from dfkt.engine import Engine
from dfkt.models.files import load_model
from dfkt.models.foreign import ForeignClassifier, load_foreign
from dfkt.supervised import evaluate_model
from dfkt.synthesis.bn_prior import BNStatsPrior
from tests.conftest import FAST_ENGINE

FEW_STEPS = FAST_ENGINE + [
    "params.gen_batch=16",
    "params.student_batch=16",
    "params.student_epochs=1",
    "params.student_steps_per_epoch=6",
    "eval_every=3",
]


def set_flags(settings: list[str]) -> list[str]:
    return [flag for s in settings for flag in ("--set", s)]


def accuracy(net, images, labels, mean, std, classes=10) -> float:
    engine = Engine(EngineConfig(precision="32-true", progress=False))
    return evaluate_model(net.eval(), normalize(images, mean, std), labels, engine, classes)["accuracy"]


@pytest.fixture
def rgb_folder(tmp_path):
    """30 labelled 32x32 RGB images in class-index subfolders: test data for a 3-channel teacher."""
    rng = np.random.default_rng(0)
    for i in range(30):
        (tmp_path / "test" / str(i % 10)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / "test" / str(i % 10) / f"{i}.png"
        )
    return tmp_path / "test"


def distil(*args) -> dict:
    assert main(["distill", "--method", "dfad", *args, *set_flags(FEW_STEPS)]) == 0
    out = args[args.index("--out") + 1]
    return json.loads((Path(out) / "summary.json").read_text())


def test_torchvision_resnet18_teacher_with_a_weights_file(rgb_folder, tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    torch.save(net.state_dict(), tmp_path / "resnet18.pt")
    summary = distil(
        "--teacher",
        "torchvision:resnet18",
        "--teacher-weights",
        str(tmp_path / "resnet18.pt"),
        "--data",
        str(rgb_folder),
        "--student",
        "wrn16_1",
        "--out",
        str(tmp_path / "run"),
    )
    data = load_dataset(str(rgb_folder))
    assert summary["teacher"] == "torchvision:resnet18"
    # The teacher is the saved network, fed with the folder's own normalisation.
    assert summary["teacher_acc"] == pytest.approx(
        accuracy(net, data.test_images, data.test_labels, data.mean, data.std)
    )
    assert (tmp_path / "run" / "student.safetensors").is_file()
    assert "torchvision:resnet18" in (tmp_path / "run" / "config.yaml").read_text()


def test_torchscript_teacher_is_the_same_model(digits_teacher, tmp_path):
    model, info = load_model(digits_teacher)
    torch.jit.script(model.eval()).save(str(tmp_path / "teacher.pt"))
    summary = distil(
        "--teacher",
        str(tmp_path / "teacher.pt"),
        "--data",
        "digits",
        "--student",
        "digits_cnn_half",
        "--out",
        str(tmp_path / "run"),
    )
    data = load_dataset("digits")
    assert summary["teacher_acc"] == pytest.approx(
        accuracy(model, data.test_images, data.test_labels, info.mean, info.std)
    )


def test_module_function_teacher_gives_the_same_features(digits_teacher, tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "from dfkt.models import build_model\n\ndef digits():\n    return build_model('digits_cnn', 10, 1, 8)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model, _ = load_model(digits_teacher)
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    x = torch.randn(4, 1, 8, 8)
    wrapped = ForeignClassifier(
        load_foreign("my_nets:digits", "callable", str(tmp_path / "weights.safetensors"), DeclaredInfo()), "callable"
    )
    model.eval()
    assert torch.allclose(wrapped.forward_features(x), model.forward_features(x))
    assert torch.allclose(wrapped.classify(wrapped.forward_features(x)), model(x))
    assert wrapped.feature_dim == model.feature_dim
    # dafl takes the teacher's penultimate features: they come from the hook.
    summary = distil(
        "--teacher",
        "my_nets:digits",
        "--teacher-weights",
        str(tmp_path / "weights.safetensors"),
        "--data",
        "digits",
        "--student",
        "digits_cnn_half",
        "--out",
        str(tmp_path / "run"),
    )
    data = load_dataset("digits")
    assert summary["teacher_acc"] == pytest.approx(
        accuracy(model, data.test_images, data.test_labels, data.mean, data.std)
    )


def test_batchnorm_prior_finds_a_torchvision_teachers_layers():
    prior = BNStatsPrior(ForeignClassifier(torchvision.models.resnet18(num_classes=10).eval(), "torchvision"), "cmi")
    assert len(prior.layers) == 20


def one_line_error(capsys, *args) -> str:
    assert main(["distill", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dfkt: error: ") and "\n" not in err, err
    return err


def test_foreign_teacher_errors(capsys, digits_teacher, rgb_folder, tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pt")
    model, _ = load_model(digits_teacher)
    torch.jit.script(model.eval()).save(str(tmp_path / "teacher.pt"))
    capsys.readouterr()  # torch.jit.script's deprecation warning, when warnings are not captured
    cases = [
        (["--teacher", "torchvision:resnet18", "--data", str(rgb_folder)], "--teacher-weights"),
        (["--teacher", "torchvision:resnet18", "--teacher-weights", str(tmp_path / "r18.pt")], "--data NAME"),
        (
            [
                "--teacher",
                "torchvision:resnet1",
                "--teacher-weights",
                str(tmp_path / "r18.pt"),
                "--data",
                str(rgb_folder),
            ],
            "unknown torchvision classifier 'resnet1'",
        ),
        (
            [
                "--teacher",
                "torchvision:resnet34",
                "--teacher-weights",
                str(tmp_path / "r18.pt"),
                "--data",
                str(rgb_folder),
            ],
            "does not fit torchvision:resnet34",
        ),
        (
            [
                "--teacher",
                "torchvision:resnet18",
                "--teacher-weights",
                str(tmp_path / "r18.pt"),
                "--data",
                str(rgb_folder),
                "--set",
                "teacher_info.num_classes=5",
            ],
            "size mismatch for fc.weight",
        ),
        (
            ["--teacher", "torchvision:resnet18", "--teacher-weights", str(tmp_path / "r18.pt"), "--data", "digits"],
            "fails on 1×8×8 images",
        ),
        (
            ["--teacher", "no_such_module:build", "--teacher-weights", str(tmp_path / "r18.pt"), "--data", "digits"],
            "cannot import 'no_such_module:build'",
        ),
        (
            [
                "--teacher",
                str(tmp_path / "teacher.pt"),
                "--teacher-weights",
                str(tmp_path / "r18.pt"),
                "--data",
                "digits",
            ],
            "drop --teacher-weights",
        ),
        (
            [
                "--teacher",
                str(tmp_path / "teacher.pt"),
                "--data",
                "digits",
                "--method",
                "dafl",
                "--student",
                "digits_cnn_half",
            ],
            "a TorchScript teacher hides its layers",
        ),
        (
            [
                "--teacher",
                str(tmp_path / "teacher.pt"),
                "--data",
                "digits",
                "--method",
                "deepinversion",
                "--student",
                "digits_cnn_half",
            ],
            "a TorchScript teacher hides them",
        ),
    ]
    for i, (args, needle) in enumerate(cases):
        err = one_line_error(capsys, *args, "--out", str(tmp_path / f"run{i}"), *set_flags(FAST_ENGINE))
        assert needle in err, (args, err)


def test_a_224px_torchvision_teacher_distils_with_the_imagenet_preset(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        (tmp_path / "test" / str(i)).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(tmp_path / "test" / str(i) / "a.png")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), tmp_path / "resnet18.pt")
    tiny = FAST_ENGINE + [
        "params.gen_batch=4",
        "params.gen_epochs=1",
        "params.gen_steps_per_epoch=2",
        "params.student_batch=4",
        "params.student_epochs=1",
        "params.student_steps_per_epoch=2",
    ]
    out = tmp_path / "run"
    assert (
        main(
            [
                "distill",
                "--method",
                "rdskd",
                "--preset",
                "paper-imagenet",
                "--teacher",
                "torchvision:resnet18",
                "--teacher-weights",
                str(tmp_path / "resnet18.pt"),
                "--data",
                str(tmp_path / "test"),
                "--student",
                "wrn16_1",
                "--out",
                str(out),
                *set_flags(tiny),
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    generator_steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    generator_steps = [r for r in generator_steps if r.get("stage") == "generator" and "event" not in r]
    assert generator_steps[-1]["step"] == 2 and math.isfinite(generator_steps[-1]["g_loss"])  # both steps ran
    # 50 samples of 224x224 (the fewest the diagnostics take), each judged by the teacher as one of its 4 classes
    assert len(summary["samples"]["class_histogram"]) == 4 and sum(summary["samples"]["class_histogram"]) == 50
    assert yaml.safe_load((out / "config.yaml").read_text())["params"]["generator"] == "deep"
