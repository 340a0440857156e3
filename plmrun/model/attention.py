"""Exact attention over packed sequences: one function, several backends.

Tokens of n sequences lie back to back in one stream of T tokens; `cu_seqlens` ([n+1] int32)
holds the boundaries. Token i attends to token j only when both lie in the same segment, and
(window > 0) |i - j| < window, and (causal) j <= i. Every backend computes exactly this:

- `naive`: a Python loop over segments with an explicit softmax; the reference for tests.
- `cpu`: segments are sorted by length and grouped into buckets (a small dynamic programme picks
  the grouping that minimises padded score elements plus a per-bucket call cost); each bucket is
  gathered into a padded [B, H, Lmax, Dh] tensor and run through SDPA (or matmul + tanh +
  softmax with a soft-cap). Cost scales with sum(L_i^2), not T^2, and gradients flow exactly
  through the gathers.
- `sdpa_dense`: SDPA with a dense [T, T] block-diagonal mask; O(T^2), a baseline.
- `flex`: FlexAttention with a document block mask and a soft-cap score_mod (CUDA).
- `flash`: flash-attn varlen (CUDA, fp16/bf16, when installed).
- `auto`: flash on CUDA for half inputs when installed, else flex on CUDA, else cpu.

`PackedLayout` caches what depends only on the batch (bucket plans, block masks), so a model
builds it once per forward and shares it across layers.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

try:  # optional CUDA kernel
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the installation
    flash_attn_varlen_func = None

BACKENDS = ("auto", "cpu", "flex", "flash", "sdpa_dense", "naive")

# Fixed cost of one bucket (gathers, masks, kernel calls, Python) in units of padded score
# elements (Lmax^2 per sequence): it trades one bucket per distinct length against one padded
# bucket. benchmarks/attention_cpu.py sweeps it.
BUCKET_CALL_COST = 256 * 256


def plan_buckets(lengths: list[int], call_cost: int = BUCKET_CALL_COST) -> list[list[int]]:
    """Group segment indices into buckets minimising sum(B * Lmax^2) + call_cost * #buckets.

    Sorted by length (descending), an optimal grouping is contiguous and never splits equal
    lengths, so a DP over runs of equal length (vectorised over the bucket start) finds it
    exactly in a few milliseconds even for hundreds of segments.
    """
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    ls = np.asarray(lengths, dtype=np.float64)[order]
    run_start = np.flatnonzero(np.r_[True, ls[1:] != ls[:-1]])  # first index of each run
    ends = np.r_[run_start[1:], len(ls)]  # one past each run
    top = ls[run_start] ** 2  # Lmax^2 if a bucket starts there
    best = np.zeros(len(run_start) + 1)  # best[r]: first r runs grouped
    cut = np.zeros(len(run_start) + 1, dtype=np.int64)
    for r in range(1, len(run_start) + 1):
        cost = best[:r] + (ends[r - 1] - run_start[:r]) * top[:r] + call_cost
        cut[r] = int(np.argmin(cost))
        best[r] = cost[cut[r]]
    buckets, r = [], len(run_start)
    while r > 0:
        buckets.append(order[run_start[cut[r]] : ends[r - 1]].tolist())
        r = cut[r]
    return buckets[::-1]


class PackedLayout:
    """Per-batch attention metadata derived from cu_seqlens; build once per forward."""

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int):
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be a 1-D tensor of n+1 >= 2 boundaries, got shape {tuple(cu_seqlens.shape)}"
            )
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = int(max_seqlen)
        self._cache: dict = {}

    @functools.cached_property
    def bounds(self) -> list[int]:
        b = self.cu_seqlens.tolist()
        if b[0] != 0 or any(e < s for s, e in zip(b, b[1:])):
            raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {b[:8]}...")
        return b

    @functools.cached_property
    def doc_ids(self) -> torch.Tensor:
        """Segment id of each token, [T] int32 on the device of cu_seqlens."""
        cu = self.cu_seqlens.long()
        lengths = cu[1:] - cu[:-1]
        return torch.repeat_interleave(torch.arange(len(lengths), device=cu.device, dtype=torch.int32), lengths)

    def cpu_buckets(self, device: torch.device, window: int, causal: bool) -> list[tuple]:
        """For each bucket: (gather index [B*Lmax], attend mask or None, B, Lmax), and the
        inverse permutation that puts the concatenated valid rows back in token order."""
        key = ("cpu", device, window, causal)
        if key not in self._cache:
            self._cache[key] = self._build_cpu_buckets(device, window, causal)
        return self._cache[key]

    def _build_cpu_buckets(self, device, window, causal):
        b = self.bounds
        lengths = [e - s for s, e in zip(b, b[1:])]
        plans, rows, tokens, offset = [], [], [], 0
        for seg in plan_buckets(lengths):
            seg = [s for s in seg if lengths[s] > 0]
            if not seg:
                continue
            B, lmax = len(seg), max(lengths[s] for s in seg)
            starts = torch.tensor([b[s] for s in seg])[:, None]
            lens = torch.tensor([lengths[s] for s in seg])[:, None]
            ar = torch.arange(lmax)[None, :]
            valid = ar < lens  # [B, Lmax]
            index = torch.where(valid, starts + ar, starts)  # pads re-read the first token
            attend = _attend_mask(valid, lmax, window, causal)
            plans.append((index.reshape(-1).to(device), None if attend is None else attend.to(device), B, lmax))
            rows.append(torch.arange(B * lmax).view(B, lmax)[valid] + offset)
            tokens.append(index[valid])
            offset += B * lmax
        gather_back = torch.empty(b[-1], dtype=torch.long)
        gather_back[torch.cat(tokens)] = torch.cat(rows)  # token t is row gather_back[t] of the output
        return plans, gather_back.to(device)

    def dense_mask(self, device, window: int, causal: bool) -> torch.Tensor:
        key = ("dense", device, window, causal)
        if key not in self._cache:
            doc = self.doc_ids.to(device)
            pos = torch.arange(len(doc), device=device)
            m = doc[:, None] == doc[None, :]
            if window:
                m &= (pos[:, None] - pos[None, :]).abs() < window
            if causal:
                m &= pos[None, :] <= pos[:, None]
            self._cache[key] = m
        return self._cache[key]

    def block_mask(self, device, window: int, causal: bool):
        key = ("flex", device, window, causal)
        if key not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            doc = self.doc_ids.to(device)

            def mask_mod(b, h, q_idx, kv_idx):
                m = doc[q_idx] == doc[kv_idx]
                if window:
                    m = m & ((q_idx - kv_idx).abs() < window)
                if causal:
                    m = m & (kv_idx <= q_idx)
                return m

            T = len(doc)
            self._cache[key] = create_block_mask(mask_mod, None, None, T, T, device=device)
        return self._cache[key]


def _attend_mask(valid: torch.Tensor, lmax: int, window: int, causal: bool) -> torch.Tensor | None:
    """[B, 1, Lmax, Lmax] bool (True = attend), or None when nothing needs masking.

    Padded query rows may see every valid key: their outputs are discarded, and a fully
    masked row would put NaN into the softmax backward.
    """
    needs_pad = not bool(valid.all())
    if not (needs_pad or window or causal):
        return None
    if not (window or causal):  # padding only: a key mask [B, 1, 1, Lk] broadcasts over queries
        return valid[:, None, None, :]
    ar = torch.arange(lmax)
    band = torch.ones(lmax, lmax, dtype=torch.bool)
    if window:
        band &= (ar[:, None] - ar[None, :]).abs() < window
    if causal:
        band &= ar[None, :] <= ar[:, None]
    m = band[None] | ~valid[:, :, None]  # [B, Lq, Lk]
    m = m & valid[:, None, :]
    return m[:, None]


def _check(q, k, v, layout: PackedLayout):
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must share one [T, H, Dh] shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if layout.bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens[-1] ({layout.bounds[-1]}) must equal the number of tokens ({q.shape[0]})")


def _scores_softmax_v(q, k, v, mask, scale, soft_cap):
    """Explicit attention on [..., L, Dh] (used for soft-caps and by the naive reference)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if soft_cap:
        s = soft_cap * torch.tanh(s / soft_cap)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.promote_types(s.dtype, torch.float32))
    return torch.matmul(p.to(v.dtype), v)


