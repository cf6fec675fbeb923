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
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_REGEX_CHARS = set("*^$()[]{}?+|\\")


class LoRAError(ValueError):
    """Bad LoRA targets, settings or adapter files."""


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update; the base weight is frozen (PEFT ``lora.Linear``)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, init: str = "kaiming") -> None:
        if r <= 0:
            raise LoRAError(f"LoRA rank r must be positive, got {r}")
        nn.Module.__init__(self)  # adopt the base tensors instead of allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.lora_alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, r, **kw)  # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, **kw)  # (out, r)
        self.reset_lora(init)

    def reset_lora(self, init: str = "kaiming") -> None:
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            raise LoRAError(f"unknown LoRA init {init!r}; use 'kaiming' (PEFT default) or 'gaussian'")
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)  # (..., out)
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))  # (..., out)
        return y + (delta * self.scaling).to(y.dtype)

    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + B A * scaling`` (computed in float32, cast back)."""
        w = self.weight.data
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        lin.weight.data.copy_((w.float() + delta).to(w.dtype))
        if self.bias is not None:
            lin.bias.data.copy_(self.bias.data)
        return lin

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.lora_alpha}"


def _is_regex(t: str) -> bool:
    return any(c in _REGEX_CHARS for c in t)


def target_matches(name: str, targets: list[str]) -> bool:
    """PEFT matching: a plain entry matches the full name or a ``.``-separated suffix;
    an entry with regex characters must ``re.fullmatch`` the full module name."""
    for t in targets:
        if _is_regex(t):
            if re.fullmatch(t, name):
                return True
        elif name == t or name.endswith("." + t):
            return True
    return False


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_lora(model: nn.Module, targets: list[str], r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                init: str = "kaiming") -> list[str]:
    """Swap every ``nn.Linear`` whose name matches ``targets`` for a ``LoRALinear``.

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
        if type(mod) is not nn.Linear:
            # Containers whose name happens to match (e.g. a regex hitting ``...mlp``) are skipped
            # only if they hold no parameters of their own; anything else is an error.
            if isinstance(mod, nn.Linear) or list(mod.parameters(recurse=False)):
                raise LoRAError(f"LoRA target {name!r} is a {type(mod).__name__}, only nn.Linear is supported")
            continue
        matched.append(name)
    if not matched:
        raise LoRAError(f"LoRA targets {targets} match no nn.Linear module of {type(model).__name__}")
    for name in matched:
        _set_module(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout, init))
    return matched


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight; the model then holds plain ``nn.Linear`` layers
    again (so ``save_pretrained`` writes the original key set). Returns ``model``."""
    for name, mod in lora_modules(model).items():
        lin = mod.merged_linear()
        lin.weight.requires_grad_(mod.weight.requires_grad)
        _set_module(model, name, lin)
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
    all_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
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
