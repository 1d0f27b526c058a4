"""The README's first two commands work as written: the demo (run here) and the test command (run by CI)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import dfkt

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_readme_starts_with_the_demo_and_test_commands():
    demo, tests = readme_commands()
    assert demo.endswith("dfkt demo") and "torch==2.14.1 torchvision==0.29.1" in demo
    assert "pytest" in tests
    # Running the test command from inside the tests would recurse; CI runs it, so it must be
    # the very line .ci/run executes.
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_demo_command_runs_as_written():
    demo, _ = readme_commands()
    out = ROOT / "runs" / "demo"
    shutil.rmtree(out, ignore_errors=True)  # a finished demo would be reused, not rerun
    proc = subprocess.run(demo, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=900)
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
