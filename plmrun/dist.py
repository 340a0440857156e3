"""The few collective helpers every layer needs, in one place: rank, world size, barrier and reductions.

Each one is a no-op (or the identity) in a single process, so library code calls them without
asking whether torchrun started it. Joining and leaving the process group stays in
plmrun/train/parallelize.py: only the trainer does that.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks. NCCL only reduces CUDA tensors: CPU bookkeeping tensors make a round trip."""
    if is_distributed():
        if t.device.type == "cpu" and dist.get_backend() == "nccl":
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t)
    return t


def max_over_ranks(n: int, device: torch.device | str = "cpu") -> int:
    """The largest `n` any rank holds (collective)."""
    if not is_distributed():
        return n
    t = torch.tensor([n], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def agree(message: str | None) -> str | None:
    """The first rank's non-empty message, on every rank (collective), so all ranks raise the same line together."""
    if not is_distributed():
        return message
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, message)
    return next((m for m in out if m), None)
