"""Multi-process training under ``torchrun``: DDP replicas or FSDP2 shards (``train.distributed``).

One machine, K processes (gloo on CPU, NCCL with ``train.device: cuda``; each process takes the GPU of
its ``LOCAL_RANK``)::

    torchrun --nproc-per-node K $(which smolvlm) train --recipe configs/finetune-lora.yaml

Several machines: run the same command on every node (``HOST`` is one of them, reachable from all;
any free port)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        $(which smolvlm) train --recipe configs/finetune-lora.yaml

The run is the run of one process with the same recipe: ``train.batch_size`` (and ``grad_accum``)
stay the global batch of an optimizer step. Each micro-batch's samples are dealt out over the ranks
(rank r takes samples r, r+K, r+2K, ... of it: ``shard``), and the loop (``loop.train_step``) weighs
every rank's loss by its target tokens over the target tokens of *all* ranks (all-reduced), times K
because DDP and FSDP2 average gradients over the ranks: the summed gradient is the one-process
gradient, up to float32 reduction order. With dropout the ranks draw other masks than one process
would (rank r seeds ``train.seed + r``), so such a run is the same in distribution, not bitwise.

``ddp`` keeps a full replica per rank and all-reduces gradients once per optimizer step (earlier
micro-batches under ``no_sync``). ``fsdp`` applies FSDP2 ``fully_shard`` to every transformer layer
(children of ``*.layers``) and then to the root, for models whose weights, gradients and optimizer
states do not fit on one device; the model may be built on CPU, ``fully_shard`` moves each rank's
shards to its device. Only rank 0 writes (metrics, plots, TensorBoard, checkpoints, ``final/``,
``adapter/``, processor files, stage-1 and replay caches); the others wait at a barrier. Checkpoints
hold full tensors gathered on rank 0 in the one-process layout (``checkpoint.py``), and a resume
reads them on rank 0 and broadcasts them, so nodes need not share a file system for checkpoints;
stage 1 (``vision_pretrain``) and the replay data are made by rank 0 alone and then read from
``train.output_dir`` by the others, which must therefore see that folder.

Limits: under ``fsdp`` every rank must use the same trainable parameters in each micro-batch (a
trainable vision tower with some micro-batches of text-only samples would hang), and
``freeze.train_added_tokens`` (a parametrization) is not supported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from smolvlm import torchrun as _shard
from smolvlm.training.optim import TrainError

_local = False  # inside ``rank0_first``: each process works as if it were alone


@dataclass(frozen=True)
class Context:
    """This process's place in the run: rank and world size (1: a plain one-process run)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _dist():
    import torch.distributed as dist

    return dist


def current() -> Context:
    """The running process group's rank / world size; one process when there is none (or inside ``rank0_first``)."""
    dist = _dist()
    if _local or not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(dist.get_rank(), dist.get_world_size())


def setup(device: str = "cpu") -> Context:
    """Join torchrun's process group once (``WORLD_SIZE`` > 1): gloo on CPU, NCCL for ``cuda`` with
    this process on GPU ``LOCAL_RANK``. No-op (and no process group) for one process."""
    if _local:
        return Context()
    env = _shard.from_env()
    if env.world == 1:
        return Context()
    dist = _dist()
    if not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            if str(device) != "cuda":
                raise TrainError(f"train.device {device!r}: under torchrun use 'cuda' (each process takes the GPU "
                                 f"of its LOCAL_RANK)")
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=_shard.BARRIER_TIMEOUT)
    return current()


def close() -> None:
    """Leave the process group (end of a run)."""
    dist = _dist()
    if not _local and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _dist().get_backend() == "nccl" else torch.device("cpu")


# -- collectives (no-ops for one process) ----------------------------------------------------------
def shard(items: Sequence[Any]) -> list[Any]:
    """This rank's share of one micro-batch's samples: items r, r+K, r+2K, ..."""
    c = current()
    if not c.active:
        return list(items)
    if len(items) < c.world:
        raise TrainError(f"a micro-batch of {len(items)} samples cannot be split over {c.world} processes; "
                         f"set train.batch_size >= {c.world}")
    return list(items[c.rank::c.world])


def barrier() -> None:
    if current().active:
        _dist().barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled)."""
    if not current().active:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not current().active:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    _dist().all_reduce(t)
    return t.tolist()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    c = current()
    if not c.active:
        return [obj]
    out: list[Any] = [None] * c.world
    _dist().all_gather_object(out, obj)
    return out


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Rank 0's named tensors on every rank (on CPU), one broadcast per tensor."""
    if not current().active:
        return dict(tensors or {})
    meta = broadcast({n: (tuple(t.shape), t.dtype) for n, t in tensors.items()} if tensors is not None else None)
    dev, out = _comm_device(), {}
    for n, (shape, dtype) in meta.items():
        t = tensors[n].to(dev) if current().is_main else torch.empty(shape, dtype=dtype, device=dev)
        _dist().broadcast(t, src=0)
        out[n] = t.cpu()
    return out


