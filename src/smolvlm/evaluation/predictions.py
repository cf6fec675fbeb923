"""Prediction files: JSONL, one ``{"id": <question id>, "prediction": "..."}`` per line.

The same format is written by ``smolvlm eval`` as it goes (appended and flushed after every
batch, so a killed run loses at most one batch and a rerun skips what is done) and read by
scoring-only mode (``--predictions``) from any engine. Lines we write may also carry ``"error"``
(the item could not be built or generated: a corrupt image, a missing video, a prompt past the
context) -- such an item scores 0 and is listed in the results.

With K processes (``shard.py``) rank r appends to ``<stem>.rank<r>.jsonl``; rank 0 folds those
into the main file once all ranks are done.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class PredictionsError(ValueError):
    """A predictions file that cannot be read (message names file and line)."""


def path_for(output: Path) -> Path:
    """``results.json`` -> ``results.predictions.jsonl`` (next to it)."""
    return output.with_name(output.stem + ".predictions.jsonl")


def rank_path(main: Path, rank: int) -> Path:
    return main.with_name(main.name.replace(".jsonl", f".rank{rank}.jsonl"))


def read(path: Path, *, tolerate_torn_tail: bool = False) -> dict[str, dict[str, Any]]:
    """id -> record. A line that is not a JSON object with a string-able ``id`` and a string
    ``prediction`` is an error naming the line; ``tolerate_torn_tail`` drops an unterminated last
    line (what a killed writer leaves) instead. Later lines win for a repeated id."""
    out: dict[str, dict[str, Any]] = {}
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PredictionsError(f"predictions file not found: {path}") from None
    except UnicodeDecodeError:
        raise PredictionsError(f"{path}: not UTF-8 text") from None
    lines = raw.split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and n == len(lines):  # no newline after it: cut off mid-write
                break
            raise PredictionsError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("prediction"), str):
            raise PredictionsError(f'{path}:{n}: expected {{"id": ..., "prediction": "<text>"}}, got {line[:120]!r}')
        rec["id"] = str(rec["id"])
        out[rec["id"]] = rec
    return out


def read_done(main: Path) -> dict[str, dict[str, Any]]:
    """Everything a previous (possibly sharded, possibly killed) run of this output wrote."""
    done: dict[str, dict[str, Any]] = {}
    for p in [main, *sorted(main.parent.glob(main.name.replace(".jsonl", ".rank*.jsonl")))]:
        if p.exists():
            done.update(read(p, tolerate_torn_tail=True))
    return done


class Writer:
    """Appends records to a JSONL file, flushing after each ``write`` (so a kill loses little)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._f = path.open("a", encoding="utf-8")

    def _repair_tail(self) -> None:
        # a killed writer may leave a last line without its newline: drop that torn record
        if self.path.exists() and self.path.stat().st_size:
            data = self.path.read_bytes()
            if not data.endswith(b"\n"):
                with self.path.open("r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self._f.write(json.dumps(r, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def merge_ranks(main: Path, world: int) -> None:
    """Fold ``<stem>.rank<r>.jsonl`` (r < world) into ``main`` and delete them."""
    parts = [rank_path(main, r) for r in range(world)]
    records = [rec for p in parts if p.exists() for rec in read(p, tolerate_torn_tail=True).values()]
    w = Writer(main)
    w.write(records)
    w.close()
    for p in parts:
        p.unlink(missing_ok=True)
