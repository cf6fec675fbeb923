"""The one training loop. SFT (``sft.py``) and stage-1 vision pretraining (``vision_pretrain.py``)
differ only in the ``Task`` they hand it: a loss, where each step's batches come from, and an
optional evaluation.

``run`` builds the optimizer and schedule (``optim.py``) over the parameters with ``requires_grad``,
then each step takes the micro-batches ``task.batches(position)`` gives, weighs each by
``task.loss.weight(batch)`` (the LM: its target tokens, so accumulating k micro-batches gives the
gradient of one batch k times larger, the reference Trainer's ``num_items_in_batch`` path, SPEC 1.8),
clips, steps, and logs one JSON line to ``<output_dir>/metrics.jsonl``. With ``checkpoints`` it saves
atomic checkpoints (``checkpoint.py``) and resumes exactly: the data position, optimizer, schedule
and RNG states all come back.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from smolvlm.training import checkpoint as ckpt
from smolvlm.training.optim import TrainError, build_optimizer, build_scheduler, lr_factor
from smolvlm.training.plot import append_metrics, plot_loss, truncate_metrics
from smolvlm.training.recipe import OptimRecipe, ScheduleRecipe, TrainRecipe

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bf16 matrix products natively: a CUDA GPU with bf16, or a CPU
    with AVX-512 BF16 or AMX. Elsewhere (an AVX2-only CPU) bf16 runs ~100x slower than float32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    probes = [getattr(torch.cpu, f, None) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(p()) for p in probes if p is not None)


def autocast_dtype(name: str, device: str) -> torch.dtype | None:
    """``train.autocast`` -> the autocast dtype (None: off). ``"auto"`` is bf16 where ``native_bf16``, else off."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    return AUTOCAST[name]


def autocast_context(device: str, dtype: torch.dtype | None):
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


class Loss(Protocol):
    """A training objective. ``weight(batch)``: how much a micro-batch counts (0: skipped);
    ``__call__(model, batch)``: (mean loss, named parts to log)."""

    def weight(self, batch: Any) -> int: ...

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclass
class Task:
    """What the loop trains. ``batches(position)`` -> (micro-batches of one optimizer step, the next
    position, how many samples they hold); a pure function of ``position`` for an exact resume.
    ``evaluate(model)`` -> metrics, logged with an ``eval_`` prefix."""

    loss: Loss
    batches: Callable[[int], tuple[list[Any], int, int]]
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None


def train_step(model: nn.Module, micro_batches: list[Any], optimizer: torch.optim.Optimizer, scheduler: Any,
               loss_fn: Loss, grad_clip: float = 0.0, autocast: torch.dtype | None = None,
               device: str = "cpu") -> dict[str, float]:
    """Forward/backward over the micro-batches (weighted), clip, step. Returns loss, grad norm and
    the weighted mean of each loss part."""
    model.train()
    weights = [loss_fn.weight(b) for b in micro_batches]
    total = sum(weights)
    if total == 0:
        raise TrainError("a training batch has nothing to learn (weight 0; SFT: no target tokens, all labels are -100)")
    loss_sum, parts = 0.0, {}
    for b, w in zip(micro_batches, weights):
        if w == 0:
            continue
        with autocast_context(device, autocast):
            loss, logs = loss_fn(model, b)
        (loss.float() * (w / total)).backward()
        loss_sum += float(loss.detach()) * w
        for k, v in logs.items():
            parts[k] = parts.get(k, 0.0) + float(v.detach()) * w / total
    params = [p for g in optimizer.param_groups for p in g["params"]]
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return {"loss": loss_sum / total, "grad_norm": float(gnorm), **parts}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class LoopResult:
    step: int
    last_loss: float
    eval: dict[str, float]  # the latest evaluation ({} before the first)
    output_dir: Path
    checkpoint: Path | None = None
    samples: int = 0  # samples this call trained on (a resumed run's earlier ones not counted)

    @property
    def eval_loss(self) -> float | None:
        return self.eval.get("loss")


def check_resume(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start fresh); without ``resume`` an existing checkpoint
    is an error, so a run never overwrites another by accident. Reads only."""
    last = ckpt.latest_checkpoint(out / "checkpoints")
    if not resume and last is not None:
        raise TrainError(f"{out} already holds checkpoints (latest {last.name}); pass --resume or use a new output_dir")
    return last if resume else None


def _resume_or_start(out: Path, resume: bool, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
    ckpt.clean_temp(out / "checkpoints")
    last = check_resume(out, resume)
    if last is not None:
        state = ckpt.load_checkpoint(last, model, optimizer, scheduler)
        truncate_metrics(out / "metrics.jsonl", state["step"])
        return state
    return _fresh(out)


def _fresh(out: Path) -> dict[str, Any]:
    (out / "metrics.jsonl").unlink(missing_ok=True)
    return {"step": 0, "samples_seen": 0, "elapsed": 0.0}


def _saved_eval(state: dict[str, Any]) -> dict[str, float]:
    if "eval" in state:
        return state["eval"] or {}
    return {"loss": state["eval_loss"]} if state.get("eval_loss") is not None else {}  # older checkpoints


def _progress(cfg: TrainRecipe, initial: int, desc: str):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


def run(model: nn.Module, task: Task, cfg: TrainRecipe, optim: OptimRecipe, sched: ScheduleRecipe, *,
        resume: bool = False, stop_at: int | None = None, checkpoints: bool = True, desc: str = "train") -> LoopResult:
    """Train ``model``'s parameters with ``requires_grad`` on ``task`` until ``cfg.max_steps``.
    ``stop_at`` ends early after that step (simulates a killed run). Without ``checkpoints`` nothing
    is saved but the metrics and the loss plot, and every call starts fresh."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    model.to(cfg.device)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, sched, cfg.max_steps)
    state = _resume_or_start(out, resume, model, optimizer, scheduler) if checkpoints else _fresh(out)
    amp = autocast_dtype(cfg.autocast, cfg.device)
    step, position, elapsed = state["step"], state["samples_seen"], state.get("elapsed", 0.0)
    last_loss, last_eval, saved, samples = state.get("last_loss", float("nan")), _saved_eval(state), None, 0
    bar = _progress(cfg, step, desc)
    end = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
    while step < end:
        t0 = time.perf_counter()
        lr = optim.lr * lr_factor(step, sched, cfg.max_steps)  # base lr of this step (groups scale alike)
        micro, position, n = task.batches(position)
        stats = train_step(model, micro, optimizer, scheduler, task.loss, cfg.grad_clip, amp, cfg.device)
        step, samples = step + 1, samples + n
        dt = time.perf_counter() - t0
        elapsed += dt
        last_loss = stats.pop("loss")
        rec = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": stats.pop("grad_norm"),
               "samples_per_s": n / dt, "elapsed": elapsed, **stats}
        if task.evaluate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            last_eval = task.evaluate(model)
            rec.update({f"eval_{k}": v for k, v in last_eval.items()})
        append_metrics(out / "metrics.jsonl", rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", sps=f"{rec['samples_per_s']:.1f}")
        if checkpoints and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == end):
            saved = ckpt.save_checkpoint(out / "checkpoints", step, model, optimizer, scheduler,
                                         {"samples_seen": position, "elapsed": elapsed, "eval": last_eval,
                                          "last_loss": last_loss},
                                         keep_last=cfg.keep_last)
    if bar is not None:
        bar.close()
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    return LoopResult(step, last_loss, last_eval, out, saved, samples)
