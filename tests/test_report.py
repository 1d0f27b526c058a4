"""`dfkt report`: a page for a run and for a sweep, opened in a real headless Chromium."""

import shutil
from pathlib import Path

import pytest

import dfkt
from dfkt.cli import main
from dfkt.errors import DfktError
from tests.conftest import FAST_ENGINE, tiny_rdskd

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def run_and_sweep(tmp_path_factory, digits_teacher):
    root = tmp_path_factory.mktemp("report")
    dfkt.distill("rdskd", digits_teacher, overrides=tiny_rdskd(), out=root / "run")
    dfkt.sweep(
        {
            "grid": {"params.gen_lr": [0.001]},
            "seeds": [1],
            "teacher": digits_teacher,
            "overrides": FAST_ENGINE + tiny_rdskd()[len(FAST_ENGINE) :],
        },
        out=root / "sweep",
    )
    return root / "run", root / "sweep"


def open_in_chromium(page_file: Path) -> dict:
    """What a browser shows: the headings, and every image with its decoded width."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "the report test needs Chromium: apt-get install -y chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(page_file.resolve().as_uri())
        page.wait_for_load_state("load")
        seen = page.evaluate("""() => ({
            headings: [...document.querySelectorAll('h2, h3')].map(h => h.textContent),
            images: [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth})),
            text: document.body.innerText})""")
        browser.close()
    return seen


def test_report_of_a_run_renders_with_its_images(run_and_sweep, tmp_path):
    run, _ = run_and_sweep
    assert main(["report", str(run), "--out", str(tmp_path)]) == 0
    seen = open_in_chromium(tmp_path / "report.html")
    assert seen["images"] and all(i["complete"] and i["width"] > 0 for i in seen["images"])
    headings = " ".join(seen["headings"])
    for part in (
        "Accuracy over training time",
        "generator stage: loss terms",
        "RDSKD exponential weights",
        "Class histogram",
        "Generated samples",
    ):
        assert part in headings, headings
    student = [h for h in seen["headings"] if h.startswith("student stage: loss terms")]
    assert student and "s_loss" in student[0] and "test_acc" not in student[0]  # training terms, not evaluations
    assert "label-free selection" in seen["text"] and "oracle" in seen["text"]
    markdown = (tmp_path / "report.md").read_text()
    for name in [line.split("](")[1].rstrip(")") for line in markdown.splitlines() if line.startswith("![")]:
        assert (tmp_path / name).is_file(), name


def test_report_of_a_sweep_has_a_box_plot(run_and_sweep, tmp_path):
    run, sweep = run_and_sweep
    dfkt.report([sweep, run], tmp_path)
    seen = open_in_chromium(tmp_path / "report.html")
    assert all(i["complete"] and i["width"] > 0 for i in seen["images"])
    assert any("Box plot" in h for h in seen["headings"]) and "rdskd" in seen["text"]


def test_report_refuses_a_folder_without_results(tmp_path):
    with pytest.raises(DfktError, match="summary.json or sweep.json"):
        dfkt.report([tmp_path], tmp_path / "out")


def test_a_short_run_has_an_accuracy_curve_at_a_small_cost(digits_teacher, tmp_path):
    """No evaluation settings: the student stage is scored from its start to its end, at least 10
    times, and evaluating stays a small share of its time (the engine's schedule itself is counted
    on a fake clock in test_engine)."""
    steps = 400
    overrides = [o for o in tiny_rdskd(student_steps_per_epoch=steps) if not o.startswith("eval_")]
    summary = dfkt.distill("rdskd", digits_teacher, overrides=overrides + ["engine.threads=1"], out=tmp_path / "run")
    curve = summary["curve"]
    assert len(curve) >= 10 and curve[0]["step"] == 0 and curve[-1]["step"] == steps, curve
    seconds = summary["seconds"]
    assert seconds["evaluation"] < 0.1 * seconds["by_stage"]["student"], seconds
    dfkt.report([tmp_path / "run"], tmp_path / "report")
    assert (
        f"| evaluations (test set and teacher agreement) | {len(curve)}, "
        in (tmp_path / "report" / "report.md").read_text()
    )


def test_the_accuracy_axis_shows_the_curve_with_a_margin_and_no_zoom_into_noise():
    from dfkt.report.page import accuracy_limits

    low, high = accuracy_limits([0.9756, 0.9756, 0.9609, 0.9766, 0.9956])  # two points and the teacher
    assert high - low >= 0.1 - 1e-9 and low < 0.9609 and 0.9956 < high <= 1.0
    assert accuracy_limits([0.1, 0.6, 0.97]) == pytest.approx((0.0565, 1.0))
    assert accuracy_limits([0.0, 0.02]) == (0.0, 0.1)
