"""A sweep: one method over a grid or random space of settings, several seeds each, every trial a
normal ``dfkt distill`` run folder. Trials are kept in an Optuna storage (a journal file, or a
database URL), which is what lets several workers, on one machine or several, share a study, and
an interrupted study resume without redoing finished trials.

The plan (every setting x seed) is fixed when the study is created: the creating worker enqueues
every trial once (creating a study succeeds for exactly one worker), and each worker pops waiting
trials, which the storage hands to one worker only. A trial left running by a dead worker (same
host and its process gone, or no heartbeat for ``STALE_SECONDS``) is queued again; its run folder
resumes from its checkpoint, so a killed trial loses at most the work since it. A failed trial
(its run exited with an error) stays failed unless a worker is told to retry failed trials.

Queues may hold a trial twice (two workers requeueing at once); of the copies waiting or running,
only the one with the lowest number runs, so a trial never runs twice at the same time.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from dfkt.config import StrictModel
from dfkt.errors import ConfigError, DfktError

STALE_SECONDS = 600.0
HEARTBEAT_SECONDS = 30.0
CLAIM_SECONDS = 1.0  # how long a taken trial's owner waits before checking it kept it


class RandomRange(StrictModel):
    low: float
    high: float
    log: bool = False
    integer: bool = False


class SweepConfig(StrictModel):
    """``dfkt sweep``: what to run and over which settings."""

    method: str = Field("rdskd", description="DFKD method (see 'dfkt list methods')")
    teacher: str = Field("", description="teacher model file (as for distill)")
    preset: str | None = Field("cpu", description="method preset of every trial")
    seeds: list[int] = Field([1, 2, 3], min_length=1, description="engine seeds of each setting")
    max_seconds: float | None = Field(None, gt=0, description="wall-time budget of each trial")
    grid: dict[str, list[Any]] = Field({}, description="setting -> values; every combination is a trial")
    points: list[dict[str, Any]] = Field(
        [], description="explicit settings after the grid's, e.g. one loss weight changed at a time"
    )
    random: dict[str, RandomRange | list[Any]] = Field(
        {}, description="setting -> range or choices, drawn random_trials times (seeded)"
    )
    random_trials: int = Field(0, ge=0, description="settings drawn from the random space")
    random_seed: int = Field(0, description="seed of the random draws")
    overrides: list[str] = Field([], description="--set settings shared by every trial")

    def settings(self) -> list[dict[str, Any]]:
        """Every setting of the sweep: the grid's combinations, the explicit points, then the random draws."""
        points = (
            [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())] if self.grid else []
        )
        points += [dict(p) for p in self.points]
        if self.random and not self.random_trials:
            raise ConfigError("a random space needs random_trials: N (how many settings to draw)")
        rng = random.Random(self.random_seed)
        base = points or [{}]
        for i in range(self.random_trials):
            draw = dict(base[i % len(base)])
            for key, space in self.random.items():
                draw[key] = rng.choice(space) if isinstance(space, list) else _draw(space, rng)
            points.append(draw)
        return points or [{}]


def _draw(space: RandomRange, rng: random.Random) -> float | int:
    if space.log:
        value = math.exp(rng.uniform(math.log(space.low), math.log(space.high)))
    else:
        value = rng.uniform(space.low, space.high)
    return int(round(value)) if space.integer else float(f"{value:.4g}")


def plan(cfg: SweepConfig) -> list[dict[str, Any]]:
    """The trials: one per setting and seed, each with a stable key that names its run folder."""
    trials = []
    for index, setting in enumerate(cfg.settings()):
        for seed in cfg.seeds:
            trials.append(
                {
                    "key": f"s{index:03d}-seed{seed}",
                    "setting": index,
                    "seed": seed,
                    "overrides": [f"{k}={json.dumps(v)}" for k, v in setting.items()],
                }
            )
    return trials


