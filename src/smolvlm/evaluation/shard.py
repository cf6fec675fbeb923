"""Which part of a benchmark this process evaluates: one process, or one rank under ``torchrun``.

``torchrun --nproc-per-node K $(which smolvlm) eval ...`` starts K processes with ``RANK`` /
``WORLD_SIZE`` in the environment. Rank r evaluates rows ``r, r + K, r + 2K, ...`` of the
planned rows (interleaved, so every rank gets a similar mix), appends its predictions to its own
file, and waits at a barrier; rank 0 then merges the files and scores. The process group is
gloo on CPU, NCCL when the model is on CUDA; its timeout is long (``BARRIER_TIMEOUT``) because
ranks may finish minutes apart.
"""

from __future__ import annotations

from smolvlm.torchrun import BARRIER_TIMEOUT, Shard, from_env

__all__ = ["BARRIER_TIMEOUT", "Shard", "barrier", "close", "from_env", "init"]


def init(shard: Shard, device: str = "cpu") -> None:
    """Join the process group (no-op for one process)."""
    if shard.world == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend, rank=shard.rank, world_size=shard.world, timeout=BARRIER_TIMEOUT)


def barrier(shard: Shard) -> None:
    if shard.world > 1:
        import torch.distributed as dist

        dist.barrier()


def close(shard: Shard) -> None:
    if shard.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
