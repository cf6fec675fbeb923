"""``LoRALinear``: an ``nn.Linear`` plus a low-rank update (PEFT ``lora.Linear``; see ``lora.py``)."""

from __future__ import annotations

import math
import re

import torch
from torch import nn


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
        if self.__dict__.get("adapter_disabled", False):  # ``adapters_disabled``: the base layer alone
            return y
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


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


_REGEX_CHARS = set("*^$()[]{}?+|\\")


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
