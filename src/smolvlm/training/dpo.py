"""Direct Preference Optimization (Rafailov et al. 2023), the preference task of the one loop (``loop.py``).

A preference sample ``{"images", "prompt", "chosen", "rejected"}`` (``data/preference.py`` reads them
from JSONL) becomes two sequences, prompt + chosen and prompt + rejected, each encoded exactly as an
SFT sample (``data.encode_sample``: user turn = images + prompt, assistant turn = the response,
labels on the response and its ``<end_of_utterance>`` only). ``collate_pairs`` stacks a batch of B
pairs as 2B rows: the B chosen rows, then the B rejected rows.

``DPOLoss`` is TRL's ``DPOTrainer`` sigmoid loss: with ``log pi(y|x)`` summed over the response
tokens, ``x = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))`` and the loss
``-(1 - ls) logsigmoid(beta x) - ls logsigmoid(-beta x)`` (``ls``: label smoothing, conservative DPO),
averaged over pairs. It logs TRL's metrics: ``rewards/chosen`` = ``beta (log pi(c) - log ref(c))``,
``rewards/rejected``, ``rewards/accuracies`` (chosen reward > rejected), ``rewards/margins``, and the
policy's ``logps/chosen`` / ``logps/rejected``.

The reference model is the model as training starts, evaluated without gradient and without
dropout (eval mode). When only LoRA adapters train it is the same model with its adapters disabled
(``lora.adapters_disabled``; no second copy, as TRL with PEFT). Otherwise (full fine-tuning, or LoRA
plus trained non-adapter parameters) it is a frozen deep copy made when the loss is built, which
shares every frozen tensor with the policy, so it costs memory only for what trains.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smolvlm.data.preference import load_preferences
from smolvlm.training import loop, lora, sft
from smolvlm.training.collate import IGNORE_INDEX, collate
from smolvlm.training.data import encode_sample
from smolvlm.training.optim import TrainError
from smolvlm.training.recipe import DPORecipe, OptimRecipe, Recipe, RecipeError, ScheduleRecipe, TrainRecipe

Batch = dict[str, torch.Tensor]


# -- samples -> pairs of encoded sequences -------------------------------------------------------
def response_sample(sample: dict[str, Any], response: str) -> dict[str, Any]:
    """A preference sample with one of its responses as a one-turn the_cauldron sample."""
    return {"id": sample.get("id", "?"), "images": list(sample.get("images") or []),
            "texts": [{"user": sample["prompt"], "assistant": sample[response]}]}


def encode_pair(sample: dict[str, Any], processor: Any, system_prompt: str | None = None) -> dict[str, Batch]:
    """``{"chosen": enc, "rejected": enc}``, each ``data.encode_sample`` of prompt + that response."""
    return {k: encode_sample(response_sample(sample, k), processor, system_prompt) for k in ("chosen", "rejected")}


class PreferenceDataset(Sequence):
    """Preference samples encoded lazily into pairs on access (images are too big to keep encoded)."""

    def __init__(self, samples: Sequence[dict[str, Any]], processor: Any, system_prompt: str | None = None) -> None:
        self.samples, self.processor, self.system_prompt = samples, processor, system_prompt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Batch]:  # type: ignore[override]
        return encode_pair(self.samples[i], self.processor, self.system_prompt)


def collate_pairs(pairs: list[dict[str, Batch]], pad_token_id: int, max_length: int | None = None,
                  image_token_id: int | None = None) -> Batch:
    """B pairs -> one ``collate`` batch of 2B rows: chosen rows ``[:B]``, rejected rows ``[B:]`` (each
    pair's images appear in both of its rows)."""
    rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    return collate(rows, pad_token_id, max_length=max_length, image_token_id=image_token_id)


# -- log-probabilities -----------------------------------------------------------------------------
def _model_inputs(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k != "labels"}


def sequence_logps(model: nn.Module, batch: Batch) -> torch.Tensor:
    """``(rows,)`` float32: each row's summed log-probability of its target tokens (labels != -100,
    predicted from the previous position). Where the model has an ``lm_head`` module the head runs only
    at the positions that predict a target (as SFT's ``return_logits=False``), never on the full
    ``(rows, T, vocab)`` logits; otherwise they are computed and indexed."""
    labels = batch["labels"]
    targets = labels[:, 1:]  # (R, T-1)
    keep = targets != IGNORE_INDEX  # (R, T-1)
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Module):
        at = F.pad(keep, (0, 1), value=False)  # (R, T): positions whose next token is a target

        def only_targets(_mod: nn.Module, args: tuple) -> tuple:
            return (args[0][at.to(args[0].device)], *args[1:])  # (R, T, D) -> (N, D)

        handle = head.register_forward_pre_hook(only_targets)
        try:
            logits = model(**_model_inputs(batch)).logits  # (N, V)
        finally:
            handle.remove()
        if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
            raise TrainError(f"sequence_logps: the model's lm_head gave logits {tuple(logits.shape)}, expected "
                             f"({int(keep.sum())}, vocab) at the target positions")
    else:
        logits = model(**_model_inputs(batch)).logits[:, :-1][keep.to(labels.device)]  # (N, V)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    tok = targets[keep].to(logp.device)  # (N,)
    per_token = logp.gather(-1, tok[:, None])[:, 0]  # (N,)
    rows = keep.nonzero()[:, 0].to(logp.device)  # (N,) row of each target
    return torch.zeros(labels.shape[0], dtype=torch.float32, device=logp.device).index_add(0, rows, per_token)


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair sigmoid DPO loss (TRL ``loss_type="sigmoid"``), ``(B,)``."""
    x = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # (B,)
    return -(1 - label_smoothing) * F.logsigmoid(beta * x) - label_smoothing * F.logsigmoid(-beta * x)


# -- the reference model -------------------------------------------------------------------------
def _adapters_only(model: nn.Module) -> bool:
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    return bool(lora.lora_modules(model)) and all(".lora_A." in n or ".lora_B." in n for n in trained)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen snapshot of ``model`` that shares its frozen parameters and its buffers (they never
    change in training) and copies only what trains. Gradient-checkpointing wrappers
    (``sft.enable_gradient_checkpointing``) are undone in the copy: they close over the original layers."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers()) if not t.requires_grad}
    ref = copy.deepcopy(model, shared)
    for m in ref.modules():
        if m.__dict__.pop("_ckpt_wrapped", False):
            m.__dict__.pop("forward", None)
    ref.requires_grad_(False)
    return ref.eval()


def reference_model(model: nn.Module) -> nn.Module | None:
    """``None`` when the reference is ``model`` with its LoRA adapters disabled (only adapters train),
    else ``frozen_copy(model)``. Call before training starts: the reference is the starting model."""
    return None if _adapters_only(model) else frozen_copy(model)


# -- the loss ------------------------------------------------------------------------------------------
def _pairs(batch: Batch) -> int:
    rows = batch["input_ids"].shape[0]
    if rows % 2:
        raise TrainError(f"a DPO batch holds chosen and rejected rows in pairs; got {rows} rows")
    return rows // 2


def _valid_pairs(batch: Batch) -> torch.Tensor:
    """``(B,)`` bool: pairs whose chosen and rejected rows both keep a response token (``max_length``
    can cut one away entirely); the others are left out of the loss."""
    has = (batch["labels"][:, 1:] != IGNORE_INDEX).any(-1)  # (2B,)
    b = _pairs(batch)
    return has[:b] & has[b:]


class DPOLoss:
    """The DPO objective as a ``loop.Loss``: a micro-batch weighs its number of (usable) pairs, the
    loss is their mean. ``reference``: ``"auto"`` (``reference_model(model)``, taken now), ``None``
    (``model`` with adapters disabled) or a module."""

    def __init__(self, model: nn.Module, beta: float = 0.1, label_smoothing: float = 0.0, device: str = "cpu",
                 reference: nn.Module | None | str = "auto") -> None:
        if beta <= 0:
            raise TrainError(f"DPO beta must be > 0, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise TrainError(f"DPO label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.label_smoothing, self.device = beta, label_smoothing, device
        self.reference = reference_model(model) if isinstance(reference, str) else reference
        self._ref_device: Any = None

    def weight(self, batch: Batch) -> int:
        return int(_valid_pairs(batch).sum())

    @torch.no_grad()
    def reference_logps(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """``(2B,)`` reference log-probabilities (no gradient, eval mode)."""
        batch = sft._to(batch, self.device)
        if self.reference is not None:
            if self._ref_device != self.device:
                self.reference.to(self.device)
                self._ref_device = self.device
            return sequence_logps(self.reference, batch)
        was_training = model.training
        model.eval()
        try:
            with lora.adapters_disabled(model):
                return sequence_logps(model, batch)
        finally:
            model.train(was_training)

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b, ok = _pairs(batch), _valid_pairs(batch)
        ref = self.reference_logps(model, batch)  # (2B,)
        pol = sequence_logps(model, sft._to(batch, self.device))  # (2B,)
        ok = ok.to(pol.device)
        pc, pr, rc, rr = pol[:b][ok], pol[b:][ok], ref[:b][ok], ref[b:][ok]
        loss = dpo_losses(pc, pr, rc, rr, self.beta, self.label_smoothing).mean()
        chosen_r = self.beta * (pc - rc).detach()  # (B',)
        rejected_r = self.beta * (pr - rr).detach()
        logs = {"rewards/chosen": chosen_r.mean(), "rewards/rejected": rejected_r.mean(),
                "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
                "rewards/margins": (chosen_r - rejected_r).mean(),
                "logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()}
        return loss, logs


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: DPOLoss, batches: Iterable[Batch], autocast_dtype: torch.dtype | None = None,
             device: str = "cpu") -> dict[str, float]:
    """Pair-weighted mean loss and reward metrics over ``batches`` in eval mode."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    total = 0
    for b in batches:
        n = loss_fn.weight(b)
        if n == 0:
            continue
        with loop.autocast_context(device, autocast_dtype):
            loss, logs = loss_fn(model, b)
        for k, v in {"loss": loss, **logs}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        total += n
    model.train(was_training)
    return {k: v / max(total, 1) for k, v in sums.items()}


