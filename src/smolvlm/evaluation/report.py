"""Reports of benchmark results: markdown tables beside the published scores, and bar charts.

* ``markdown(results)``: one run -- the headline score next to the published score of the same
  checkpoint size, then the per-category table.
* ``combine(results_list)``: several runs (e.g. before and after fine-tuning) -> one table, a
  row per task, a column per run, plus the published column(s).
* ``bar_chart(results, path)`` / ``combined_chart(results_list, path)``: PNGs (matplotlib, Agg).

The published score a run is compared with: the model-card row whose name the ``--model`` string
contains (``SmolVLM2-2.2B-Instruct``, ...); else the SmolVLM2 row of the same text width
(2048 -> 2.2B, 960 -> 500M, 576 -> 256M: our default model, on SmolLM2-135M, is compared with
the 256M card); none when neither is known (scoring-only mode without ``--model``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

SIZE_BY_WIDTH = {2048: "SmolVLM2-2.2B-Instruct", 960: "SmolVLM2-500M-Video-Instruct",
                 576: "SmolVLM2-256M-Video-Instruct"}
KNOWN = ("SmolVLM2-2.2B-Instruct", "SmolVLM2-500M-Video-Instruct", "SmolVLM2-256M-Video-Instruct", "SmolVLM-Instruct")


def published_key(model_name: str | None, text_width: int | None = None) -> str | None:
    """Which model card row a run is compared with (module docstring)."""
    name = (model_name or "").lower()
    for key in KNOWN:
        if key.lower() in name:
            return key
    return SIZE_BY_WIDTH.get(text_width) if text_width is not None else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def label(results: dict[str, Any]) -> str:
    return str(results.get("settings", {}).get("model") or "predictions")


def markdown(results: dict[str, Any]) -> str:
    """One run's report (module docstring)."""
    key = results.get("compare_with")
    pub = results.get("published", {}).get(key) if key else None
    lines = [f"## {results['task']} ({results['metric']})", "",
             f"| model | n | score | published ({key or 'no matching model card'}) |", "|---|---|---|---|",
             f"| {label(results)} | {results['n']} | {_fmt(results['score'])} | {_fmt(pub)} |"]
    if results.get("per_category"):
        lines += ["", "| category | n | score |", "|---|---|---|"]
        lines += [f"| {c} | {v['n']} | {_fmt(v['score'])} |" for c, v in results["per_category"].items()]
    notes = results.get("settings", {}).get("notes")
    if notes:
        lines += ["", f"Notes: {notes}"]
    if results.get("errors", {}).get("n"):
        lines += ["", f"{results['errors']['n']} item(s) failed (scored 0), e.g. {results['errors']['first'][0]}"]
    return "\n".join(lines) + "\n"


def combine(runs: Sequence[dict[str, Any]]) -> str:
    """Several runs -> one markdown table: a row per task, a column per model (a run of a task the
    column already has gets its own column), then the published column(s)."""
    if not runs:
        raise ValueError("no results to combine")
    cells: dict[tuple[str, str], float | None] = {}
    cols: list[str] = []
    for r in runs:
        col = label(r)
        while (r["task"], col) in cells:
            col += "'"
        cells[(r["task"], col)] = r["score"]
        if col not in cols:
            cols.append(col)
    keys = sorted({r["compare_with"] for r in runs if r.get("compare_with")})
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    head = ["task", "metric", *cols, *[f"published {k}" for k in keys]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tasks:
        metric = next(r["metric"] for r in runs if r["task"] == t)
        ours = [_fmt(cells[(t, c)]) if (t, c) in cells else "" for c in cols]
        pubs = [_fmt(next((r.get("published", {}).get(k) for r in runs if r["task"] == t), None)) for k in keys]
        lines.append("| " + " | ".join([t, metric, *ours, *pubs]) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, Any], path: Path) -> Path | None:
    """Per-category scores as horizontal bars, the overall score as a line; None without categories."""
    per = results.get("per_category") or {}
    if not per:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
    ax.barh(names, [per[n]["score"] or 0.0 for n in names], color="#4c72b0")
    if results.get("score") is not None:
        ax.axvline(results["score"], color="#c44e52", linestyle="--", label=f"overall {results['score']:.1f}")
        ax.legend(loc="lower right")
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.set_xlabel(f"{results['metric']} (%)")
    ax.set_title(f"{results['task']}: {label(results)}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def combined_chart(runs: Sequence[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: a group per task, a bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in runs))
    labels = list(dict.fromkeys(label(r) for r in runs))
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * max(1, len(labels)) * 0.6), 4))
    for j, lab in enumerate(labels):
        vals = [next((r["score"] or 0.0 for r in runs if r["task"] == t and label(r) == lab), 0.0) for t in tasks]
        ax.bar([i + j * width for i in range(len(tasks))], vals, width, label=lab)
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("score (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
