"""One supervised fine-tuning loop, full or LoRA, with exact resume.

Works on any module called as ``model(input_ids=..., attention_mask=..., [pixel_values=...,
pixel_attention_mask=...,] labels=...)`` that returns an object with ``.loss`` (SmolVLM does:
fp32 logits, shift by one, ignore -100, mean; SPEC 1.8). Pieces, each small and testable:

* ``apply_freezing``       - per-parameter ``requires_grad`` from name prefixes (longest wins);
* ``train_embedding_rows`` - train only some rows of an embedding / head (new special tokens);
* ``build_optimizer``      - AdamW with per-prefix learning rates, no decay on norms / biases;
* ``build_scheduler``      - linear warmup then cosine (HF ``get_cosine_schedule_with_warmup``);
* ``enable_gradient_checkpointing`` - wraps each ``*.layers[i].forward`` from the outside;
* ``DataOrder``            - epoch permutations that are a pure function of (seed, position);
* ``train_step`` / ``evaluate`` / ``train``.

Gradient accumulation weights each micro-batch by its number of target tokens, so accumulating
k micro-batches gives the same gradient as one batch k times larger (the reference Trainer's
``num_items_in_batch`` path, SPEC 1.8).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from smolvlm.training import checkpoint as ckpt
from smolvlm.training.collate import IGNORE_INDEX
from smolvlm.training.lora import LoRALinear
from smolvlm.training.plot import append_metrics, plot_loss, truncate_metrics
from smolvlm.training.recipe import OptimRecipe, ScheduleRecipe, TrainRecipe

Batch = dict[str, torch.Tensor]


class TrainError(ValueError):
    """A training setup that cannot run (no trainable parameters, bad prefix, stale run dir)."""


# -- freezing --------------------------------------------------------------------------------
def _prefix_match(name: str, prefix: str) -> bool:
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def apply_freezing(model: nn.Module, freeze: Sequence[str] = (), train: Sequence[str] = ()) -> dict[str, int]:
    """Set ``requires_grad`` by name prefix: the longest matching prefix of ``freeze`` or ``train``
    decides; unmatched parameters train. LoRA adapters always train and the base weights of
    ``LoRALinear`` layers never do. A prefix that matches no parameter is an error (typos)."""
    lora_base = {id(p) for m in model.modules() if isinstance(m, LoRALinear) for p in (m.weight, m.bias) if p is not None}
    names = [n for n, _ in model.named_parameters()]
    for pre in [*freeze, *train]:
        if not any(_prefix_match(n, pre) for n in names):
            raise TrainError(f"freeze/train prefix {pre!r} matches no parameter (e.g. {names[0]!r})")
    rules = sorted([(p, False) for p in freeze] + [(p, True) for p in train], key=lambda r: -len(r[0]))
    counts = {"trainable": 0, "frozen": 0}
    for n, p in model.named_parameters():
        if id(p) in lora_base:
            flag = False
        elif ".lora_A." in n or ".lora_B." in n:
            flag = True
        else:
            flag = next((t for pre, t in rules if _prefix_match(n, pre)), True)
        p.requires_grad_(flag)
        counts["trainable" if flag else "frozen"] += p.numel()
    if counts["trainable"] == 0:
        raise TrainError("no trainable parameters left after freezing")
    return counts


class _Rows(nn.Module):
    """Parametrization ``W -> W`` with ``rows`` replaced by a small trainable tensor."""

    def __init__(self, weight: torch.Tensor, rows: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", rows, persistent=False)
        self.rows = nn.Parameter(weight.detach()[rows].clone())
        self.rows._row_mask = True  # no weight decay (``_no_decay``)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_put((self.index,), self.rows.to(weight.dtype))


def train_embedding_rows(model: nn.Module, param_names: Sequence[str], rows: Sequence[int]) -> None:
    """Train only ``rows`` of each named 2-D parameter (e.g. the embeddings of tokens a frozen
    backbone never saw). The full matrix stays frozen; a parametrization swaps in a small trainable
    ``(len(rows), dim)`` tensor, so gradients, optimizer state and checkpoints cost the rows only,
    and the other rows stay bit-identical. ``merge_embedding_rows`` folds them back (export)."""
    from torch.nn.utils import parametrize

    params = dict(model.named_parameters())
    idx = torch.tensor(sorted(set(rows)), dtype=torch.long)
    for name in param_names:
        if name not in params:
            raise TrainError(f"train_embedding_rows: no parameter {name!r}")
        p = params[name]
        if idx.numel() and (idx.min() < 0 or idx.max() >= p.shape[0]):
            raise TrainError(f"train_embedding_rows: rows out of range for {name} with {p.shape[0]} rows")
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        p.requires_grad_(False)
        parametrize.register_parametrization(mod, attr, _Rows(p, idx.to(p.device)))


def merge_embedding_rows(model: nn.Module) -> int:
    """Fold ``train_embedding_rows`` parametrizations into plain weights; returns how many."""
    from torch.nn.utils import parametrize

    n = 0
    for mod in list(model.modules()):
        if parametrize.is_parametrized(mod):
            for attr in list(mod.parametrizations.keys()):
                if any(isinstance(f, _Rows) for f in mod.parametrizations[attr]):
                    parametrize.remove_parametrizations(mod, attr, leave_parametrized=True)
                    getattr(mod, attr).requires_grad_(False)
                    n += 1
    return n


# -- optimizer and schedule ----------------------------------------------------------------------
def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or "norm" in name or getattr(p, "_row_mask", None) is not None


def param_groups(model: nn.Module, optim: OptimRecipe) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (learning rate, weight decay), in model order."""
    lr_rules = sorted(optim.lr_groups.items(), key=lambda kv: -len(kv[0]))
    names = [n for n, _ in model.named_parameters()]
    for pre in optim.lr_groups:
        if not any(_prefix_match(n, pre) for n in names):
            raise TrainError(f"optim.lr_groups prefix {pre!r} matches no parameter")
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = next((v for pre, v in lr_rules if _prefix_match(n, pre)), optim.lr)
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


