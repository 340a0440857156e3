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
    fp32 elsewhere and for exact comparisons; with `ns_coefficients` quintic, polar_express or the
    3-step polar_express_3.
Opt-in ways to make the orthogonalisation cheaper at small batch (all off by default):
  * `ns_gram`: iterate on the small-side Gram matrix (see gram_newton_schulz), for matrices at
    least GRAM_MIN_ASPECT times wider than tall, where it saves matmul work;
  * per-head blocks: a param group with `ns_blocks=H` orthogonalises each of H row blocks of its
    matrices on its own (attention Q/K/V, one block per head: H small Gram matrices instead of one);
  * `ns_every=k`: orthogonalise every k-th step and reuse that polar factor for the k−1 steps
    between (the momentum buffer still advances every step).

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
# A 3-step schedule fitted the Polar Express way for this repo's spectrum: the default run's Muon momentum
# (30 steps in) has s/‖U‖_F from ~1e-7 (1% quantile) over ~1e-4 (median) to ~0.9 (top), so no 3-step
# polynomial lifts the bulk; this one targets [1e-2, 1], where the top directions lie. Greedy minimax per
# step (each odd quintic minimises max |1 − p(s)| on the previous step's output range, a linear program on a
# log grid; a 1% safety shrink on all but the last step): it maps [1e-2, 1] into [0.72, 1.28], where 3
# quintic steps leave 1e-2 at 0.40. Same cost as quintic × 3.
POLAR_EXPRESS_3_COEFFICIENTS = (
    (8.013240692795438, -22.92577994620797, 16.599432890662623),
    (3.607024119247038, -2.6485980302480043, 0.5119239518572185),
    (2.6801635888842643, -1.9979935267681252, 0.45723054613159947),
)
NS_SCHEDULES = ("quintic", "polar_express", "polar_express_3")
# gram_newton_schulz costs 2·c/r + 4·steps − 3 r×r×r matmul units against steps·(2·c/r + 1) for the
# direct iteration (wide r×c): cheaper from c/r ≈ 2 at 5 steps, so it is used from this aspect up.
GRAM_MIN_ASPECT = 2.0


