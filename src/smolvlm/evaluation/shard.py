"""Which part of a benchmark this process evaluates: one process, or one rank under ``torchrun``.

``torchrun --nproc-per-node K $(which smolvlm) eval ...`` starts K processes with ``RANK`` /
``WORLD_SIZE`` in the environment. Rank r evaluates rows ``r, r + K, r + 2K, ...`` of the
planned rows (interleaved, so every rank gets a similar mix), appends its predictions to its own
file, and waits at a barrier; rank 0 then merges the files and scores. The process group is
gloo on CPU, NCCL when the model is on CUDA; its timeout is long (``BARRIER_TIMEOUT``) because
ranks may finish minutes apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

BARRIER_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, position: int) -> bool:
        """Whether the ``position``-th planned row is this rank's."""
        return position % self.world == self.rank


def from_env() -> Shard:
    """The shard torchrun's environment describes (``RANK``, ``WORLD_SIZE``); one process otherwise."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"RANK / WORLD_SIZE must be integers, got {os.environ.get('RANK')!r} / "
                         f"{os.environ.get('WORLD_SIZE')!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return Shard(rank, world)


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
