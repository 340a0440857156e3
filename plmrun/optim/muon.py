"""Muon: momentum, then Newton–Schulz orthogonalisation, for the hidden 2-D weight matrices.

Why our own and not `torch.optim.Muon` (torch 2.13): that one always runs Newton–Schulz in bf16
(no fp32 path for exact tests), orthogonalises whatever local tensor it holds — under FSDP2 a
row shard, whose orthogonalisation is a different, wrong update — and every data-parallel rank
repeats all of the Newton–Schulz work. This one
  * orthogonalises the FULL matrix under FSDP2: DTensor updates are gathered (`full_tensor`),
    orthogonalised, and each rank applies its own shard of the result;
  * spreads the work under DDP and FSDP2: matrices are sorted by size and dealt out in rounds of
    `world` matrices, matrix i of a round to rank i; the owner orthogonalises it and one
    all-gather per round gives every rank every result. Any world size and any number or shape
    of matrices works (the last round may be partial; the seed asserted even splits and crashed);
  * runs Newton–Schulz in `ns_dtype`: bf16 where bf16 matmuls are native (the trainer's choice),
    fp32 elsewhere and for exact comparisons; with `ns_coefficients` quintic or polar_express.

Update of a weight W (rows × cols) with gradient G, momentum μ, learning rate η, decay λ:
    B ← μ·B + (1−μ)·G                   momentum buffer as an EMA, so it stays in gradient units
    U ← (1−μ)·G + μ·B  (Nesterov)  or  U ← B
    O ← NS(U)                           ≈ the orthogonal factor of U's SVD (see newton_schulz)
    W ← (1 − η·λ)·W − η·sqrt(max(1, rows/cols))·O
The shape factor is Keller Jordan's original one (torch's adjust_lr_fn="original"): it makes the
update's RMS 1/sqrt(cols), i.e. 1/sqrt(fan_in) for nn.Linear weights [out, in], for every shape.
Requirement in a process group: gradients are identical on every rank (DDP after its all-reduce)
or DTensors (FSDP2), and every rank steps the same parameters.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from plmrun.dist import get_rank, get_world_size

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel et al. 2025, arXiv 2505.16932; modded-nanogpt's 5-step schedule with its 2%
# safety factor): one (a, b, c) per iteration. Only the whole schedule ends near 1: cut after 4 or 3
# steps it leaves singular values up to 1.6 / 1.9 (a 48×16 Gaussian matrix), so it takes 5 steps.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NS_SCHEDULES = ("quintic", "polar_express")


def ns_schedule(coefficients: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of `steps` iterations for `coefficients` ('quintic' or 'polar_express')."""
    if coefficients == "quintic":
        return [NS_COEFFICIENTS] * steps
    if coefficients == "polar_express" and steps == len(POLAR_EXPRESS_COEFFICIENTS):
        return list(POLAR_EXPRESS_COEFFICIENTS)
    raise ValueError(f"Newton-Schulz coefficients {coefficients!r} with {steps} steps: expected one of "
                     f"{', '.join(NS_SCHEDULES)}, polar_express with exactly {len(POLAR_EXPRESS_COEFFICIENTS)} steps")


def newton_schulz(g: torch.Tensor, steps: int, dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7,
                  coefficients: str = "quintic") -> torch.Tensor:
    """Quintic Newton–Schulz iteration towards U·Vᵀ of g = U·S·Vᵀ; returns a `dtype` tensor.

    Each step maps every singular value s to a·s + b·s³ + c·s⁵ after dividing g by its Frobenius
    norm (so s ≤ 1); the quintic coefficients push small s up fast at the price of not converging
    exactly to 1; polar_express changes (a, b, c) per step and lands closer to 1 in as many steps.
    Works on the wide orientation so the Gram matrix X·Xᵀ is the small one. g may be a stack
    [..., rows, cols] of same-shape matrices: one batched matmul per product instead of one per
    matrix, each matrix normalised on its own (on CPU bitwise equal to one call per matrix).
    """
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    if coefficients == "polar_express":
        norm = norm * (1 + 2e-2)  # its safety factor: the schedule assumes s ≤ 1/1.02
    x = x / (norm + eps)
    mm = torch.addmm if x.ndim == 2 else torch.baddbmm
    for a, b, c in ns_schedule(coefficients, steps):
        gram = x @ x.mT
        poly = mm(gram, gram, gram, beta=b, alpha=c)  # b·A + c·A²
        x = mm(x, poly, x, beta=a)  # a·X + (b·A + c·A²)·X
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters (plain tensors or FSDP2 DTensors); see the module docstring."""

    def __init__(self, params, lr: float, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_dtype: torch.dtype = torch.bfloat16,
                 ns_coefficients: str = "quintic"):
        ns_schedule(ns_coefficients, ns_steps)  # refuse an unknown schedule here, not at the first step
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        ns_coefficients=ns_coefficients)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = get_rank(), get_world_size()
        work = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        work.sort(key=lambda pg: -pg[0].numel())  # stable: equal sizes keep group order on every rank
        for start in range(0, len(work), world):
            self._round(work[start:start + world], rank, world)
        return loss

    def _round(self, items: list, rank: int, world: int) -> None:
        """Orthogonalise up to `world` matrices, matrix i on rank i, and apply all of them."""
        full = [_full(self._momentum_update(p, group)) for p, group in items]
        ns = [dict(steps=group["ns_steps"], coefficients=group["ns_coefficients"], dtype=self.ns_dtype)
              for _, group in items]
        if world == 1:
            outs = [newton_schulz(u, **kw) for u, kw in zip(full, ns)]
        else:
            size = max(u.numel() for u in full)
            mine = torch.zeros(size, dtype=self.ns_dtype, device=full[0].device)
            if rank < len(items):
                mine[:full[rank].numel()] = newton_schulz(full[rank], **ns[rank]).flatten()
            gathered = torch.empty(world * size, dtype=self.ns_dtype, device=mine.device)
            dist.all_gather_into_tensor(gathered, mine)
            outs = [gathered[i * size:i * size + u.numel()].view(u.shape) for i, u in enumerate(full)]
        for (p, group), o in zip(items, outs):
            o = o.to(p.dtype)
            if isinstance(p, DTensor):  # keep this rank's shard; src_data_rank=None: no communication
                o = distribute_tensor(o, p.device_mesh, p.placements, src_data_rank=None)
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(o, alpha=-lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)

    def _momentum_update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """Advance the momentum buffer (elementwise, on the local shard) and return U."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - mu)
        return p.grad.lerp(buf, mu) if group["nesterov"] else buf


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t
