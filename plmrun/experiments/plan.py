"""`plmrun plan`: per-GPU memory of a config under DDP and FSDP2, and the largest micro-batch that fits.

Model states are exact byte counts from the model built on the meta device (fp32 master weights and
gradients; Muon keeps one fp32 momentum per hidden matrix, Adam two moments per parameter). DDP keeps
everything on every GPU plus its gradient buckets (a second gradient copy); FSDP2 divides the states
by the number of GPUs and adds the unsharded working set: two blocks (the one computing and the one
prefetched) plus the root (embeddings, head) in the compute dtype, with their gradients in fp32.
Activations are an estimate of the tensors autograd saves per token (see `activation_bytes`); they
scale with the micro-batch token budget. 10% of the card is held back for the CUDA context, NCCL
buffers and allocator fragmentation. Measure a real run with torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass

import torch

from plmrun.config import Config, max_length_phases

GB = 1e9
RESERVED = 0.10


@dataclass
class Estimate:
    params: float
    grads: float
    optimizer: float
    working: float  # DDP: gradient buckets + autocast weight copies; FSDP2: unsharded blocks and root
    act_per_token: float  # activation bytes per token of the micro-batch, without checkpointing
    act_per_token_ckpt: float
    act_fixed_ckpt: float  # with checkpointing: one block's activations during recompute (per token)

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optimizer + self.working

    def total(self, tokens: int, checkpointing: bool) -> float:
        per = self.act_per_token_ckpt + self.act_fixed_ckpt if checkpointing else self.act_per_token
        return self.states + per * tokens

    def largest_budget(self, gpu_bytes: float, checkpointing: bool, multiple: int) -> int:
        """Largest token budget (a multiple of `multiple`) whose total fits in the usable memory; 0 if none."""
        per = self.act_per_token_ckpt + self.act_fixed_ckpt if checkpointing else self.act_per_token
        free = gpu_bytes * (1 - RESERVED) - self.states
        return max(0, int(free // per) // multiple * multiple)


def parameter_counts(cfg: Config) -> dict[str, int]:
    """Parameters by optimizer role (hidden / embed / head / scalar) and per block, built on the meta device."""
    return dict(_counts(tuple(sorted(vars(cfg.model).items()))))


@functools.lru_cache(maxsize=16)
def _counts(model_items: tuple) -> dict[str, int]:
    from plmrun.model.config import ModelConfig
    from plmrun.model.registry import build_model

    with torch.device("meta"):
        model = build_model(ModelConfig(**dict(model_items)))
    counts = {"hidden": 0, "embed": 0, "head": 0, "scalar": 0}
    named = dict(model.named_parameters())
    for name, kind in model.parameter_kinds().items():
        counts[kind] += named[name].numel()
    counts["total"] = sum(counts[k] for k in ("hidden", "embed", "head", "scalar"))
    counts["block"] = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    counts["root"] = counts["total"] - sum(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    return counts


def activation_bytes(cfg: Config, half: int) -> tuple[float, float]:
    """(bytes saved per token and block, bytes per token outside the blocks) for backward.

    Per block: the fp32 residual stream and the two pre-norm outputs (3 × 4·D), the x0 mix (4·D),
    and in the compute dtype q, k, v, the rotated q and k, the attention output and two input casts
    (8·D) plus the MLP's up projection, activation and its square (3·F). Attention kernels keep only
    O(heads) statistics per token. Outside: embedding output and x0 (8·D), the head's dense/GELU/norm
    (3·D·half + 4·D) and fp32 logits and their softmax at the 15% masked positions.
    """
    D = cfg.model.hidden_size
    F = round(D * cfg.model.expansion_ratio)
    per_block = 16 * D + half * (8 * D + 3 * F)
    outside = 8 * D + 3 * D * half + 4 * D + 0.15 * 2 * 4 * 33
    return per_block, outside


def estimate(cfg: Config, gpus: int, strategy: str, *, bf16: bool = True) -> Estimate:
    n = parameter_counts(cfg)
    P = n["total"]
    half = 2 if bf16 else 4
    opt = 8 * P if cfg.optim.optimizer == "adamw" else 4 * n["hidden"] + 8 * (P - n["hidden"])
    per_block, outside = activation_bytes(cfg, half)
    L = cfg.model.num_layers
    act = L * per_block + outside
    act_ckpt = L * 4 * cfg.model.hidden_size + outside  # block inputs only
    if strategy == "ddp":
        working = 4 * P * (gpus > 1) + (half * P if bf16 else 0)
        return Estimate(4 * P, 4 * P, opt, working, act, act_ckpt, per_block)
    shard = max(gpus, 1)
    working = (2 * n["block"] + n["root"]) * (half + 4)
    return Estimate(4 * P / shard, 4 * P / shard, opt / shard, working, act, act_ckpt, per_block)


def _gb(x: float) -> str:
    return f"{x / GB:9.2f}"


def plan_table(cfg: Config, gpus: int, gpu_mem_gb: float, *, name: str = "") -> str:
    bf16 = cfg.train.precision != "fp32"
    n = parameter_counts(cfg)
    T = cfg.data.token_budget
    est = {s: estimate(cfg, gpus, s, bf16=bf16) for s in ("ddp", "fsdp")}
    lines = [
        f"plan {name}: {n['total'] / 1e9:.3f}B parameters ({n['hidden'] / 1e9:.3f}B in hidden matrices), "
        f"{gpus} GPU(s) × {gpu_mem_gb:g} GB, {'bf16 autocast' if bf16 else 'fp32'}, {cfg.optim.optimizer}, "
        f"micro-batch {T} tokens per GPU",
        f"{'per GPU, GB':<44}{'DDP':>9}{'FSDP2':>10}",
    ]
    rows = [
        ("params (fp32 master)", lambda e: e.params),
        ("grads (fp32)", lambda e: e.grads),
        ("optimizer states", lambda e: e.optimizer),
        ("working set (DDP buckets / FSDP2 unsharded)", lambda e: e.working),
        (f"activations @ {T} tokens", lambda e: e.act_per_token * T),
        (f"activations @ {T} tokens, checkpointed", lambda e: (e.act_per_token_ckpt + e.act_fixed_ckpt) * T),
        ("total", lambda e: e.total(T, False)),
        ("total, checkpointed", lambda e: e.total(T, True)),
    ]
    for label, f in rows:
        lines.append(f"{label:<44}{_gb(f(est['ddp']))} {_gb(f(est['fsdp']))}")
    longest = max(n for _, n in max_length_phases(cfg.data))  # a crop schedule's longest phase must fit
    mult = 1024 if longest <= 1024 else longest
    for ck in (False, True):
        fits = []
        for s in ("ddp", "fsdp"):
            b = est[s].largest_budget(gpu_mem_gb * GB, ck, mult)
            fits.append(f"{b:,}" if b >= longest else "does not fit")
        label = "largest token budget" + (", checkpointed" if ck else "")
        lines.append(f"{label:<44}{fits[0]:>9} {fits[1]:>9}")
    lines.append(f"(usable memory: {100 * (1 - RESERVED):.0f}% of the card; activations are an estimate)")
    return "\n".join(lines)


def add_plan_command(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="per-GPU memory for DDP vs FSDP2 and the largest micro-batch that fits",
        description="Estimate per-GPU memory of a config (params, grads, optimizer states, "
        "activations with and without checkpointing) under DDP and FSDP2.",
    )
    p.add_argument("--config", required=True, help="YAML config file or shipped config name")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs (data-parallel ranks)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GB")
    p.set_defaults(func=_cmd_plan, takes_overrides=True)


def _cmd_plan(args: argparse.Namespace, overrides) -> int:
    from plmrun.config import ConfigError, build_config

    if args.gpus < 1 or args.gpu_mem <= 0:
        raise ConfigError("--gpus must be >= 1 and --gpu-mem > 0")
    cfg = build_config(args.config, overrides)
    print(plan_table(cfg, args.gpus, args.gpu_mem, name=args.config))
    return 0
