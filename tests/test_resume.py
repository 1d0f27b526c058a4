"""A distill run killed with SIGKILL and rerun with --resume ends exactly like an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from tests.conftest import tiny_rdskd

SETTINGS = tiny_rdskd(gen_epochs=3, student_steps_per_epoch=150, student_data="pool") + [
    "engine.deterministic=true",
    "engine.checkpoint_every=10",
]


def distill_command(teacher, out, *extra):
    overrides = sum((["--set", s] for s in SETTINGS), [])
    return [sys.executable, "-m", "dfkt.cli", "distill", "--teacher", teacher, "--out", str(out), *overrides, *extra]


def kill_after(command, metrics, marker):
    """Start ``command`` and SIGKILL it as soon as ``marker`` appears in its metrics."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and marker not in (metrics.read_text() if metrics.exists() else ""):
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, digits_teacher):
    reference = tmp_path / "uninterrupted"
    subprocess.run(distill_command(digits_teacher, reference), check=True, capture_output=True)

    killed = tmp_path / "killed"
    metrics = killed / "metrics.jsonl"
    # Killed once in the generator stage and once in the student stage, each after a checkpoint.
    kill_after(distill_command(digits_teacher, killed), metrics, '"stage": "generator", "step": 40')
    kill_after(distill_command(digits_teacher, killed, "--resume"), metrics, '"stage": "student", "step": 20')
    assert not (killed / "summary.json").exists()

    subprocess.run(distill_command(digits_teacher, killed, "--resume"), check=True, capture_output=True)
    assert metrics.read_text().count('"event": "resume"') == 2
    a = json.loads((reference / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert a["student_acc"] == b["student_acc"] and a["student_best_on_test_acc"] == b["student_best_on_test_acc"]
    weights_a = load_file(str(reference / "student.safetensors"))
    weights_b = load_file(str(killed / "student.safetensors"))
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
