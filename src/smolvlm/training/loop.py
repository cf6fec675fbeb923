"""The one training loop. SFT (``sft.py``) and stage-1 vision pretraining (``vision_pretrain.py``)
differ only in the ``Task`` they hand it: a loss, where each step's batches come from, and an
optional evaluation.

``run`` builds the optimizer and schedule (``optim.py``) over the parameters with ``requires_grad``,
then each step takes the micro-batches ``task.batches(position)`` gives, weighs each by
``task.loss.weight(batch)`` (the LM: its target tokens, so accumulating k micro-batches gives the
gradient of one batch k times larger, the reference Trainer's ``num_items_in_batch`` path, SPEC 1.8),
clips, steps, and logs one JSON line to ``<output_dir>/metrics.jsonl`` (loss, lr, grad norm,
samples/s, tokens/s, and ``eval_*`` every ``eval_every`` steps), which ``plot.py`` draws to
``loss.png`` (loss, eval loss, lr) and, with ``train.tensorboard``, to TensorBoard event files in
``<output_dir>/tensorboard``. A progress bar shows loss, lr, tokens/s and the ETA. With
``checkpoints`` it saves atomic checkpoints (``checkpoint.py``) and resumes exactly: the data
position, optimizer, schedule and RNG states all come back; Ctrl-C saves one at the last finished
step and raises ``Interrupted`` (a KeyboardInterrupt) saying how to resume.

Under ``torchrun`` (WORLD_SIZE > 1) the same loop trains DDP replicas or FSDP2 shards with the
global batch and loss of one process (``distributed.py``); only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from smolvlm import cpu
from smolvlm.training import checkpoint as ckpt
from smolvlm.training import distributed
from smolvlm.training.optim import TrainError, build_optimizer, build_scheduler, lr_factor
from smolvlm.training.plot import append_metrics, plot_loss, truncate_metrics
from smolvlm.training.recipe import OptimRecipe, RecipeError, ScheduleRecipe, TrainRecipe

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bf16 matrix products natively: a CUDA GPU with bf16, or a CPU
    with AVX-512 BF16 or AMX. Elsewhere (an AVX2-only CPU) bf16 runs ~100x slower than float32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    return cpu.has("avx512_bf16") or cpu.has("amx_tile")


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
               device: str = "cpu", dist: distributed.Context | None = None) -> dict[str, float]:
    """Forward/backward over the micro-batches (weighted), clip, step. Returns loss, grad norm and
    the weighted mean of each loss part. With an active ``dist`` this is one rank's share of the
    step (``_distributed_step``)."""
    if dist is not None and dist.active:
        return _distributed_step(model, micro_batches, optimizer, scheduler, loss_fn, grad_clip, autocast, device, dist)
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


def _distributed_step(model: nn.Module, micro_batches: list[Any], optimizer: torch.optim.Optimizer, scheduler: Any,
                      loss_fn: Loss, grad_clip: float, autocast: torch.dtype | None, device: str,
                      dist: distributed.Context) -> dict[str, float]:
    """One rank's share of an optimizer step: its micro-batch m has weight w_m (its target tokens)
    of W, the weight of the step over all ranks (all-reduced). DDP / FSDP2 average gradients over
    the K ranks, so each backward is scaled by w_m * K / W: the reduced gradient is the weighted
    gradient of the whole step, as one process computes it. Every rank runs every micro-batch
    (one with weight 0 contributes zero gradient), gradients are reduced in the last backward."""
    model.train()
    weights = [loss_fn.weight(b) for b in micro_batches]
    (total,) = distributed.all_sum([sum(weights)])
    if total == 0:
        raise TrainError("a training batch has nothing to learn (weight 0; SFT: no target tokens, all labels are -100)")
    scale = dist.world / total
    loss_sum, parts = 0.0, {}
    for i, (b, w) in enumerate(zip(micro_batches, weights)):
        with distributed.grad_sync(model, i == len(micro_batches) - 1):
            with autocast_context(device, autocast):
                loss, logs = loss_fn(model, b)
            (loss.float() * (w * scale)).backward()  # w == 0: a NaN mean times 0 still back-propagates zeros
        if w:
            loss_sum += float(loss.detach()) * w
        for k, v in logs.items():
            parts[k] = parts.get(k, 0.0) + (float(v.detach()) * w if w else 0.0)
    keys = sorted(parts)
    sums = distributed.all_sum([loss_sum, *(parts[k] for k in keys)])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    gnorm = distributed.full_value(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return {"loss": sums[0] / total, "grad_norm": float(gnorm), **{k: v / total for k, v in zip(keys, sums[1:])}}


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


def _fresh(out: Path, write: bool = True) -> dict[str, Any]:
    if write:
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


# -- parameters, memory, tokens -------------------------------------------------------------------
def input_tokens(batch: Any) -> int:
    """Tokens a micro-batch feeds the model: non-padding positions of an LM batch (0 if it has none)."""
    if isinstance(batch, dict):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return int(batch["input_ids"].numel())
    return 0


# -- TensorBoard -----------------------------------------------------------------------------------
def tensorboard_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``; a RecipeError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RecipeError("train.tensorboard: true needs the tensorboard package: pip install tensorboard "
                          "(or set train.tensorboard: false)") from None
    return SummaryWriter


def check_tensorboard(cfg: TrainRecipe) -> None:
    if cfg.tensorboard:
        tensorboard_writer_class()


def _log_tensorboard(writer: Any, rec: dict[str, Any]) -> None:
    for k, v in rec.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
            writer.add_scalar(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}", v, rec["step"])
    writer.flush()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``run``: the checkpoint saved at ``step`` (None: nothing to resume from)."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        self.step, self.checkpoint = step, checkpoint
        how = (f"checkpoint {checkpoint} saved; run again with --resume to continue" if checkpoint is not None
               else "no checkpoint saved")
        super().__init__(f"interrupted after step {step}: {how}")


# -- distributed setup -------------------------------------------------------------------------------
@dataclass
class _Setup:
    net: nn.Module  # what train_step runs: the DDP wrapper, the FSDP2 model or the model
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: dict[str, Any]
    fingerprint: list[float] | None = None


def _setup_distributed(model: nn.Module, cfg: TrainRecipe, optim: OptimRecipe, sched: ScheduleRecipe, out: Path,
                       resume: bool, checkpoints: bool, dist: distributed.Context) -> _Setup:
    """Resume (rank 0 reads, every rank receives) into the plain model, then wrap it, build the
    optimizer over the wrapped parameters and load the optimizer, schedule and RNG states."""
    fsdp = cfg.distributed == "fsdp"
    if not fsdp:
        model.to(cfg.device)  # FSDP2: fully_shard moves each rank's shards to the device
    fingerprint = ckpt.frozen_fingerprint(model)  # before sharding: frozen weights never change
    last, err = None, None
    if checkpoints and dist.is_main:
        ckpt.clean_temp(out / "checkpoints")
        try:
            found = check_resume(out, resume)
            last = str(found) if found is not None else None
        except TrainError as e:
            err = str(e)
    last, err = distributed.broadcast((last, err) if checkpoints else (None, None))
    if err:
        raise TrainError(err)
    rngs, saved_optim = None, None
    if last is None:
        state = _fresh(out, write=dist.is_main)
    else:
        path = Path(last)
        state = distributed.broadcast(ckpt.read_state(path) if dist.is_main else None)
        ckpt.check_fingerprint(path, fingerprint, state["frozen_fingerprint"])
        saved = ckpt.read_trainable(path) if dist.is_main else None
        ckpt.check_names(path, model, dict.fromkeys(distributed.broadcast(list(saved) if dist.is_main else None)))
        tensors = distributed.broadcast_tensors(saved)
        ckpt.apply_trainable(path, model, tensors)
        rngs = distributed.broadcast(ckpt.read_rng(path) if dist.is_main else None)
        saved_optim = ckpt.read_optimizer(path, map_location="cpu") if dist.is_main else None
    net = distributed.wrap(model, cfg.distributed, cfg.device)
    optimizer = build_optimizer(model, optim)  # DDP: the same parameters; FSDP2: the sharded ones
    scheduler = build_scheduler(optimizer, sched, cfg.max_steps)
    if last is not None:
        distributed.load_optimizer_state(net, optimizer, saved_optim)
        if state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        # each rank its own generator states when the world size is unchanged, else rank 0's
        ckpt.set_rng_state(rngs[dist.rank] if len(rngs) == dist.world else rngs[0])
        if dist.is_main:
            truncate_metrics(out / "metrics.jsonl", state["step"])
    distributed.barrier()
    return _Setup(net, optimizer, scheduler, state, fingerprint)


def _save(out: Path, step: int, model: nn.Module, s: _Setup, extra: dict[str, Any], cfg: TrainRecipe,
          dist: distributed.Context) -> Path:
    root = out / "checkpoints"
    if not dist.active:
        return ckpt.save_checkpoint(root, step, model, s.optimizer, s.scheduler, extra, keep_last=cfg.keep_last)
    tensors = distributed.trainable_state(s.net)  # collectives first, on every rank
    optim_state = distributed.optimizer_state(s.net, s.optimizer)
    rngs = distributed.gather(ckpt.rng_state())
    if dist.is_main:
        ckpt.save_checkpoint(root, step, model, None, s.scheduler, extra, keep_last=cfg.keep_last, tensors=tensors,
                             optim_state=optim_state, fingerprint=s.fingerprint, rng_ranks=rngs)
    distributed.barrier()
    return ckpt.checkpoint_dir(root, step)


def run(model: nn.Module, task: Task, cfg: TrainRecipe, optim: OptimRecipe, sched: ScheduleRecipe, *,
        resume: bool = False, stop_at: int | None = None, checkpoints: bool = True, desc: str = "train") -> LoopResult:
    """Train ``model``'s parameters with ``requires_grad`` on ``task`` until ``cfg.max_steps``.
    ``stop_at`` ends early after that step (simulates a killed run). Without ``checkpoints`` nothing
    is saved but the metrics and the loss plot, and every call starts fresh.

    Under torchrun every rank calls this with the same arguments; after an FSDP run rank 0's
    ``model`` holds the full trained weights on CPU (``distributed.gather_to_main``)."""
    out = Path(cfg.output_dir)
    writer_cls = tensorboard_writer_class() if cfg.tensorboard else None
    dist = distributed.setup(cfg.device)
    main = dist.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed + dist.rank)
    if dist.active:
        s = _setup_distributed(model, cfg, optim, sched, out, resume, checkpoints, dist)
    else:
        model.to(cfg.device)
        optimizer = build_optimizer(model, optim)
        scheduler = build_scheduler(optimizer, sched, cfg.max_steps)
        state = _resume_or_start(out, resume, model, optimizer, scheduler) if checkpoints else _fresh(out)
        s = _Setup(model, optimizer, scheduler, state)
    state = s.state
    amp = autocast_dtype(cfg.autocast, cfg.device)
    step, position, elapsed = state["step"], state["samples_seen"], state.get("elapsed", 0.0)
    last_loss, last_eval, saved, samples = state.get("last_loss", float("nan")), _saved_eval(state), None, 0
    bar = _progress(cfg, step, desc) if main else None
    writer = None
    if writer_cls is not None and main:  # a resumed run drops the events a killed run logged past `step`
        writer = writer_cls(str(out / "tensorboard"), purge_step=step + 1 if step else None)
    end = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
    pending: dict[str, Any] | None = None  # the record of a finished step not yet logged

    def loop_state() -> dict[str, Any]:
        return {"samples_seen": position, "elapsed": elapsed, "eval": last_eval, "last_loss": last_loss}

    def finish() -> None:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if main:
            plot_loss(out / "metrics.jsonl", out / "loss.png")

    # one process: Ctrl-C raises KeyboardInterrupt where it lands; several: a flag all ranks check per step
    flag = distributed.InterruptFlag() if dist.active else None
    agreed_stop = False
    with flag if flag is not None else contextlib.nullcontext():
        try:
            while step < end:
                t0 = time.perf_counter()
                lr = optim.lr * lr_factor(step, sched, cfg.max_steps)  # base lr of this step (groups scale alike)
                micro, next_position, n = task.batches(position)
                stats = train_step(s.net, micro, s.optimizer, s.scheduler, task.loss, cfg.grad_clip, amp, cfg.device,
                                   dist)
                tokens, targets, stop = distributed.all_sum(
                    [sum(input_tokens(b) for b in micro), sum(task.loss.weight(b) for b in micro),
                     float(flag is not None and flag.raised)])
                step, position, samples = step + 1, next_position, samples + n
                dt = time.perf_counter() - t0
                elapsed += dt
                last_loss = stats.pop("loss")
                pending = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": stats.pop("grad_norm"),
                           "samples_per_s": n / dt, "tokens_per_s": tokens / dt, "target_tokens_per_s": targets / dt,
                           "elapsed": elapsed, **stats}
                if stop:  # some rank got Ctrl-C: all stop here, after the same step
                    agreed_stop = True
                    raise KeyboardInterrupt
                rec = dict(pending)
                if task.evaluate is not None and cfg.eval_every and (step % cfg.eval_every == 0
                                                                     or step == cfg.max_steps):
                    last_eval = task.evaluate(model)
                    if dist.active:
                        distributed.reshard(model)
                    rec.update({f"eval_{k}": v for k, v in last_eval.items()})
                if main:
                    append_metrics(out / "metrics.jsonl", rec)
                    if writer is not None:
                        _log_tensorboard(writer, rec)
                pending = None
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({"loss": f"{last_loss:.4f}", "lr": f"{lr:.2e}",
                                     "tok/s": f"{rec['tokens_per_s']:.0f}"})  # the bar itself shows the ETA
                if checkpoints and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == end):
                    saved = _save(out, step, model, s, loop_state(), cfg, dist)
        except KeyboardInterrupt:
            if dist.active and not agreed_stop:
                raise  # not at the same step boundary on every rank: no collective save is possible
            # the step in flight (if any) is dropped: parameters, position and RNG are those after `step`
            if main and pending is not None:
                append_metrics(out / "metrics.jsonl", pending)
            s.optimizer.zero_grad(set_to_none=True)
            at = _save(out, step, model, s, loop_state(), cfg, dist) if checkpoints and step > 0 else None
            finish()
            distributed.barrier()  # rank 0 has plotted before any rank exits (torchrun then stops the rest)
            raise Interrupted(step, at) from None
    if dist.active and cfg.distributed == "fsdp":
        distributed.gather_to_main(model)
    finish()
    distributed.barrier()
    return LoopResult(step, last_loss, last_eval, out, saved, samples)
