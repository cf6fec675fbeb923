"""Atomic training checkpoints and exact resume.

A checkpoint is a folder ``<root>/step-00000012/`` holding

* ``trainable.safetensors`` - every parameter with ``requires_grad`` (LoRA adapters included),
* ``optimizer.pt``          - ``optimizer.state_dict()``,
* ``trainer_state.json``    - step, samples seen (= data-order position), scheduler state,
  a fingerprint of the frozen parameters, free-form loop state,
* ``rng.json``              - python, numpy and torch (CPU + CUDA) generator states,
* ``rng-ranks.json``        - (multi-process runs) every rank's generator states, in rank order.

Multi-process runs (``distributed.py``) save from rank 0 what the ranks gathered there (the full
trainable tensors and optimizer state, even when FSDP2 shards them) in this same layout, so a
checkpoint resumes under one process, DDP or FSDP alike.

Frozen parameters are not stored: resume rebuilds the model from its recipe (same base weights,
same seeded init) and checks the fingerprint, so a changed base is a loud error instead of a
silently different run. Writes go to a hidden temp folder that is fsync'ed and then renamed, so
a run killed mid-save never leaves a half checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

PREFIX = "step-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
RNG_RANKS_FILE = "rng-ranks.json"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model/run being resumed."""


# -- RNG --------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """All generator states as JSON-able data (python, numpy, torch CPU, torch CUDA)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(s: dict[str, Any]) -> None:
    v, st, gauss = s["python"]
    random.setstate((v, tuple(st), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(x, dtype=torch.uint8) for x in s["cuda"]])


# -- model tensors ------------------------------------------------------------------------------
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def frozen_fingerprint(model: nn.Module) -> list[float]:
    """Cheap identity of the frozen weights: count, float64 sum and sum of squares."""
    s = s2 = 0.0
    n = 0
    with torch.no_grad():
        for _, p in model.named_parameters():
            if not p.requires_grad:
                x = p.detach().double()
                s += float(x.sum())
                s2 += float((x * x).sum())
                n += x.numel()
    return [float(n), s, s2]


# -- files ----------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temp folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: str | Path) -> Path | None:
    ck = list_checkpoints(root)
    return ck[-1] if ck else None


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any, state: dict[str, Any], keep_last: int = 2, *,
                    tensors: dict[str, torch.Tensor] | None = None, optim_state: dict[str, Any] | None = None,
                    fingerprint: list[float] | None = None, rng_ranks: list[dict[str, Any]] | None = None) -> Path:
    """Write the checkpoint for ``step`` atomically and keep only the newest ``keep_last``.

    By default everything comes from the live objects; a multi-process run passes what it gathered
    instead: ``tensors`` (trainable parameters), ``optim_state`` (``optimizer.state_dict()`` layout),
    ``fingerprint`` (of the frozen weights, taken before sharding) and ``rng_ranks`` (every rank's
    generator states; rank 0's also go to ``rng.json``)."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(trainable_state(model) if tensors is None else tensors, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict() if optim_state is None else optim_state, tmp / "optimizer.pt")
    full_state = dict(state, step=step, scheduler=scheduler.state_dict() if scheduler is not None else None,
                      frozen_fingerprint=frozen_fingerprint(model) if fingerprint is None else fingerprint)
    (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1))
    (tmp / "rng.json").write_text(json.dumps(rng_state() if rng_ranks is None else rng_ranks[0]))
    if rng_ranks is not None and len(rng_ranks) > 1:
        (tmp / RNG_RANKS_FILE).write_text(json.dumps(rng_ranks))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # re-saving the same step (e.g. final save == periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def clean_temp(root: str | Path) -> None:
    """Remove half-written temp folders left by a killed run."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def read_state(path: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint (an error if ``path`` is not one)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint (no {STATE_FILE})")
    return json.loads((path / STATE_FILE).read_text())


def read_trainable(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "trainable.safetensors"))


def read_optimizer(path: str | Path, map_location: Any = None) -> dict[str, Any]:
    return torch.load(Path(path) / "optimizer.pt", weights_only=True, map_location=map_location)


def read_rng(path: str | Path) -> list[dict[str, Any]]:
    """Generator states by rank: every rank's for a multi-process checkpoint, else ``[rank 0's]``."""
    path = Path(path)
    if (path / RNG_RANKS_FILE).is_file():
        return json.loads((path / RNG_RANKS_FILE).read_text())
    return [json.loads((path / "rng.json").read_text())]


def check_fingerprint(path: str | Path, fp: list[float], want: list[float]) -> None:
    """The frozen weights are the ones the checkpoint was trained on (relative tolerance 1e-9 on
    float64 sums: the same tensors give bit-identical sums; any changed base weight moves them far more)."""
    if fp[0] != want[0] or any(abs(a - b) > 1e-9 * max(1.0, abs(b)) for a, b in zip(fp[1:], want[1:])):
        raise CheckpointError(f"checkpoint {path}: frozen weights differ from the ones it was trained on "
                              f"(fingerprint {fp} != {want}); rebuild the model from the same recipe")


def check_names(path: str | Path, model: nn.Module, saved: dict[str, Any]) -> None:
    """The saved tensors are exactly ``model``'s trainable parameters, by name."""
    live = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(live - set(saved)), sorted(set(saved) - live)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model's trainable parameters: "
                              f"{len(missing)} missing: {', '.join(missing[:5])}; "
                              f"{len(unexpected)} unexpected: {', '.join(unexpected[:5])}")


def apply_trainable(path: str | Path, model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into ``model``'s trainable parameters (names and shapes checked)."""
    check_names(path, model, saved)
    params = dict(model.named_parameters())
    live = [n for n, p in params.items() if p.requires_grad]
    for n in live:
        if saved[n].shape != params[n].shape:
            raise CheckpointError(f"{n}: checkpoint shape {tuple(saved[n].shape)} != model {tuple(params[n].shape)}")
    with torch.no_grad():
        for n in live:
            params[n].copy_(saved[n])


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any, restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` into live objects; returns trainer state.

    Strict: the trainable parameter names must equal the saved ones, and the frozen weights must
    have the saved fingerprint (``check_fingerprint``)."""
    path = Path(path)
    state = read_state(path)
    saved = read_trainable(path)
    check_names(path, model, saved)
    check_fingerprint(path, frozen_fingerprint(model), state["frozen_fingerprint"])
    apply_trainable(path, model, saved)
    if optimizer is not None:
        optimizer.load_state_dict(read_optimizer(path))
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(read_rng(path)[0])
    return state
