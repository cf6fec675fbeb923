"""Checking a checkpoint's tensors against the model its config.json builds, with readable errors.

A mismatch is reported once, with every problem counted, the first few names of each kind and,
where the shapes tell, the probable cause: a config field that disagrees with the weights
("hidden_size in config.json is 1024, the weights have 576"), a different layer count, or a
folder that holds some other model altogether. The full lists can run to hundreds of tensors; a
one-screen message is what a person can act on.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from torch import nn

from smolvlm.weights.safetensors_io import CheckpointError

Shapes = dict[str, tuple[int, ...]]
SHOWN = 3  # names listed per kind of problem
_LAYER = re.compile(r"^(.*\.layers)\.(\d+)\.")
# Config fields that set tensor sizes, per sub-config, in the order we name them.
_SIZE_FIELDS = ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "patch_size", "image_size", "num_channels")


def expected_shapes(model: nn.Module, optional: set[str] = frozenset()) -> Shapes:
    """Parameter/buffer name -> shape for every persistent entry of the model's state dict."""
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items() if k not in optional}


def _listing(label: str, names: list[str]) -> str:
    more = f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return f"{len(names)} {label} ({', '.join(names[:SHOWN])}{more})"


def _layer_counts(names: Any) -> dict[str, int]:
    """``<prefix>.layers`` -> number of layers, from tensor names."""
    found: dict[str, set[int]] = {}
    for name in names:
        m = _LAYER.match(name)
        if m:
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    return {prefix: max(ids) + 1 for prefix, ids in found.items()}


def _config_fields(config: Any, value: int) -> list[str]:
    """Dotted names of the size fields of ``config`` (and its text/vision parts) equal to ``value``."""
    out = []
    for part, prefix in ((getattr(config, "text_config", None), "text_config."),
                         (getattr(config, "vision_config", None), "vision_config.")):
        for field in _SIZE_FIELDS:
            if part is not None and getattr(part, field, None) == value:
                out.append(prefix + field)
    return out


def probable_cause(expected: Shapes, found: Shapes, config: Any = None) -> str:
    """A short guess at why the tensors differ, or ''."""
    if expected and found and not set(expected) & set(found):
        sample = next(iter(found))
        return (f"no tensor name in common: the weights are not a SmolVLM/Idefics3 checkpoint in transformers' "
                f"layout (first name: {sample})")
    hints = []
    want, have = _layer_counts(expected), _layer_counts(found)
    for prefix, n in want.items():
        if prefix in have and have[prefix] != n:
            hints.append(f"the config builds {n} layers in {prefix}, the weights have {have[prefix]}")
    pairs: Counter[tuple[int, int]] = Counter()
    for k, shape in expected.items():
        if k in found and len(found[k]) == len(shape) and tuple(found[k]) != tuple(shape):
            pairs.update((a, b) for a, b in zip(shape, found[k]) if a != b)
    if pairs and pairs.most_common(1)[0][1] >= 2:  # one odd tensor says nothing about the config
        (model_dim, ckpt_dim), _ = pairs.most_common(1)[0]
        fields = _config_fields(config, model_dim) if config is not None else []
        what = f"{' / '.join(fields)} in config.json is {model_dim}" if fields else f"the config gives size {model_dim}"
        hints.append(f"{what}, the weights have {ckpt_dim}")
    return "; ".join(hints)


def check_keys(expected: Shapes, found: Shapes, optional: set[str] = frozenset(), where: str = "checkpoint",
               config: Any = None) -> None:
    """Raise one short CheckpointError naming every kind of mismatch (counts, first names, probable cause)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and k not in optional]
    wrong = [f"{k}: weights {list(found[k])}, model {list(v)}" for k, v in expected.items()
             if k in found and tuple(found[k]) != tuple(v)]
    if not (missing or unexpected or wrong):
        return
    parts = [_listing(label, names) for label, names in
             (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong))
             if names]
    cause = probable_cause(expected, found, config)
    raise CheckpointError(f"{where} does not match the model built from its config.json: {'; '.join(parts)}"
                          + (f". Probable cause: {cause}" if cause else ""))
