"""``dfkt report``: one page (self-contained HTML, and markdown beside its PNG files) for run folders
and sweeps: config, accuracy and loss curves (RDSKD's two exponential weights among them), sample
grids, sample diagnostics, and for sweeps a box plot of final accuracy per method."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: drawing needs no backend, so the caller's is left alone

from dfkt.engine.metrics import read_metrics
from dfkt.errors import DfktError

EXP_WEIGHTS = ("exp_oh", "exp_ie")  # RDSKD: exp(L_oh - r_oh) and exp(L_ie - r_ie)


@dataclass
class Section:
    """One run or sweep: a title, key-value facts, text blocks, tables and figures (PNG files)."""

    title: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)
    blocks: list[tuple[str, str]] = field(default_factory=list)  # (caption, preformatted text)
    warnings: list[str] = field(default_factory=list)


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _figure(path: Path, draw) -> Path:
    fig = Figure(figsize=(6.4, 3.4))
    draw(fig.subplots())
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def accuracy_limits(values: list[float], least_span: float = 0.1) -> tuple[float, float]:
    """The accuracy axis: every value with a margin, inside [0, 1], and at least ``least_span`` tall so
    that a flat stretch of the curve looks flat rather than filling the plot with noise."""
    low, high = min(values), max(values)
    margin = max(0.01, 0.05 * (high - low))
    low, high = max(0.0, low - margin), min(1.0, high + margin)
    if high - low < least_span:
        low = max(0.0, high - least_span)
        high = min(1.0, low + least_span)
    return low, high


def _curve_figures(run: Path, summary: dict, out: Path, tag: str) -> list[tuple[str, Path]]:
    figures = []
    curve = [e for e in summary.get("curve", []) if e.get("test_acc") is not None or e.get("adapted_acc") is not None]
    if curve:

        def accuracy(ax):
            # The evaluated stage from its start (the run's first evaluation) to its end.
            x = [e["train_seconds"] for e in curve]
            key = "test_acc" if "test_acc" in curve[0] else "adapted_acc"
            shown = [e[key] for e in curve]
            ax.plot(x, shown, marker=".", label=f"{key} (test labels: for the report only)")
            selection = summary.get("selection")  # train-source writes a sentence here; adapt, a mapping
            score = selection.get("score") if isinstance(selection, dict) else None
            for name, what in (
                ("teacher_agreement", "teacher agreement on held-out synthetic images (label-free)"),
                ("label_free_score", f"{score or 'label-free score'} on the target (label-free)"),
            ):
                values = [e.get(name) for e in curve]
                if any(v is not None for v in values):
                    ax.plot(
                        [xi for xi, v in zip(x, values) if v is not None],
                        [v for v in values if v is not None],
                        marker=".",
                        label=what,
                    )
                    shown += [v for v in values if v is not None]
            if summary.get("teacher_acc") is not None:
                ax.axhline(
                    summary["teacher_acc"],
                    color="gray",
                    linestyle="--",
                    linewidth=1,
                    label=f"teacher ({pct(summary['teacher_acc'])})",
                )
                shown.append(summary["teacher_acc"])
            if x[-1] > x[0]:
                ax.set_xlim(x[0], x[-1])
            ax.set_ylim(*accuracy_limits(shown))
            ax.set_xlabel("training seconds"), ax.set_ylabel("accuracy, score")
            ax.legend(fontsize=7, loc="lower right")  # the curve rises at the left

        figures.append(("Accuracy over training time", _figure(out / f"{tag}-accuracy.png", accuracy)))
    records = [r for r in read_metrics(run / "metrics.jsonl") if "stage" in r and "step" in r and "event" not in r]
    for stage in dict.fromkeys(r["stage"] for r in records):
        rows = [r for r in records if r["stage"] == stage]
        keys = [
            k
            for k in dict.fromkeys(k for r in rows for k in r)
            if k not in ("stage", "step", "seconds") and isinstance(rows[-1].get(k), (int, float))
        ]
        for group, names in (
            ("loss terms", [k for k in keys if k not in EXP_WEIGHTS]),
            ("RDSKD exponential weights exp(L - r)", [k for k in keys if k in EXP_WEIGHTS]),
        ):
            if not names:
                continue

            def losses(ax, names=names, rows=rows, group=group):
                for name in names:
                    points = [(r["step"], r[name]) for r in rows if name in r]
                    ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
                ax.set_xlabel(f"{stage} step"), ax.set_title(group, fontsize=9), ax.legend(fontsize=7)
                if group == "loss terms" and all(r[n] > 0 for r in rows for n in names if n in r):
                    ax.set_yscale("log")

            figures.append(
                (
                    f"{stage} stage: {group} ({', '.join(names)})",
                    _figure(out / f"{tag}-{stage}-{len(figures)}.png", losses),
                )
            )
    return figures


def run_section(run: Path, out: Path, tag: str) -> Section:
    """A distill or adapt run folder."""
    summary = json.loads((run / "summary.json").read_text())
    section = Section(f"{summary.get('method', '?')} — {run}")
    if "student_acc" in summary:
        section.facts += [
            ("teacher", f"{summary['teacher']} ({pct(summary['teacher_acc'])})"),
            ("student (final)", pct(summary["student_acc"])),
            ("student (label-free selection)", pct(summary.get("student_selected_acc"))),
            ("student (best on test, oracle)", pct(summary["student_best_on_test_acc"])),
            (
                "seconds: synthesis / student / total",
                " / ".join(f"{summary['seconds'][k]:.0f}" for k in ("synthesis", "student", "total")),
            ),
        ]
        if "evaluation" in summary["seconds"]:
            section.facts.append(
                (
                    "evaluations (test set and teacher agreement)",
                    f"{len(summary.get('curve', []))}, {summary['seconds']['evaluation']:.1f} s "
                    f"({summary['seconds']['evaluation'] / max(summary['seconds']['total'], 1e-9):.1%} "
                    "of the training time)",
                )
            )
        samples = summary.get("samples", {})
        diversity = samples.get("diversity") or {}
        section.facts += [
            ("teacher confidence on samples", f"{samples.get('teacher_confidence', 0):.3f}"),
            (
                "sample diversity (1 - cos of " + diversity.get("features", "features") + ")",
                f"within class {diversity.get('within_class') or 0:.4f}, across {diversity.get('across') or 0:.4f}",
            ),
        ]
        histogram = samples.get("class_histogram")
        if histogram:

            def bars(ax):
                ax.bar(range(len(histogram)), histogram)
                ax.set_xlabel("teacher-predicted class"), ax.set_ylabel("samples")

            section.figures.append(("Class histogram of the generated samples", _figure(out / f"{tag}-hist.png", bars)))
        if (run / "samples.png").is_file():
            section.figures.append(("Generated samples by teacher-predicted class", run / "samples.png"))
        for name, ref in summary.get("references", {}).items():
            section.facts.append((f"reference {name}", pct(ref["student_acc"])))
        section.warnings = summary.get("warnings", [])
    else:
        section.facts += [
            ("target", summary["target"]),
            (
                "transductive: adapted / source only",
                f"{pct(summary['adapted']['transductive'])} / {pct(summary['source_only']['transductive'])}",
            ),
            (
                "inductive: adapted / source only",
                f"{pct(summary['adapted']['inductive'])} / {pct(summary['source_only']['inductive'])}",
            ),
        ]
        selected = summary.get("selected")
        if selected is not None:  # runs from before the label-free selection have none
            epoch = "final weights" if selected["epoch"] is None else f"epoch {selected['epoch']:g}"
            section.facts.append(
                (
                    f"label-free selection ({epoch}): transductive / inductive",
                    f"{pct(selected['transductive'])} / {pct(selected['inductive'])}",
                )
            )
        section.warnings = summary.get("warnings", [])
    section.figures[:0] = _curve_figures(run, summary, out, tag)
    if (run / "config.yaml").is_file():
        section.blocks.append(("config.yaml", (run / "config.yaml").read_text()))
    return section


def sweep_sections(sweeps: list[Path], out: Path) -> list[Section]:
    results = [json.loads((s / "sweep.json").read_text()) for s in sweeps]
    sections = []
    if results:

        def boxes(ax):
            ax.boxplot([r["student_acc"].get("values", []) for r in results], showmeans=True)
            ax.set_xticks(range(1, len(results) + 1), [r["method"] for r in results])
            ax.set_ylabel("final student accuracy"), ax.set_title("every setting x seed", fontsize=9)

        overview = Section("Sweeps: final student accuracy per method")
        overview.figures.append(("Box plot over the sweep's trials", _figure(out / "sweep-box.png", boxes)))
        head = ["method", "trials", "mean", "std", "min", "max", "label-free selected (mean)", "best on test (oracle)"]
        rows = [
            [
                r["method"],
                f"{r['trials_finished']}/{r['trials_planned']}",
                *(pct(r["student_acc"][k]) for k in ("mean", "std", "min", "max")),
                pct(r["student_selected_acc"]["mean"]),
                pct(r["student_best_on_test_acc"]["mean"]),
            ]
            for r in results
        ]
        overview.tables.append(("Final student accuracy over all trials", head, rows))
        sections.append(overview)
    for path, r in zip(sweeps, results):
        section = Section(f"Sweep {r['method']} — {path}")
        section.tables.append(
            (
                "Per setting (mean over seeds)",
                ["setting", "overrides", "mean", "std", "min", "max"],
                [
                    [
                        str(s["setting"]),
                        " ".join(s["overrides"]) or "(preset)",
                        *(pct(s[k]) for k in ("mean", "std", "min", "max")),
                    ]
                    for s in r["settings"]
                ],
            )
        )
        section.warnings = [f"trial {k} failed: {v}" for k, v in r.get("failed", {}).items()]
        if (path / "sweep.yaml").is_file():
            section.blocks.append(("sweep.yaml", (path / "sweep.yaml").read_text()))
        sections.append(section)
    return sections


def _html(sections: list[Section]) -> str:
    def image(path: Path) -> str:
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>dfkt report</title><style>",
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:left}img{max-width:100%;display:block;margin:.3em 0 1em}pre{background:#f5f5f5;"
        "padding:.6em;overflow:auto;font-size:12px}.warn{color:#a00}</style></head><body><h1>dfkt report</h1>",
    ]
    for s in sections:
        parts.append(f"<section><h2>{html.escape(s.title)}</h2>")
        parts += [f"<p class='warn'>warning: {html.escape(w)}</p>" for w in s.warnings]
        if s.facts:
            parts.append(
                "<table>"
                + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in s.facts)
                + "</table>"
            )
        for caption, head, rows in s.tables:
            parts.append(
                f"<h3>{html.escape(caption)}</h3><table><tr>"
                + "".join(f"<th>{html.escape(h)}</th>" for h in head)
                + "</tr>"
            )
            parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
        for caption, path in s.figures:
            parts.append(f"<h3>{html.escape(caption)}</h3>{image(path)}")
        for caption, text in s.blocks:
            parts.append(f"<details><summary>{html.escape(caption)}</summary><pre>{html.escape(text)}</pre></details>")
        parts.append("</section>")
    return "\n".join(parts + ["</body></html>"])


def _markdown(sections: list[Section], out: Path) -> str:
    lines = ["# dfkt report", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        lines += [f"> warning: {w}" for w in s.warnings] + ([""] if s.warnings else [])
        if s.facts:
            lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in s.facts], ""]
        for caption, head, rows in s.tables:
            lines += [
                f"**{caption}**",
                "",
                "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head),
                *["| " + " | ".join(row) + " |" for row in rows],
                "",
            ]
        for caption, path in s.figures:
            target = path if path.parent == out else out / f"{path.parent.name}-{path.name}"
            if target != path:
                target.write_bytes(path.read_bytes())
            lines += [f"![{caption}]({target.name})", ""]
        for caption, text in s.blocks:
            lines += [
                f"<details><summary>{caption}</summary>",
                "",
                "```yaml",
                text.rstrip(),
                "```",
                "",
                "</details>",
                "",
            ]
    return "\n".join(lines)


def write_report(paths: list[str | Path], out: str | Path) -> dict[str, Any]:
    """Report on run folders (distill or adapt) and sweep folders; writes OUT/report.html and OUT/report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs, sweeps = [], []
    for p in map(Path, paths):
        if (p / "sweep.json").is_file():
            sweeps.append(p)
        elif (p / "summary.json").is_file():
            runs.append(p)
        else:
            raise DfktError(f"{p} holds no summary.json or sweep.json; name a finished run folder or sweep folder")
    sections = sweep_sections(sweeps, out) + [run_section(r, out, f"run{i}") for i, r in enumerate(runs)]
    (out / "report.html").write_text(_html(sections))
    (out / "report.md").write_text(_markdown(sections, out))
    return {
        "html": str(out / "report.html"),
        "markdown": str(out / "report.md"),
        "runs": len(runs),
        "sweeps": len(sweeps),
    }
