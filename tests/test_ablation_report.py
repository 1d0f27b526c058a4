"""benchmarks/ablation.py's report: the worst seed of a variant is the lowest finished run, and n/a (not 0.0)
when none of its runs finished."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ablation  # noqa: E402


def test_worst_seed_is_the_lowest_finished_run():
    assert ablation.worst([0.781, None, 0.695]) == "69.5"


def test_worst_seed_without_a_finished_run_is_not_a_number():
    assert ablation.worst([None, None]) == "n/a"
