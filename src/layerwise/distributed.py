"""Running under ``torchrun`` (or ``accelerate launch``): one process per device, rows shared.

Each rank loads the model on its own device (``cuda:<local rank>``, or the CPU with the gloo
backend), evaluates every world-th batch of rows, and hands its batches to rank 0 with
``torch.distributed.gather_object``. Rank 0 joins them in batch order — the batches are the same as
in one process, so the results are byte for byte those of one process (minus timing) — computes
the metrics (corpus BLEU needs every row) and writes results and report once.

A model too large for one device: give each rank a group of devices with ``--device-map`` (e.g.
2 ranks × 4 GPUs: ``CUDA_VISIBLE_DEVICES`` per rank, or ``--device-map auto`` inside each rank's
visible devices); the rows are shared between the groups.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Shard:
    rank: int
    world: int
    local_rank: int
    backend: str

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank 0; None on the other ranks."""
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def device(self, requested: str) -> str:
        """The device this rank uses: its own GPU under ``auto``/``cuda``, else what was asked."""
        import torch

        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return "cpu" if requested == "auto" else requested

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def from_env() -> Shard | None:
    """The process group torchrun describes in the environment (``WORLD_SIZE`` > 1), or None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    import datetime

    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))
    return Shard(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, backend=backend)
