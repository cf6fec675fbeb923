"""Supervised fine-tuning, full or LoRA: the language-model task of the one loop (``loop.py``).

Works on any module called as ``model(input_ids=..., attention_mask=..., [pixel_values=...,
pixel_attention_mask=...,] labels=...)`` that returns an object with ``.loss`` (SmolVLM does:
fp32 logits, shift by one, ignore -100, mean; SPEC 1.8). Pieces, each small and testable:

* ``apply_freezing``       - per-parameter ``requires_grad`` from name prefixes (longest wins);
* ``train_embedding_rows`` - train only some rows of an embedding / head (new special tokens);
* ``enable_gradient_checkpointing`` - wraps each ``*.layers[i].forward`` from the outside;
* ``DataOrder``            - epoch permutations that are a pure function of (seed, position);
* ``LMLoss``               - the next-token loss, each micro-batch weighted by its target tokens;
* ``train_step`` / ``evaluate`` / ``train``.

The optimizer and schedule are ``optim.py``'s; ``train`` hands ``loop.run`` a ``Task`` whose data
position is the number of samples consumed, so a resumed run reads the same samples in order.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from smolvlm.training import distributed, loop
from smolvlm.training.collate import IGNORE_INDEX
from smolvlm.training.lora import LoRALinear
from smolvlm.training.qlora import QUANTIZED
from smolvlm.training.optim import TrainError, prefix_match
from smolvlm.training.recipe import OptimRecipe, ScheduleRecipe, TrainRecipe

Batch = dict[str, torch.Tensor]


# -- freezing --------------------------------------------------------------------------------
def apply_freezing(model: nn.Module, freeze: Sequence[str] = (), train: Sequence[str] = ()) -> dict[str, int]:
    """Set ``requires_grad`` by name prefix: the longest matching prefix of ``freeze`` or ``train``
    decides; unmatched parameters train. LoRA adapters always train and the base weights of
    ``LoRALinear`` layers never do, nor anything of a quantized layer (QLoRA: the bias of an
    ``Int8Linear`` / ``Int4Linear``). A prefix that matches no parameter is an error (typos)."""
    lora_base = {id(p) for m in model.modules() if isinstance(m, LoRALinear) for p in (m.weight, m.bias) if p is not None}
    lora_base |= {id(p) for m in model.modules() if isinstance(m, QUANTIZED) for p in m.parameters()}
    names = [n for n, _ in model.named_parameters()]
    # a quantized layer's weights are buffers, frozen by nature; a prefix naming them is no typo
    quantized = [f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, QUANTIZED) for b, _ in m.named_buffers()]
    for pre in [*freeze, *train]:
        if not any(prefix_match(n, pre) for n in (*names, *quantized)):
            raise TrainError(f"freeze/train prefix {pre!r} matches no parameter (e.g. {names[0]!r})")
    rules = sorted([(p, False) for p in freeze] + [(p, True) for p in train], key=lambda r: -len(r[0]))
    counts = {"trainable": 0, "frozen": 0}
    for n, p in model.named_parameters():
        if id(p) in lora_base:
            flag = False
        elif ".lora_A." in n or ".lora_B." in n:
            flag = True
        else:
            flag = next((t for pre, t in rules if prefix_match(n, pre)), True)
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


# -- the LM task --------------------------------------------------------------------------------------
def _to(batch: Batch, device: torch.device | str) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def _n_targets(batch: Batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # targets after the shift by one


def _loss_kwargs(model: nn.Module) -> dict[str, Any]:
    """``return_logits=False`` where the model takes it (SmolVLM: head only at target positions)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"return_logits": False} if "return_logits" in params else {}


class LMLoss:
    """Mean next-token loss of a collated batch; a micro-batch weighs its number of target tokens."""

    def __init__(self, model: nn.Module, device: str = "cpu") -> None:
        self.device, self.extra = device, _loss_kwargs(model)

    def weight(self, batch: Batch) -> int:
        return _n_targets(batch)

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return model(**_to(batch, self.device), **self.extra).loss, {}


def train_step(model: nn.Module, micro_batches: list[Batch], optimizer: torch.optim.Optimizer, scheduler: Any,
               grad_clip: float = 0.0, autocast_dtype: torch.dtype | None = None, device: str = "cpu") -> dict[str, float]:
    """One optimizer step of the LM loss over the micro-batches (token-weighted). Returns loss, grad norm."""
    return loop.train_step(model, micro_batches, optimizer, scheduler, LMLoss(model, device), grad_clip,
                           autocast_dtype, device)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], autocast_dtype: torch.dtype | None = None,
             device: str = "cpu") -> float:
    """Token-weighted mean loss over ``batches`` in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    loss_fn, loss_sum, total = LMLoss(model, device), 0.0, 0
    for b in batches:
        n = loss_fn.weight(b)
        if n == 0:
            continue
        with loop.autocast_context(device, autocast_dtype):
            loss_sum += float(loss_fn(model, b)[0]) * n
        total += n
    model.train(was_training)
    return loss_sum / max(total, 1)


def _eval_batches(eval_data: Sequence, collate_fn: Callable, bs: int):
    for i in range(0, len(eval_data), bs):
        yield collate_fn([eval_data[j] for j in range(i, min(i + bs, len(eval_data)))])


def step_batches(train_data: Sequence, collate_fn: Callable[[list], Any], cfg: TrainRecipe
                 ) -> Callable[[int], tuple[list[Any], int, int]]:
    """The loop's ``Task.batches``: from data position ``seen``, ``grad_accum`` micro-batches of
    ``batch_size`` samples in ``DataOrder``; under torchrun each rank collates its share of every
    micro-batch (``distributed.shard``). Returns (micro-batches, next position, samples)."""
    order = DataOrder(len(train_data), cfg.seed, cfg.shuffle)

    def batches(seen: int) -> tuple[list[Any], int, int]:
        micro = []
        for _ in range(cfg.grad_accum):
            micro.append(collate_fn([train_data[i] for i in distributed.shard(order.indices(seen, cfg.batch_size))]))
            seen += cfg.batch_size
        return micro, seen, cfg.batch_size * cfg.grad_accum

    return batches


def train(model: nn.Module, train_data: Sequence, collate_fn: Callable[[list], Batch], cfg: TrainRecipe,
          optim: OptimRecipe, sched: ScheduleRecipe, eval_data: Sequence | None = None, resume: bool = False,
          stop_at: int | None = None) -> loop.LoopResult:
    """Run (or resume) SFT until ``cfg.max_steps``; ``stop_at`` ends early after that step (used to
    simulate a killed run). Freezing/LoRA must already be applied to ``model``."""
    batches = step_batches(train_data, collate_fn, cfg)

    def evaluate_lm(m: nn.Module) -> dict[str, float]:
        amp = loop.autocast_dtype(cfg.autocast, cfg.device)
        return {"loss": evaluate(m, _eval_batches(eval_data, collate_fn, cfg.batch_size), amp, cfg.device)}

    task = loop.Task(LMLoss(model, cfg.device), batches, evaluate_lm if eval_data is not None else None)
    return loop.run(model, task, cfg, optim, sched, resume=resume, stop_at=stop_at)
