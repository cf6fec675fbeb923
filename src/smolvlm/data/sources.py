"""Users' training data on disk, as random-access sequences of raw samples (``samples.py`` layouts).

Training shuffles by index, so every reader is a ``Sequence`` that reads one sample on demand and
never holds the data set in memory:

* ``ParquetSource`` (``format: cauldron``): the_cauldron / Docmatix parquet, one file or a folder of
  shards. Rows are indexed by (file, row group, offset) from the parquet metadata; a sample reads its
  row group (``images`` + ``texts`` columns only) through a small LRU cache.
* ``JsonlSource`` (``format: jsonl``): one JSON object per line, either layout; indexed by the byte
  offset of each non-blank line. Image / video paths are relative to the JSONL file.
* ``Mixture``: several sources, each drawn in proportion to its weight (deterministic given a seed).

Each sample gets ``"_name"``: ``<file>:<line>`` (JSONL) or ``<file>#<row>`` (parquet, row within the
file). A line or row that cannot be read comes back as ``{"_name", "_error"}`` for validation to drop,
never as an exception.
"""

from __future__ import annotations

import bisect
import json
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from smolvlm.data.cauldron import DataError
from smolvlm.data.samples import ERROR, NAME, resolve_paths, resolve_source

FORMATS = {"cauldron": (".parquet",), "jsonl": (".jsonl", ".json")}


