"""Data-parallel training under ``torchrun``: which process this is, barriers, means over processes.

Every process holds a full replica; ``DistributedDataParallel`` averages gradients, so the replicas stay
identical (``loop.fit`` checks this with a digest of the parameters at the end).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Dist"]


@dataclass
class Dist:
    """Where this process sits in a ``torchrun`` job (world 1 without one)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(td.get_rank(), td.get_world_size())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as td

            t = t.clone()
            td.all_reduce(t)
            t /= self.world
        return t

    def gather(self, obj) -> list:
        """``obj`` from every process, in rank order (``[obj]`` without torchrun)."""
        if self.world <= 1:
            return [obj]
        import torch.distributed as td

        out: list = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` for the forward / backward pass: under DistributedDataParallel when there are replicas."""
        if self.world <= 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, broadcast_buffers=False)
