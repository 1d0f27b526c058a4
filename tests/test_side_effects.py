"""No side effects on the caller: importing dfkt keeps matplotlib's backend and the loggers' levels,
and dfkt.evaluate() gives back the global random generators and the deterministic-algorithms flag."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dfkt

SRC = str(Path(dfkt.__file__).resolve().parents[1])

IMPORT_PROBE = """
import json, logging, sys
import matplotlib
import lightning_fabric  # its own import sets its logger's level: done before we look
loggers = ("lightning_fabric", "lightning.fabric")
for name in loggers:
    logging.getLogger(name).setLevel(logging.DEBUG)
before = matplotlib.get_backend()
import dfkt, dfkt.report.grid, dfkt.report.page, dfkt.engine.engine
print(json.dumps({"before": before, "after": matplotlib.get_backend(),
                  "levels": [logging.getLogger(n).level for n in loggers],
                  "pyplot": "matplotlib.pyplot" in sys.modules}))
"""


@pytest.mark.parametrize("backend", ["svg", "pdf"])
def test_import_keeps_the_matplotlib_backend_and_logger_levels(backend):
    env = {**os.environ, "MPLBACKEND": backend, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", IMPORT_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["before"].lower() == backend
    # the backend, and the loggers at logging.DEBUG as the caller set them
    assert (seen["after"], seen["levels"]) == (seen["before"], [10, 10])
    assert not seen["pyplot"], "dfkt imported matplotlib.pyplot"


def _global_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.random.get_rng_state().clone(),
        "numpy": (np_state[0], np_state[1].copy(), *np_state[2:]),
        "python": random.getstate(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
    }


def _changed(a: dict, b: dict) -> list[str]:
    same = {
        "torch": torch.equal(a["torch"], b["torch"]),
        "numpy": a["numpy"][0] == b["numpy"][0]
        and np.array_equal(a["numpy"][1], b["numpy"][1])
        and a["numpy"][2:] == b["numpy"][2:],
        "python": a["python"] == b["python"],
        "deterministic": (a["deterministic"], a["warn_only"]) == (b["deterministic"], b["warn_only"]),
    }
    return [k for k, v in same.items() if not v]


@pytest.mark.parametrize("deterministic", [False, True])
def test_evaluate_gives_back_the_callers_random_state_and_deterministic_flag(digits_teacher, deterministic):
    saved_flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        random.seed(987), np.random.seed(987), torch.manual_seed(987)
        random.random(), np.random.rand(3), torch.rand(3)  # somewhere along the streams, not at a fresh seed
        before = _global_state()
        result = dfkt.evaluate(digits_teacher)
        assert _changed(before, _global_state()) == []
    finally:
        torch.use_deterministic_algorithms(saved_flags[0], warn_only=saved_flags[1])
    # The numbers are the engine's own, whatever state the caller was in.
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    again = dfkt.evaluate(digits_teacher)
    assert again["accuracy"] == result["accuracy"] > 0.9
    assert again["confusion"] == result["confusion"]
