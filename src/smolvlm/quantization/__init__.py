"""Weight-only quantization by module swapping: ``quantize(model, mode="int8" | "int4")``.

Which layers: every ``nn.Linear`` of the text decoder (q/k/v/o, gate/up/down) and ``lm_head``;
the vision encoder's and the connector's too with ``vision=True``, always in int8 (in int4 mode
too: they hold half of SmolVLM-2.2B's float weights after int4 text, 0.77 GiB in bf16; int8 keeps
its image features 3% from bf16's, where two bf16 kernel paths differ by 1.5%, bench/BIG_MODEL.md). Norms, embeddings, the patch conv
and biases stay in floating point. A tied ``lm_head`` is untied first: the embedding keeps its
float table for lookups, lm_head gets its own quantized copy. int4 keeps ``lm_head`` at int8 by
default (``head="int8"``), as llama.cpp's Q4 files keep their output matrix at 6 bits: on the real
SmolLM2-135M an int4 head alone changes the greedy answers (bench/QUANT_AGREEMENT.md); its
49152 x 576 head takes 27 MiB at int8 against 20 MiB at int4 with its group scales.

Saving and loading a quantized model is ``weights/``'s work (``weights/quantized.py`` holds the
format; ``SmolVLM.from_pretrained`` loads such a folder); ``swap_in_empty`` gives the loader the
quantized module tree to load into.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn

from smolvlm import kernels
from smolvlm.memory import release_freed_memory
from smolvlm.quantization.int4 import GROUP_SIZES, Int4Linear, erased_update
from smolvlm.quantization.int8 import Int8Linear

if TYPE_CHECKING:
    from smolvlm.model.vlm import SmolVLM

MODES = ("none", "int8", "int4")
HEADS = ("int8", "int4")  # what int4 does with lm_head

__all__ = ["MODES", "Int4Linear", "Int8Linear", "quantize", "quantize_while_loading", "quantized_modules", "swap_in_empty",
           "QuantizationError"]


class QuantizationError(ValueError):
    """A bad quantization mode/setting or a quantized checkpoint that does not match its description."""


def check_mode(mode: str, group_size: int = 32) -> None:
    """Raise QuantizationError for an unknown mode or int4 group size."""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "int4" and group_size not in (32, 64, 128, 256):
        raise QuantizationError(f"int4 group_size must be 32, 64, 128 or 256, got {group_size}")


VISION_PREFIXES = ("model.vision_model.", "model.connector.")


def target_linears(model: "SmolVLM", vision: bool = False) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules ``quantize`` swaps, in module order."""
    prefixes = ("model.text_model.", "lm_head") + (VISION_PREFIXES if vision else ())
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(prefixes)]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _untie(model: "SmolVLM") -> None:
    if model.lm_head_is_tied():
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)


@torch.no_grad()
def quantize(model: "SmolVLM", mode: str = "int8", group_size: int | None = None, vision: bool = False,
             names: Iterable[str] | None = None, head: str = "int8") -> "SmolVLM":
    """Swap the target ``nn.Linear`` modules for ``Int8Linear``/``Int4Linear`` in place; returns ``model``.

    ``mode="none"`` is a no-op. ``names`` overrides the default target list. The model's float
    dtype (activations) is unchanged; bf16 is the fast path. ``group_size`` is int4's group width;
    None picks the smallest of ``int4.GROUP_SIZES`` that divides every target's ``in_features``
    and keeps what sits off the weights' existing 4-bit grid (``int4.erased_update``): 32 for
    ordinary weights, 64 for the default model (a Q4_1 GGUF, blocks of 32, + a merged LoRA). A
    group size that does not divide, or that would round such an update away, is a
    QuantizationError raised before any module is swapped. ``head``: int4's ``lm_head`` in int8
    (default) or int4. ``vision``: the vision encoder and connector too, in int8 whatever ``mode``.
    """
    check_mode(mode, 32 if group_size is None else group_size)
    check_head(head)
    if mode == "none":
        return model
    names = list(names) if names is not None else target_linears(model, vision)
    for name in names:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise QuantizationError(f"{name} is a {type(lin).__name__}, not an nn.Linear (already quantized?)")
    int8_names = _int8_names(names, mode, head)
    new: dict[str, nn.Module] = {}
    if mode == "int4":  # all built (and checked) first: ~0.75 byte a weight on top of the float model
        place = new.__setitem__
    else:  # int8 cannot fail: each float weight is freed as its module goes in
        place = lambda name, module: _swap(model, name, module)  # noqa: E731
    if "lm_head" in names:
        _untie(model)

    def linear_of(name: str) -> nn.Module:
        release_freed_memory()  # the previous layer's temporaries (the loader's reader does the same)
        return model.get_submodule(name)

    group_size = _build(model, names, int8_names, group_size, linear_of, place)
    for name, module in new.items():
        _swap(model, name, module)
    for module in quantized_modules(model).values():  # once the float weights are gone (int4: built first)
        prepare_kernel(module, model.dtype)
    _record(model, mode, group_size, names, int8_names)
    return model


