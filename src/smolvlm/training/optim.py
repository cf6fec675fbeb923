"""Optimizer and learning-rate schedule of every training run (SFT and stage-1 vision alike).

* ``param_groups`` / ``build_optimizer`` - AdamW over the parameters with ``requires_grad``, grouped
  by per-prefix learning rate (``optim.lr_groups``, longest prefix wins), no weight decay on norms,
  biases and trained embedding rows;
* ``lr_factor`` / ``build_scheduler`` - linear warmup from 0, then cosine, linear or constant down
  to ``min_lr_ratio`` (transformers' ``get_cosine_schedule_with_warmup``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from smolvlm.training.recipe import OptimRecipe, ScheduleRecipe


class TrainError(ValueError):
    """A training setup that cannot run (no trainable parameters, bad prefix, stale run dir)."""


def prefix_match(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` or lies under it (``"model.text_model"`` matches ``"model.text_model.norm.weight"``)."""
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or "norm" in name or getattr(p, "_row_mask", None) is not None


def param_groups(model: nn.Module, optim: OptimRecipe) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (learning rate, weight decay), in model order."""
    lr_rules = sorted(optim.lr_groups.items(), key=lambda kv: -len(kv[0]))
    names = [n for n, _ in model.named_parameters()]
    for pre in optim.lr_groups:
        if not any(prefix_match(n, pre) for n in names):
            raise TrainError(f"optim.lr_groups prefix {pre!r} matches no parameter")
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = next((v for pre, v in lr_rules if prefix_match(n, pre)), optim.lr)
        wd = 0.0 if _no_decay(n, p) else optim.weight_decay
        g = groups.setdefault((lr, wd), {"params": [], "names": [], "lr": lr, "weight_decay": wd})
        g["params"].append(p)
        g["names"].append(n)
    if not groups:
        raise TrainError("no trainable parameters")
    return list(groups.values())


def build_optimizer(model: nn.Module, optim: OptimRecipe) -> torch.optim.AdamW:
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, optim)]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def lr_factor(step: int, sched: ScheduleRecipe, total: int) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based). Warmup is linear from 0
    and cosine decays to ``min_lr_ratio`` at ``total``, as transformers' cosine schedule."""
    if step < sched.warmup_steps:
        return step / max(1, sched.warmup_steps)
    if sched.kind == "constant":
        return 1.0
    progress = min(1.0, (step - sched.warmup_steps) / max(1, total - sched.warmup_steps))
    if sched.kind == "linear":
        decay = 1.0 - progress
    else:  # cosine
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return sched.min_lr_ratio + (1.0 - sched.min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, sched: ScheduleRecipe, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, sched, total))
