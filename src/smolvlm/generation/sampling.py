"""Pure logits -> logits / token functions (no model, no state).

Each mirrors one transformers logits processor (``transformers/generation/logits_process.py``)
and is applied in the same order as ``GenerationMixin._get_logits_processor``: repetition
penalty first, then (sampling only) temperature, top-k, top-p, min-p. Work happens in float32,
as transformers upcasts the last-position logits before processing.
"""

from __future__ import annotations

import torch

from smolvlm.generation.config import GenerationSettings

NEG_INF = float("-inf")


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalize tokens already present (prompt included): divide positive logits, multiply negative ones.

    ``logits (B, V)``, ``seen (B, V)`` bool. Mirrors ``RepetitionPenaltyLogitsProcessor``.
    """
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)  # (B, V)
    return torch.where(seen, penalized, logits)


def temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    """``TemperatureLogitsWarper``: logits / t."""
    if t <= 0:
        raise ValueError(f"temperature must be > 0, got {t}")
    return logits if t == 1.0 else logits / t


def top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """``TopKLogitsWarper``: keep logits >= the k-th largest (ties at the boundary are kept)."""
    if not k:
        return logits
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """``TopPLogitsWarper``: smallest set whose probability mass exceeds p; the top token always stays."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)  # ascending, (B, V)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1.0 - p)
    remove_sorted[..., -1:] = False  # min_tokens_to_keep = 1
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def min_p(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """``MinPLogitsWarper``: drop tokens whose probability is below p * (top probability)."""
    if p is None or p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)  # (B, V)
    threshold = p * probs.amax(dim=-1, keepdim=True)  # (B, 1)
    remove = probs < threshold
    # keep at least the top token (it is never below the threshold unless p > 1, which is refused)
    return logits.masked_fill(remove, NEG_INF)


def process_logits(logits: torch.Tensor, s: GenerationSettings, seen: torch.Tensor | None) -> torch.Tensor:
    """All configured processors in transformers' order. ``logits (B, V)`` float32 -> ``(B, V)``."""
    if seen is not None:
        logits = repetition_penalty(logits, seen, s.repetition_penalty)
    if s.do_sample:
        logits = temperature(logits, s.temperature)
        logits = top_k(logits, s.top_k)
        logits = top_p(logits, s.top_p)
        logits = min_p(logits, s.min_p)
    return logits


def select_token(logits: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy argmax or one multinomial draw from softmax(logits). ``(B, V)`` -> ``(B,)`` int64.

    With a ``generator`` seeded like ``torch.manual_seed(seed)``, draws equal transformers'
    ``torch.multinomial(probs, 1)`` under the same global seed (same op, same RNG stream).
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A private RNG for reproducible sampling (the global RNG stays untouched); None without a seed."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g
