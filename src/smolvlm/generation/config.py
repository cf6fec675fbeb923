"""Run settings for generation, resolved against the checkpoint's ``generation_config.json``.

Mirrors how transformers' ``GenerationModel.generate`` fills in unset values (SPEC 1.10):
explicit argument > the checkpoint's generation config > library default. The library
defaults that matter here are ``max_length=20`` (used as 20 *new* tokens when no length is
given, SPEC 1.10) and ``top_k=50`` when sampling
(``transformers/generation/configuration_utils.py _get_default_generation_params``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

DEFAULT_MAX_NEW_TOKENS = 20
DEFAULT_TOP_K = 50


@dataclass(frozen=True)
class GenerationSettings:
    """Fully resolved settings of one ``generate`` call (no ``None`` left where a value is needed)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None  # None or 0: off
    top_p: float | None = None  # None or 1.0: off
    min_p: float | None = None  # None: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 when sampling, got {self.temperature} (use do_sample=False for greedy)"
            )
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop_strings)!r}")


def _as_id_tuple(v: int | Sequence[int] | None) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(x) for x in v)


def resolve_settings(
    model: Any,
    prompt_len: int,
    *,
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
) -> GenerationSettings:
    """Fill unset values from ``model.generation_config`` (a raw dict) and the text config.

    Stop ids: the argument, else ``generation_config["eos_token_id"]`` (int or list), else
    ``text_config.eos_token_id`` (SPEC 1.10: for SmolVLM-256M only 49279 stops, not 2).
    Pad id: the argument, else the generation config's, else the first stop id (transformers
    does the same, with a warning).
    """
    gen: dict[str, Any] = dict(getattr(model, "generation_config", None) or {})
    if max_new_tokens is None:
        if gen.get("max_new_tokens") is not None:
            max_new_tokens = int(gen["max_new_tokens"])
        elif gen.get("max_length") is not None:
            # transformers: max_length counts the prompt; keep at least one new token
            max_new_tokens = max(1, int(gen["max_length"]) - prompt_len)
        else:
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    if eos_token_id is None:
        eos_token_id = gen.get("eos_token_id")
        if eos_token_id is None:
            eos_token_id = model.config.text_config.eos_token_id
    eos = _as_id_tuple(eos_token_id)
    if pad_token_id is None:
        pad_token_id = gen.get("pad_token_id")
        if pad_token_id is None and eos:
            pad_token_id = eos[0]
    if do_sample and top_k is None:
        top_k = int(gen.get("top_k", DEFAULT_TOP_K))
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    return GenerationSettings(
        max_new_tokens=int(max_new_tokens),
        do_sample=bool(do_sample),
        temperature=float(temperature),
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=float(repetition_penalty),
        seed=seed,
        eos_token_ids=eos,
        pad_token_id=pad_token_id,
        stop_strings=tuple(stop_strings or ()),
    )
