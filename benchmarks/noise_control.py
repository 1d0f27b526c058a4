"""What a finished distillation run's student would learn from Gaussian noise with the same student settings.

The control of tests/noise_control.py at benchmark scale: the same teacher, student, student settings (the run's
params that belong to the student stage: steps, batch, lr, temperature, augmentation, weight average, start and
hint loss), seed and time budget, but every sample fresh N(0, 1) noise in the teacher's normalised units. A
student started from its teacher can learn a lot from noise; this says how much of a run's accuracy its
synthetic images add.

    python benchmarks/noise_control.py runs/b2-r16/hint3/seed1 --out runs/b2-noise/seed1 [--max-seconds 600]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dfkt  # noqa: E402
from tests.noise_control import registered, student_settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished `dfkt distill` run folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-seconds", type=float, default=None, help="default: the run's own budget")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    config = yaml.safe_load((args.run / "config.yaml").read_text())
    overrides = [f"params.{k}={json.dumps(v)}" for k, v in student_settings(args.run).items()]
    overrides += [f"engine.seed={config['engine']['seed']}", f"engine.threads={args.threads}"]
    with registered() as name:
        summary = dfkt.distill(
            name,
            config["teacher"],
            config["student"],
            max_seconds=args.max_seconds or config.get("max_seconds"),
            overrides=overrides,
            out=args.out,
        )
    run = json.loads((args.run / "summary.json").read_text())
    print(
        json.dumps(
            {
                "run": str(args.run),
                "run_student_acc": run["student_acc"],
                "noise_student_acc": summary["student_acc"],
                "student_init": summary["student_init"],
                "feature_hint_layers": summary["feature_hint_layers"],
            }
        )
    )


if __name__ == "__main__":
    main()