def ns_schedule(coefficients: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of `steps` iterations for `coefficients` (one of NS_SCHEDULES)."""
    if coefficients == "quintic":
        return [NS_COEFFICIENTS] * steps
    if coefficients == "polar_express" and steps == len(POLAR_EXPRESS_COEFFICIENTS):
        return list(POLAR_EXPRESS_COEFFICIENTS)
    if coefficients == "polar_express_3" and steps == len(POLAR_EXPRESS_3_COEFFICIENTS):
        return list(POLAR_EXPRESS_3_COEFFICIENTS)
    raise ValueError(
        f"Newton-Schulz coefficients {coefficients!r} with {steps} steps: expected one of "
        f"{', '.join(NS_SCHEDULES)}, polar_express with exactly {len(POLAR_EXPRESS_COEFFICIENTS)} steps, "
        f"polar_express_3 with exactly {len(POLAR_EXPRESS_3_COEFFICIENTS)}"
    )


def newton_schulz(
    g: torch.Tensor,
    steps: int,
    dtype: torch.dtype = torch.bfloat16,
    eps: float = 1e-7,
    coefficients: str = "quintic",
    gram: bool = False,
) -> torch.Tensor:
    """Quintic Newton–Schulz iteration towards U·Vᵀ of g = U·S·Vᵀ; returns a `dtype` tensor.

    Each step maps every singular value s to a·s + b·s³ + c·s⁵ after dividing g by its Frobenius
    norm (so s ≤ 1); the quintic coefficients push small s up fast at the price of not converging
    exactly to 1; polar_express changes (a, b, c) per step and lands closer to 1 in as many steps.
    Works on the wide orientation so the Gram matrix X·Xᵀ is the small one. g may be a stack
    [..., rows, cols] of same-shape matrices: one batched matmul per product instead of one per
    matrix, each matrix normalised on its own (on CPU bitwise equal to one call per matrix).
    gram=True: the same polynomial iteration done on the small Gram matrix (gram_newton_schulz)
    when the matrix is at least GRAM_MIN_ASPECT times wider than tall; the direct one otherwise.
    """
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    if coefficients == "polar_express":
        norm = norm * (1 + 2e-2)  # its safety factor: the schedule assumes s ≤ 1/1.02
    x = x / (norm + eps)
    if gram and x.size(-1) >= GRAM_MIN_ASPECT * x.size(-2):
        x = gram_newton_schulz(x, ns_schedule(coefficients, steps))
        return x.mT if tall else x
    mm = torch.addmm if x.ndim == 2 else torch.baddbmm
    for a, b, c in ns_schedule(coefficients, steps):
        gram = x @ x.mT
        poly = mm(gram, gram, gram, beta=b, alpha=c)  # b·A + c·A²
        x = mm(x, poly, x, beta=a)  # a·X + (b·A + c·A²)·X
    return x.mT if tall else x


def gram_newton_schulz(x: torch.Tensor, schedule: list[tuple[float, float, float]]) -> torch.Tensor:
    """The Newton–Schulz iteration X ← p(X·Xᵀ)·X of a normalised wide x (r×c, r < c) done in r×r.

    Every iterate is Q·X₀ with Q a polynomial in A₀ = X₀·X₀ᵀ, so all of them commute:
        P = a·I + b·A + c·A²,   Q ← P·Q,   A ← P·A·P   (= X·Xᵀ of the next iterate),
    and only the first Gram and the final Q·X₀ touch the long side: 2·c/r + 4·steps − 3 units of
    r³ instead of steps·(2·c/r + 1) (25 against 45 for the 256×1024 MLP matrices at 5 steps).
    Equal to the direct iteration in exact arithmetic; in fp32 to ~1e-5. In bf16 the repeated
    A ← P·A·P rounds more than the direct form (ns_errors in benchmarks/step_profile.py measures it).
    """
    mm = torch.addmm if x.ndim == 2 else torch.baddbmm
    gram = x @ x.mT
    q = None
    for i, (a, b, c) in enumerate(schedule):
        p = mm(gram, gram, gram, beta=b, alpha=c)  # b·A + c·A²
        p.diagonal(dim1=-2, dim2=-1).add_(a)
        q = p if q is None else p @ q
        if i + 1 < len(schedule):
            gram = p @ gram @ p
    return q @ x


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters (plain tensors or FSDP2 DTensors); see the module docstring.

    A param group may carry `ns_blocks` (default 1): its matrices' rows are split into that many
    equal blocks, each orthogonalised on its own (per attention head for Q/K/V)."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
        ns_coefficients: str = "quintic",
        ns_gram: bool = False,
        ns_every: int = 1,
    ):
        ns_schedule(ns_coefficients, ns_steps)  # refuse an unknown schedule here, not at the first step
        if ns_every < 1:
            raise ValueError(f"ns_every must be >= 1, got {ns_every}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            ns_blocks=1,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")
                if p.shape[0] % group.get("ns_blocks", 1):
                    raise ValueError(
                        f"ns_blocks={group.get('ns_blocks', 1)} does not divide the {p.shape[0]} rows of a "
                        f"parameter of shape {tuple(p.shape)}"
                    )
        self.ns_dtype = ns_dtype
        self.ns_gram = ns_gram
        self.ns_every = ns_every

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = get_rank(), get_world_size()
        work = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        work.sort(key=lambda pg: -pg[0].numel())  # stable: equal sizes keep group order on every rank
        if self.ns_every > 1:  # every rank steps the same parameters, so all agree on which are due
            reuse = [(p, g) for p, g in work if not self._polar_due(p)]
            work = [(p, g) for p, g in work if self._polar_due(p)]
            for p, group in reuse:
                self._momentum_update(p, group)
                self._apply(p, group, self.state[p]["polar"])
        for start in range(0, len(work), world):
            self._round(work[start : start + world], rank, world)
        return loss

    def _polar_due(self, p: torch.Tensor) -> bool:
        """ns_every > 1: whether p's polar factor is recomputed this step (else the stored one is reused)."""
        state = self.state[p]
        return "polar" not in state or int(state["polar_age"]) + 1 >= self.ns_every

    def _orthogonalise(self, u: torch.Tensor, group: dict) -> torch.Tensor:
        blocks = group.get("ns_blocks", 1)  # a group loaded from a checkpoint of before ns_blocks has none
        x = u.view(blocks, u.shape[0] // blocks, u.shape[1]) if blocks > 1 else u
        o = newton_schulz(
            x, steps=group["ns_steps"], coefficients=group["ns_coefficients"], dtype=self.ns_dtype, gram=self.ns_gram
        )
        return o.reshape(u.shape)

    def _round(self, items: list, rank: int, world: int) -> None:
        """Orthogonalise up to `world` matrices, matrix i on rank i, and apply all of them."""
        full = [_full(self._momentum_update(p, group)) for p, group in items]
        if world == 1:
            outs = [self._orthogonalise(u, group) for u, (_, group) in zip(full, items)]
        else:
            size = max(u.numel() for u in full)
            mine = torch.zeros(size, dtype=self.ns_dtype, device=full[0].device)
            if rank < len(items):
                mine[: full[rank].numel()] = self._orthogonalise(full[rank], items[rank][1]).flatten()
            gathered = torch.empty(world * size, dtype=self.ns_dtype, device=mine.device)
            dist.all_gather_into_tensor(gathered, mine)
            outs = [gathered[i * size : i * size + u.numel()].view(u.shape) for i, u in enumerate(full)]
        for (p, group), o in zip(items, outs):
            o = o.to(p.dtype)
            if isinstance(p, DTensor):  # keep this rank's shard; src_data_rank=None: no communication
                o = distribute_tensor(o, p.device_mesh, p.placements, src_data_rank=None)
            if self.ns_every > 1:
                self.state[p]["polar"] = o
                self.state[p]["polar_age"] = torch.tensor(-1)
            self._apply(p, group, o)

    def _apply(self, p: torch.Tensor, group: dict, o: torch.Tensor) -> None:
        """W ← (1 − η·λ)·W − η·sqrt(max(1, rows/cols))·O."""
        if self.ns_every > 1:
            self.state[p]["polar_age"] += 1
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
