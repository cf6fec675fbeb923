"""Benchmark runs: plan the rows, generate greedy answers (batched, resumable, sharded), score.

``generate(model, processor, run)`` appends this rank's predictions to the predictions file;
``score(run, predictions)`` streams the split's text columns and scores every predicted row with
the benchmark's rule; ``results`` is the JSON ``smolvlm eval`` writes:

    {"task", "metric", "score" (0-100), "n", "per_category": {cat: {"score", "n"}}, "published",
     "errors": {"n", "first"}, "missing", "settings": {...}, "samples": [{"id", "category",
     "prediction", "extracted", "score", "reference"}], "git_commit", "seconds"}

Generation is the library's (``generation.generate.generate_ids``): greedy, left-padded batches
of consecutive rows, stopping at the checkpoint's eos ids and ``<end_of_utterance>``. An item that
cannot be built (corrupt image, missing video) or generated (prompt past the context) is written
with its ``error`` and scores 0; the results count and list them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolvlm.evaluation import dataset_files, predictions
from smolvlm.evaluation.benchmarks import get_benchmark
from smolvlm.evaluation.benchmarks.base import Benchmark, BuildContext, Item
from smolvlm.evaluation.shard import Shard

_BUILD_ERRORS = (ValueError, OSError, KeyError, IndexError, TypeError)


@dataclass
class BenchRun:
    """One ``smolvlm eval --task <benchmark>`` invocation, resolved (files found, output chosen)."""

    task: str
    data: str
    split: str | None = None
    media: str | None = None
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    output: Path = Path("results.json")
    progress: bool = True
    files: list[Path] = field(default_factory=list)

    @property
    def benchmark(self) -> Benchmark:
        return get_benchmark(self.task)

    @property
    def budget(self) -> int:
        return self.max_new_tokens or self.benchmark.max_new_tokens

    def resolve(self) -> "BenchRun":
        """Check the flags and find the data files (no model needed): errors here are the user's."""
        bench = self.benchmark
        for name in ("batch_size",) + (("limit",) if self.limit is not None else ()) + (
                ("max_new_tokens",) if self.max_new_tokens is not None else ()):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        self.split = self.split or bench.split
        if bench.media == "video" and self.media is None:
            raise ValueError(f"{bench.name} is a video benchmark: give its video folder with --media PATH")
        if self.media is not None and not Path(self.media).expanduser().is_dir():
            raise FileNotFoundError(f"--media folder not found: {self.media}")
        files = dataset_files.resolve(self.data, self.split, bench.hub_config, bench.hub_id)
        self.files = [f for f in files if bench.keep_file is None or bench.keep_file(f)]
        if not self.files:
            raise dataset_files.DataError(f"{self.data}: none of its files hold {bench.name} questions")
        dataset_files.check_columns(self.files, bench.text_columns)
        return self

    def context(self) -> BuildContext:
        return BuildContext(media=Path(self.media).expanduser() if self.media else None)


