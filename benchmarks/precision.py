"""Speed of one RDSKD generator step (DAFL generator + teacher, forward and backward) per
precision and memory format, measured in one run so the numbers compare as ratios.

    python benchmarks/precision.py --size 32 --batch 256

Writes benchmarks/results/precision.{json,md}. Used to choose engine.precision=auto's CPU default.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from report import machine, write

from dfkt import losses
from dfkt.engine.cpu import cpu_has_native_bf16
from dfkt.models import build_generator, build_model


def step_seconds(teacher_arch: str, size: int, batch: int, bf16: bool, channels_last: bool, repeats: int) -> float:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher = build_model(teacher_arch, 10, 1, size).eval().requires_grad_(False).to(memory_format=fmt)
    generator = build_generator("dafl", 100, 1, size).to(memory_format=fmt)
    opt = torch.optim.Adam(generator.parameters(), lr=1e-3)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            x = generator(torch.randn(batch, 100))
            logits = teacher(x)
            loss = losses.one_hot_loss(logits) + losses.class_balance_loss(logits)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up: first-call allocations and kernel selection
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    teacher = "lenet5" if args.size == 32 else "digits_cnn"
    rows = {}
    for bf16 in (False, True):
        for cl in (False, True):
            name = f"{'bf16-mixed' if bf16 else 'fp32'}{' + channels_last' if cl else ''}"
            rows[name] = step_seconds(teacher, args.size, args.batch, bf16, cl, args.repeats)
            print(f"{name}: {rows[name]:.3f} s/step", flush=True)
    base = rows["fp32"]
    info = machine()
    lines = [
        f"# Generator step time by precision ({teacher}, {args.size}px, batch {args.batch})",
        "",
        f"`python benchmarks/precision.py --size {args.size} --batch {args.batch}` on {info['cpu']}, "
        f"{info['threads']} threads, torch {info['torch']}, {time.strftime('%Y-%m-%d')}; "
        f"native bf16 (AMX/AVX512-BF16): {cpu_has_native_bf16()}.",
        "",
        "| precision | s/step | speed vs fp32 |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} | {base / v:.2f}x |" for k, v in rows.items()]
    write(
        Path(args.out),
        f"precision_{args.size}px",
        {"machine": info, "args": vars(args), "seconds": rows},
        "\n".join(lines) + "\n",
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
