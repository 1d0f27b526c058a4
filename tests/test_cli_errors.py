"""Bad input gets one clear line on stderr and exit code 2, never a traceback, and loses nothing."""

import gzip
import struct
import subprocess
import sys

import numpy as np
import pytest

from dfkt.cli import main
from tests.conftest import tiny_rdskd


def run_cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.err.strip()


def assert_one_line_error(code, err, *needles):
    assert code == 2
    assert err.startswith("dfkt: error: ") and "\n" not in err and "Traceback" not in err
    for needle in needles:
        assert needle in err


def write_fake_fmnist(root, n=8):
    """A few 28×28 images in the IDX format, enough to load."""
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())


def test_missing_dataset_names_the_install_command(capsys, tmp_path):
    code, err = run_cli(
        capsys,
        "train-teacher",
        "--data",
        "fmnist",
        "--data-root",
        str(tmp_path / "none"),
        "--out",
        str(tmp_path / "run"),
    )
    assert_one_line_error(code, err, "apt-get install -y dataset-fashion-mnist", "--data-root")


def test_truncated_teacher_file(capsys, tmp_path, digits_teacher):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(open(digits_teacher, "rb").read()[:500])
    code, err = run_cli(capsys, "distill", "--teacher", str(bad), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "corrupt or truncated", "dfkt train-teacher")


def test_teacher_that_does_not_fit_the_data(capsys, tmp_path, digits_teacher):
    write_fake_fmnist(tmp_path)
    code, err = run_cli(
        capsys,
        "distill",
        "--teacher",
        digits_teacher,
        "--data",
        "fmnist",
        "--data-root",
        str(tmp_path),
        "--out",
        str(tmp_path / "run"),
    )
    assert_one_line_error(code, err, "32px images vs the model's 8px")


def test_teacher_with_other_class_count(capsys, tmp_path, digits_teacher):
    from dfkt.models import build_model
    from dfkt.models.files import ModelInfo, save_model

    five = save_model(
        build_model("digits_cnn", 5, 1, 8),
        ModelInfo("digits_cnn", 5, 1, 8, (0.3,), (0.4,), "digits"),
        tmp_path / "five.safetensors",
    )
    code, err = run_cli(capsys, "distill", "--teacher", str(five), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "10 classes vs the model's 5")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["distill", "--method", "nope"], "unknown method 'nope'; valid methods: cmi, dafl, deepinversion"),
        (["distill", "--student", "nope"], "unknown model 'nope'; valid models:"),
        (["train-teacher", "--model", "nope"], "unknown model 'nope'; valid models:"),
        (["distill", "--set", "params.bogus=1"], "unknown key 'bogus'"),
        (["distill", "--set", "engine.sed=1"], "unknown key 'engine.sed'"),
        (["distill", "--preset", "huge"], "unknown preset 'huge' for rdskd; valid presets: paper"),
        (["train-teacher", "--data", "nope"], "unknown dataset 'nope'"),
    ],
)
def test_unknown_names_and_keys(capsys, tmp_path, digits_teacher, args, needle):
    code, err = run_cli(
        capsys, *args, "--out", str(tmp_path / "run"), *(["--teacher", digits_teacher] if args[0] == "distill" else [])
    )
    assert_one_line_error(code, err, needle)


def test_existing_run_is_not_overwritten(capsys, tmp_path, digits_teacher):
    out = tmp_path / "run"
    assert (
        main(
            ["distill", "--teacher", digits_teacher, "--out", str(out), *sum((["--set", s] for s in tiny_rdskd()), [])]
        )
        == 0
    )
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()  # the first run's own output (e.g. its sample warnings)
    code, err = run_cli(capsys, "distill", "--teacher", digits_teacher, "--out", str(out))
    assert_one_line_error(code, err, "already holds a run", "--resume")
    assert (out / "checkpoint.pt").read_bytes() == before


def test_the_installed_command_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dfkt.cli", "distill", "--method", "nope", "--teacher", "x"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_teacher_folder_without_a_model(capsys, tmp_path):
    code, err = run_cli(capsys, "distill", "--teacher", str(tmp_path), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "no student.safetensors or model.safetensors")


def test_safetensors_file_without_dfkt_metadata(capsys, tmp_path):
    import torch
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    code, err = run_cli(capsys, "distill", "--teacher", str(plain), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "without dfkt metadata", "save_model")


def test_teacher_file_naming_an_unknown_architecture(capsys, tmp_path, digits_teacher):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(digits_teacher, framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    info = json.loads(meta["info"])
    info["arch"] = "mystery_net"
    odd = tmp_path / "odd.safetensors"
    save_file(tensors, str(odd), metadata={**meta, "info": json.dumps(info)})
    code, err = run_cli(capsys, "distill", "--teacher", str(odd), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "'mystery_net'", "known: ")
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_bad_yaml_config(capsys, tmp_path, digits_teacher):
    bad = tmp_path / "bad.yaml"
    bad.write_text("params: [unclosed\n")
    code, err = run_cli(capsys, "distill", "--teacher", digits_teacher, "--config", str(bad))
    assert_one_line_error(code, err, "cannot be read as YAML")


def test_data_root_alone_keeps_the_teachers_dataset(capsys, tmp_path, digits_teacher):
    """--data-root without --data must not switch datasets; digits ignores the root and loads."""
    from dfkt.api import resolve_distill_config

    cfg, _ = resolve_distill_config(teacher=digits_teacher, data_root=str(tmp_path))
    assert cfg.data.name is None and cfg.data.root == str(tmp_path)


def test_budget_that_ends_before_the_student_stage(capsys, tmp_path, digits_teacher):
    """Only without a generator budget share (the cpu preset has one, which always leaves the student time)."""
    out = tmp_path / "run"
    args = [
        "distill",
        "--teacher",
        digits_teacher,
        "--out",
        str(out),
        "--max-seconds",
        "0.2",
        *sum((["--set", s] for s in tiny_rdskd(gen_epochs=50, gen_budget_share="null")), []),
    ]
    code, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "ran out before the student stage", "--resume")
    assert (out / "checkpoint.pt").is_file()  # nothing lost: a larger budget continues it


@pytest.mark.parametrize("method", ["deepinversion", "cmi", "fast"])
def test_batchnorm_prior_on_a_teacher_without_batchnorm(capsys, tmp_path, method):
    from dfkt.models import build_model
    from dfkt.models.files import ModelInfo, save_model

    write_fake_fmnist(tmp_path)
    lenet = save_model(
        build_model("lenet5", 10, 1, 32),
        ModelInfo("lenet5", 10, 1, 32, (0.3,), (0.4,), "fmnist"),
        tmp_path / "lenet.safetensors",
    )
    code, err = run_cli(
        capsys,
        "distill",
        "--method",
        method,
        "--teacher",
        str(lenet),
        "--data-root",
        str(tmp_path),
        "--out",
        str(tmp_path / "run"),
    )
    assert_one_line_error(code, err, f"{method} needs a teacher with BatchNorm layers", "--set params.w_bn=0")
