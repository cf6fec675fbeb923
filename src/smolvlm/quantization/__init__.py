"""Weight-only quantization by module swapping: ``quantize(model, mode="int8" | "int4")``.

Which layers: every ``nn.Linear`` of the text decoder (q/k/v/o, gate/up/down) and ``lm_head``;
the vision encoder and connector too with ``vision=True``. Norms, embeddings, the patch conv and
biases stay in floating point. A tied ``lm_head`` is untied first: the embedding keeps its
float table for lookups, lm_head gets its own quantized copy.

Saved format (``save_quantized``): the usual ``config.json`` (+ generation config), a
``quantization.json`` ({"format_version", "mode", "group_size", "modules": [...]}), and
``model.safetensors`` holding the float tensors plus each quantized module's buffers
(``<name>.weight_int8`` + ``<name>.scale``, or ``<name>.weight_uint4`` + ``.scales`` + ``.zeros``).
``load_quantized`` rebuilds the same module tree on the meta device and loads it strictly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from smolvlm.quantization.int4 import Int4Linear
from smolvlm.quantization.int8 import Int8Linear

if TYPE_CHECKING:
    from smolvlm.model.vlm import SmolVLM

MODES = ("none", "int8", "int4")
QUANT_FILE = "quantization.json"
FORMAT_VERSION = 1

__all__ = ["MODES", "Int4Linear", "Int8Linear", "quantize", "quantized_modules", "save_quantized", "load_quantized",
           "QuantizationError"]


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
    head = model.lm_head
    if head.weight is model.model.text_model.embed_tokens.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)


@torch.no_grad()
def quantize(model: "SmolVLM", mode: str = "int8", group_size: int = 32, vision: bool = False,
             names: Iterable[str] | None = None) -> "SmolVLM":
    """Swap the target ``nn.Linear`` modules for ``Int8Linear``/``Int4Linear`` in place; returns ``model``.

    ``mode="none"`` is a no-op. ``names`` overrides the default target list. ``group_size`` is
    int4's group width. The model's float dtype (activations) is unchanged; bf16 is the fast path.
    """
    check_mode(mode, group_size)
    if mode == "none":
        return model
    names = list(names) if names is not None else target_linears(model, vision)
    if "lm_head" in names:
        _untie(model)
    for name in names:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise QuantizationError(f"{name} is a {type(lin).__name__}, not an nn.Linear (already quantized?)")
        if mode == "int8":
            new: nn.Module = Int8Linear.from_linear(lin)
        else:
            new = Int4Linear.from_linear(lin, group_size)
        _swap(model, name, new)
    model.quantization = {"mode": mode, "group_size": group_size, "modules": names}
    return model


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}


def save_quantized(model: "SmolVLM", directory: str | Path) -> Path:
    """Write config.json, generation_config.json, quantization.json and model.safetensors."""
    from safetensors.torch import save_file

    from smolvlm.weights.save import _config_for_save

    info = getattr(model, "quantization", None)
    if not info or not quantized_modules(model):
        raise QuantizationError("model is not quantized; call smolvlm.quantization.quantize(model, mode) first")
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    head = model.lm_head
    if isinstance(head, nn.Linear) and head.weight is model.model.text_model.embed_tokens.weight:
        state.pop("lm_head.weight", None)  # tied (lm_head not quantized): stored once, as the embedding
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    _config_for_save(model).save(directory)
    if model.generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(model.generation_config, indent=2) + "\n")
    meta = {"format_version": FORMAT_VERSION, **info}
    (directory / QUANT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load_quantized(directory: str | Path, dtype: torch.dtype | str | None = None,
                   device: torch.device | str = "cpu") -> "SmolVLM":
    """Inverse of :func:`save_quantized`: strict, meta-device build, mmap'd tensors assigned in place."""
    from safetensors.torch import load_file

    from smolvlm.config import SmolVLMConfig
    from smolvlm.model.vlm import SmolVLM
    from smolvlm.weights.load import check_keys, read_generation_config, resolve_dtype

    directory = Path(directory).expanduser()
    qfile = directory / QUANT_FILE
    if not qfile.is_file():
        raise FileNotFoundError(f"{directory} has no {QUANT_FILE}; it is not a quantized smolvlm checkpoint")
    info = json.loads(qfile.read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise QuantizationError(f"{qfile}: unsupported format_version {info.get('format_version')!r}")
    mode, group_size, names = info.get("mode"), int(info.get("group_size", 32)), info.get("modules")
    check_mode(str(mode), group_size)
    config = SmolVLMConfig.from_json_file(directory / "config.json")
    dtype = resolve_dtype(dtype, config)  # None -> float32, as from_pretrained
    with torch.device("meta"):
        model = SmolVLM(config)
        if "lm_head" in names:
            _untie(model)
        for name in names:
            lin = model.get_submodule(name)
            cls_kw = dict(bias=lin.bias is not None, dtype=dtype)
            new = Int8Linear(lin.in_features, lin.out_features, **cls_kw) if mode == "int8" else \
                Int4Linear(lin.in_features, lin.out_features, group_size=group_size, **cls_kw)
            _swap(model, name, new)
    state = load_file(str(directory / "model.safetensors"), device=str(device))
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    tied = "lm_head" not in names and model.lm_head.weight is model.model.text_model.embed_tokens.weight
    optional = {"lm_head.weight"} if tied else set()
    check_keys({k: s for k, s in expected.items() if k not in optional}, {k: tuple(v.shape) for k, v in state.items()},
               optional, where=str(directory))
    for k, v in state.items():  # float tensors take the requested dtype; quantized buffers keep theirs
        if v.is_floating_point() and not k.endswith((".scale", ".scales", ".zeros")):
            state[k] = v.to(dtype)
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.tie_weights()
    model.quantization = {"mode": mode, "group_size": group_size, "modules": names}
    model.generation_config = read_generation_config(directory)
    return model.eval()
