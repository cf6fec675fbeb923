"""torchrun's environment: which process of how many this is (imports nothing of ours).

``torchrun --nproc-per-node K ...`` starts K processes with ``RANK`` / ``WORLD_SIZE`` set; evaluation
(``evaluation/shard.py``) and training (``training/distributed.py``) both read them here.
``BARRIER_TIMEOUT`` is long because ranks may finish their share minutes apart.
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
