"""Distribution, compilation and activation checkpointing, applied to an already built model.

The model file knows nothing of this (torchtitan's split). Under torchrun we run DDP or FSDP2
(`fully_shard` per block, then the root); NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from plmrun.config import Config


@dataclass
class DistEnv:
    world_size: int
    rank: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg: Config) -> DistEnv:
    """Join the torchrun process group if launched by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.train.device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # A short timeout so a dead rank brings the job down instead of hanging for 30 minutes.
        dist.init_process_group(backend, timeout=timedelta(seconds=int(os.environ.get("PLMRUN_DIST_TIMEOUT", "300"))))
    return DistEnv(world, rank, local_rank, device)


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast (fp32 master weights) unless precision is fp32."""
    if cfg.train.precision == "fp32":
        return None
    return torch.bfloat16


def parallelize(model: nn.Module, cfg: Config, env: DistEnv) -> nn.Module:
    """Apply activation checkpointing, FSDP2 or DDP, then torch.compile, in that order."""
    if cfg.dist.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block)
    if env.world_size > 1:
        if cfg.dist.strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            mp = None
            if env.device.type == "cuda" and cfg.train.precision != "fp32":
                mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            kwargs = {"mp_policy": mp} if mp is not None else {}
            for block in model.blocks:
                fully_shard(block, **kwargs)
            fully_shard(model, **kwargs)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if cfg.train.compile:
        model = torch.compile(model, dynamic=False)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain PLM under DDP / torch.compile wrappers (FSDP2 modifies the module in place)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t
