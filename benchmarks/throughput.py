"""Throughput of data-free distillation's two inner loops on this machine, per precision, memory
format and torch.compile, all measured in one run so they compare as ratios:

- synthetic images per second: a DAFL/RDSKD generator step (generator forward, teacher forward,
  one-hot + class-balance loss, backward, Adam step), batch images per step;
- student steps per second: a KD step on generated images (teacher forward without gradients,
  student forward and backward, SGD step).

    python benchmarks/throughput.py --teacher lenet5 --student lenet5_half --size 32 --batch 128

Runs unchanged on a GPU (the first CUDA device when there is one, else the CPU). Writes
OUT/throughput_{device}.{json,md}. A configuration that fails (e.g. torch.compile without a C++
compiler) is reported as failed with its error, not left out.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable

import torch
from flags import add_report_arguments, positive_int
from report import machine, write

from dfkt import losses
from dfkt.engine.cpu import cpu_has_native_bf16
from dfkt.models import build_generator, build_model

LATENT = 100


def timed(step: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Seconds per call, after two warm-up calls (allocations, kernel choice, compilation)."""
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def loops(
    args: argparse.Namespace, device: torch.device, bf16: bool, channels_last: bool, compiled: bool
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The generator step and the student step of one configuration."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher = build_model(args.teacher, 10, args.channels, args.size).to(device, memory_format=fmt)
    teacher.eval().requires_grad_(False)
    student = build_model(args.student, 10, args.channels, args.size).to(device, memory_format=fmt).train()
    generator = build_generator("dafl", LATENT, args.channels, args.size).to(device, memory_format=fmt).train()
    g_opt = torch.optim.Adam(generator.parameters(), lr=1e-3)
    s_opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    run_g, run_t, run_s = (torch.compile(m) if compiled else m for m in (generator, teacher, student))
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    def generator_step() -> None:
        with autocast():
            logits = run_t(run_g(torch.randn(args.batch, LATENT, device=device)))
            loss = losses.one_hot_loss(logits) + losses.class_balance_loss(logits)
        g_opt.zero_grad(set_to_none=True)
        loss.backward()
        g_opt.step()

    with torch.no_grad(), autocast():
        images = run_g(torch.randn(args.batch, LATENT, device=device)).float().contiguous(memory_format=fmt)

    def student_step() -> None:
        with autocast():
            with torch.no_grad():
                target = run_t(images)
            loss = losses.kd_loss(run_s(images), target, 4.0)
        s_opt.zero_grad(set_to_none=True)
        loss.backward()
        s_opt.step()

    return generator_step, student_step


def measure(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    for bf16, channels_last, compiled in itertools.product((False, True), (False, True), (False, True)):
        row = {"precision": "bf16-mixed" if bf16 else "fp32", "channels_last": channels_last, "compile": compiled}
        try:
            generator_step, student_step = loops(args, device, bf16, channels_last, compiled)
            row["images_per_s"] = args.batch / timed(generator_step, args.repeats, device)
            row["student_steps_per_s"] = 1.0 / timed(student_step, args.repeats, device)
        except Exception as exc:  # noqa: BLE001  (reported in the table, e.g. no compiler for torch.compile)
            row["failed"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> str:
    info = machine()
    where = info["cpu"] if device.type == "cpu" else torch.cuda.get_device_name(device)
    base = rows[0]  # fp32, contiguous, eager
    lines = [
        f"# Throughput: {args.teacher} teacher, {args.student} student, {args.size}px, batch {args.batch}, "
        f"{device.type}",
        "",
        f"`python benchmarks/throughput.py --teacher {args.teacher} --student {args.student} --size {args.size} "
        f"--batch {args.batch} --repeats {args.repeats}` on {where}, "
        f"{info['threads']} threads, torch {info['torch']}, {time.strftime('%Y-%m-%d')}; native CPU bf16 "
        f"(AMX/AVX512-BF16): {cpu_has_native_bf16()}. Mean of {args.repeats} calls after 2 warm-up calls "
        "(compilation excluded).",
        "",
        "| precision | channels_last | torch.compile | synthetic images/s | vs fp32 eager | student steps/s | "
        "vs fp32 eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flags = f"| {r['precision']} | {'yes' if r['channels_last'] else 'no'} | {'yes' if r['compile'] else 'no'} |"
        if "failed" in r:
            lines.append(f"{flags} failed: {r['failed']} | | | |")
        elif "failed" in base:
            lines.append(f"{flags} {r['images_per_s']:.1f} | | {r['student_steps_per_s']:.2f} | |")
        else:
            lines.append(
                f"{flags} {r['images_per_s']:.1f} | {r['images_per_s'] / base['images_per_s']:.2f}x | "
                f"{r['student_steps_per_s']:.2f} | "
                f"{r['student_steps_per_s'] / base['student_steps_per_s']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="lenet5", help="teacher architecture (default lenet5)")
    parser.add_argument("--student", default="lenet5_half", help="student architecture (default lenet5_half)")
    parser.add_argument("--size", type=positive_int, default=32, help="image side (default 32)")
    parser.add_argument("--channels", type=positive_int, default=1, help="image channels (default 1)")
    parser.add_argument("--batch", type=positive_int, default=128, help="images per step (default 128)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed calls per loop (default 5)")
    add_report_arguments(parser, analysis=False)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = measure(args, device)
    text = markdown(args, device, rows)
    write(
        args.out,
        f"throughput_{device.type}",
        {"machine": machine(), "device": device.type, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
        text,
    )
    print(text)


if __name__ == "__main__":
    main()
