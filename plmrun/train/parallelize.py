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

from plmrun.config import Config, ConfigError
from plmrun.device import resolve_device


@dataclass
class DistEnv:
    world_size: int
    rank: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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
        timeout = timedelta(seconds=int(os.environ.get("PLMRUN_DIST_TIMEOUT", "300")))
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        # torchrun keeps its store across --max-restarts: without a per-attempt prefix the restarted ranks
        # read the dead attempt's gloo/NCCL addresses and fail with "Connection refused" (pytorch#167288).
        store = dist.PrefixStore(f"plmrun/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return DistEnv(world, rank, local_rank, device)


def leave_distributed() -> None:
    """Destroy the process group before the interpreter exits: left to exit, gloo's background threads
    can be torn down while still joinable and abort a finished rank ("terminate called without an
    active exception", after a torchrun restart)."""
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()  # the run's FSDP/DDP modules hold the group in reference cycles: free them now, not at exit
        dist.destroy_process_group()


def native_bf16(device: torch.device) -> bool:
    """Whether this device multiplies bf16 matrices in hardware: a CUDA GPU that supports bf16, or a
    CPU for which oneDNN has bf16 kernels (AVX-512 / AMX). Elsewhere (e.g. AVX2-only CPUs) bf16
    matmuls are emulated, tens of times slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision as run: 'auto' is bf16 where bf16 matmuls are native (native_bf16), else fp32."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast (fp32 master weights) when the resolved precision is bf16, else None (fp32)."""
    return torch.bfloat16 if resolve_precision(cfg.train.precision, device) == "bf16" else None


def matmul_dtypes(cfg: Config, device: torch.device) -> list[torch.dtype]:
    """The dtypes this run's matmuls run in: the autocast dtype (or fp32), plus float8 under train.fp8;
    the MFU peak is the fastest of them (peak.run_peak)."""
    return [autocast_dtype(cfg, device) or torch.float32] + [torch.float8_e4m3fn] * cfg.train.fp8


def parallelize(model: nn.Module, cfg: Config, env: DistEnv) -> nn.Module:
    """Apply float8 linears, activation checkpointing, FSDP2 or DDP, then torch.compile, in that order.

    With dist.meta_init the model arrives on the meta device: it is sharded first, then its
    (sharded) storage is allocated on the device and initialised, before DDP broadcasts it.
    """
    plm = model
    blocks = model.blocks  # every PLM names its repeated blocks `blocks`
    if cfg.train.fp8:
        convert_to_float8(blocks, cfg, env.device)
    if cfg.dist.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)
    if env.world_size > 1 and cfg.dist.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = None
        if env.device.type == "cuda" and autocast_dtype(cfg, env.device) is not None:
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs = {"mp_policy": mp} if mp is not None else {}
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
    if cfg.dist.meta_init:
        model.materialize(env.device)  # the constructor's own init, on the (sharded) storage
    if env.world_size > 1 and cfg.dist.strategy != "fsdp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if cfg.train.compile:
        # Per block, in place (parameter names unchanged), static shapes: the micro-batch is always
        # token_budget tokens; data-dependent attention backends stay eager inside the block.
        for block in blocks:
            block.compile(dynamic=False)
        if env.device.type == "cpu":
            plm.use_compiled_cpu_attention()
    return model


FP8_MULTIPLE = 16
"Float8 matmul kernels (torch._scaled_mm) need both dimensions of a weight to be multiples of this."


def convert_to_float8(blocks: nn.ModuleList, cfg: Config, device: torch.device) -> int:
    """train.fp8: every nn.Linear of the blocks whose dimensions are multiples of FP8_MULTIPLE becomes
    torchao's Float8Linear, in place (dynamic per-tensor scales: inputs and weights cast to e4m3, output
    gradients to e5m2). Its weight stays the same fp32 parameter, so parameter names, the optimizer,
    checkpoints and exports are those of a bf16 run; the embeddings and the LM head stay in bf16, as do
    the layers left out. Returns how many layers were converted."""
    if resolve_precision(cfg.train.precision, device) != "bf16":
        raise ConfigError(
            f"train.fp8=true needs bf16 for the other matmuls, but train.precision={cfg.train.precision} "
            f"runs fp32 on this {device.type} (its bf16 matmuls are emulated); set train.precision=bf16 or "
            "train.fp8=false"
        )
    convert = _import_float8()
    eligible = lambda mod, fqn: isinstance(mod, nn.Linear) and all(d % FP8_MULTIPLE == 0 for d in mod.weight.shape)
    before = sum(isinstance(m, nn.Linear) for m in blocks.modules())
    convert(blocks, module_filter_fn=eligible)
    after = sum(type(m) is nn.Linear for m in blocks.modules())
    converted = before - after
    if converted == 0:
        raise ConfigError(
            f"train.fp8=true: no linear layer of the blocks has both dimensions a multiple of {FP8_MULTIPLE} "
            "(model.hidden_size and the MLP width), so nothing would run in float8"
        )
    return converted


def _import_float8():
    """torchao's convert_to_float8_training, imported quietly: on a machine without CUDA its import
    logs a warning per CUDA kernel library it cannot load, which says nothing about float8 training."""
    import logging

    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise ConfigError(f"train.fp8=true needs torchao ({e}): pip install 'plmrun[fp8]'") from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return convert_to_float8_training


def unwrap(model: nn.Module) -> nn.Module:
    """The plain PLM under DDP / torch.compile wrappers (FSDP2 modifies the module in place)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