def open_storage(url: str):
    """A journal file (any path) or a database (a URL such as sqlite:///sweep.db)."""
    try:
        import optuna
    except ImportError:
        raise DfktError("dfkt sweep keeps its trials with Optuna: pip install 'dfkt[sweep]'") from None

    if "://" in url:
        return _database(optuna, url)
    from optuna.storages.journal import JournalFileBackend

    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(url))


POSTGRES_DRIVER = "psycopg"  # what `pip install 'dfkt[postgres]'` installs (psycopg 3)


def database_url(url: str) -> str:
    """The URL SQLAlchemy opens: a PostgreSQL URL without a driver (postgresql://...) gets psycopg 3,
    the driver of the ``postgres`` extra, whichever default the installed SQLAlchemy has (psycopg2
    before 2.1); a URL naming its driver (postgresql+psycopg2://...) is left as it is."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql+{POSTGRES_DRIVER}://{rest}" if sep and scheme == "postgresql" else url


def _database(optuna, url: str, attempts: int = 5):
    """Workers started together race to create the schema (the loser gets an IntegrityError on
    Optuna's version row); retrying finds the schema made. SQLite writers wait up to a minute for
    the file lock instead of its default 5 s."""
    import sqlalchemy.exc

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    scheme = url.partition("://")[0]
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(database_url(url), engine_kwargs=engine_kwargs)
        except ImportError as exc:  # the database's driver is not installed
            fix = (
                "pip install 'dfkt[postgres]'"
                if scheme.startswith("postgresql")
                else "install the Python driver SQLAlchemy names for it"
            )
            missing = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc  # Optuna rewords it
            raise DfktError(
                f"the sweep storage {scheme}://... needs a database driver that is not installed ({missing}): {fix}"
            ) from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as exc:
            error = exc
            time.sleep(0.2 * (attempt + 1))
        except sqlalchemy.exc.SQLAlchemyError as exc:  # a malformed URL: retrying cannot help
            error = exc
            break
    raise DfktError(
        f"cannot open the sweep storage {url} ({type(error).__name__}: {str(error).splitlines()[0]}); "
        "check --storage (sqlite:///FILE or postgresql://USER@HOST/DB), or leave it out for "
        "OUT/study.journal"
    ) from error


def open_study(storage, name: str, trials: list[dict[str, Any]]):
    """Create the study and queue its trials, or join it once its creator has queued them."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name)
        deadline = time.time() + 120
        while "plan" not in study.user_attrs:  # its creator is still queueing
            if time.time() > deadline:
                raise DfktError(
                    f"study {name} exists but has no plan; its creator died while queueing: delete the "
                    "storage (or pass another --storage) to start the sweep again"
                )
            time.sleep(0.5)
        if study.user_attrs["plan"] != trials:
            raise DfktError(
                f"the storage already holds a study {name} with other trials; pass another --out or "
                "--storage for a different sweep"
            )
        return study
    for trial in trials:
        study.enqueue_trial({}, user_attrs={"trial": trial})
    study.set_user_attr("plan", trials)
    return study


def _alive(trial) -> bool:
    """A trial's worker is alive while its heartbeat (or, before the first, the trial's start) is
    recent and, on this host, its process exists."""
    attrs = trial.user_attrs
    if "heartbeat" not in attrs:  # just taken: its worker is writing who it is
        return time.time() - trial.datetime_start.timestamp() < STALE_SECONDS
    if time.time() - float(attrs["heartbeat"]) >= STALE_SECONDS:
        return False
    if attrs.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(attrs.get("pid", -1)), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def requeue_stale(study) -> int:
    """Queue again the trials whose worker died; returns how many."""
    from optuna.trial import TrialState

    requeued = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "trial" in trial.user_attrs and not _alive(trial):
            try:
                study.tell(trial.number, state=TrialState.FAIL)
            except (RuntimeError, ValueError):  # another worker got there first
                continue
            study.enqueue_trial({}, user_attrs={"trial": trial.user_attrs["trial"]})
            requeued += 1
    return requeued


def requeue_failed(study) -> int:
    """Queue again the planned trials whose runs failed and that are not finished, waiting or running."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    busy = {_key(t) for t in trials if t.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)}
    failed = {_key(t) for t in trials if t.state == TrialState.FAIL and "error" in t.user_attrs}
    retry = [spec for spec in study.user_attrs["plan"] if spec["key"] in failed - busy]
    for spec in retry:
        study.enqueue_trial({}, user_attrs={"trial": spec})
    return len(retry)


def runs_first(study, trial) -> bool:
    """Whether ``trial`` (just taken) is the copy of its key to run: the key is not finished and no
    lower-numbered copy is waiting or running."""
    from optuna.trial import TrialState

    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)):
        if (
            other.number != trial.number
            and _key(other) == _key(trial)
            and (other.state == TrialState.COMPLETE or other.number < trial.number)
        ):
            return False
    return True


def claim(study, trial) -> bool:
    """Whether this worker keeps the trial it just took. SQLite does not lock rows, so two workers
    can pop one waiting trial at the same instant; each writes its own token, and the last write
    wins."""
    token = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
    trial.set_user_attr("owner", token)
    time.sleep(CLAIM_SECONDS)
    now = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    return now.user_attrs["owner"] == token


def _key(trial) -> str | None:
    """The planned trial's key; None for trials Optuna started outside the plan."""
    return trial.user_attrs.get("trial", {}).get("key")


def trial_command(cfg: SweepConfig, trial: dict[str, Any], run_dir: Path) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "dfkt.cli",
        "distill",
        "--method",
        cfg.method,
        "--teacher",
        cfg.teacher,
        "--out",
        str(run_dir),
    ]
    if cfg.preset:
        command += ["--preset", cfg.preset]
    if cfg.max_seconds:
        command += ["--max-seconds", str(cfg.max_seconds)]
    if (run_dir / "checkpoint.pt").is_file():
        command.append("--resume")
    for setting in [*cfg.overrides, *trial["overrides"], f"engine.seed={trial['seed']}", "engine.progress=false"]:
        command += ["--set", setting]
    return command


