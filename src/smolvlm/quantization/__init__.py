"""Weight-only quantization by module swapping: ``quantize(model, mode="int8" | "int4")``.

Which layers: every ``nn.Linear`` of the text decoder (q/k/v/o, gate/up/down) and ``lm_head``;
the vision encoder and connector too with ``vision=True``. Norms, embeddings, the patch conv and
biases stay in floating point. A tied ``lm_head`` is untied first: the embedding keeps its
float table for lookups, lm_head gets its own quantized copy.

Saving and loading a quantized model is ``weights/``'s work (``weights/quantized.py`` holds the
format; ``SmolVLM.from_pretrained`` loads such a folder); ``swap_in_empty`` gives the loader the
quantized module tree to load into.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from smolvlm.quantization.int4 import GROUP_SIZES, Int4Linear, erased_update
from smolvlm.quantization.int8 import Int8Linear

if TYPE_CHECKING:
    from smolvlm.model.vlm import SmolVLM

MODES = ("none", "int8", "int4")

__all__ = ["MODES", "Int4Linear", "Int8Linear", "quantize", "quantized_modules", "swap_in_empty", "QuantizationError"]


class QuantizationError(ValueError):
    """A bad quantization mode/setting or a quantized checkpoint that does not match its description."""


def check_mode(mode: str, group_size: int = 32) -> None:
    """Raise QuantizationError for an unknown mode or int4 group size."""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "int4" and group_size not in (32, 64, 128, 256):
        raise QuantizationError(f"int4 group_size must be 32, 64, 128 or 256, got {group_size}")


def target_linears(model: "SmolVLM", vision: bool = False) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules ``quantize`` swaps, in module order."""
    prefixes = ["model.text_model.", "lm_head"] + (["model.vision_model.", "model.connector."] if vision else [])
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(name.startswith(p) for p in prefixes)]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _untie(model: "SmolVLM") -> None:
    if model.lm_head_is_tied():
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)


@torch.no_grad()
def quantize(model: "SmolVLM", mode: str = "int8", group_size: int | None = None, vision: bool = False,
             names: Iterable[str] | None = None) -> "SmolVLM":
    """Swap the target ``nn.Linear`` modules for ``Int8Linear``/``Int4Linear`` in place; returns ``model``.

    ``mode="none"`` is a no-op. ``names`` overrides the default target list. The model's float
    dtype (activations) is unchanged; bf16 is the fast path. ``group_size`` is int4's group width;
    None picks the smallest of ``int4.GROUP_SIZES`` that divides every target's ``in_features``
    and keeps what sits off the weights' existing 4-bit grid (``int4.erased_update``): 32 for
    ordinary weights, 64 for the default model (a Q4_1 GGUF, blocks of 32, + a merged LoRA). A
    group size that does not divide, or that would round such an update away, is a
    QuantizationError raised before any module is swapped.
    """
    check_mode(mode, 32 if group_size is None else group_size)
    if mode == "none":
        return model
    names = list(names) if names is not None else target_linears(model, vision)
    for name in names:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise QuantizationError(f"{name} is a {type(lin).__name__}, not an nn.Linear (already quantized?)")
    if mode == "int4":  # all built (and checked) first: ~0.75 byte a weight on top of the float model
        group_size, new = _int4_modules(model, names, group_size)
    else:  # int8 cannot fail: built one at a time, each float weight freed as its module goes in
        group_size, new = 32 if group_size is None else group_size, {}  # int8 records it, unused
    if "lm_head" in names:
        _untie(model)
    for name in names:
        _swap(model, name, new[name] if mode == "int4" else Int8Linear.from_linear(model.get_submodule(name)))
    model.quantization = {"mode": mode, "group_size": group_size, "modules": names}
    return model


def _int4_modules(model: "SmolVLM", names: list[str], group_size: int | None) -> tuple[int, dict[str, nn.Module]]:
    """(group size, {name: Int4Linear}) for ``quantize``; see its docstring for the choice."""
    widths = {n: model.get_submodule(n).in_features for n in names}
    fits = [g for g in GROUP_SIZES if all(k % g == 0 for k in widths.values())]
    if group_size is not None and group_size not in fits:
        bad = [f"{n} ({k})" for n, k in widths.items() if k % group_size]
        raise QuantizationError(f"int4 group_size {group_size} does not divide in_features of {len(bad)} layer(s): "
                                f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; "
                                f"{'use one of ' + ', '.join(map(str, fits)) if fits else 'use int8'}")
    if not fits:
        raise QuantizationError(f"no int4 group size ({', '.join(map(str, GROUP_SIZES))}) divides the in_features "
                                f"of every layer ({', '.join(map(str, sorted(set(widths.values()))))}); use int8")
    erased: dict[str, float] = {}
    for g in [group_size] if group_size is not None else fits:
        new, erased = {}, {}
        for name in names:
            lin = model.get_submodule(name)
            new[name] = module = Int4Linear.from_linear(lin, g)
            lost = erased_update(lin.weight, module.dequantized_weight(), module.scales)
            if lost:
                erased[name] = lost
                if group_size is None:
                    break  # this grid is the weights' own: try the next group size
        if not erased:
            return g, new
    name, lost = max(erased.items(), key=lambda kv: kv[1])
    if group_size is not None:
        where = f"with group_size {group_size} ({len(erased)} layer(s); {name} loses {lost:.2%} of its weight)"
        hint = "pass group_size=None to pick one that keeps it, or use int8"
    else:
        where = f"at every group size that fits ({', '.join(map(str, fits))}; e.g. {name} loses {lost:.2%} of its weight)"
        hint = "use int8"
    raise QuantizationError(f"int4 would round away a float update on top of weights that already sit on its 4-bit "
                            f"grid (e.g. a Q4 GGUF with a merged LoRA), leaving the model without it, {where}; {hint}")


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}


def swap_in_empty(model: "SmolVLM", mode: str, group_size: int, names: Iterable[str], dtype: torch.dtype) -> None:
    """Replace ``names`` with empty quantized modules of the same size (on the current default device,
    e.g. meta), ready to be assigned a saved quantized state; records ``model.quantization``."""
    check_mode(mode, group_size)
    names = list(names)
    if "lm_head" in names:
        _untie(model)
    for name in names:
        lin = model.get_submodule(name)
        kw = dict(bias=lin.bias is not None, dtype=dtype)
        new = Int8Linear(lin.in_features, lin.out_features, **kw) if mode == "int8" else \
            Int4Linear(lin.in_features, lin.out_features, group_size=group_size, **kw)
        _swap(model, name, new)
    model.quantization = {"mode": mode, "group_size": group_size, "modules": names}
