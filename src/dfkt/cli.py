"""``dfkt`` command line: argparse subcommands, each a thin shell over a function in dfkt.api."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Sequence
from typing import Any

from dfkt.commands import ADAPT, COMMANDS, DISTILL, QUANTIZE, SWEEP, Command, Setting
from dfkt.errors import DfktError, disk_full_error, is_disk_full

EPILOG = "Errors print one line and exit 2. A run interrupted or killed continues with --resume --out DIR."


def _run_flags(p: argparse.ArgumentParser) -> None:
    """How a training command runs, beside what it runs (its settings)."""
    p.add_argument("--config", help="YAML file with settings (flags and --set override it)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set engine.precision=32-true (repeatable)",
    )
    p.add_argument("--out", help="run folder (default: runs/<kind>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


def _setting_flags(p: argparse.ArgumentParser, command: Command) -> None:
    """A flag for every setting of ``command`` but its sections (those take --set or --config), made
    from its config's fields: the type, the choices, and the description as help."""
    for keyword, setting in command.settings().items():
        if setting.value is None:
            continue
        value = setting.value
        if value.type is bool:  # --x and --no-x; unset, the layers below decide
            options = {"action": argparse.BooleanOptionalAction}
        elif value.switch:  # --x, --no-x, or --x MODE
            flag = "--" + keyword.replace("_", "-")
            p.add_argument(
                "--no-" + flag[2:], dest=keyword, action="store_const", const="false", help=argparse.SUPPRESS
            )
            p.add_argument(
                flag,
                nargs="?",
                const="true",
                choices=value.choices,
                help=_help(setting) + "; --no-" + flag[2:] + " turns it off",
            )
            continue
        else:
            options = {"type": value.type, "choices": value.choices, "metavar": "N" if value.type is int else None}
            if value.many:
                options["nargs"] = "+"
        if keyword == command.argument:
            p.add_argument(keyword, nargs="?", help=_help(setting), **options)
        else:
            p.add_argument("--" + keyword.replace("_", "-"), help=_help(setting), **options)


def _help(setting: Setting) -> str:
    """The setting's description, and its default unless the description gives it or there is none."""
    text = setting.description.replace("%", "%%")  # argparse formats help with %
    default = setting.default
    if setting.value.type is bool:
        return text + ("; on by default" if default else "")
    if "default" in text or default is None or default == "" or default == []:
        return text
    return f"{text}; default {' '.join(map(str, default)) if isinstance(default, list) else default}"