def train(model: nn.Module, train_data: Sequence, collate_fn: Callable[[list], Batch], cfg: TrainRecipe,
          optim: OptimRecipe, sched: ScheduleRecipe, dpo: DPORecipe | None = None, eval_data: Sequence | None = None,
          resume: bool = False, stop_at: int | None = None) -> loop.LoopResult:
    """Run (or resume) DPO until ``cfg.max_steps``: ``batch_size`` pairs per micro-batch. LoRA and
    freezing must already be applied to ``model``; the reference is taken here, before any step (a
    resumed run takes it before its checkpoint loads, so it is still the starting model)."""
    dpo = dpo or DPORecipe()
    loss_fn = DPOLoss(model, dpo.beta, dpo.label_smoothing, cfg.device)
    batches = sft.step_batches(train_data, collate_fn, cfg)  # batch_size pairs per micro-batch

    def evaluate_dpo(m: nn.Module) -> dict[str, float]:
        amp = loop.autocast_dtype(cfg.autocast, cfg.device)
        return evaluate(m, loss_fn, sft._eval_batches(eval_data, collate_fn, cfg.batch_size), amp, cfg.device)

    task = loop.Task(loss_fn, batches, evaluate_dpo if eval_data is not None else None)
    return loop.run(model, task, cfg, optim, sched, resume=resume, stop_at=stop_at, desc="dpo")


