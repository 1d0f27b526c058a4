"""B6 — data-free int8 quantization: `dfkt quantize` on each model with every calibration source.

    python benchmarks/quantize.py --threads 1 --seeds 1 2 3 \\
        --model digits=runs/b6/digits-teacher/model.safetensors \\
        --model fmnist-lenet5=runs/b2final/teacher/model.safetensors \\
        --model fmnist-wrn16_2=runs/bench-dfkd-compare-b2-wrn/teacher/model.safetensors \\
        --generator-runs fmnist-lenet5=runs/b2final/rdskd/seed1,runs/b2final/rdskd/seed2,runs/b2final/rdskd/seed3

Per model: fp32 test accuracy (PyTorch and fp32 ONNX in ONNX Runtime); int8 test accuracy for each
calibration source (bn-inversion where the model has BatchNorm, generator, gaussian: one run per seed;
real: once, a reference), the int8/fp32 top-1 agreement on held-out images of the source, the file
sizes, and the latency of the fp32 and the int8 ONNX model in ONNX Runtime at batch 1 and 64
(interleaved, median of repeats). ``--generator-runs`` adds rows calibrated on the frozen generators of
existing distill runs (one per seed) instead of a generator trained against the model.

Writes benchmarks/results/NAME.{json,md}; never part of the test run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from report import command_line, machine, write

from dfkt import api
from dfkt.api.export import export_onnx
from dfkt.data import load_dataset, normalize
from dfkt.models.files import load_model
from dfkt.quantize import backend
from dfkt.synthesis import statistics_layers


def latency(paths: dict[str, Path], batch: int, shape: tuple[int, ...], threads: int, seconds: float) -> dict:
    """Median seconds per batch of each model, the runs interleaved so both see the same machine load."""
    sessions = {name: backend.session(path, threads) for name, path in paths.items()}
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for s in sessions.values():  # warm-up
        s.run(None, {"image": x})
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or min(len(t) for t in times.values()) < 5:
        for name, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"image": x})
            times[name].append(time.perf_counter() - t)
    return {name: {"median_s": statistics.median(t), "runs": len(t)} for name, t in times.items()}


def mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def lscpu_flags() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    keep = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")) or "vnni" in f]
    return " ".join(keep)


class TestSet:
    """The model's real test images (normalised) and labels, the first ``limit`` of them when set, scored
    in ONNX Runtime with the benchmark's threads."""

    def __init__(self, info, limit: int | None, threads: int):
        data = load_dataset(info.dataset, None, False, info.image_size)
        n = len(data.test_labels) if limit is None else min(limit, len(data.test_labels))
        self.images = normalize(data.test_images[:n], info.mean, info.std)
        self.labels = data.test_labels[:n].numpy()
        self.threads = threads

    def accuracy(self, onnx_file: Path) -> float:
        predicted = backend.logits(backend.session(onnx_file, self.threads), self.images).argmax(1)
        return float((predicted == self.labels).mean())