def find_files(path: str | Path, fmt: str) -> list[Path]:
    """The data files of ``path``: the file itself, or the format's files in a folder (sorted, recursive)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; known: {sorted(FORMATS)}")
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataError(f"data path not found: {path}")
    files = sorted(f for f in p.rglob("*") if f.suffix in FORMATS[fmt] and f.is_file()
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise DataError(f"{path}: no {' / '.join(FORMATS[fmt])} files in this folder (data format {fmt!r})")
    return files


class _Indexed(Sequence):
    """Shared bookkeeping: global index -> (block, offset in block) over cumulative block starts."""

    _starts: list[int]
    _total: int

    def __len__(self) -> int:
        return self._total

    def _locate(self, i: int) -> tuple[int, int]:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"sample indices are integers, got {type(i).__name__}")
        i = int(i) + (self._total if i < 0 else 0)
        if not 0 <= i < self._total:
            raise IndexError(i)
        b = bisect.bisect_right(self._starts, i) - 1
        return b, i - self._starts[b]


class ParquetSource(_Indexed):
    """the_cauldron layout parquet: ``images`` = list of ``{bytes, path}``, ``texts`` = list of
    ``{user, assistant, source?}``. ``limit``: the first N rows only."""

    def __init__(self, path: str | Path, limit: int | None = None, cache_size: int = 4) -> None:
        import pyarrow.parquet as pq

        self.files = find_files(path, "cauldron")
        self._groups: list[tuple[int, int, int]] = []  # (file, row group, first row of the group in its file)
        self._starts, total, self.columns = [], 0, []
        for fi, f in enumerate(self.files):
            try:
                pf = pq.ParquetFile(f)
                meta, names = pf.metadata, pf.schema_arrow.names
            except (OSError, ValueError) as e:
                raise DataError(f"{f}: cannot read parquet ({str(e)[:200]})") from None
            if "texts" not in names:
                raise DataError(f"{f}: no 'texts' column (it has: {', '.join(names)}); not the_cauldron layout")
            self.columns.append([c for c in ("images", "texts", "videos", "video") if c in names])
            row = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if n:
                    self._groups.append((fi, g, row))
                    self._starts.append(total)
                    total, row = total + n, row + n
        self._total = total if limit is None else min(total, limit)
        self.cache_size = cache_size
        self._cache: OrderedDict[int, Any] = OrderedDict()

    def _group(self, b: int) -> Any:
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        import pyarrow.parquet as pq

        fi, g, _ = self._groups[b]
        table = pq.ParquetFile(self.files[fi]).read_row_group(g, columns=self.columns[fi])
        self._cache[b] = table
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return table

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        b, off = self._locate(i)
        fi, _, first = self._groups[b]
        name = f"{self.files[fi]}#{first + off}"
        try:
            row = self._group(b).slice(off, 1).to_pylist()[0]
        except Exception as e:  # a corrupt row group: this sample is dropped, the run goes on
            return {NAME: name, ERROR: f"cannot read parquet row ({type(e).__name__}: {str(e)[:160]})"}
        row = resolve_paths(row, self.files[fi].parent)
        return {**row, NAME: name}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": OrderedDict()}


class JsonlSource(_Indexed):
    """One JSON object per line (the_cauldron layout or chat messages); ``limit``: first N lines."""

    def __init__(self, path: str | Path, limit: int | None = None) -> None:
        self.files = find_files(path, "jsonl")
        self._offsets, self._lines, self._file_of = array("q"), array("q"), array("l")
        for fi, f in enumerate(self.files):
            pos = 0
            with f.open("rb") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        self._offsets.append(pos)
                        self._lines.append(n)
                        self._file_of.append(fi)
                    pos += len(line)
        self._starts = [0]
        self._total = len(self._offsets) if limit is None else min(len(self._offsets), limit)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        _, k = self._locate(i)
        f = self.files[self._file_of[k]]
        name = f"{f}:{self._lines[k]}"
        with f.open("rb") as fh:
            fh.seek(self._offsets[k])
            raw = fh.readline()
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return {NAME: name, ERROR: f"not valid JSON ({getattr(e, 'msg', e)})"}
        if not isinstance(obj, dict):
            return {NAME: name, ERROR: f"a line must hold a JSON object, got {type(obj).__name__}"}
        return {**resolve_paths(obj, f.parent), NAME: name}


def open_source(fmt: str, path: str | Path, limit: int | None = None) -> Sequence:
    """A reader for ``format`` (``cauldron`` | ``jsonl``) at ``path``."""
    if limit is not None and limit < 1:
        raise DataError(f"data.limit must be >= 1, got {limit}")
    if fmt == "cauldron":
        return ParquetSource(path, limit)
    if fmt == "jsonl":
        return JsonlSource(path, limit)
    raise DataError(f"data format {fmt!r} has no file reader; use 'cauldron' or 'jsonl'")


class Mixture(Sequence):
    """Several sources as one: ``size`` (default: their total length) samples, source k drawn
    ``size * w_k / sum(w)`` times (largest remainder), each cycling through seeded permutations of
    that source (so a small source is repeated, a large one subsampled); the whole list shuffled."""

    def __init__(self, sources: Sequence[Sequence], weights: Sequence[float], seed: int = 0,
                 size: int | None = None) -> None:
        if len(sources) != len(weights) or not sources:
            raise DataError("a mixture needs one weight per source and at least one source")
        if any(not w > 0 for w in weights):
            raise DataError(f"mixture weights must be > 0, got {list(weights)}")
        self.sources = list(sources)
        n = sum(len(s) for s in sources) if size is None else size
        share = np.asarray(weights, dtype=float) / float(sum(weights)) * n
        counts = np.floor(share).astype(int)
        for k in np.argsort(-(share - counts), kind="stable")[: n - int(counts.sum())]:
            counts[k] += 1
        rng = np.random.default_rng(seed)
        src, idx = [], []
        for k, (s, c) in enumerate(zip(sources, counts)):
            if c and not len(s):
                raise DataError(f"mixture source {k} is empty")
            picks: list[int] = []
            while len(picks) < c:
                picks.extend(rng.permutation(len(s)).tolist())
            src += [k] * int(c)
            idx += picks[:c]
        order = rng.permutation(len(src))
        self._src = np.asarray(src, dtype=np.int32)[order]
        self._idx = np.asarray(idx, dtype=np.int64)[order]
        self.counts = [int(c) for c in counts]

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        return self.sources[int(self._src[i])][int(self._idx[i])]


def mixture_entries(data: Any) -> list[tuple[str, str, float]]:
    """``(format, path, weight)`` of a recipe's training sources (``data.mixture``, else ``format`` + ``path``)."""
    if not data.mixture:
        if not data.path:
            raise DataError(f"data.format {data.format!r} needs data.path (a file or a folder)")
        return [(data.format, data.path, 1.0)]
    out = []
    for k, e in enumerate(data.mixture):
        unknown = sorted(set(e) - {"format", "path", "weight"}) if isinstance(e, dict) else None
        if unknown is None or unknown or "path" not in e:
            raise DataError(f"data.mixture[{k}] must be {{format, path, weight}}, got {e!r}")
        fmt, w = e.get("format", data.format), e.get("weight", 1.0)
        if fmt not in FORMATS:
            raise DataError(f"data.mixture[{k}].format must be one of {sorted(FORMATS)}, got {fmt!r}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            raise DataError(f"data.mixture[{k}].weight must be a number > 0, got {w!r}")
        out.append((fmt, str(e["path"]), float(w)))
    return out


def eval_format(data: Any) -> str:
    """The format of ``data.eval_path``: ``data.format``, or with a mixture of files the first entry's."""
    return data.format if data.format in FORMATS else mixture_entries(data)[0][0]


def check_paths(data: Any) -> None:
    """Every path a recipe's data section names exists and holds files of its format (reads nothing else)."""
    entries = mixture_entries(data)
    if data.eval_path:
        entries.append((eval_format(data), data.eval_path, 1.0))
    for fmt, path, _ in entries:
        find_files(path, fmt)


__all__ = ["FORMATS", "JsonlSource", "Mixture", "ParquetSource", "check_paths", "eval_format", "find_files",
           "mixture_entries", "open_source", "resolve_source"]
