"""Bad input gets one clear line on stderr and exit code 2, never a traceback, and loses nothing."""

import gzip
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from dfkt.cli import main
from tests.conftest import FAST_ENGINE, tiny_rdskd


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
    code, err = run_cli(capsys, "train-teacher", "--data", "fmnist", "--data-root", str(tmp_path / "none"),
                        "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "apt-get install -y dataset-fashion-mnist", "--data-root")


def test_truncated_teacher_file(capsys, tmp_path, digits_teacher):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(open(digits_teacher, "rb").read()[:500])
    code, err = run_cli(capsys, "distill", "--teacher", str(bad), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "corrupt or truncated", "dfkt train-teacher")


def test_teacher_that_does_not_fit_the_data(capsys, tmp_path, digits_teacher):
    write_fake_fmnist(tmp_path)
    code, err = run_cli(capsys, "distill", "--teacher", digits_teacher, "--data", "fmnist",
                        "--data-root", str(tmp_path), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "32px images vs the model's 8px")


def test_teacher_with_other_class_count(capsys, tmp_path, digits_teacher):
    from dfkt.models import build_model
    from dfkt.models.files import ModelInfo, save_model

    five = save_model(build_model("digits_cnn", 5, 1, 8), ModelInfo("digits_cnn", 5, 1, 8, (0.3,), (0.4,), "digits"),
                      tmp_path / "five.safetensors")
    code, err = run_cli(capsys, "distill", "--teacher", str(five), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "10 classes vs the model's 5")


@pytest.mark.parametrize("args, needle", [
    (["distill", "--method", "nope"], "unknown method 'nope'; valid methods: rdskd"),
    (["distill", "--student", "nope"], "unknown model 'nope'; valid models:"),
    (["train-teacher", "--model", "nope"], "unknown model 'nope'; valid models:"),
    (["distill", "--set", "params.bogus=1"], "unknown key 'bogus'"),
    (["distill", "--set", "engine.sed=1"], "unknown key 'engine.sed'"),
    (["distill", "--preset", "huge"], "unknown preset 'huge' for rdskd; valid presets: paper"),
    (["train-teacher", "--data", "nope"], "unknown dataset 'nope'"),
])
def test_unknown_names_and_keys(capsys, tmp_path, digits_teacher, args, needle):
    code, err = run_cli(capsys, *args, "--out", str(tmp_path / "run"),
                        *(["--teacher", digits_teacher] if args[0] == "distill" else []))
    assert_one_line_error(code, err, needle)


def test_existing_run_is_not_overwritten(capsys, tmp_path, digits_teacher):
    out = tmp_path / "run"
    assert main(["distill", "--teacher", digits_teacher, "--out", str(out), *sum(
        (["--set", s] for s in tiny_rdskd()), [])]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    code, err = run_cli(capsys, "distill", "--teacher", digits_teacher, "--out", str(out))
    assert_one_line_error(code, err, "already holds a run", "--resume")
    assert (out / "checkpoint.pt").read_bytes() == before


def test_the_installed_command_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dfkt.cli", "distill", "--method", "nope", "--teacher", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
