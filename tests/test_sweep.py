"""`dfkt sweep`: trials persisted in Optuna storage, resumed after a kill, split between workers."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import dfkt
from dfkt.errors import ConfigError, DfktError
from dfkt.sweep import SweepConfig, plan
from tests.conftest import FAST_ENGINE, tiny_rdskd

TINY = FAST_ENGINE + ["engine.threads=1"] + tiny_rdskd()[len(FAST_ENGINE) :]


def spec(tmp_path, teacher, **extra) -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(
        yaml.safe_dump(
            {"grid": {"params.gen_lr": [0.001, 0.01]}, "seeds": [1, 2], "teacher": teacher, "overrides": TINY, **extra}
        )
    )
    return str(path)


def sweep_command(grid: str, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dfkt.cli", "sweep", "--grid", grid, "--out", str(out), *extra]


def finished(out) -> list[str]:
    return sorted(p.parent.name for p in (out / "trials").glob("*/summary.json"))


def test_plan_is_grid_times_seeds_and_random_draws_are_seeded():
    cfg = SweepConfig(
        grid={"params.w_ie": [1, 5]},
        points=[{"params.w_a": 0}],
        random={"params.gen_lr": {"low": 1e-4, "high": 1e-1, "log": True}, "params.nz": [64, 100]},
        random_trials=3,
        seeds=[1, 2],
    )
    settings = cfg.settings()
    assert len(settings) == 6 and settings[:3] == [{"params.w_ie": 1}, {"params.w_ie": 5}, {"params.w_a": 0}]
    assert all(1e-4 <= s["params.gen_lr"] <= 1e-1 and s["params.nz"] in (64, 100) for s in settings[3:])
    assert settings == SweepConfig(**cfg.model_dump()).settings()  # the same draws every time
    trials = plan(cfg)
    assert len(trials) == 12 and len({t["key"] for t in trials}) == 12
    assert trials[0]["overrides"] == ["params.w_ie=1"] and trials[1]["seed"] == 2
    with pytest.raises(ConfigError, match="random_trials"):
        SweepConfig(random={"params.nz": [64]}).settings()


def test_sweep_errors_name_the_fix(tmp_path, digits_teacher):
    with pytest.raises(ConfigError, match="--teacher"):
        dfkt.sweep({"grid": {"params.gen_lr": [0.1]}}, out=tmp_path / "a")
    with pytest.raises(ConfigError, match="unknown"):
        dfkt.sweep({"grid": {"params.gen_lr": [0.1]}, "teacher": digits_teacher, "typo": 1}, out=tmp_path / "b")
    one = {"grid": {"params.gen_lr": [0.1]}, "teacher": digits_teacher, "seeds": [1], "overrides": TINY}
    dfkt.sweep(one, out=tmp_path / "c")
    with pytest.raises(DfktError, match="other trials"):  # the same storage, another plan
        dfkt.sweep({**one, "seeds": [1, 2]}, out=tmp_path / "c")


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_workers_opening_one_storage_together_share_one_study(tmp_path, kind):
    # Started at the same instant, Optuna's schema creation races (IntegrityError on its version row).
    import threading

    from dfkt.sweep import open_storage, open_study

    trials = plan(SweepConfig(grid={"params.gen_lr": [0.1, 0.2]}, seeds=[1]))
    for round_ in range(5):
        url = f"sqlite:///{tmp_path / f'{round_}.db'}" if kind == "sqlite" else str(tmp_path / f"{round_}.journal")
        barrier, plans, errors = threading.Barrier(2), [], []

        def join():
            barrier.wait()
            try:
                plans.append(open_study(open_storage(url), "sweep", trials).user_attrs["plan"])
            except Exception as exc:  # noqa: BLE001 - the test reports whatever a worker hit
                errors.append(repr(exc))

        threads = [threading.Thread(target=join) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors and plans == [trials, trials]
        assert len(open_study(open_storage(url), "sweep", trials).get_trials()) == len(trials)  # queued once


def test_failed_trials_are_queued_again_once_and_a_duplicate_never_runs(tmp_path):
    from optuna.trial import TrialState

    from dfkt.sweep import open_storage, open_study, requeue_failed, runs_first

    trials = plan(SweepConfig(grid={"params.gen_lr": [0.1, 0.2]}, seeds=[1]))
    study = open_study(open_storage(str(tmp_path / "s.journal")), "sweep", trials)
    first, second = study.ask(), study.ask()
    assert runs_first(study, first) and runs_first(study, second)
    first.set_user_attr("error", "out of memory")
    study.tell(first, state=TrialState.FAIL)
    study.tell(second, 0.5)
    assert requeue_failed(study) == 1 and requeue_failed(study) == 0  # queued, and only once
    study.enqueue_trial({}, user_attrs={"trial": trials[0]})  # a second copy, as a racing worker would add
    copies = [study.ask(), study.ask()]
    assert [t.user_attrs["trial"]["key"] for t in copies] == [trials[0]["key"]] * 2
    assert [runs_first(study, t) for t in copies] == [True, False]  # the lower number runs
    again = study.ask()  # nothing waits: Optuna starts a fresh trial without a plan entry
    assert "trial" not in again.user_attrs
    study.tell(copies[0], 0.7)
    study.enqueue_trial({}, user_attrs={"trial": trials[1]})
    finished_copy = study.ask()
    assert not runs_first(study, finished_copy)  # its key is complete


def test_a_failed_trial_runs_again_with_retry_failed(tmp_path, digits_teacher):
    import shutil

    teacher = tmp_path / "later" / "model.safetensors"  # not there yet: the trial fails
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump({"grid": {"params.gen_lr": [0.001]}, "seeds": [1], "teacher": str(teacher), "overrides": TINY})
    )
    out = tmp_path / "sweep"
    first = subprocess.run(sweep_command(str(grid), out), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "--retry-failed" in first.stdout and json.loads((out / "sweep.json").read_text())["trials_finished"] == 0
    teacher.parent.mkdir()
    shutil.copy(digits_teacher, teacher)
    plain = subprocess.run(sweep_command(str(grid), out), capture_output=True, text=True, timeout=300)
    assert json.loads((out / "sweep.json").read_text())["trials_finished"] == 0, plain.stderr  # not without the flag
    retried = subprocess.run(
        sweep_command(str(grid), out, "--retry-failed"), capture_output=True, text=True, timeout=600
    )
    assert retried.returncode == 0, retried.stderr
    assert "failed trials queued again: 1" in retried.stderr
    result = json.loads((out / "sweep.json").read_text())
    assert result["trials_finished"] == 1 and not result["failed"]


def test_one_trial_popped_by_two_workers_is_kept_by_one(tmp_path):
    # SQLite lets two workers pop the same waiting trial; only one of them may run it.
    import threading

    from dfkt.sweep import claim, open_storage, open_study

    study = open_study(
        open_storage(f"sqlite:///{tmp_path / 's.db'}"),
        "sweep",
        plan(SweepConfig(grid={"params.gen_lr": [0.1]}, seeds=[1])),
    )
    trial, barrier, kept = study.ask(), threading.Barrier(2), []

    def take():
        barrier.wait()
        kept.append(claim(study, trial))

    threads = [threading.Thread(target=take) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(kept) == [False, True]


def test_a_storage_that_cannot_open_names_the_flag(tmp_path):
    from dfkt.sweep import open_storage

    with pytest.raises(DfktError, match="check --storage"):
        open_storage(f"sqlite:///{tmp_path / 'no-such-folder' / 'sweep.db'}")
    with pytest.raises(DfktError, match="check --storage"):
        open_storage("nosuchdialect://host/db")


def test_a_missing_database_driver_is_one_line_naming_the_pip_command(monkeypatch, tmp_path, capsys):
    from dfkt.cli import main
    from dfkt.sweep import database_url, open_storage

    assert database_url("postgresql://me@db:5432/sweeps") == "postgresql+psycopg://me@db:5432/sweeps"
    assert database_url("postgresql+psycopg2://me@db/sweeps") == "postgresql+psycopg2://me@db/sweeps"
    assert database_url("sqlite:///sweep.db") == "sqlite:///sweep.db"
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if `pip install 'dfkt[postgres]'` had not run
    with pytest.raises(DfktError, match=r"pip install 'dfkt\[postgres\]'"):
        open_storage("postgresql://me:secret@127.0.0.1:1/sweeps")
    code = main(
        [
            "sweep",
            "--method",
            "rdskd",
            "--teacher",
            "t.safetensors",
            "--out",
            str(tmp_path / "sweep"),
            "--storage",
            "postgresql://me:secret@127.0.0.1:1/sweeps",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install 'dfkt[postgres]'" in err, err
    assert "secret" not in err and "Traceback" not in err


def postgres_program(name: str) -> str | None:
    """A PostgreSQL server program: on the PATH, or where Debian's postgresql package puts it."""
    import glob
    import shutil

    found = shutil.which(name)
    versions = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0,
    )
    return found or (versions[-1] if versions else None)


