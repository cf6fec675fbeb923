"""Batched evaluation: task requests -> greedy answers -> scores -> results JSON.

Generation is the library's own (``generation.generate.generate_ids``, shared with the CLI and
server): greedy, left-padded batches, stop on the checkpoint's eos ids plus
``<end_of_utterance>``, at most ``max_new_tokens`` new tokens per request. Requests are grouped by
their token budget (captions get a larger one), then batched in task order within a group, so
the batches -- and with greedy decoding the answers -- are the same on every run.

Results (``evaluate``)::

    {"model", "task", "n" (samples), "n_requests", "overall" (micro average over the headline
     requests), "overall_metric", "macro", "per_category": {cat: {"score", "n", "metric", "headline"}},
     "excluded_from_overall": [cat, ...], "examples": [first predictions with gold],
     "settings": {...}, "git_commit", "seconds"}
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from smolvlm.evaluation import metrics
from smolvlm.evaluation.provenance import git_commit
from smolvlm.evaluation.tasks import Request, get_task
from smolvlm.generation.feature_cache import FeatureCache
from smolvlm.generation.generate import generate_ids
from smolvlm.generation.pixels import pixel_dtype

_EOU = "<end_of_utterance>"


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how (the ``smolvlm eval`` flags)."""

    task: str = "synth"
    n: int = 200  # samples (a sample may hold several questions)
    seed: int = 0
    batch_size: int = 8
    max_new_tokens: int = 16
    caption_max_new_tokens: int = 48
    system_prompt: str | None = None  # as the training recipe's data.system_prompt
    num_examples: int = 10  # predictions kept in the results' "examples"
    feature_cache: bool = True  # reuse image features across the turns of a sample
    progress: bool = True

    def validate(self) -> "EvalConfig":
        get_task(self.task)
        for name in ("n", "batch_size", "max_new_tokens", "caption_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0 or self.num_examples < 0:
            raise ValueError(f"seed and num_examples must be >= 0, got {self.seed} / {self.num_examples}")
        return self


def stop_ids(model: Any, processor: Any) -> list[int]:
    """The checkpoint's eos ids (generation config, else text config) plus ``<end_of_utterance>``,
    which ends every assistant turn the model was fine-tuned on."""
    gen = dict(getattr(model, "generation_config", None) or {})
    eos = gen.get("eos_token_id", model.config.text_config.eos_token_id)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    eou = processor.tokenizer.token_to_id(_EOU)
    return sorted({int(i) for i in ids} | ({eou} if eou is not None else set()))


def decode_answer(processor: Any, new_ids: Sequence[int], eos: Sequence[int]) -> str:
    """New token ids of one row -> answer text: cut at the first stop id, special tokens skipped,
    surrounding whitespace stripped (the first token usually carries the space after "Assistant:")."""
    ids = [int(t) for t in new_ids]
    stop = next((i for i, t in enumerate(ids) if t in set(eos)), len(ids))
    return processor.decode(ids[:stop], skip_special_tokens=True).strip()


def encode_batch(processor: Any, batch: Sequence[Request], pixel_dtype: Any = None) -> dict[str, torch.Tensor]:
    """Requests -> left-padded model inputs (chat template with the generation prompt); ``pixel_dtype``:
    the model's (``generation.pixels.pixel_dtype``: the pixels as it reads them, without the float32 batch)."""
    texts = [processor.apply_chat_template(r.messages, add_generation_prompt=True) for r in batch]
    images = [list(r.images) for r in batch]
    enc = processor(text=texts, images=images if any(images) else None, return_tensors="pt", padding_side="left",
                    pixel_dtype=pixel_dtype)
    return {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask") if k in enc}


def generate_batch(model: Any, processor: Any, batch: Sequence[Request], max_new_tokens: int,
                   feature_cache: Any = None) -> list[str]:
    """Greedy answers for one batch of requests, in order."""
    inputs = encode_batch(processor, batch, pixel_dtype=pixel_dtype(model))
    eos = stop_ids(model, processor)
    ids = generate_ids(model, **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                       feature_cache=feature_cache)  # (B, T + new)
    new = ids[:, inputs["input_ids"].shape[1]:].tolist()
    return [decode_answer(processor, row, eos) for row in new]


def plan_batches(requests: Sequence[Request], batch_size: int) -> list[list[int]]:
    """Request indices in batches: grouped by token budget (ascending), task order within a group."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.max_new_tokens, []).append(i)
    batches = []
    for budget in sorted(groups):
        idx = groups[budget]
        batches.extend(idx[s: s + batch_size] for s in range(0, len(idx), batch_size))
    return batches


def predict(model: Any, processor: Any, requests: Sequence[Request], batch_size: int,
            feature_cache: bool = True, progress: bool = True) -> list[str]:
    """Answers for every request (same order as ``requests``)."""
    from tqdm import tqdm

    preds: list[str | None] = [None] * len(requests)
    cache = FeatureCache() if feature_cache else None
    with tqdm(total=len(requests), desc="eval", unit="q", disable=not progress) as bar:
        for idx in plan_batches(requests, batch_size):
            batch = [requests[i] for i in idx]
            answers = generate_batch(model, processor, batch, batch[0].max_new_tokens, cache)
            for i, a in zip(idx, answers):
                preds[i] = a
            bar.update(len(idx))
    return [p if p is not None else "" for p in preds]


def score_predictions(requests: Sequence[Request], preds: Sequence[str]) -> list[float]:
    """Each prediction scored with its request's metric."""
    return [metrics.METRICS[r.metric](p, r.gold) for r, p in zip(requests, preds)]


def summarize(requests: Sequence[Request], preds: Sequence[str], scores: Sequence[float],
              num_examples: int = 10) -> dict[str, Any]:
    """Scores -> overall (headline requests only), per category (every request, own metric), examples."""
    head = metrics.aggregate((r.category, s) for r, s in zip(requests, scores) if r.headline)
    every = metrics.aggregate((r.category, s) for r, s in zip(requests, scores))
    info = {r.category: (r.metric, r.headline) for r in requests}
    per = {c: {**v, "metric": info[c][0], "headline": info[c][1]} for c, v in every["per_category"].items()}
    examples = [{"id": r.id, "category": r.category, "question": r.question, "gold": r.gold, "prediction": p,
                 "score": s} for r, p, s in list(zip(requests, preds, scores))[:num_examples]]
    return {"overall": head["overall"], "overall_metric": "exact_match", "macro": head["macro"],
            "n_overall": head["n"], "per_category": per,
            "excluded_from_overall": [c for c, (_, h) in info.items() if not h], "examples": examples}


def evaluate(model: Any, processor: Any, config: EvalConfig, model_name: str = "") -> dict[str, Any]:
    """Run ``config.task`` on the model; the results dict (module docstring). Deterministic except
    ``seconds``."""
    config.validate()
    t0 = time.perf_counter()
    task = get_task(config.task)
    requests = task.build_requests(config.n, config.seed, max_new_tokens=config.max_new_tokens,
                                   caption_max_new_tokens=config.caption_max_new_tokens,
                                   system_prompt=config.system_prompt)
    preds = predict(model, processor, requests, config.batch_size, config.feature_cache, config.progress)
    scores = score_predictions(requests, preds)
    settings = {k: v for k, v in asdict(config).items() if k not in ("task", "n", "progress")}
    settings.update(split=getattr(task, "SPLIT", None), dtype=str(getattr(model, "dtype", "")).replace("torch.", ""))
    return {"model": model_name, "task": config.task, "n": config.n, "n_requests": len(requests),
            **summarize(requests, preds, scores, config.num_examples), "settings": settings,
            "git_commit": git_commit(), "seconds": round(time.perf_counter() - t0, 3)}
