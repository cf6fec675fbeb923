"""Benchmark data on disk: find a split's files in a hub-layout folder and stream their rows.

``--data`` is a local copy of the dataset as ``huggingface_hub.snapshot_download(repo_type="dataset")``
leaves it (a folder of parquet shards such as ``DocVQA/validation-00000-of-00005.parquet`` or
``data/test-00000-of-00001.parquet``), one parquet file, a JSON / JSONL file or folder of them
(MVBench and MLVU publish JSON annotations), or -- where there is internet -- the hub id itself.

Rows are read with pyarrow, a record batch at a time and only the columns asked for
(``iter_rows(..., columns=...)``), so neither a whole split nor, when scoring, its image bytes
are ever in memory. Files are read in sorted path order; a row's index counts across them, which
is the order ``datasets`` loads the shards in (ChartQA's questions are keyed by that index).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

DATA_SUFFIXES = (".parquet", ".json", ".jsonl")
# names the hub gives splits; a folder whose files name none of these has one unnamed split
# (MMStar's single ``mmstar.parquet``, MVBench's ``json/<task>.json``): all its files are taken
SPLIT_NAMES = {"train", "validation", "val", "dev", "test", "testmini", "test_mini"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DataError(ValueError):
    """A dataset path, layout or row that cannot be evaluated (message names the file)."""


def _split_of(path: Path, root: Path) -> str | None:
    """The split a file belongs to by the hub's naming: ``<split>-00000-of-00003.parquet``,
    ``<split>.parquet`` / ``.json(l)``, or a ``<split>/`` folder."""
    m = re.match(r"^([A-Za-z_]+?)(?:[-_]\d{5}-of-\d{5})?(?:-[0-9a-f]{4,})?\.(?:parquet|jsonl?)$", path.name)
    if m:
        return m.group(1)
    parts = path.relative_to(root).parts[:-1]
    return parts[-1] if parts else None


def find_files(data: str | Path, split: str | None, config: str | None = None) -> list[Path]:
    """The data files of ``split`` (of subset ``config`` when the folder has it) under ``data``.

    A single file is taken as it is. In a folder, files named for the split (or inside a folder
    named for it) are chosen; a ``config`` subfolder, when present, narrows the search (DocVQA's
    repo holds ``DocVQA/`` and ``InfographicVQA/``). No match is an error that lists the splits
    the folder does have. A folder whose file names carry no split name (``SPLIT_NAMES``) is one
    split, taken whole.
    """
    root = Path(data).expanduser()
    if root.is_file():
        if root.suffix not in DATA_SUFFIXES:
            raise DataError(f"{root}: not a dataset file (expected {', '.join(DATA_SUFFIXES)})")
        return [root]
    if not root.is_dir():
        raise DataError(f"dataset not found: {data} (give a folder of parquet files, one parquet file, or a hub id)")
    if config and (root / config).is_dir():
        root = root / config
    files = sorted(p for p in root.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DataError(f"{root}: no {', '.join(DATA_SUFFIXES)} files in this folder")
    if split is None:
        return files
    chosen = [p for p in files if _split_of(p, root) == split]
    if not chosen and not any(_split_of(p, root) in SPLIT_NAMES for p in files):
        return files
    if not chosen:
        found = sorted({s for p in files if (s := _split_of(p, root)) is not None})
        raise DataError(f"{root}: no files for split {split!r}; splits found: {', '.join(found) or 'none'}")
    return chosen


def resolve(data: str, split: str | None, config: str | None = None, hub_id: str | None = None) -> list[Path]:
    """``--data`` -> files: a local path, or a hub dataset id downloaded with ``huggingface_hub``
    (only the split's files). ``hub_id``: the benchmark's own repo, for the error message."""
    if Path(data).expanduser().exists() or not _HUB_ID.match(data):
        return find_files(data, split, config)
    from huggingface_hub import snapshot_download

    sub = f"{config}/" if config else ""
    # the split's files only; without a split, the annotation / parquet files (not the videos)
    patterns = ([f"{sub}*{split}*", f"{sub}**/*{split}*"] if split
                else [f"{sub}*{ext}" for ext in DATA_SUFFIXES] + [f"{sub}**/*{ext}" for ext in DATA_SUFFIXES])
    try:
        folder = snapshot_download(data, repo_type="dataset", allow_patterns=patterns)
    except Exception as e:  # no internet, unknown repo, gated dataset
        hint = f" (this task's data is {hub_id})" if hub_id and hub_id != data else ""
        raise DataError(f"cannot download dataset {data}{hint}: {type(e).__name__}: {str(e)[:200]}") from None
    return find_files(folder, split, config)


def columns_of(path: Path) -> list[str]:
    """Column names of a data file (JSON: the keys of its first record)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    first = next(_iter_json(path), None)
    return list(first) if first else []


def check_columns(files: Sequence[Path], needed: Sequence[str]) -> None:
    """Every file has the ``needed`` columns, else one error naming the file and what it has."""
    for f in files:
        have = columns_of(f)
        missing = [c for c in needed if c not in have]
        if missing:
            raise DataError(f"{f}: missing column(s) {', '.join(missing)} (it has: {', '.join(have) or 'none'}); "
                            "is this the right dataset and split for the task?")


def _iter_json(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))  # annotation files: small
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    yield from data


def _iter_parquet(path: Path, columns: Sequence[str] | None, batch_size: int) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None):
            yield from batch.to_pylist()
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise DataError(f"{path}: cannot read parquet ({str(e)[:200]})") from None


def iter_rows(files: Sequence[Path], columns: Sequence[str] | None = None,
              batch_size: int = 16) -> Iterator[tuple[int, Path, dict[str, Any]]]:
    """``(index, file, row)`` over the files in order; ``columns`` limits what parquet reads
    (JSON rows are given whole, with each record's ``_file`` set to the annotation file)."""
    index = 0
    for f in files:
        rows = _iter_parquet(f, columns, batch_size) if f.suffix == ".parquet" else _iter_json(f)
        for row in rows:
            if not isinstance(row, dict):
                raise DataError(f"{f}: row {index} is {type(row).__name__}, not a record")
            if f.suffix != ".parquet":
                row = {**row, "_file": str(f)}
            yield index, f, row
            index += 1


def count_rows(files: Sequence[Path]) -> int:
    """Rows in the files (parquet: from the footer, without reading data)."""
    n = 0
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                n += pq.ParquetFile(f).metadata.num_rows
            except (OSError, ValueError) as e:
                raise DataError(f"{f}: cannot read parquet ({str(e)[:200]})") from None
        else:
            n += sum(1 for _ in _iter_json(f))
    return n
