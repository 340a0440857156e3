"""Packed attention on CPU: bucketed `cpu` backend (eager, and with the torch.compile'd bucket kernel
that `train.compile` turns on) vs dense block-diagonal SDPA vs the naive loop.

Forward + backward time (median of repeats) on packed micro-batches of T tokens whose
sequence lengths follow a protein-like distribution (log-normal, mean ~380, cropped to 512),
with a <pad> tail segment. Also sweeps the bucket call cost the `cpu` planner uses.

    python benchmarks/attention_cpu.py [--tokens 4096] [--heads 4] [--head-dim 64] [--repeats 5] [--threads N]

Writes benchmarks/results/attention_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from plmrun.model import attention as A

BACKENDS = ("cpu", "cpu_compiled", "sdpa_dense", "naive")


def run_backend(name, q, k, v, cu, max_len, cap, layout):
    """`cpu_compiled` is the cpu backend with its compiled kernel (the per-model switch) on for this call."""
    if name != "cpu_compiled":
        return A.packed_attention(q, k, v, cu, max_len, backend=name, soft_cap=cap, layout=layout)
    return A.packed_attention(
        q, k, v, cu, max_len, backend="cpu", soft_cap=cap, layout=layout, compiled_cpu_kernel=True
    )


def _plan_with_cost(layout, cost):
    """The cpu bucket plan built with another planner call cost."""
    default = A.plan_buckets.__defaults__
    A.plan_buckets.__defaults__ = (cost,)
    try:
        return layout._build_cpu_buckets(torch.device("cpu"), 0, False)
    finally:
        A.plan_buckets.__defaults__ = default


def protein_batch(T: int, rng: np.random.Generator, max_len: int = 512) -> list[int]:
    """Greedy packing of log-normal lengths (mean ~380 before cropping) into T tokens + pad tail."""
    lengths = []
    while True:
        n = int(min(max_len, max(8, rng.lognormal(mean=5.75, sigma=0.55))))
        if sum(lengths) + n > T:
            break
        lengths.append(n)
    if sum(lengths) < T:
        lengths.append(T - sum(lengths))  # the pad tail is one more segment
    return lengths


def fwd_bwd_seconds(fn, qkv) -> float:
    q, k, v = (x.detach().requires_grad_() for x in qkv)
    t0 = time.perf_counter()
    fn(q, k, v).sum().backward()
    return time.perf_counter() - t0


def interleaved(fns: dict, qkv, repeats: int) -> dict:
    """Median seconds per function; the functions take turns so that load from other
    processes on a shared machine hits all of them alike. One warm-up call each."""
    times = {name: [] for name in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            t = fwd_bwd_seconds(fn, qkv)
            if r:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = default); 1 is steadier on a busy machine"
    )
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention_cpu.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from plmrun.train.parallelize import native_bf16

    # bf16 only where this CPU multiplies bf16 natively (AVX2-only CPUs emulate it, tens of times slower)
    dtypes = (torch.bfloat16, torch.float32) if native_bf16(torch.device("cpu")) else (torch.float32,)
    rng = np.random.default_rng(0)
    rows = []
    for b in range(args.batches):
        lengths = protein_batch(args.tokens, rng)
        cu = torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32)
        sum_sq = sum(n * n for n in lengths)
        for dtype in dtypes:
            g = torch.Generator().manual_seed(b)
            qkv = [torch.randn(args.tokens, args.heads, args.head_dim, generator=g).to(dtype) for _ in range(3)]
            for cap in (0.0, 30.0):
                layouts = {name: A.PackedLayout(cu, max(lengths)) for name in BACKENDS}
                fns = {
                    name: (
                        lambda q, k, v, name=name, cap=cap, cu=cu, lengths=lengths, layouts=layouts: run_backend(
                            name, q, k, v, cu, max(lengths), cap, layouts[name]
                        )
                    )
                    for name in BACKENDS
                }
                for name, t in interleaved(fns, qkv, args.repeats).items():
                    rows.append(
                        dict(
                            batch=b,
                            dtype=str(dtype).split(".")[-1],
                            soft_cap=cap,
                            backend=name,
                            seconds=t,
                            num_segments=len(lengths),
                            mean_len=float(np.mean(lengths[:-1])),
                            dense_over_sumsq=args.tokens**2 / sum_sq,
                        )
                    )
                    print(
                        f"batch {b} {rows[-1]['dtype']:8s} cap={cap:4.0f} {name:10s} {t * 1e3:8.1f} ms "
                        f"({len(lengths)} segments, T^2/sum L^2 = {args.tokens**2 / sum_sq:.1f})",
                        flush=True,
                    )
    # planner call-cost sweep (first dtype, no cap): one bucket per length run (0) ... one bucket (huge)
    sweep = []
    lengths = protein_batch(args.tokens, np.random.default_rng(1))
    cu = torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(args.tokens, args.heads, args.head_dim, generator=g).to(dtypes[0]) for _ in range(3)]
    costs = (0, 32**2, 64**2, 128**2, 256**2, 512**2, 10**9)
    plans, fns = {}, {}
    for cost in costs:
        layout = A.PackedLayout(cu, max(lengths))
        layout._cache[("cpu", torch.device("cpu"), 0, False)] = plan = _plan_with_cost(layout, cost)
        plans[cost] = len(plan[0])
        fns[cost] = lambda q, k, v, layout=layout: A.packed_attention(
            q, k, v, cu, max(lengths), backend="cpu", layout=layout
        )
    for cost, t in interleaved(fns, qkv, args.repeats).items():
        sweep.append(dict(call_cost=cost, buckets=plans[cost], seconds=t))
        print(f"call_cost {cost:>10d}: {plans[cost]:2d} buckets {t * 1e3:8.1f} ms", flush=True)

    summary = {}
    for dt in (str(d).split(".")[-1] for d in dtypes):
        for cap in (0.0, 30.0):
            sel = lambda name, dt=dt, cap=cap: statistics.median(  # noqa: E731
                r["seconds"] for r in rows if r["backend"] == name and r["dtype"] == dt and r["soft_cap"] == cap
            )
            summary[f"{dt}_cap{cap:g}"] = {n: sel(n) for n in BACKENDS}
    print(f"\nmedian fwd+bwd seconds over batches (T={args.tokens}, H={args.heads}, Dh={args.head_dim}):")
    print(
        f"{'case':18s} {'cpu':>9s} {'cpu_compiled':>13s} {'sdpa_dense':>11s} {'naive':>9s} {'dense/cpu':>10s}"
        f" {'cpu/compiled':>13s}"
    )
    for case, s in summary.items():
        print(
            f"{case:18s} {s['cpu']:9.4f} {s['cpu_compiled']:13.4f} {s['sdpa_dense']:11.4f} {s['naive']:9.4f}"
            f" {s['sdpa_dense'] / s['cpu']:10.2f} {s['cpu'] / s['cpu_compiled']:13.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            dict(
                config=vars(args),
                torch=torch.__version__,
                threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine(),
                summary=summary,
                runs=rows,
                call_cost_sweep=sweep,
            ),
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
