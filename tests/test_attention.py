"""Every packed-attention backend equals the per-segment naive reference, forward and backward."""

import os

import pytest
import torch

from plmrun.model import attention as A
from plmrun.model.attention import PackedLayout, naive_attention, packed_attention, plan_buckets, resolve_backend

CUDA = torch.cuda.is_available()
# mixed lengths: length-1 and length-2 segments, equal lengths, and a pad tail as the last segment
LENGTHS = [7, 1, 33, 2, 33, 19, 64, 5, 12]


def make_qkv(lengths, H=3, Dh=8, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    qkv = [torch.randn(T, H, Dh, generator=g, dtype=dtype).to(device).requires_grad_() for _ in range(3)]
    return qkv, cu.to(device), max(lengths)


def run(backend, qkv, cu, max_seqlen, **kw):
    q, k, v = qkv
    out = packed_attention(q, k, v, cu, max_seqlen, backend=backend, **kw)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    return out, grads


OPTIONS = [
    dict(),
    dict(soft_cap=5.0),
    dict(window=4),
    dict(window=4, soft_cap=3.0),
    dict(causal=True),
    dict(scale=0.3),
    dict(causal=True, window=3, soft_cap=2.0),
]


@pytest.mark.parametrize("backend", ["cpu", "sdpa_dense"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_cpu_backends_match_naive(backend, opts):
    qkv, cu, m = make_qkv(LENGTHS)
    ref, ref_g = run("naive", qkv, cu, m, **opts)
    out, out_g = run(backend, qkv, cu, m, **opts)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "opts", [o for o in OPTIONS if "soft_cap" in o], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
def test_compiled_cpu_kernel_matches_naive(opts):
    """train.compile's bucket kernel (soft-capped buckets take it in every dtype) is exact."""
    qkv, cu, m = make_qkv(LENGTHS)
    ref, ref_g = run("naive", qkv, cu, m, **opts)
    out, out_g = run("cpu", qkv, cu, m, compiled_cpu_kernel=True, **opts)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_compiled_cpu_kernel_bf16_matches_eager_sdpa():
    """bf16 buckets: the compiled kernel against the naive fp32 reference, forward and gradients."""
    qkv, cu, m = make_qkv(LENGTHS, dtype=torch.float32)
    ref, ref_g = run("naive", qkv, cu, m)
    low = [x.detach().bfloat16().requires_grad_() for x in qkv]
    out, out_g = run("cpu", low, cu, m, compiled_cpu_kernel=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.05)


def test_naive_matches_independent_dense_softmax():
    """The reference itself against a from-scratch masked softmax over the whole stream."""
    qkv, cu, _ = make_qkv([3, 1, 5], H=2, Dh=4)
    q, k, v = qkv
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([3, 1, 5]))
    s = torch.einsum("ihd,jhd->hij", q, k) / 2.0
    s = s.masked_fill(doc[:, None] != doc[None, :], float("-inf"))
    ref = torch.einsum("hij,jhd->ihd", s.softmax(-1), v)
    torch.testing.assert_close(naive_attention(q, k, v, cu), ref)


def test_cpu_backend_single_sequence_and_fp32():
    qkv, cu, m = make_qkv([40], dtype=torch.float32)
    ref, _ = run("naive", qkv, cu, m)
    out, _ = run("cpu", qkv, cu, m)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cpu_backend_bf16_autocast_close():
    qkv, cu, m = make_qkv(LENGTHS, dtype=torch.float32)
    ref, _ = run("naive", qkv, cu, m)
    q, k, v = (x.detach().bfloat16() for x in qkv)
    out = packed_attention(q, k, v, cu, m, backend="cpu")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def _brute_force_cost(lengths, call_cost):
    """Best cost over every contiguous grouping of the descending-sorted lengths."""
    ls = sorted(lengths, reverse=True)
    best = [0] + [float("inf")] * len(ls)
    for j in range(1, len(ls) + 1):
        best[j] = min(best[i] + (j - i) * ls[i] ** 2 + call_cost for i in range(j))
    return best[-1]


def test_bucket_plan_is_an_optimal_exact_cover():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 513, (int(torch.randint(1, 14, (1,), generator=g)),), generator=g).tolist()
        lengths += [lengths[0], 2, 2]  # repeats and tiny segments
        for call_cost in (0, 128 * 128, 10**7):
            buckets = plan_buckets(lengths, call_cost)
            assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
            cost = sum(len(b) * max(lengths[i] for i in b) ** 2 + call_cost for b in buckets)
            assert cost == _brute_force_cost(lengths, call_cost)


def test_layout_plan_is_built_once_and_reused():
    qkv, cu, m = make_qkv([5, 9, 1])
    layout = PackedLayout(cu, m)
    q, k, v = qkv
    a = packed_attention(q, k, v, cu, m, backend="cpu", layout=layout)
    b = packed_attention(q, k, v, cu, m, backend="cpu", layout=layout)
    assert len(layout._cache) == 1 and torch.equal(a, b)


def test_bad_input_messages():
    qkv, cu, m = make_qkv([4, 4])
    q, k, v = qkv
    with pytest.raises(ValueError, match="cu_seqlens\\[-1\\]"):
        packed_attention(q[:7], k[:7], v[:7], cu, m, backend="cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        packed_attention(q, k, v, cu, m, backend="bogus")
    if not CUDA:
        with pytest.raises(RuntimeError, match="needs CUDA"):
            packed_attention(q, k, v, cu, m, backend="flex")
        assert resolve_backend("auto", q) == "cpu"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["flex", pytest.param("flash", marks=pytest.mark.external), "auto"])
@pytest.mark.parametrize(
    "opts", [dict(), dict(soft_cap=5.0), dict(window=16, soft_cap=3.0)], ids=["plain", "cap", "win"]
)
def test_cuda_backends_match_naive(backend, opts):
    if backend == "flash":
        pytest.importorskip("flash_attn")
    lengths = LENGTHS + [200, 300]
    qkv, cu, m = make_qkv(lengths, H=4, Dh=64, dtype=torch.bfloat16, device="cuda")
    ref_qkv = [x.detach().float().requires_grad_() for x in qkv]
    ref, ref_g = run("naive", ref_qkv, cu, m, **opts)
    out, out_g = run(backend, qkv, cu, m, **opts)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("PLMRUN_SLOW"), reason="compiles FlexAttention on CPU (~25 s); set PLMRUN_SLOW=1"
)
def test_flex_forward_on_cpu_matches_naive():
    """torch 2.13 has FlexAttention forward (not backward) on CPU: check our mask/score_mod there."""

    qkv, cu, m = make_qkv([7, 1, 33, 2, 21], H=2, Dh=16, dtype=torch.float32)
    q, k, v = (x.detach() for x in qkv)
    layout = PackedLayout(cu, m)
    for opts in (dict(), dict(soft_cap=3.0, window=5)):
        ref = naive_attention(q, k, v, cu, **opts)
        out = A._flex_attention(
            q,
            k,
            v,
            layout,
            causal=False,
            window=opts.get("window", 0),
            soft_cap=opts.get("soft_cap", 0.0),
            scale=q.shape[-1] ** -0.5,
        )
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
