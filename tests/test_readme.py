"""The README's first two commands work as written: the demo (run here) and the test command (run by CI)."""

import json
import re
import subprocess
from pathlib import Path

import dfkt

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks[:2]]


CI_SETUP = {
    "#!/usr/bin/env bash",
    "set -euo pipefail",
    'cd "$(dirname "$0")/.."',
    "export DEBIAN_FRONTEND=noninteractive",
}


def test_readme_starts_with_the_demo_and_test_commands():
    demo, tests = readme_commands()
    assert demo.endswith("dfkt demo") and "torch==2.14.1 torchvision==0.29.1" in demo
    assert "pytest" in tests
    # The data the tests read is installed by the test command itself, not by CI alone.
    assert "dataset-fashion-mnist" in tests and "chromium" in tests and "postgresql" in tests.split("&&")[1]
    assert "'.[test]'" in tests  # whose extras include the postgres driver (pyproject.toml)


def test_ci_runs_the_readme_commands_and_installs_nothing_else():
    """Running the test command from inside the tests would recurse; CI runs both commands, so
    .ci/run must be exactly those two lines plus shell set-up that installs nothing."""
    demo, tests = readme_commands()
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#") or line.startswith("#!")]
    assert [c for c in commands if c not in CI_SETUP] == [demo, tests]


def test_readme_demo_runs(tmp_path):
    """The demo command's last part in a scratch folder: no install, no network, and the
    checkout's runs/ left alone (CI runs the whole command as written)."""
    demo, _ = readme_commands()
    out = tmp_path / "demo"
    proc = subprocess.run(
        demo.split("&&")[-1].split() + ["--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RDSKD student / teacher" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["student_acc"] >= 0.95 * summary["teacher_acc"]
    assert (out / "rdskd" / "samples.png").stat().st_size > 1000

    # The demo's report page, as a person would open it.
    from tests.test_report import open_in_chromium

    page = dfkt.report([out / "rdskd"], out / "report")["html"]
    seen = open_in_chromium(Path(page))
    assert len(seen["images"]) >= 5 and all(i["complete"] and i["width"] > 0 for i in seen["images"])
    assert "RDSKD exponential weights" in " ".join(seen["headings"])
