"""Training metrics: JSONL log and a PNG loss curve (matplotlib, Agg backend, no display)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def append_metrics(path: str | Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def truncate_metrics(path: str | Path, max_step: int) -> None:
    """Drop records logged after ``max_step`` (a killed run logged past its last checkpoint)."""
    p = Path(path)
    if p.is_file():
        keep = [r for r in read_metrics(p) if r.get("step", 0) <= max_step]
        p.write_text("".join(json.dumps(r) + "\n" for r in keep))


def plot_loss(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """One panel each, against the optimizer step, for what was logged: train loss, eval loss,
    learning rate. None if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    series = [(name, label, [(r["step"], r[key]) for r in recs if key in r])
              for key, name, label in (("loss", "train loss", "loss"), ("eval_loss", "eval loss", "loss"),
                                       ("lr", "learning rate", "lr"))]
    panels = [p for p in series if p[2]]
    if not any(name != "learning rate" for name, _, _ in panels):
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(6, 2.2 * len(panels) + 0.6), dpi=100, sharex=True, squeeze=False)
    for ax, (name, label, points) in zip(axes[:, 0], panels):
        ax.plot(*zip(*points), "o-" if name == "eval loss" else "-", lw=1, ms=3, label=name)
        ax.set_ylabel(label)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