# -- planning ---------------------------------------------------------------------------------------
def planned_rows(run: BenchRun, columns: Sequence[str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(index, row)`` of the rows to evaluate: the split in order, the first ``limit``."""
    for index, _, row in dataset_files.iter_rows(run.files, columns):
        if run.limit is not None and index >= run.limit:
            return
        yield index, row


def count_planned(run: BenchRun) -> int:
    n = dataset_files.count_rows(run.files)
    return min(n, run.limit) if run.limit is not None else n


def preflight(run: BenchRun) -> None:
    """Build the first planned item (decode its image, find its video) before the model loads, so a
    wrong ``--data`` / ``--media`` fails in seconds; an empty split is an error too."""
    bench = run.benchmark
    for index, row in planned_rows(run):
        bench.build(row, run.context())
        return
    raise dataset_files.DataError(f"no rows to evaluate in {', '.join(map(str, run.files[:3]))}")


# -- generation ---------------------------------------------------------------------------------------
def encode_items(processor: Any, items: Sequence[Item], pixel_dtype: Any = None) -> dict[str, Any]:
    """Items -> left-padded model inputs: each rendered with the checkpoint's chat template and the
    generation prompt, then the item's ``answer_prefix`` (as markup, like the reference's prompt string).
    ``pixel_dtype``: the model's (``generation.pixels.pixel_dtype``), so the float32 pixel batch never exists."""
    from smolvlm.processing.messages import collect_images, collect_videos
    from smolvlm.processing.prompt import Prompt

    prompts = [Prompt(processor.render_prompt(it.messages, add_generation_prompt=True).pieces
                      + (((it.answer_prefix, False),) if it.answer_prefix else ())) for it in items]
    images = [collect_images(it.messages) for it in items]
    videos = [collect_videos(it.messages) for it in items]
    enc = processor(text=prompts, images=images if any(images) else None, videos=videos if any(videos) else None,
                    return_tensors="pt", padding_side="left", pixel_dtype=pixel_dtype)
    return {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask") if k in enc}


def answer_items(model: Any, processor: Any, items: Sequence[Item], max_new_tokens: int) -> list[str]:
    """Greedy answers for one batch, in order."""
    from smolvlm.evaluation.runner import decode_answer, stop_ids
    from smolvlm.generation.generate import generate_ids
    from smolvlm.generation.pixels import pixel_dtype

    inputs = encode_items(processor, items, pixel_dtype=pixel_dtype(model))
    eos = stop_ids(model, processor)
    ids = generate_ids(model, **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos)
    new = ids[:, inputs["input_ids"].shape[1]:].tolist()
    return [decode_answer(processor, row, eos) for row in new]


def _answer_batch(model: Any, processor: Any, items: list[Item], budget: int) -> list[dict[str, Any]]:
    """Records for a batch; when the batch fails (one prompt past the context, say), each item is
    retried alone so only the bad one carries the error."""
    try:
        return [{"id": it.id, "prediction": p} for it, p in zip(items, answer_items(model, processor, items, budget))]
    except _BUILD_ERRORS as e:
        if len(items) == 1:
            return [{"id": items[0].id, "prediction": "", "error": _short(e)}]
    return [r for it in items for r in _answer_batch(model, processor, [it], budget)]


def _short(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) <= 300 else msg[:297] + "..."


def generate(model: Any, processor: Any, run: BenchRun, shard: Shard = Shard()) -> int:
    """Answer this rank's planned rows that the predictions files do not hold yet; returns how many
    were generated now. Predictions are appended after every batch."""
    from tqdm import tqdm

    bench = run.benchmark
    main = predictions.path_for(run.output)
    done = predictions.read_done(main)
    out = predictions.Writer(main if shard.world == 1 else predictions.rank_path(main, shard.rank))
    total = count_planned(run)
    mine = sum(1 for pos in range(total) if shard.owns(pos))
    fresh, batch = 0, []
    bar = tqdm(total=mine, desc=f"{bench.name}" + (f" rank {shard.rank}" if shard.world > 1 else ""),
               unit="q", disable=not run.progress, dynamic_ncols=True)
    try:
        for pos, (index, row) in enumerate(planned_rows(run)):
            if not shard.owns(pos):
                continue
            rid = bench.row_id(row, index)
            if rid in done:
                bar.update(1)
                continue
            try:
                batch.append(dataclasses.replace(bench.build(row, run.context()), id=rid))
            except _BUILD_ERRORS as e:
                out.write([{"id": rid, "prediction": "", "error": _short(e)}])
                bar.update(1)
            if len(batch) == run.batch_size:
                out.write(_answer_batch(model, processor, batch, run.budget))
                fresh += len(batch)
                bar.update(len(batch))
                batch = []
        if batch:
            out.write(_answer_batch(model, processor, batch, run.budget))
            fresh += len(batch)
            bar.update(len(batch))
    finally:
        bar.close()
        out.close()
    return fresh


# -- scoring -------------------------------------------------------------------------------------------
def _pct(xs: list[float]) -> float | None:
    return round(100.0 * sum(xs) / len(xs), 4) if xs else None


def score(run: BenchRun, preds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Score the planned rows that have a prediction (streaming the text columns only)."""
    from smolvlm.evaluation.scoring import extract

    bench = run.benchmark
    samples, by_cat, missing, errors = [], {}, 0, []
    seen: set[str] = set()
    for index, row in planned_rows(run, bench.text_columns):
        rid = bench.row_id(row, index)
        rec = preds.get(rid)
        if rec is None:
            missing += 1
            continue
        seen.add(rid)
        ref = bench.reference(row)
        cat = bench.category(row)
        s = float(bench.score(rec["prediction"], ref))
        sample = {"id": rid, "category": cat, "prediction": rec["prediction"],
                  "extracted": extract(bench.name, rec["prediction"], ref), "score": s, "reference": ref}
        if rec.get("error"):
            sample["error"] = rec["error"]
            errors.append(f"{rid}: {rec['error']}")
        samples.append(sample)
        by_cat.setdefault(cat, []).append(s)
    scores = [s["score"] for s in samples]
    per = {str(c): {"score": _pct(v), "n": len(v)} for c, v in by_cat.items() if c is not None}
    if bench.overall == "macro" and per:
        overall = round(sum(v["score"] for v in per.values()) / len(per), 4)
    else:
        overall = _pct(scores)
    return {"task": bench.name, "metric": bench.metric, "score": overall, "n": len(samples),
            "overall": "mean of the category scores" if bench.overall == "macro" else "mean over questions",
            "per_category": per, "published": dict(bench.published),
            "errors": {"n": len(errors), "first": errors[:10]}, "missing": missing,
            "unmatched_predictions": len(set(preds) - seen), "samples": samples}


def settings(run: BenchRun, **extra: Any) -> dict[str, Any]:
    bench = run.benchmark
    return {"data": str(run.data), "split": run.split, "files": len(run.files), "media": run.media,
            "limit": run.limit, "batch_size": run.batch_size, "max_new_tokens": run.budget, "decoding": "greedy",
            "prompt": "VLMEvalKit SmolVLM wrapper (vlmeval/vlm/smolvlm.py), rendered with the checkpoint's chat template",
            "notes": bench.notes, **extra}


def results(run: BenchRun, preds: dict[str, dict[str, Any]], t0: float, **extra: Any) -> dict[str, Any]:
    from smolvlm.evaluation.provenance import git_commit

    out = score(run, preds)
    out["settings"] = settings(run, **extra)
    out["git_commit"] = git_commit()
    out["seconds"] = round(time.perf_counter() - t0, 3)
    order = ["task", "metric", "score", "n", "overall", "per_category", "published", "errors", "missing",
             "unmatched_predictions", "settings", "git_commit", "seconds", "samples"]
    return {k: out[k] for k in order}