# -- recipes (``build.py``) --------------------------------------------------------------------------
def check_recipe(recipe: Recipe) -> None:
    """Errors of a DPO recipe found by reading only (``build.check_run``): the objective and the data
    format must agree, the preference files must exist, SFT-only options are refused."""
    d = recipe.data
    if recipe.train.objective != "dpo":
        if d.format == "preference":
            raise RecipeError("data.format: preference holds DPO pairs; set train.objective: dpo")
        return
    if d.format != "preference":
        raise RecipeError(f"train.objective: dpo needs data.format: preference (prompt/chosen/rejected pairs), "
                          f"got data.format: {d.format}")
    if d.mixture:
        raise RecipeError("data.mixture is not supported with train.objective: dpo; give one data.path")
    if recipe.replay.n:
        raise RecipeError("replay adds SFT samples; set replay.n: 0 with train.objective: dpo")
    if not d.path:
        raise RecipeError("train.objective: dpo needs data.path, a preference JSONL file")
    for key in ("path", "eval_path"):
        v = getattr(d, key)
        if v and not Path(v).is_file():
            raise RecipeError(f"data.{key}: no preference file {v}")
    if recipe.dpo.beta <= 0:
        raise RecipeError(f"dpo.beta must be > 0, got {recipe.dpo.beta}")
    if not 0.0 <= recipe.dpo.label_smoothing < 0.5:
        raise RecipeError(f"dpo.label_smoothing must be in [0, 0.5), got {recipe.dpo.label_smoothing}")


def build_data(recipe: Recipe, processor: Any) -> tuple[PreferenceDataset, PreferenceDataset | None, Callable]:
    """(train pairs, eval pairs or None, ``collate_pairs`` bound to the processor) of a DPO recipe."""
    d = recipe.data
    train_data = PreferenceDataset(load_preferences(d.path, d.limit), processor, d.system_prompt)
    eval_data = (PreferenceDataset(load_preferences(d.eval_path, d.limit), processor, d.system_prompt)
                 if d.eval_path else None)
    collate_fn = functools.partial(collate_pairs, pad_token_id=processor.tokenizer.pad_token_id,
                                   max_length=d.max_length, image_token_id=processor.image_token_id)
    return train_data, eval_data, collate_fn
