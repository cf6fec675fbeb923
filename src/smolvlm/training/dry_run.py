"""``smolvlm train --dry-run``: what a recipe would train, without training or writing anything."""

from __future__ import annotations

import dataclasses
import tempfile

from torch import nn

from smolvlm.training import data as data_mod
from smolvlm.training.build import build_run
from smolvlm.training.recipe import Recipe


def param_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and frozen parameter counts (shared tensors once)."""
    seen, out = set(), {"trainable": 0, "frozen": 0}
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out["trainable" if p.requires_grad else "frozen"] += p.numel()
    return out


def memory_estimate(model: nn.Module) -> dict[str, float]:
    """MiB for the weights (all parameters and buffers: a quantized base's weights are buffers), the
    gradients and the AdamW states (exp_avg, exp_avg_sq) of the trainable parameters, in their
    dtypes; activations are not included (they depend on the batch)."""
    seen, weights, trainable = set(), 0, 0
    for p in [*model.parameters(), *model.buffers()]:
        if id(p) not in seen:
            seen.add(id(p))
            weights += p.numel() * p.element_size()
            trainable += p.numel() * p.element_size() if p.requires_grad else 0
    mib = 1024.0 ** 2
    out = {"weights": weights / mib, "grads": trainable / mib, "adamw": 2 * trainable / mib}
    out["total"] = sum(out.values())
    return out


def dry_run(recipe: Recipe) -> str:
    """``smolvlm train --dry-run``: build the model and the data as the run would (the processor files
    of a model built from parts go to a temporary folder), train nothing, write nothing. Returns the
    data summary, the trainable / frozen parameter counts and a memory estimate."""
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_run(dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, output_dir=tmp)))
    lines = []
    for split, ds in (("train", parts.train_data), ("eval", parts.eval_data)):
        n = len(ds) if ds is not None else 0
        samples = getattr(ds, "samples", None)
        if isinstance(samples, data_mod.SynthSamples):  # round-robin over the categories
            cats = samples.categories
            n_by = ", ".join(f"{c} {len(range(i, n, len(cats)))}" for i, c in enumerate(cats))
            lines.append(f"data {split}: {n} samples (synth: {n_by})")
        else:
            lines.append(f"data {split}: {n} samples")
    t = recipe.train
    step_samples = t.batch_size * t.grad_accum
    n_train = len(parts.train_data)
    lines.append(f"steps: {t.max_steps} x {step_samples} samples (batch_size {t.batch_size} x grad_accum "
                 f"{t.grad_accum}) = {t.max_steps * step_samples / max(n_train, 1):.2f} epochs")
    counts, mem = param_counts(parts.model), memory_estimate(parts.model)
    lines.append(f"parameters: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen")
    lines.append(f"memory estimate: {mem['total']:.1f} MiB (weights {mem['weights']:.1f} + grads {mem['grads']:.1f} "
                 f"+ AdamW states {mem['adamw']:.1f}; activations not included)")
    return "\n".join(lines) + "\n"
