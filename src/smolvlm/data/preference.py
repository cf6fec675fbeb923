"""Preference pairs for DPO, read from JSONL (RLAIF-V style).

One JSON object a line::

    {"images": ["img/0001.jpg"], "prompt": "What is shown?", "chosen": "A red bus.", "rejected": "A cat."}

``images`` (a list, or ``image``: one path) may be absent or empty for text-only pairs; relative paths
are relative to the JSONL file's folder. A bad line (not JSON, a missing key, an empty or non-string
``chosen`` / ``rejected``, identical answers, an image file that does not exist) is dropped and reported
as ``<file>:<line>: <what>``; only a file without a single good line is an error.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from smolvlm.data.cauldron import DataError

KEYS = ("prompt", "chosen", "rejected")
SHOWN = 20  # bad lines named in one report


class PreferenceDataWarning(UserWarning):
    """Some lines of a preference file were dropped (each named ``<file>:<line>``)."""


def _images(rec: dict[str, Any], base: Path) -> tuple[list[str], str | None]:
    """Resolved image paths of a record, or the reason it has none usable."""
    raw = rec.get("images", rec.get("image"))
    if raw is None:
        return [], None
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
        return [], f"'images' must be a list of file paths, got {raw!r}"
    out = []
    for x in items:
        p = Path(x).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            return [], f"missing image {x!r} (no file {p})"
        out.append(str(p))
    return out, None


def parse_line(line: str, base: Path) -> tuple[dict[str, Any] | None, str | None]:
    """One JSONL line -> (sample, None) or (None, what is wrong with it)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(rec, dict):
        return None, f"expected a JSON object, got {type(rec).__name__}"
    missing = [k for k in KEYS if k not in rec]
    if missing:
        return None, f"missing key(s) {', '.join(repr(k) for k in missing)} (has {sorted(rec)})"
    for k in KEYS:
        if not isinstance(rec[k], str):
            return None, f"{k!r} must be a string, got {type(rec[k]).__name__}"
    for k in ("chosen", "rejected"):
        if not rec[k].strip():
            return None, f"empty {k!r} response"
    if rec["chosen"].strip() == rec["rejected"].strip():
        return None, "'chosen' and 'rejected' are the same text (no preference to learn)"
    images, err = _images(rec, base)
    if err:
        return None, err
    return {"images": images, "prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"]}, None


def read_preferences(path: str | Path, limit: int | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """(good samples, one ``"<file>:<line>: <what>"`` per bad line). Blank lines are skipped; ``limit``
    stops after that many good samples. A missing file is an error; bad lines are not."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"preference file not found: {p}")
    samples: list[dict[str, Any]] = []
    problems: list[str] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(samples) >= limit:
                break
            if not line.strip():
                continue
            sample, err = parse_line(line, p.parent)
            if err is not None:
                problems.append(f"{p}:{lineno}: {err}")
            else:
                samples.append({**sample, "id": f"{p.name}:{lineno}"})
    return samples, problems


def load_preferences(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """``read_preferences``, with the dropped lines reported as one ``PreferenceDataWarning``; a file
    with no good line is a ``DataError`` naming its first bad lines."""
    samples, problems = read_preferences(path, limit)
    more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    shown = "\n  ".join(problems[:SHOWN]) + more
    if not samples:
        raise DataError(f"{path}: no usable preference pair" + (f" ({len(problems)} bad lines):\n  {shown}" if problems
                                                                 else " (the file is empty)"))
    if problems:
        warnings.warn(f"{path}: dropped {len(problems)} bad line(s), kept {len(samples)}:\n  {shown}",
                      PreferenceDataWarning, stacklevel=2)
    return samples