def _settings(args: argparse.Namespace, command: Command) -> dict[str, Any]:
    """The settings as the command line gave them (None where a flag was not given)."""
    return {
        keyword: getattr(args, keyword) for keyword, setting in command.settings().items() if setting.value is not None
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfkt",
        epilog=EPILOG,
        description="Data-free knowledge transfer: distil a teacher into a student without its training data, "
        "or adapt a source model to a new domain without the source data.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="offline end-to-end run on scikit-learn digits (35-95 s on 2 cores, see the README)",
        description="Train a digits teacher, distil it with RDSKD without data, train the "
        "reference students, print a table and write a sample grid.",
    )
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--precision",
        choices=["bf16-mixed", "32-true"],
        default=None,
        help="default: engine.precision=auto, bf16-mixed where the CPU computes bf16 natively "
        "(AVX512-BF16 or AMX), else 32-true",
    )

    for name, what in (
        ("train-teacher", "train a classifier (a teacher) on real labelled data"),
        (
            "train-source",
            "train a source model for adaptation (SHOT's recipe: label smoothing, epoch chosen on "
            "held-out source images)",
        ),
    ):
        p = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".", epilog=EPILOG)
        _setting_flags(p, COMMANDS[name])
        _run_flags(p)

    p = sub.add_parser("distill", help="distil a teacher into a student without data", epilog=EPILOG)
    _setting_flags(p, DISTILL)
    _run_flags(p)

    p = sub.add_parser(
        "adapt",
        help="adapt a source model to an unlabelled target domain, without source data",
        description="Source-free domain adaptation. The target's test images are split in two "
        "fixed halves: the method adapts on one, and accuracy is reported on it "
        "(transductive) and on the other (inductive), beside the source model's.",
        epilog=EPILOG,
    )
    _setting_flags(p, ADAPT)
    _run_flags(p)

    p = sub.add_parser(
        "sweep",
        help="one method over a grid or random space of settings, several seeds each",
        description="A robustness study: every setting x seed is a normal distill run folder in "
        "OUT/trials/KEY; trials are kept in an Optuna storage, so an interrupted sweep "
        "resumes without redoing finished trials and several workers (here, or on other "
        "machines with the same --storage and a shared --out) split one study. Prints "
        "mean/std/min/max of the final student accuracy.",
        epilog=EPILOG,
    )
    p.add_argument(
        "--grid",
        help="YAML file: 'grid: {params.gen_lr: [0.001, 0.01]}' (every combination), "
        "'points: [{params.w_a: 0}]' (explicit settings) and/or "
        "'random: {params.gen_lr: {low: 1e-4, high: 1e-1, log: true}}' with "
        "'random_trials: N'; may also set method, teacher, preset, seeds, max_seconds, "
        "overrides",
    )
    _setting_flags(p, SWEEP)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting shared by every trial, e.g. --set engine.precision=32-true (repeatable)",
    )
    p.add_argument("--out", default="runs/sweep", help="sweep folder (default: runs/sweep)")
    p.add_argument(
        "--storage",
        help="Optuna storage: a journal file (default OUT/study.journal) or a database "
        "URL (sqlite:///sweep.db, postgresql://...)",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="run again the trials whose runs failed (their errors are listed in OUT/sweep.md)",
    )

    p = sub.add_parser(
        "report",
        help="an HTML page (and markdown) of run folders and sweeps, with plots",
        description="Write OUT/report.html (self-contained: open it anywhere) and OUT/report.md "
        "(beside its PNG files): config, accuracy and loss curves (RDSKD's exponential "
        "weights among them), sample grids and diagnostics per run; for sweeps, a box "
        "plot of final accuracy per method.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished distill/adapt run folders or sweep folders")
    p.add_argument("--out", default="runs/report", help="folder for the report (default: runs/report)")

    p = sub.add_parser(
        "evaluate",
        help="test accuracy, per-class accuracy and confusion matrix",
        description="Evaluate a run folder's model (or a .safetensors model file, or an ONNX file "
        "from 'dfkt export' or 'dfkt quantize', run with ONNX Runtime) on the real "
        "test set of the data it was trained for.",
    )
    p.add_argument("target", help="run folder, model file or .onnx file")
    p.add_argument("--data", help="dataset to evaluate on; default: the model's own")
    p.add_argument("--data-root", help="folder holding the dataset files")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")

    p = sub.add_parser(
        "export",
        help="write a trained model as ONNX or safetensors, for deployment",
        description="Export a run folder's model (or a model file). ONNX takes normalised N×C×H×W "
        "float images, any batch size; the normalisation and class count are in its "
        "metadata (dfkt_mean, dfkt_std, dfkt_num_classes). Every ONNX file is checked "
        "against PyTorch on random inputs with ONNX Runtime. Needs: pip install "
        "'dfkt[onnx]'.",
    )
    p.add_argument("target", help="run folder or model file")
    p.add_argument("--out", required=True, help="file to write, e.g. student.onnx")
    p.add_argument("--format", choices=["onnx", "safetensors"], default="onnx", help="default onnx")

    p = sub.add_parser(
        "quantize",
        help="int8 post-training quantization (ONNX Runtime) calibrated without data",
        description="Quantize a model to int8 ONNX (QDQ, per-channel weights) with ONNX Runtime's "
        "static quantization, calibrated on synthetic images: bn-inversion (ZeroQ's "
        "distilled data; needs BatchNorm), generator (trained against the model, or a "
        "distill run's frozen one), gaussian (noise baseline) or real (the training "
        "images, a reference). The int8 model is compared with fp32 (top-1) on held-out "
        "images of the same source before it is written; 'dfkt evaluate FILE.onnx' "
        "measures its accuracy. Needs: pip install 'dfkt[onnx]'.",
        epilog=EPILOG,
    )
    _setting_flags(p, QUANTIZE)
    p.add_argument("--config", help="YAML file with settings (flags and --set override it)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set params.iterations=100 (the source's settings) or "
        "--set activation_type=int8 (repeatable)",
    )

    p = sub.add_parser(
        "list",
        help="list registered methods, adaptation methods, models or datasets, or the "
        "settings of one method ('dfkt list params rdskd')",
    )
    p.add_argument("kind", choices=["methods", "adapt-methods", "models", "datasets", "calibration-sources", "params"])
    p.add_argument("method", nargs="?", help="with 'params': the (DFKD or adaptation) method whose settings to list")
    return parser