def one_model(name: str, spec: str, args, work: Path, generator_runs: list[str]) -> dict:
    path, *options = spec.split(",")
    options = dict(o.split("=", 1) for o in options)  # a lighter protocol for one model, e.g. seeds=1,test=500
    seeds = [int(s) for s in options.pop("seeds").split("+")] if "seeds" in options else args.seeds
    limit = int(options.pop("test")) if "test" in options else None
    args = argparse.Namespace(**vars(args))
    for key, value in options.items():  # any other option: a global setting for this model only
        setattr(args, key, type(getattr(args, key))(value))
    net, info = load_model(path)
    has_bn = bool(statistics_layers(net))
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    fp32_onnx = export_onnx(net.eval(), info, folder / "fp32.onnx", optimize=False)
    test = TestSet(info, limit, args.threads)
    result: dict = {
        "model": path,
        "arch": info.arch,
        "dataset": info.dataset,
        "batchnorm": has_bn,
        "seeds": seeds,
        "settings": {
            k: getattr(args, k)
            for k in (
                "calibration_images",
                "check_images",
                "bn_iterations",
                "bn_batch",
                "generator_steps",
                "generator_batch",
                "generator_width",
            )
        },
        "test_images": len(test.labels),
        "fp32_acc": test.accuracy(fp32_onnx),
        "bytes": {"fp32": fp32_onnx.stat().st_size},
        "sources": {},
    }
    print(f"{name}: fp32 ONNX {result['fp32_acc']:.4f} on {len(test.labels)} test images", flush=True)
    budget = {
        "calibration_images": args.calibration_images,
        "check_images": args.check_images,
        "calibrate_method": args.calibrate_method,
        "min_agreement": 0.0,
    }
    params = {
        "bn-inversion": [f"params.iterations={args.bn_iterations}", f"params.batch={args.bn_batch}"],
        "generator": [
            f"params.steps={args.generator_steps}",
            f"params.batch={args.generator_batch}",
            f"params.width={args.generator_width}",
        ],
        "gaussian": [],
        "real": [],
    }
    plan = [
        (s, seed, None)
        for s in ("bn-inversion", "generator", "gaussian")
        for seed in seeds
        if s != "bn-inversion" or has_bn
    ]
    plan += [("generator (distill run)", seed, run) for seed, run in zip(seeds, generator_runs)]
    plan += [("real", seeds[0], None)]
    int8_file = None
    for label, seed, run in plan:
        source = "generator" if run else label
        out = folder / f"{label.split()[0]}{'-run' if run else ''}-seed{seed}.int8.onnx"
        overrides = [
            f"threads={args.threads}",
            "progress=false",
            *params[source],
            *([f"params.from_run={run}"] if run else []),
        ]
        started = time.perf_counter()
        r = api.quantize(path, source, out, seed=seed, overrides=overrides, **budget)
        seconds = time.perf_counter() - started
        acc = test.accuracy(out)
        print(
            f"{name} {label} seed {seed}: int8 {acc:.4f}, agreement {r['top1_agreement_with_fp32']:.3f}, "
            f"{r['seconds']['synthesis']:.1f} s synthesis, {seconds:.1f} s total",
            flush=True,
        )
        row = result["sources"].setdefault(label, {"runs": []})
        row["runs"].append(
            {
                "seed": seed,
                "int8_acc": acc,
                "agreement": r["top1_agreement_with_fp32"],
                "synthesis_s": r["seconds"]["synthesis"],
                "total_s": seconds,
                "bytes": r["bytes"]["int8"],
                **({"from_run": run} if run else {}),
            }
        )
        int8_file = int8_file or out
    for label, row in result["sources"].items():
        row["int8_acc"] = mean_std([r["int8_acc"] for r in row["runs"]])
        row["agreement"] = mean_std([r["agreement"] for r in row["runs"]])
        row["synthesis_s"] = mean_std([r["synthesis_s"] for r in row["runs"]])
    result["bytes"]["int8"] = int8_file.stat().st_size
    shape = (info.in_channels, info.image_size, info.image_size)
    result["latency"] = {
        str(b): latency({"fp32": fp32_onnx, "int8": int8_file}, b, shape, args.threads, args.latency_seconds)
        for b in (1, 64)
    }
    lat = result["latency"]["64"]
    print(
        f"{name}: batch 64 fp32 {lat['fp32']['median_s'] * 1e3:.2f} ms, int8 {lat['int8']['median_s'] * 1e3:.2f} "
        f"ms; {result['bytes']['fp32'] / result['bytes']['int8']:.2f}x smaller",
        flush=True,
    )
    return result


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        f"# B6 — data-free int8 quantization ({data['date']})",
        "",
        f"`{data['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['flags']}), torch {m['torch']}, onnxruntime "
        f"{data['onnxruntime']}, {data['threads']} thread(s). Test accuracy (%) on the real test set (or its "
        "first N images, as noted per model), fp32 and int8 both in ONNX Runtime; int8 rows: mean ± std over "
        "the model's seeds (real: its first seed only). Calibration method "
        f"{data['settings']['calibrate_method']}; per-model image counts and synthesis settings below; "
        "agreement = int8/fp32 top-1 agreement on the source's held-out images (check_images).",
        "",
    ]
    for name, r in data["models"].items():
        lines += [
            f"## {name}: {r['arch']} on {r['dataset']}" + (" (BatchNorm)" if r["batchnorm"] else " (no BatchNorm)"),
            "",
            f"fp32 (ONNX Runtime): {100 * r['fp32_acc']:.2f} on {r['test_images']} test images; seeds "
            f"{', '.join(map(str, r['seeds']))}; settings: " + ", ".join(f"{k} {v}" for k, v in r["settings"].items()),
            "",
            "| calibration | int8 accuracy | vs fp32 | per seed | agreement | synthesis s |",
            "|---|---|---|---|---|---|",
        ]
        for label, row in r["sources"].items():
            acc = row["int8_acc"]
            lines.append(
                f"| {label} | {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} | "
                f"{100 * (acc['mean'] - r['fp32_acc']):+.2f} | "
                f"{' / '.join(f'{100 * v:.2f}' for v in acc['values'])} | "
                f"{100 * row['agreement']['mean']:.1f}% | {row['synthesis_s']['mean']:.1f} |"
            )
        lat = r["latency"]
        b = r["bytes"]
        lines += [
            "",
            "| | fp32 ONNX | int8 ONNX | ratio |",
            "|---|---|---|---|",
            f"| size | {b['fp32'] / 1024:.1f} KB | {b['int8'] / 1024:.1f} KB | {b['fp32'] / b['int8']:.2f}x smaller |",
        ]
        for batch in ("1", "64"):
            f, i = lat[batch]["fp32"]["median_s"], lat[batch]["int8"]["median_s"]
            lines.append(f"| latency, batch {batch} | {f * 1e3:.3f} ms | {i * 1e3:.3f} ms | {f / i:.2f}x faster |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=PATH[,seeds=1+2][,test=N]",
        help="a model file; seeds= and test= give it fewer seeds or only the first N test images",
    )
    parser.add_argument("--generator-runs", action="append", default=[], metavar="NAME=RUN1,RUN2,...")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--check-images", type=int, default=128)
    parser.add_argument("--calibrate-method", default="minmax", choices=["minmax", "entropy", "percentile"])
    parser.add_argument("--bn-iterations", type=int, default=100)
    parser.add_argument("--bn-batch", type=int, default=64)
    parser.add_argument("--generator-steps", type=int, default=100)
    parser.add_argument("--generator-batch", type=int, default=64)
    parser.add_argument("--generator-width", type=int, default=32)
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--work", type=Path, default=None, help="folder for the ONNX files (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="quantize_b6")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = dict(spec.split("=", 1) for spec in args.generator_runs)
    import onnxruntime

    data: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(),
        "machine": {**machine(), "flags": lscpu_flags()},
        "onnxruntime": onnxruntime.__version__,
        "threads": args.threads,
        "seeds": args.seeds,
        "settings": {k: v for k, v in vars(args).items() if k not in ("model", "work", "out", "name")},
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="b6-") as tmp:
        work = args.work or Path(tmp)
        started = time.perf_counter()
        for spec in args.model:
            name, path = spec.split("=", 1)
            generator_runs = runs[name].split(",") if name in runs else []
            data["models"][name] = one_model(name, path, args, work, generator_runs)
            write(args.out, args.name, data, markdown(data))  # a partial report survives an interruption
        data["seconds"] = time.perf_counter() - started
    write(args.out, args.name, data, markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    sys.exit(main())


def rerender(json_file: Path) -> str:
    """The markdown of a finished run's JSON, as this script renders it now."""
    return markdown(json.loads(json_file.read_text()))