def missing(reason: str):
    """A system dependency the README's test command installs: CI must have it, elsewhere skip."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def postgres_url(request):
    """A throwaway PostgreSQL cluster in a temporary folder on a free local port, stopped and deleted
    afterwards; its URL (the driver of the postgres extra, trust authentication, local only)."""
    import shutil
    import socket
    import tempfile
    from pathlib import Path

    initdb, pg_ctl = postgres_program("initdb"), postgres_program("pg_ctl")
    if not (initdb and pg_ctl):
        missing("the PostgreSQL sweep test needs a PostgreSQL server: apt-get install -y postgresql")
    folder = Path(tempfile.mkdtemp(prefix="dfkt-postgres-"))
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
    as_user = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: Debian's package makes a postgres user
        import pwd

        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            missing("the PostgreSQL sweep test runs as root and needs the postgres user: apt-get install -y postgresql")
        os.chown(folder, account.pw_uid, account.pw_gid)
        as_user = {"user": "postgres", "group": account.pw_gid}
    data = folder / "data"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def run(*args):
        done = subprocess.run(args, cwd=folder, capture_output=True, text=True, timeout=120, **as_user)
        assert done.returncode == 0, f"{args[0]}: {done.stdout}{done.stderr}"

    run(initdb, "-D", str(data), "-U", "dfkt", "--auth=trust", "-E", "UTF8", "--no-sync")
    request.addfinalizer(
        lambda: subprocess.run(
            [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
            cwd=folder,
            capture_output=True,
            timeout=120,
            **as_user,
        )
    )
    run(
        pg_ctl,
        "-D",
        str(data),
        "-l",
        str(folder / "server.log"),
        "-w",
        "-t",
        "60",
        "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off",
        "start",
    )
    return f"postgresql://dfkt@127.0.0.1:{port}/postgres"


@pytest.mark.slow
def test_two_workers_share_one_study_on_a_postgresql_server(tmp_path, digits_teacher, postgres_url):
    import optuna

    from dfkt.sweep import database_url

    grid, out = spec(tmp_path, digits_teacher, grid={"params.gen_lr": [0.01]}), tmp_path / "sweep"  # 2 seeds
    workers = [
        subprocess.Popen(
            sweep_command(grid, out, "--storage", postgres_url),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        logs = [w.communicate(timeout=900)[1] for w in workers]
    finally:  # never leave a worker behind (the server stops after the test)
        for w in workers:
            w.kill()
    assert all(w.returncode == 0 for w in workers), logs
    result = json.loads((out / "sweep.json").read_text())
    assert result["storage"] == postgres_url and not (out / "study.journal").exists()
    assert result["trials_finished"] == 2 and len({t["key"] for t in result["trials"]}) == 2
    assert len({t["worker"] for t in result["trials"]}) == 2  # one each
    assert sum(log.count("dfkt sweep: trial") for log in logs) == 2  # and no trial twice
    study = optuna.load_study(study_name="dfkt-sweep", storage=database_url(postgres_url))
    assert sorted(t.user_attrs["trial"]["key"] for t in study.trials if t.state.name == "COMPLETE") == sorted(
        t["key"] for t in result["trials"]
    )  # kept in the server


@pytest.mark.slow
def test_killed_sweep_resumes_without_repeating_finished_trials(tmp_path, digits_teacher):
    grid, out = spec(tmp_path, digits_teacher), tmp_path / "sweep"
    proc = subprocess.Popen(
        sweep_command(grid, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(finished(out)) < 2:
        time.sleep(0.1)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {key: (out / "trials" / key / "summary.json").stat().st_mtime_ns for key in finished(out)}
    assert 2 <= len(before) < 4

    done = subprocess.run(sweep_command(grid, out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "sweep.json").read_text())
    assert result["trials_finished"] == 4 and len({t["key"] for t in result["trials"]}) == 4
    for key, mtime in before.items():  # finished trials were not run again
        assert (out / "trials" / key / "summary.json").stat().st_mtime_ns == mtime
    for key in finished(out):  # every trial's run finished once (a killed one resumed, not restarted)
        assert (out / "trials" / f"{key}.log").read_text().count("rdskd: student") == 1, key
    assert_statistics_are_the_trials(out, result, seeds=2)


def assert_statistics_are_the_trials(out, result: dict, seeds: int) -> None:
    """The sweep's statistics, overall and per setting, recomputed from each trial's own summary.json."""
    import statistics

    accs = {
        key: json.loads((out / "trials" / key / "summary.json").read_text())["student_acc"] for key in finished(out)
    }
    assert {t["key"]: t["student_acc"] for t in result["trials"]} == accs

    def assert_described(stats: dict, values: list[float]) -> None:
        assert stats["n"] == len(values) and sorted(stats["values"]) == sorted(values), (stats, values)
        assert stats["min"] == min(values) and stats["max"] == max(values)
        assert stats["mean"] == pytest.approx(sum(values) / len(values))
        assert stats["std"] == pytest.approx(statistics.stdev(values))

    assert_described(result["student_acc"], list(accs.values()))
    for setting in result["settings"]:
        values = [accs[t["key"]] for t in result["trials"] if t["setting"] == setting["setting"]]
        assert len(values) == seeds
        assert_described(setting, values)


@pytest.mark.slow
def test_two_workers_split_one_study(tmp_path, digits_teacher):
    grid, out = spec(tmp_path, digits_teacher), tmp_path / "sweep"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    workers = [
        subprocess.Popen(
            sweep_command(grid, out, "--storage", storage), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    logs = [w.communicate(timeout=600)[1] for w in workers]
    assert all(w.returncode == 0 for w in workers), logs
    result = json.loads((out / "sweep.json").read_text())
    assert result["trials_finished"] == 4 and len({t["key"] for t in result["trials"]}) == 4
    by_worker = {t["worker"] for t in result["trials"]}
    assert len(by_worker) == 2  # each ran some
    assert sum(log.count("dfkt sweep: trial") for log in logs) == 4  # and no trial twice
    assert_statistics_are_the_trials(out, result, seeds=2)


def test_the_readme_sweep_space_is_valid():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    space = yaml.safe_load(re.search(r"```yaml\n(.*?)```", readme, flags=re.S).group(1))
    cfg = SweepConfig(**space, teacher="t.safetensors", seeds=[1])
    assert len(plan(cfg)) == 3 * 3 + 1 + space["random_trials"]


def test_a_trial_is_stale_only_when_its_worker_is_gone_or_silent():
    import datetime
    import socket
    from types import SimpleNamespace

    from dfkt.sweep import STALE_SECONDS, _alive

    def trial(**attrs):
        return SimpleNamespace(user_attrs={"trial": {}, **attrs}, datetime_start=datetime.datetime.now())

    here = {"host": socket.gethostname(), "heartbeat": time.time()}
    assert _alive(trial())  # just taken, its worker not yet recorded: not requeued by a racing worker
    assert _alive(trial(**here, pid=os.getpid()))
    assert not _alive(trial(**here, pid=2**22 + 12345))  # its process is gone
    assert _alive(trial(host="elsewhere", heartbeat=time.time()))
    assert not _alive(trial(host="elsewhere", heartbeat=time.time() - STALE_SECONDS - 1))
