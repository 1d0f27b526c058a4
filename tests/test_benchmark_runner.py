"""The benchmarks' pool of `dfkt` subprocesses (benchmarks/runner.py): at most --parallel runs at a
time and that many side by side, started in the order given, a finished run reused, a failure
reported with its log's last line while the others go on, and --report-only starting nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import runner  # noqa: E402


def describe(summary: dict) -> str:
    return f"acc {summary['acc']}"


def shell_run(folder: Path, script: str) -> runner.Run:
    """A run whose command is a shell script; $1 is its folder."""
    return runner.Run(["sh", "-c", script, "sh", str(folder)], folder)


WRITES_SUMMARY = 'mkdir -p "$1" && echo \'{"acc": 1}\' > "$1/summary.json"'


def test_at_most_and_exactly_parallel_runs_side_by_side(tmp_path, monkeypatch):
    """Six runs, two at a time: each run waits for a partner (a barrier of two, broken after a timeout
    when runs go one by one), and no more than two are ever running together."""
    barrier, lock = threading.Barrier(2, timeout=20), threading.Lock()
    running, most, started = [0], [0], []

    def fake_run(command, stdout=None, stderr=None):
        folder = Path(command[-1])
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            started.append(folder.name)
        barrier.wait()
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"acc": int(folder.name)}))
        with lock:
            running[0] -= 1
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    runs = {i: runner.Run(["fake", str(tmp_path / str(i))], tmp_path / str(i)) for i in range(6)}
    done = runner.run_pool(runs, 2, describe)
    assert done == {i: {"acc": i} for i in range(6)}
    assert most[0] == 2
    assert sorted(started[:2]) == ["0", "1"] and sorted(started[2:4]) == ["2", "3"]  # in the order given


def test_order_given_one_at_a_time(tmp_path, monkeypatch):
    started = []

    def fake_run(command, stdout=None, stderr=None):
        started.append(command[-1])
        Path(command[-1]).mkdir()
        (Path(command[-1]) / "summary.json").write_text('{"acc": 0}')
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    order = ["c", "a", "b"]
    runner.run_pool({name: runner.Run(["fake", str(tmp_path / name)], tmp_path / name) for name in order}, 1, describe)
    assert started == [str(tmp_path / name) for name in order]


def test_failure_reported_others_go_on_finished_reused(tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text('{"acc": 7}')
    runs = {
        "ok": shell_run(tmp_path / "ok", WRITES_SUMMARY),
        "bad": shell_run(tmp_path / "bad", 'echo "Traceback ..." >&2; echo "ValueError: no such method" >&2; exit 3'),
        "silent": shell_run(tmp_path / "silent", "exit 4"),
        "no summary": shell_run(tmp_path / "no summary", "exit 0"),
        "old": shell_run(tmp_path / "old", "echo ran again >&2; exit 1"),
    }
    done = runner.run_pool(runs, 2, describe)
    assert done["ok"] == {"acc": 1}
    assert done["bad"] == {"failed": "ValueError: no such method", "log": str(tmp_path / "bad.log")}
    assert done["silent"]["failed"] == "exit code 4 with an empty log"
    assert done["no summary"]["failed"] == "exit code 0 with an empty log"
    assert done["old"] == {"acc": 7}  # reused: its command, which would fail, never ran
    assert not (tmp_path / "old.log").exists()
    out = capsys.readouterr().out
    assert f"{tmp_path / 'old'}: reused, acc 7" in out
    assert f"{tmp_path / 'bad'}: FAILED: ValueError: no such method" in out


def test_report_only_starts_nothing(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text('{"acc": 7}')
    runs = {"old": shell_run(tmp_path / "old", WRITES_SUMMARY), "new": shell_run(tmp_path / "new", WRITES_SUMMARY)}
    done = runner.run_pool(runs, 2, describe, report_only=True)
    assert done == {"old": {"acc": 7}, "new": {"failed": runner.NOT_RUN}}
    assert not (tmp_path / "new").exists()


def test_report_only_without_any_finished_run_is_an_error(tmp_path):
    runs = {"a": shell_run(tmp_path / "work" / "a", WRITES_SUMMARY)}
    with pytest.raises(SystemExit, match=r"--report-only: none of the 1 runs has finished .*work/a"):
        runner.run_pool(runs, 1, describe, report_only=True)
    assert not (tmp_path / "work").exists()