def naive_attention(q, k, v, cu_seqlens, *, causal=False, window=0, soft_cap=0.0, scale=None):
    """Reference: one segment at a time, explicit masks and softmax."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    b = cu_seqlens.tolist()
    for s, e in zip(b, b[1:]):
        if e == s:
            continue
        L = e - s
        ar = torch.arange(L, device=q.device)
        mask = torch.ones(L, L, dtype=torch.bool, device=q.device)
        if window:
            mask &= (ar[:, None] - ar[None, :]).abs() < window
        if causal:
            mask &= ar[None, :] <= ar[:, None]
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))  # [H, L, Dh]
        outs.append(_scores_softmax_v(qs, ks, vs, mask, scale, soft_cap).transpose(0, 1))
    return torch.cat(outs)


@functools.cache
def _compiled_cpu_kernel():
    """_scores_softmax_v through torch.compile (dynamic shapes: one graph serves every bucket shape).

    Measured by benchmarks/attention_cpu.py: on protein bucket shapes in bf16 it is 1.5-2.5x
    faster, forward and backward, than SDPA's CPU flash kernel, which stays the fp32 path (there
    the compiled kernel gains nothing). A model asks for it with `use_compiled_cpu_attention()`
    (train.parallelize does with train.compile on CPU); nothing here is a global switch.
    """
    return torch.compile(_scores_softmax_v, dynamic=True)


def _cpu_attention(q, k, v, layout, *, causal, window, soft_cap, scale, compiled_kernel=False):
    plans, gather_back = layout.cpu_buckets(q.device, window, causal)
    H, Dh = q.shape[1:]
    use = compiled_kernel and (q.dtype in (torch.bfloat16, torch.float16) or soft_cap)
    compiled = _compiled_cpu_kernel() if use else None
    parts = []
    for index, mask, B, lmax in plans:
        qb, kb, vb = (x.index_select(0, index).view(B, lmax, H, Dh).transpose(1, 2) for x in (q, k, v))
        if compiled is not None:
            o = compiled(qb, kb, vb, mask, scale, soft_cap)
        elif soft_cap:
            o = _scores_softmax_v(qb, kb, vb, mask, scale, soft_cap)
        else:
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        parts.append(o.transpose(1, 2).reshape(B * lmax, H, Dh))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.index_select(0, gather_back)


def _dense_attention(q, k, v, layout, *, causal, window, soft_cap, scale):
    mask = layout.dense_mask(q.device, window, causal)
    qd, kd, vd = (x.transpose(0, 1)[None] for x in (q, k, v))
    if soft_cap:
        o = _scores_softmax_v(qd, kd, vd, mask, scale, soft_cap)
    else:
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)
    return o[0].transpose(0, 1)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_attention(q, k, v, layout, *, causal, window, soft_cap, scale):
    block_mask = layout.block_mask(q.device, window, causal)
    score_mod = None
    if soft_cap:

        def score_mod(score, b, h, q_idx, kv_idx):
            return soft_cap * torch.tanh(score / soft_cap)

    qf, kf, vf = (x.transpose(0, 1)[None] for x in (q, k, v))
    o = _compiled_flex()(qf, kf, vf, score_mod=score_mod, block_mask=block_mask, scale=scale)
    return o[0].transpose(0, 1)


def _flash_attention(q, k, v, layout, *, causal, window, soft_cap, scale):
    if flash_attn_varlen_func is None:
        raise RuntimeError("attention backend 'flash' needs the flash-attn package (pip install flash-attn)")
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"attention backend 'flash' needs fp16/bf16 CUDA tensors, got {q.dtype} on {q.device}")
    cu = layout.cu_seqlens.to(device=q.device, dtype=torch.int32)
    w = (window - 1, window - 1) if window else (-1, -1)
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu,
        cu,
        layout.max_seqlen,
        layout.max_seqlen,
        softmax_scale=scale,
        causal=causal,
        window_size=w,
        softcap=soft_cap,
    )


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend != "auto":
        if backend in ("flex", "flash") and not q.is_cuda:
            raise RuntimeError(f"attention backend {backend!r} needs CUDA; use 'cpu' (or 'auto') on this machine")
        return backend
    if q.is_cuda:
        return "flash" if flash_attn_varlen_func is not None and q.dtype in (torch.float16, torch.bfloat16) else "flex"
    return "cpu"


_IMPLS = {"cpu": _cpu_attention, "sdpa_dense": _dense_attention, "flex": _flex_attention, "flash": _flash_attention}


def packed_attention(
    q,
    k,
    v,
    cu_seqlens=None,
    max_seqlen=None,
    *,
    backend="auto",
    causal=False,
    window=0,
    soft_cap=0.0,
    scale=None,
    layout: PackedLayout | None = None,
    compiled_cpu_kernel: bool = False,
):
    """Attention of q/k/v [T, H, Dh] within the segments of cu_seqlens; returns [T, H, Dh].

    compiled_cpu_kernel: the cpu backend runs its bf16/fp16 (and soft-capped) buckets through a
    torch.compile'd explicit kernel (_compiled_cpu_kernel) instead of SDPA; other backends ignore it.

    `layout` (a PackedLayout of the same cu_seqlens) lets callers share per-batch plans
    across layers; it is built here when omitted. Models pass only the layout: code compiled
    with torch.compile then never reads cu_seqlens (whose length changes every batch).
    """
    layout = layout if layout is not None else PackedLayout(cu_seqlens, max_seqlen)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    window, soft_cap = int(window), float(soft_cap)
    name = resolve_backend(backend, q)
    if name == "flex":  # traceable: torch.compile of a block fuses around the flex kernel
        _check(q, k, v, layout)
        return _flex_attention(q, k, v, layout, causal=causal, window=window, soft_cap=soft_cap, scale=scale)
    return _eager_attention(
        name,
        q,
        k,
        v,
        layout,
        causal=causal,
        window=window,
        soft_cap=soft_cap,
        scale=scale,
        compiled_cpu_kernel=compiled_cpu_kernel,
    )


@torch.compiler.disable
def _eager_attention(name, q, k, v, layout, *, causal, window, soft_cap, scale, compiled_cpu_kernel):
    """The data-dependent backends (bucket plans and segment loops are Python over cu_seqlens):
    torch.compile of a block compiles the code around them and leaves them eager."""
    _check(q, k, v, layout)
    if name == "naive":
        return naive_attention(q, k, v, layout.cu_seqlens, causal=causal, window=window, soft_cap=soft_cap, scale=scale)
    if name == "cpu":
        return _cpu_attention(
            q,
            k,
            v,
            layout,
            causal=causal,
            window=window,
            soft_cap=soft_cap,
            scale=scale,
            compiled_kernel=compiled_cpu_kernel,
        )
    return _IMPLS[name](q, k, v, layout, causal=causal, window=window, soft_cap=soft_cap, scale=scale)
