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
    """Plot train loss (and eval loss where logged) against step; None if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
