"""LoRA adapters by module swapping, saved in the PEFT adapter layout.

``inject_lora`` replaces matching ``nn.Linear`` modules of the one model with ``LoRALinear``
(STYLE 3.12: swap modules, never copy model classes). ``LoRALinear`` keeps the base ``weight``
/ ``bias`` as its own (frozen) parameters, so the base keys of the state dict do not change
(``...q_proj.weight``) and the adapter adds ``...q_proj.lora_A.weight`` / ``lora_B.weight``.

Mirrors PEFT's ``LoraLayer``/``Linear`` (peft 0.21): ``y = W x + B(A(dropout(x))) * alpha / r``,
A initialised like ``nn.Linear`` (``kaiming_uniform_(a=sqrt(5))``, PEFT's default
``init_lora_weights=True``) or ``normal(0, 1/r)`` (``"gaussian"``), B zeros, so a fresh adapter is
an exact no-op. Files: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` (PEFT drops the adapter name on save).

QLoRA (a quantized target) lives in ``qlora.py``; the layer class in ``lora_layer.py``.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smolvlm.training.lora_layer import LoRAError, LoRALinear, set_module, target_matches
from smolvlm.training.qlora import QUANTIZED, QLoRALinear, enable_quantized_backward, float_dtype

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoRAError", "LoRALinear", "PEFT_PREFIX", "QLoRALinear",
           "adapters_disabled", "inject_lora", "load_lora", "lora_modules", "lora_state_dict", "merge_lora",
           "read_adapter_config", "save_lora", "target_matches"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def inject_lora(model: nn.Module, targets: list[str], r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                init: str = "kaiming") -> list[str]:
    """Swap every ``nn.Linear`` whose name matches ``targets`` for a ``LoRALinear``, and every
    quantized ``Int8Linear`` / ``Int4Linear`` for a ``QLoRALinear`` (QLoRA; the adapters take the
    model's float dtype). A model holding quantized layers has all of them made differentiable
    w.r.t. their inputs (``enable_quantized_backward``), targets or not.

    Returns the wrapped module names. Raises ``LoRAError`` if nothing matches, if a target matches
    a module that is not a Linear layer (PEFT also refuses those), or if LoRA is already injected.
    """
    if isinstance(targets, str):
        targets = [targets]
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LoRAError("model already has LoRA layers; merge_lora() or load into a fresh model")
    matched: list[str] = []
    for name, mod in list(model.named_modules()):
        if not name or not target_matches(name, targets):
            continue
        if type(mod) is not nn.Linear and not isinstance(mod, QUANTIZED):
            # Containers whose name happens to match (e.g. a regex hitting ``...mlp``) are skipped
            # only if they hold no parameters of their own; anything else is an error.
            if isinstance(mod, nn.Linear) or list(mod.parameters(recurse=False)):
                raise LoRAError(f"LoRA target {name!r} is a {type(mod).__name__}, only nn.Linear is supported")
            continue
        matched.append(name)
    if not matched:
        raise LoRAError(f"LoRA targets {targets} match no nn.Linear module of {type(model).__name__}")
    dtype = float_dtype(model)
    for name in matched:
        base = model.get_submodule(name)
        set_module(model, name, QLoRALinear(base, r, alpha, dropout, init, dtype=dtype)
                    if isinstance(base, QUANTIZED) else LoRALinear(base, r, alpha, dropout, init))
    enable_quantized_backward(model)
    return matched


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base inside the block: every ``LoRALinear`` computes ``W x + b`` alone
    (PEFT's ``disable_adapter()``), bit-identical to the layer before injection. Restored on exit,
    also on an error; nests."""
    mods = list(lora_modules(model).values())
    before = [m.__dict__.get("adapter_disabled", False) for m in mods]
    for m in mods:
        m.adapter_disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.adapter_disabled = b


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight; the model then holds plain ``nn.Linear`` layers
    again (so ``save_pretrained`` writes the original key set). Returns ``model``. A
    ``QLoRALinear`` merges into its *dequantized* base: a frozen float ``nn.Linear``."""
    for name, mod in lora_modules(model).items():
        lin = mod.merged_linear()
        lin.weight.requires_grad_(mod.weight is not None and mod.weight.requires_grad)
        set_module(model, name, lin)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's saved names."""
    out = {}
    for name, mod in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = mod.lora_A.weight.detach().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = mod.lora_B.weight.detach().contiguous()
    return out


def _config_targets(names: list[str]) -> list[str]:
    # PEFT stores plain suffixes; the last path component of each wrapped module is enough
    # (and is what PEFT users write: ["q_proj", "v_proj"]) unless it would match more modules.
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def save_lora(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT LoRA layout)."""
    from safetensors.torch import save_file

    mods = lora_modules(model)
    if not mods:
        raise LoRAError("model has no LoRA layers to save")
    first = next(iter(mods.values()))
    if any((m.r, m.lora_alpha) != (first.r, first.lora_alpha) for m in mods.values()):
        raise LoRAError("save_lora supports one r/alpha for all layers (PEFT rank_pattern is not written)")
    names = list(mods)
    targets: list[str] | str = _config_targets(names)
    all_linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, *QUANTIZED))]
    if sorted(n for n in all_linear if target_matches(n, targets)) != sorted(names):
        # The suffixes would over-match: store an exact regex instead (PEFT accepts a str regex).
        targets = "|".join(re.escape(n) for n in sorted(names))
    drop = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.lora_alpha,
        "lora_dropout": drop,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(lora_state_dict(model), str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return d


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    p = Path(directory) / ADAPTER_CONFIG
    if not p.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory}")
    cfg = json.loads(p.read_text())
    if cfg.get("peft_type") != "LORA":
        raise LoRAError(f"{p}: peft_type is {cfg.get('peft_type')!r}, only 'LORA' is supported")
    for k in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if cfg.get(k):
            raise LoRAError(f"{p}: {k}=true is not supported")
    return cfg


def load_lora(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject adapters described by ``adapter_config.json`` (if not already there) and load the
    weights strictly: missing or unexpected adapter tensors are one error naming them."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(directory)
    wpath = Path(directory) / ADAPTER_WEIGHTS
    if not wpath.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {directory}")
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not lora_modules(model):
        inject_lora(model, targets, r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                    dropout=float(cfg.get("lora_dropout") or 0.0))
    sd = load_file(str(wpath))
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise LoRAError(f"adapter {wpath}: {len(missing)} missing: {', '.join(missing[:5])}; "
                        f"{len(unexpected)} unexpected: {', '.join(unexpected[:5])}")
    for name, mod in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            t = sd[f"{PEFT_PREFIX}{name}.{part}.weight"]
            w = getattr(mod, part).weight
            if t.shape != w.shape:
                raise LoRAError(f"adapter {name}.{part}: shape {tuple(t.shape)} != model {tuple(w.shape)}")
            w.data.copy_(t.to(w.dtype))
    return model
