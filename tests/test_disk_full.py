"""A full disk is a one-line DiskFullError naming the folder: the previous file stays as it was and
no temporary file is left. The disk is simulated by writers that fail as a full one does."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import dfkt.models.files
from dfkt.cli import main
from dfkt.engine import checkpoint
from dfkt.errors import DfktError, DiskFullError
from dfkt.models.files import ModelInfo, save_model
from dfkt.runs import write_json
from tests.conftest import tiny_rdskd

# What the writers raise on a full disk (the last two as seen on a 300 KB tmpfs).
FULL = {
    "ENOSPC": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "EDQUOT": lambda: OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)),
    "torch": lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
    "safetensors": lambda: SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
}


def assert_clean_failure(err: pytest.ExceptionInfo, folder: Path, name: str, before: bytes) -> None:
    message = str(err.value)
    assert isinstance(err.value, DfktError)
    assert "\n" not in message
    assert f"cannot write {name} in {folder.resolve()}: the disk" in message, message
    assert "free" in message and "needed" in message, message
    assert (folder / name).read_bytes() == before, "the previous file was changed"
    assert sorted(p.name for p in folder.iterdir()) == [name], "a temporary file was left"


@pytest.mark.parametrize("kind", ["ENOSPC", "EDQUOT", "torch"])
def test_checkpoint_on_a_full_disk(tmp_path, monkeypatch, kind):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"w": torch.arange(10.0)}, path)
    before = path.read_bytes()

    def torch_save_fills_the_disk(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise FULL[kind]()

    monkeypatch.setattr(torch, "save", torch_save_fills_the_disk)
    with pytest.raises(DiskFullError) as err:
        checkpoint.save_atomic({"w": torch.zeros(1000)}, path)
    assert_clean_failure(err, tmp_path, "checkpoint.pt", before)
    assert "3.9 KB needed" in str(err.value)  # the payload's 1000 float32
    assert ("quota" in str(err.value)) == (kind == "EDQUOT")


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def torch_save_fails(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "save", torch_save_fails)
    with pytest.raises(OSError, match="Input/output") as err:
        checkpoint.save_atomic({"w": torch.zeros(10)}, tmp_path / "checkpoint.pt")
    assert not isinstance(err.value, DfktError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["ENOSPC", "safetensors"])
def test_save_model_on_a_full_disk(tmp_path, monkeypatch, kind):
    info = ModelInfo("digits_cnn", 10, 1, 8, (0.5,), (0.25,))
    path = save_model(torch.nn.Linear(4, 10), info, tmp_path / "model.safetensors")
    before = path.read_bytes()

    def save_file_fills_the_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a model")
        raise FULL[kind]()

    monkeypatch.setattr(dfkt.models.files, "save_file", save_file_fills_the_disk)
    with pytest.raises(DiskFullError) as err:
        save_model(torch.nn.Linear(4, 10), info, path)
    assert_clean_failure(err, tmp_path, "model.safetensors", before)


def test_write_json_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_json(path, {"student_acc": 0.5})
    before = path.read_bytes()
    real_write_text = Path.write_text

    def write_text_fills_the_disk(self, text, *args, **kwargs):
        real_write_text(self, text[:5], *args, **kwargs)
        raise FULL["ENOSPC"]()

    monkeypatch.setattr(Path, "write_text", write_text_fills_the_disk)
    data = {"student_acc": 0.75, "notes": "x" * 3000}
    with pytest.raises(DiskFullError) as err:
        write_json(path, data)
    assert_clean_failure(err, tmp_path, "summary.json", before)
    assert f"{len(json.dumps(data, indent=2)) / 1024:.1f} KB needed" in str(err.value)


def test_distill_on_a_full_disk_is_one_line_and_exit_2(digits_teacher, tmp_path, monkeypatch, capsys):
    """The first checkpoint is written; the disk is full for the next: exit 2, one line, the first kept."""
    out = tmp_path / "run"
    real_save = torch.save
    kept = {}

    def second_save_fills_the_disk(obj, handle, *args, **kwargs):
        if not kept:
            kept["first"] = None
            return real_save(obj, handle, *args, **kwargs)
        kept["first"] = (out / "checkpoint.pt").read_bytes()
        handle.write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", second_save_fills_the_disk)
    code = main(
        ["distill", "--teacher", digits_teacher, "--out", str(out), *sum((["--set", s] for s in tiny_rdskd()), [])]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dfkt: error: cannot write checkpoint.pt in {out.resolve()}: the disk is full ("), err
    assert kept.get("first"), "the run never wrote its first checkpoint"
    assert (out / "checkpoint.pt").read_bytes() == kept["first"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_any_other_write_on_a_full_disk_is_one_line_too(monkeypatch, capsys, tmp_path):
    """Writes outside the checked writers (here: listing methods, patched to fail as a full log write would)."""
    from dfkt import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))

    monkeypatch.setattr(cli, "_dispatch", full)
    assert cli.main(["list", "methods"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0] and "disk is full" in err[0]