@contextlib.contextmanager
def rank0_first() -> Iterator[bool]:
    """Rank 0 runs the block first, alone (the others wait at a barrier), then the others run it;
    inside, every process works as a single process (no collectives, writes allowed). Yields
    whether this is rank 0: the block makes a file there and reads it elsewhere."""
    global _local
    c = current()
    if not c.active:
        yield True
        return
    if not c.is_main:
        _dist().barrier()
    prev, _local = _local, True
    try:
        yield c.is_main
    finally:
        _local = prev
    if c.is_main:
        _dist().barrier()


# -- wrapping -----------------------------------------------------------------------------------------
def wrap(model: nn.Module, mode: str, device: str) -> nn.Module:
    """``ddp``: a DistributedDataParallel replica (``model`` must already be on ``device``);
    ``fsdp``: FSDP2 ``fully_shard`` on each child of every ``*.layers`` ModuleList, then on the root
    (in place; returns ``model``)."""
    dev = torch.device(device)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # unused parameters are allowed: a micro-batch of text-only samples leaves the vision tower idle
        return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if dev.type == "cuda" else None,
                                       find_unused_parameters=True)
    if mode != "fsdp":
        raise TrainError(f"train.distributed must be 'ddp' or 'fsdp', got {mode!r}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.utils import parametrize

    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise TrainError("train.distributed: fsdp does not support freeze.train_added_tokens (a parametrization); "
                         "use ddp")
    mesh = init_device_mesh(dev.type, (current().world,))
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] == "layers":
            for layer in mod:
                fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 modules are their own)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Accumulate gradients locally (``sync`` False: an earlier micro-batch of the step) or reduce
    them over the ranks in this backward (the last micro-batch)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
        return
    if _is_fsdp(model):
        model.set_requires_gradient_sync(sync)
    yield


def reshard(model: nn.Module) -> None:
    """After a forward without backward (evaluation): FSDP2 keeps the root's parameters gathered
    for the backward that never comes; put the shards back (the optimizer holds those)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_value(t: Any) -> Any:
    """A DTensor's full value (a collective); anything else as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# -- checkpoint state ------------------------------------------------------------------------------
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full trainable parameters on rank 0 (CPU; ``{}`` elsewhere). Under FSDP a collective."""
    main, out = current().is_main, {}
    for n, p in unwrap(model).named_parameters():
        if p.requires_grad:
            t = full_value(p.detach())
            if main:
                out[n] = t.cpu().contiguous()
    return out


def _param_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: index i of ``optimizer.state_dict()`` is name i."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The optimizer state in ``optimizer.state_dict()`` layout on rank 0 (None elsewhere); under
    FSDP gathered to full tensors (a collective)."""
    if not _is_fsdp(model):
        return optimizer.state_dict() if current().is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not current().is_main:
        return None
    index = {n: i for i, n in enumerate(_param_order(model, optimizer))}
    return {"state": {index[n]: s for n, s in full["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in full["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any] | None) -> None:
    """Load rank 0's ``saved`` (``optimizer.state_dict()`` layout; None on the other ranks) on every rank."""
    if not _is_fsdp(model):
        optimizer.load_state_dict(broadcast(saved))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    full: dict[str, Any] = {}
    if current().is_main:
        order = _param_order(model, optimizer)
        full = {"state": {order[i]: s for i, s in saved["state"].items()},
                "param_groups": [dict(g, params=[order[i] for i in g["params"]]) for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def gather_to_main(model: nn.Module) -> None:
    """End of an FSDP run: rank 0's ``model`` becomes a plain module again holding the full trained
    weights on CPU (to export ``final/``); the other ranks keep their shards. A collective."""
    if not _is_fsdp(model):
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not current().is_main:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            state = m._get_fsdp_state()
            for h in {id(h): h for h in (state._pre_forward_hook_handle, state._post_forward_hook_handle)}.values():
                h.remove()
            m.__class__ = type(m).__mro__[type(m)._orig_cls_mro_index]
    with torch.no_grad():
        for name, p in list(model.named_parameters()):
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._parameters[attr] = nn.Parameter(full[name], requires_grad=p.requires_grad)
        for name, b in list(model.named_buffers()):
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = b.detach().cpu()


# -- Ctrl-C ----------------------------------------------------------------------------------------------
class InterruptFlag:
    """While active, SIGINT (Ctrl-C, or torchrun passing it on) only sets ``raised``; the loop
    checks it over all ranks after each step, so every rank stops at the same step and saves
    together (a KeyboardInterrupt in the middle of a collective would hang the others)."""

    def __init__(self) -> None:
        self.raised = False
        self._prev: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __enter__(self) -> "InterruptFlag":
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