def run_trial(cfg: SweepConfig, trial: dict[str, Any], out: Path, heartbeat) -> dict[str, Any]:
    """One trial as a ``dfkt distill`` subprocess in OUT/trials/KEY (its output in KEY.log)."""
    run_dir = out / "trials" / trial["key"]
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():  # a finished run whose result was never recorded is not run again
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(run_dir.parent / f"{trial['key']}.log", "a") as log:
            proc = subprocess.Popen(trial_command(cfg, trial, run_dir), stdout=log, stderr=subprocess.STDOUT)
            while proc.poll() is None:
                heartbeat()
                try:
                    proc.wait(timeout=HEARTBEAT_SECONDS)
                except subprocess.TimeoutExpired:
                    pass
        if proc.returncode != 0 or not summary_file.is_file():
            lines = (run_dir.parent / f"{trial['key']}.log").read_text().strip().splitlines()
            raise DfktError(lines[-1] if lines else f"exit code {proc.returncode}")
    return json.loads(summary_file.read_text())


def work(cfg: SweepConfig, study, out: Path, progress=None) -> int:
    """Run waiting trials until none are left; returns how many this worker finished."""
    from optuna.trial import TrialState

    done = 0
    while True:
        requeue_stale(study)
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return done
        trial = study.ask()
        if "trial" not in trial.user_attrs:  # another worker took that waiting trial first
            study.tell(trial, state=TrialState.FAIL)
            continue
        if not claim(study, trial):  # another worker popped the same trial and keeps it
            continue
        spec = trial.user_attrs["trial"]
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("heartbeat", time.time())
        if not runs_first(study, trial):  # a duplicate: never run a trial twice
            study.tell(trial, state=TrialState.FAIL)
            continue
        try:
            summary = run_trial(cfg, spec, out, lambda: trial.set_user_attr("heartbeat", time.time()))
        except DfktError as exc:
            trial.set_user_attr("error", str(exc))
            study.tell(trial, state=TrialState.FAIL)
            if progress:
                progress(f"trial {spec['key']} failed: {exc}")
            continue
        for key in ("student_acc", "student_selected_acc", "student_best_on_test_acc", "teacher_acc"):
            if key in summary:
                trial.set_user_attr(key, summary[key])
        study.tell(trial, summary["student_acc"])
        done += 1
        if progress:
            progress(f"trial {spec['key']}: student {summary['student_acc']:.4f}")