# -- gradient checkpointing ------------------------------------------------------------------------
def enable_gradient_checkpointing(model: nn.Module, list_suffix: str = "layers") -> int:
    """Recompute each transformer layer in backward: every child of a ``ModuleList`` whose name ends
    in ``list_suffix`` (``model.text_model.layers``, ``model.vision_model.encoder.layers``) gets its
    ``forward`` wrapped in ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved, so dropout
    masks repeat). Only active while training with grad enabled. Returns the number wrapped."""
    n = 0
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.ModuleList) and name.split(".")[-1] == list_suffix):
            continue
        for layer in mod:
            if getattr(layer, "_ckpt_wrapped", False):
                continue
            orig = layer.forward

            def fwd(*args, _orig=orig, _layer=layer, **kwargs):
                if _layer.training and torch.is_grad_enabled():
                    return _checkpoint(_orig, *args, use_reentrant=False, **kwargs)
                return _orig(*args, **kwargs)

            layer.forward = fwd
            layer._ckpt_wrapped = True
            n += 1
    if n == 0:
        raise TrainError(f"gradient checkpointing: no ModuleList named '*.{list_suffix}' in the model")
    return n


# -- data order --------------------------------------------------------------------------------------
@dataclass
class DataOrder:
    """Sample order as a pure function of (seed, position): epoch e is a fresh permutation seeded
    by (seed, e). Resuming needs only the number of samples already consumed."""

    n: int
    seed: int
    shuffle: bool = True
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)
                           if self.shuffle else np.arange(self.n)}
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        if self.n == 0:
            raise TrainError("the training set is empty")
        return [int(self._perm(pos // self.n)[pos % self.n]) for pos in range(start, start + count)]


# -- steps ---------------------------------------------------------------------------------------
def _to(batch: Batch, device: torch.device | str) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def _n_targets(batch: Batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # targets after the shift by one


def _autocast(device: str, dtype: torch.dtype | None):
    dev = torch.device(device).type
    return torch.autocast(dev, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _loss_kwargs(model: nn.Module) -> dict[str, Any]:
    """``return_logits=False`` where the model takes it (SmolVLM: head only at target positions)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"return_logits": False} if "return_logits" in params else {}


def train_step(model: nn.Module, micro_batches: list[Batch], optimizer: torch.optim.Optimizer, scheduler: Any,
               grad_clip: float = 0.0, autocast_dtype: torch.dtype | None = None, device: str = "cpu") -> dict[str, float]:
    """Forward/backward over the micro-batches (token-weighted), clip, step. Returns loss, grad norm."""
    model.train()
    counts = [_n_targets(b) for b in micro_batches]
    total = sum(counts)
    if total == 0:
        raise TrainError("a training batch has no target tokens (all labels are -100)")
    loss_sum, extra = 0.0, _loss_kwargs(model)
    for b, n in zip(micro_batches, counts):
        if n == 0:
            continue
        with _autocast(device, autocast_dtype):
            loss = model(**_to(b, device), **extra).loss
        (loss.float() * (n / total)).backward()
        loss_sum += float(loss.detach()) * n
    params = [p for g in optimizer.param_groups for p in g["params"]]
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return {"loss": loss_sum / total, "grad_norm": float(gnorm)}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Batch] | Any, autocast_dtype: torch.dtype | None = None,
             device: str = "cpu") -> float:
    """Token-weighted mean loss over ``batches`` in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    loss_sum, total, extra = 0.0, 0, _loss_kwargs(model)
    for b in batches:
        n = _n_targets(b)
        if n == 0:
            continue
        with _autocast(device, autocast_dtype):
            loss_sum += float(model(**_to(b, device), **extra).loss) * n
        total += n
    model.train(was_training)
    return loss_sum / max(total, 1)


# -- the loop -----------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoopResult:
    step: int
    last_loss: float
    eval_loss: float | None
    output_dir: Path
    checkpoint: Path | None


def _resume_or_start(out: Path, resume: bool, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
    root = out / "checkpoints"
    ckpt.clean_temp(root)
    last = ckpt.latest_checkpoint(root)
    if resume and last is not None:
        state = ckpt.load_checkpoint(last, model, optimizer, scheduler)
        truncate_metrics(out / "metrics.jsonl", state["step"])
        return state
    if not resume and last is not None:
        raise TrainError(f"{out} already holds checkpoints (latest {last.name}); pass --resume or use a new output_dir")
    (out / "metrics.jsonl").unlink(missing_ok=True)
    return {"step": 0, "samples_seen": 0, "elapsed": 0.0}


def _eval_batches(eval_data: Sequence, collate_fn: Callable, bs: int):
    for i in range(0, len(eval_data), bs):
        yield collate_fn([eval_data[j] for j in range(i, min(i + bs, len(eval_data)))])


def train(model: nn.Module, train_data: Sequence, collate_fn: Callable[[list], Batch], cfg: TrainRecipe,
          optim: OptimRecipe, sched: ScheduleRecipe, eval_data: Sequence | None = None, resume: bool = False,
          stop_at: int | None = None) -> LoopResult:
    """Run (or resume) training until ``cfg.max_steps``; ``stop_at`` ends early after that step
    (used to simulate a killed run). Freezing/LoRA must already be applied to ``model``."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    model.to(cfg.device)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, sched, cfg.max_steps)
    state = _resume_or_start(out, resume, model, optimizer, scheduler)
    order = DataOrder(len(train_data), cfg.seed, cfg.shuffle)
    amp = AUTOCAST[cfg.autocast]
    step, seen, elapsed = state["step"], state["samples_seen"], state.get("elapsed", 0.0)
    last_loss, eval_loss, saved = state.get("last_loss", float("nan")), state.get("eval_loss"), None
    bar = _progress(cfg, step)
    end = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
    while step < end:
        t0 = time.perf_counter()
        lr = optim.lr * lr_factor(step, sched, cfg.max_steps)  # base lr of this step (groups scale alike)
        micro = []
        for _ in range(cfg.grad_accum):
            micro.append(collate_fn([train_data[i] for i in order.indices(seen, cfg.batch_size)]))
            seen += cfg.batch_size
        stats = train_step(model, micro, optimizer, scheduler, cfg.grad_clip, amp, cfg.device)
        step += 1
        dt = time.perf_counter() - t0
        elapsed += dt
        last_loss = stats["loss"]
        rec = {"step": step, "loss": last_loss, "lr": lr,
               "grad_norm": stats["grad_norm"], "samples_per_s": cfg.batch_size * cfg.grad_accum / dt,
               "elapsed": elapsed}
        if eval_data is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            eval_loss = evaluate(model, _eval_batches(eval_data, collate_fn, cfg.batch_size), amp, cfg.device)
            rec["eval_loss"] = eval_loss
        append_metrics(out / "metrics.jsonl", rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", sps=f"{rec['samples_per_s']:.1f}")
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == end:
            saved = ckpt.save_checkpoint(out / "checkpoints", step, model, optimizer, scheduler,
                                         {"samples_seen": seen, "elapsed": elapsed, "eval_loss": eval_loss,
                                          "last_loss": last_loss},
                                         keep_last=cfg.keep_last)
    if bar is not None:
        bar.close()
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    return LoopResult(step, last_loss, eval_loss, out, saved)


def _progress(cfg: TrainRecipe, initial: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=initial, desc="train", unit="step", dynamic_ncols=True)
