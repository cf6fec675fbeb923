"""The held-out synthetic task: ``smolvlm.synth`` samples of the "eval" split, one request per turn.

Samples: ``make_dataset(n, "eval", seed)`` -- eval seeds are odd and training seeds even
(``synth.sample_seed``), so no evaluated image was ever trained on, whatever the seeds and sizes.

Prompts: exactly the training format. Messages come from ``data.cauldron.sample_to_messages``
(the function training encodes), so images open the first user turn and an optional system
prompt leads. Turn ``k`` of a multi-turn sample is asked *in conversation with the previous gold
turns* (teacher forcing): the prompt is the first ``k`` gold user/assistant turns plus the k-th
question, rendered with the generation prompt -- character for character the prefix of the
training sequence that precedes the k-th answer (training's ``assistant_char_spans`` checks that
the template renders prefixes consistently). Later questions never get the images again, as in
training. Every turn is one request, so a sample with 3 turns weighs 3 in the micro average.

Scoring: every category but ``caption`` is scored by exact match (``metrics.exact_match``, the
synthetic generator's own normaliser) and makes the headline ``overall``. Captions are templated
sentences (``scenes.caption_for``), where a one-word slip would zero an exact match; they are
scored with ANLS against the templated caption, reported as their own category, and left out of
``overall``. They also get a larger token budget (``caption_max_new_tokens``), since a caption is
~15-30 tokens and the short-answer budget would truncate it.
"""

from __future__ import annotations

from typing import Any

from smolvlm.data.cauldron import sample_to_messages
from smolvlm.evaluation.tasks import Request
from smolvlm.synth import make_dataset

SPLIT = "eval"
RELAXED_CATEGORIES = {"caption": "anls"}  # category -> metric; these are excluded from ``overall``
DEFAULT_CAPTION_MAX_NEW_TOKENS = 48


def sample_requests(sample: dict[str, Any], max_new_tokens: int, caption_max_new_tokens: int,
                    system_prompt: str | None = None) -> list[Request]:
    """One request per (question, answer) turn of a synthetic sample (gold history, see module doc)."""
    messages = sample_to_messages(sample, system_prompt)
    first = 1 if system_prompt else 0  # index of the first user message
    cat = sample["category"]
    metric = RELAXED_CATEGORIES.get(cat, "exact_match")
    out = []
    for k, turn in enumerate(sample["texts"]):
        prompt = messages[: first + 2 * k + 1]  # (system,) user, assistant, ..., user_k
        out.append(Request(
            id=f"{sample['id']}/{k}", category=cat, messages=prompt, images=list(sample["images"]),
            gold=turn["assistant"], question=turn["user"], metric=metric, headline=cat not in RELAXED_CATEGORIES,
            max_new_tokens=caption_max_new_tokens if cat in RELAXED_CATEGORIES else max_new_tokens,
            meta={"sample": sample["id"], "turn": k},
        ))
    return out


def build_requests(n: int, seed: int = 0, *, max_new_tokens: int = 16,
                   caption_max_new_tokens: int = DEFAULT_CAPTION_MAX_NEW_TOKENS,
                   system_prompt: str | None = None) -> list[Request]:
    """Requests for the first ``n`` samples of the eval split (categories round-robin, so balanced)."""
    if n < 1:
        raise ValueError(f"n (number of samples) must be >= 1, got {n}")
    if max_new_tokens < 1 or caption_max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens} / caption {caption_max_new_tokens}")
    out: list[Request] = []
    for sample in make_dataset(n, SPLIT, seed):
        out.extend(sample_requests(sample, max_new_tokens, caption_max_new_tokens, system_prompt))
    return out