def aggregate(cfg: SweepConfig, study) -> dict[str, Any]:
    """Mean, std, min and max of the final student accuracy over every finished trial, and per setting."""
    from optuna.trial import TrialState

    plan_trials = study.user_attrs["plan"]
    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for t in study.get_trials(deepcopy=False):
        spec = t.user_attrs.get("trial")
        if spec is None:
            continue
        if t.state == TrialState.COMPLETE:
            results[spec["key"]] = {
                **spec,
                "number": t.number,
                "worker": f"{t.user_attrs.get('host')}:{t.user_attrs.get('pid')}",
                **{
                    k: t.user_attrs[k]
                    for k in ("student_acc", "student_selected_acc", "student_best_on_test_acc", "teacher_acc")
                    if k in t.user_attrs
                },
            }
        elif t.state == TrialState.FAIL and "error" in t.user_attrs:
            failed[spec["key"]] = t.user_attrs["error"]
    finished = [results[t["key"]] for t in plan_trials if t["key"] in results]
    settings = []
    for index, setting in enumerate(cfg.settings()):
        accs = [r["student_acc"] for r in finished if r["setting"] == index]
        settings.append(
            {"setting": index, "overrides": plan_trials[index * len(cfg.seeds)]["overrides"], **describe(accs)}
        )
    return {
        "method": cfg.method,
        "teacher": cfg.teacher,
        "preset": cfg.preset,
        "seeds": cfg.seeds,
        "trials_planned": len(plan_trials),
        "trials_finished": len(finished),
        "failed": {k: v for k, v in failed.items() if k not in results},
        "student_acc": describe([r["student_acc"] for r in finished]),
        "student_selected_acc": describe(
            [
                r["student_selected_acc"]
                for r in finished  # None: no held-out set
                if r.get("student_selected_acc") is not None
            ]
        ),
        "student_best_on_test_acc": describe(
            [r["student_best_on_test_acc"] for r in finished if "student_best_on_test_acc" in r]
        ),
        "best_on_test_note": "oracle: picked on the test set, not a deployable selection",
        "settings": settings,
        "trials": finished,
    }


def describe(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,  # one value has no spread
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def markdown(result: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f}"

    lines = [
        f"# Sweep: {result['method']} ({result['trials_finished']} of {result['trials_planned']} trials)",
        "",
        f"Teacher `{result['teacher']}`, preset `{result['preset']}`, seeds {result['seeds']}.",
        "",
        "| | mean | std | min | max | n |",
        "|---|---|---|---|---|---|",
    ]
    for label, key in (
        ("final student", "student_acc"),
        ("label-free selected", "student_selected_acc"),
        ("best on test (oracle)", "student_best_on_test_acc"),
    ):
        d = result[key]
        lines.append(f"| {label} | {pct(d['mean'])} | {pct(d['std'])} | {pct(d['min'])} | {pct(d['max'])} | {d['n']} |")
    lines += ["", "| setting | overrides | mean | std | min | max |", "|---|---|---|---|---|---|"]
    for s in result["settings"]:
        lines.append(
            f"| {s['setting']} | {' '.join(s['overrides']) or '(preset)'} | {pct(s['mean'])} | "
            f"{pct(s['std'])} | {pct(s['min'])} | {pct(s['max'])} |"
        )
    if result["failed"]:
        lines += [
            "",
            "Failed trials (run the sweep again with --retry-failed once the cause is fixed):",
            *[f"- {k}: {v}" for k, v in result["failed"].items()],
        ]
    return "\n".join(lines) + "\n"
