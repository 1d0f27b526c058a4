"""``dfkt demo``: the whole pipeline offline on scikit-learn digits, in 35-95 s on 2 cores (README)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dfkt import api
from dfkt.runs import write_json

# Settings sized for 8×8 digits on a 2-core CPU; everything else is the RDSKD cpu preset. A width-64 generator
# (a quarter of the authors' cost per image) and cutmix on the student's batches: on the demo's teachers of seeds
# 1-3 (one thread), cutmix gave students of 98.44 / 98.44 / 98.67% against 98.22 / 97.78 / 97.78%, and the whole
# demo took 78-93 s against 117 s for the width-128 generator in the same hour (fp32 on AVX2;
# benchmarks/analysis/feature_hints.md). Student batches of 256, the preset's before it halved them for costly
# students: at 128 the demo's student of seed 3 fell to 98.22% (98.7% of its teacher) against 98.67%.
TEACHER_EPOCHS = 30
RDSKD_PARAMS = [
    "params.gen_batch=256",
    "params.student_batch=256",
    "params.gen_epochs=3",
    "params.gen_width=64",
    "params.student_epochs=10",
    "params.pool_size=10000",
    "params.augment=shift,flip,cutmix",
]


def run_demo(out: str | Path = "runs/demo", seed: int = 1, precision: str | None = None) -> dict[str, Any]:
    """Teacher -> RDSKD student -> reference students. Rerunning the same command reuses finished work."""
    out = Path(out)
    engine_flags = [f"engine.seed={seed}"] + ([f"engine.precision={precision}"] if precision else [])
    teacher = api.train_teacher(
        "digits_cnn", "digits", TEACHER_EPOCHS, overrides=engine_flags, out=out / "teacher", resume=True
    )
    student = api.distill(
        "rdskd",
        teacher["model_file"],
        "digits_cnn_half",
        "cpu",
        overrides=engine_flags + RDSKD_PARAMS,
        out=out / "rdskd",
        resume=True,
        references=True,
    )
    summary = {"teacher": teacher, "rdskd": student}
    write_json(
        out / "summary.json",
        {
            "teacher_acc": teacher["teacher_acc"],
            "student_acc": student["student_acc"],
            "references": student["references"],
            "seconds": {"teacher": teacher["seconds"]["train"], **student["seconds"]},
            "samples": str(out / "rdskd" / "samples.png"),
        },
    )
    return summary


def format_table(result: dict[str, Any]) -> str:
    teacher, rdskd = result["teacher"], result["rdskd"]
    refs = rdskd["references"]
    rows = [
        ("teacher (digits_cnn, real data)", teacher["teacher_acc"], teacher["seconds"]["train"]),
        ("student, RDSKD (no data)", rdskd["student_acc"], rdskd["seconds"]["total"]),
        ("student, KD on real data", refs["kd_real"]["student_acc"], refs["kd_real"]["seconds"]),
        ("student, trained on labels", refs["labels"]["student_acc"], refs["labels"]["seconds"]),
    ]
    lines = [f"{'model':<34}{'test acc':>9}{'train s':>9}"]
    lines += [f"{name:<34}{acc:>9.4f}{secs:>9.1f}" for name, acc, secs in rows]
    ratio = rdskd["student_acc"] / max(teacher["teacher_acc"], 1e-9)
    lines.append(f"RDSKD student / teacher: {ratio:.1%}   samples: {Path(rdskd['samples']['grid'])}")
    return "\n".join(lines)