def _short(value) -> str:
    text = "-" if value is None else str(value)
    return text if len(text) <= 14 else text[:13] + "…"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except DfktError as exc:
        print(f"dfkt: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a write the checked writers do not cover (logs, plots) on a full disk
        if not is_disk_full(exc) or exc.filename is None:
            raise
        print(f"dfkt: error: {disk_full_error(exc.filename, None, exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfkt: interrupted; the last checkpoint is kept: rerun with --resume --out DIR", file=sys.stderr)
        return 130
    finally:
        distributed = sys.modules.get("dfkt.engine.distributed")  # only a run that imported it has ranks
        if distributed is not None:
            distributed.shutdown()


def _dispatch(args: argparse.Namespace) -> int:
    from dfkt import api
    from dfkt.demo import format_table, run_demo
    from dfkt.engine.distributed import is_main_process

    printed = io.StringIO()  # results are printed once, by rank 0, when the run is over
    with contextlib.redirect_stdout(printed):
        code = _run(args, api, run_demo, format_table)
    if is_main_process():
        sys.stdout.write(printed.getvalue())
    return code


def _run(args: argparse.Namespace, api, run_demo, format_table) -> int:
    from dfkt.engine.distributed import is_main_process

    if args.command == "list" and args.kind == "params":
        rows = api.method_params(args.method)
        presets = [k for k in rows[0] if k not in ("name", "description")] if rows else []
        print(f"{'setting (--set params.NAME=...)':<34}" + "".join(f"{p:<16}" for p in presets) + "meaning")
        for row in rows:
            print(f"{row['name']:<34}" + "".join(f"{_short(row[p]):<16}" for p in presets) + row["description"])
    elif args.command == "list":
        from dfkt.registry import ADAPT_METHODS, CALIBRATION_SOURCES, DATASETS, METHODS

        registry = {"methods": METHODS, "adapt-methods": ADAPT_METHODS, "calibration-sources": CALIBRATION_SOURCES}.get(
            args.kind
        )
        for name in api.list_names(args.kind):
            if registry:
                summary = registry.get(name).summary
            elif args.kind == "datasets":  # the loader's first docstring line: source, size, split
                summary = (DATASETS.get(name).__doc__ or "").strip().splitlines()[0].replace("``", "")
            else:
                summary = ""
            print(f"{name:<18}{summary}".rstrip())
        if args.kind == "datasets":
            print("<name>-c:<corruption>:<severity>  a dataset under a corruption, e.g. fmnist-c:rotate:3")
    elif args.command == "demo":
        result = run_demo(args.out, seed=args.seed, precision=args.precision)
        print(format_table(result))
    elif args.command in ("train-teacher", "train-source"):
        kind = args.command.split("-")[1]
        train = api.train_teacher if kind == "teacher" else api.train_source
        summary = train(
            config=args.config,
            overrides=args.overrides,
            out=args.out,
            resume=args.resume,
            **_settings(args, COMMANDS[args.command]),
        )
        print(
            f"{kind} {summary['model']} on {summary['dataset']}: test accuracy {summary[kind + '_acc']:.4f}"
            f" -> {summary['model_file']}"
        )
    elif args.command == "adapt":
        s = api.adapt(
            config=args.config, overrides=args.overrides, out=args.out, resume=args.resume, **_settings(args, ADAPT)
        )
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        print(
            f"{s['method']} on {s['target']}: transductive {fmt(s['adapted']['transductive'])} "
            f"(source only {fmt(s['source_only']['transductive'])}), inductive {fmt(s['adapted']['inductive'])} "
            f"(source only {fmt(s['source_only']['inductive'])})"
        )
        sel = s["selected"]
        epoch = "none: the final weights" if sel["epoch"] is None else f"{sel['epoch']:g}"
        print(
            f"label-free selection (model_selected.safetensors, epoch {epoch}): transductive "
            f"{fmt(sel['transductive'])}, inductive {fmt(sel['inductive'])}; score {sel['label_free_score']:.3f} "
            f"(final {s['adapted']['label_free_score']:.3f}, source {s['source_only']['label_free_score']:.3f})"
        )
        if s["as_adapted"]:  # the written weights are not the adapted ones: say how much of the source they hold
            shares, before = s["source_share"], s["as_adapted"]
            refit = ", BatchNorm statistics refit on the target" if s["batchnorm_reestimated"] else ""
            rule = "" if shares["rule"] in (None, shares["setting"]) else f": {shares['rule']}"
            print(
                f"written weights: source share {shares['final']:.2f} final, {shares['selected']:.2f} selected "
                f"(source_share={shares['setting']}{rule}){refit}; as adapted, inductive "
                f"{fmt(before['adapted']['inductive'])} final, {fmt(before['selected']['inductive'])} selected"
            )
        agree = s["agreement_with_source"]
        print(
            "agreement with the source model's classes on the target (label-free): "
            + ", ".join(f"{part} {agree[part]['agreement']:.0%} (kappa {agree[part]['kappa']:.2f})" for part in agree)
        )
        if s["target_resized"]:
            print(
                f"target images resized from {s['target_resized']['from']} px to the source model's "
                f"{s['target_resized']['to']} px"
            )
        for warning in s["warnings"] if is_main_process() else []:
            print(f"dfkt: warning: {warning}", file=sys.stderr)
    elif args.command == "distill":
        s = api.distill(
            config=args.config, overrides=args.overrides, out=args.out, resume=args.resume, **_settings(args, DISTILL)
        )
        print(
            f"{s['method']}: student {s['student_acc']:.4f} (teacher {s['teacher_acc']:.4f}); "
            f"synthesis {s['seconds']['synthesis']:.0f}s, student {s['seconds']['student']:.0f}s"
        )
        for name, ref in s.get("references", {}).items():
            print(f"reference {name}: student {ref['student_acc']:.4f}")
        for warning in s["warnings"] if is_main_process() else []:
            print(f"dfkt: warning: {warning}", file=sys.stderr)
    elif args.command == "sweep":
        from dfkt.sweep import markdown

        print(
            markdown(
                api.sweep(
                    args.grid,
                    overrides=args.overrides,
                    out=args.out,
                    storage=args.storage,
                    workers=args.workers,
                    retry_failed=args.retry_failed,
                    **_settings(args, SWEEP),
                )
            ),
            end="",
        )
    elif args.command == "report":
        r = api.report(args.runs, args.out)
        print(f"wrote {r['html']} and {r['markdown']} ({r['runs']} run(s), {r['sweeps']} sweep(s))")
    elif args.command == "evaluate":
        r = api.evaluate(args.target, args.data, args.data_root)
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            how = f" ({r['format']}, ONNX Runtime)" if r.get("format") else ""
            print(f"{r['arch']}{how} on {r['dataset']} test set: accuracy {r['accuracy']:.4f}")
            print("per class: " + " ".join(f"{c}:{a:.3f}" for c, a in enumerate(r["per_class"])))
            print("confusion (rows: true class):")
            for row in r["confusion"]:
                print("  " + " ".join(f"{v:5d}" for v in row))
    elif args.command == "quantize":
        r = api.quantize(config=args.config, overrides=args.overrides, **_settings(args, QUANTIZE))
        q = r["quantization"]
        print(
            f"wrote {r['file']}: int8 {q['format']}, {'per-channel' if q['per_channel'] else 'per-tensor'} "
            f"weights, {r['bytes']['int8'] / 1024:.1f} KB ({r['bytes']['fp32'] / max(1, r['bytes']['int8']):.1f}x "
            f"smaller than fp32's {r['bytes']['fp32'] / 1024:.1f} KB)"
        )
        print(
            f"calibration: {r['calibration_images']} {r['calibration']} images, {q['calibrate_method']}, made in "
            f"{r['seconds']['synthesis']:.1f} s; int8 agrees with fp32 (top-1) on "
            f"{r['top1_agreement_with_fp32']:.1%} of {r['check_images']} held-out {r['calibration']} images"
        )
    elif args.command == "export":
        r = api.export(args.target, args.out, args.format)
        check = (
            (
                f"; logits match PyTorch within {r['max_abs_logit_difference']:.1e} on {r['checked_inputs']} "
                "random inputs"
            )
            if args.format == "onnx"
            else ""
        )
        print(f"wrote {r['file']}{check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