@torch.no_grad()
def quantize_while_loading(model: "SmolVLM", mode: str, read_linear: Callable[[str], nn.Linear],
                           head: str = "int8", vision: bool = False) -> list[str]:
    """``quantize`` (default targets and choices) for the loader, one layer at a time.

    The target linears are still empty (meta); ``read_linear(name)`` reads one's float weights
    into private memory, it is quantized and swapped in, and its float weights go before the next
    is read. Peak memory is the quantized model plus one float layer, where ``quantize`` after a
    full load holds the whole float model first. Errors are ``quantize``'s (the model is left
    half-built: the loader discards it). ``vision``: as ``quantize``'s. Returns the quantized names.
    """
    check_mode(mode)
    check_head(head)
    names = target_linears(model, vision)
    int8_names = _int8_names(names, mode, head)
    # Largest conversions first, while the model holds least: lm_head, the text layers, then the
    # vision tower (its layers are small); stable, so each part keeps module order.
    order = sorted(names, key=lambda n: (n != "lm_head", n.startswith(VISION_PREFIXES)))

    def place(name: str, module: nn.Module) -> None:
        _swap(model, name, module)
        prepare_kernel(module, model.dtype)

    group_size = _build(model, order, int8_names, None, read_linear, place)
    _record(model, mode, group_size, names, int8_names)
    return names


def check_head(head: str) -> None:
    if head not in HEADS:
        raise QuantizationError(f"unknown head quantization {head!r}; choose one of {', '.join(HEADS)}")


def _int8_names(names: list[str], mode: str, head: str) -> list[str]:
    """The target names that become int8: all of them in int8 mode; in int4 mode lm_head with
    ``head="int8"`` and the vision encoder's and connector's linears."""
    return [n for n in names if mode == "int8" or (n == "lm_head" and head == "int8") or n.startswith(VISION_PREFIXES)]


def _record(model: "SmolVLM", mode: str, group_size: int, names: list[str], int8_names: list[str]) -> None:
    """``model.quantization``: what ``weights/quantized.py`` saves."""
    model.quantization = {"mode": mode, "group_size": group_size, "modules": names}
    if mode == "int4":
        model.quantization["int8_modules"] = int8_names


def _build(model: "SmolVLM", names: list[str], int8_names: list[str], group_size: int | None,
           linear_of: Callable[[str], nn.Module], place: Callable[[str, nn.Module], None]) -> int:
    """Quantize ``names`` in order: ``int8_names`` to int8, the rest to int4 at one group size for all
    (see ``quantize``'s docstring for the choice), each from ``linear_of(name)``, handing each new
    module to ``place``. A group size that turns out to erase an update restarts the int4 layers at
    the next one. Returns the group size (32 when nothing is int4)."""
    int4 = [n for n in names if n not in int8_names]
    fits = _group_sizes(model, int4, group_size) if int4 else [32]
    erased: dict[str, float] = {}
    for g in [group_size] if group_size is not None else fits:
        erased = {}
        for name in names:
            if name in int8_names:
                if not isinstance(model.get_submodule(name), Int8Linear):  # not again on a restart
                    place(name, Int8Linear.from_linear(linear_of(name)))
                continue
            lin = linear_of(name)
            module = Int4Linear.from_linear(lin, g)
            lost = erased_update(lin.weight, module.dequantized_rows, module.scales)
            del lin
            if lost:
                erased[name] = lost
                if group_size is None:
                    break  # this grid is the weights' own: try the next group size
            place(name, module)
        if not erased:
            return g
    name, lost = max(erased.items(), key=lambda kv: kv[1])
    if group_size is not None:
        where = f"with group_size {group_size} ({len(erased)} layer(s); {name} loses {lost:.2%} of its weight)"
        hint = "pass group_size=None to pick one that keeps it, or use int8"
    else:
        where = f"at every group size that fits ({', '.join(map(str, fits))}; e.g. {name} loses {lost:.2%} of its weight)"
        hint = "use int8"
    raise QuantizationError(f"int4 would round away a float update on top of weights that already sit on its 4-bit "
                            f"grid (e.g. a Q4 GGUF with a merged LoRA), leaving the model without it, {where}; {hint}")


def _group_sizes(model: "SmolVLM", names: list[str], group_size: int | None) -> list[int]:
    """The int4 group sizes that divide every layer's in_features (a QuantizationError if ``group_size`` does not)."""
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
    return fits


def prepare_kernel(module: nn.Module, dtype: torch.dtype) -> None:
    """An int4 module's CPU kernel weights built now, for ``dtype`` activations, where its kernel
    would run (``Int4Linear.prepare_kernel``: one copy of the scales, not two), rather than at the
    first call, which then interleaves the conversions' temporaries with the first prefill's. An int8
    module's: smolvlm's GEMV (``smolvlm.kernels``), built or loaded once per process."""
    if isinstance(module, Int4Linear) and module.kernel_supports(dtype, module.scales.device):
        module.prepare_kernel(dtype)
    elif isinstance(module, Int8Linear) and module.weight_int8.device.type == "cpu":
        kernels.prepare()  # smolvlm's int8 GEMV, built once (not inside the first forward, nor a compiled trace)


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}


def swap_in_empty(model: "SmolVLM", mode: str, group_size: int, names: Iterable[str], dtype: torch.dtype,
                  int8_names: Iterable[str] = ()) -> None:
    """Replace ``names`` with empty quantized modules of the same size (on the current default device,
    e.g. meta), ready to be assigned a saved quantized state; records ``model.quantization``.
    ``int8_names``: the modules of an int4 model that are int8 (its head)."""
    check_mode(mode, group_size)
    names = list(names)
    int8_names = list(int8_names) if mode == "int4" else names
    if "lm_head" in names:
        _untie(model)
    for name in names:
        lin = model.get_submodule(name)
        kw = dict(bias=lin.bias is not None, dtype=dtype)
        new = Int8Linear(lin.in_features, lin.out_features, **kw) if name in int8_names else \
            Int4Linear(lin.in_features, lin.out_features, group_size=group_size, **kw)
        _swap(model, name, new)
    _record(model, mode, group_size, names, int8_names)
