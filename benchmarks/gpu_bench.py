"""GPU training throughput of one config, on 1 GPU (python) or N GPUs (torchrun): the trainer's own
step for a fixed number of steps on the bundled corpus; median tokens/s and MFU over timed windows
after warm-up, peak memory per GPU. Called by benchmarks/gpu.sh; `--table FILES` prints the
markdown table of earlier results (with 1 -> N GPU scaling efficiency).

    python benchmarks/gpu_bench.py --config speedrun_133m [--set section.key=value ...] [--token-budget 65536]
        [--warmup 5] [--windows 5] [--steps-per-window 4] --out results.json
    torchrun --standalone --nproc_per_node=8 benchmarks/gpu_bench.py --config speedrun_133m --out ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import measure_plmrun  # noqa: E402


def bench(a) -> dict | None:
    import torch

    from plmrun.config import build_config
    from plmrun.experiments.record import hardware_info
    from plmrun.train.parallelize import init_distributed, matmul_dtypes
    from plmrun.train.peak import run_peak

    cfg = build_config(
        a.config,
        ["--" + s.removeprefix("--") for s in a.set]
        + [f"--data.token_budget={a.token_budget}", "--train.device=cuda", "--logging.progress=false"],
    )
    env = init_distributed(cfg)
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    # the trainer's denominator: the fastest matmul the run uses (float8 on an H100 under train.fp8), best-of, cached
    peak = run_peak(env.device, matmul_dtypes(cfg, env.device), update=env.is_main).flops
    out = measure_plmrun(cfg, env, warmup=a.warmup, windows=a.windows, steps_per_window=a.steps_per_window)
    mem = torch.tensor([out["peak_memory_mb"]], dtype=torch.float64, device=env.device)
    if env.world_size > 1:
        torch.distributed.all_reduce(mem, op=torch.distributed.ReduceOp.MAX)
    if not env.is_main:
        return None
    w = out["windows"]
    flops = statistics.median(r["flops"] / r["seconds"] for r in w)
    return {
        "config": a.config,
        "overrides": a.set,
        "arch": cfg.model.arch,
        "params": out["params"],
        "gpus": env.world_size,
        "token_budget_per_gpu": cfg.data.token_budget,
        "precision": cfg.train.precision,
        "compile": cfg.train.compile,
        "fp8": cfg.train.fp8,
        "hardware": hardware_info(),
        "real_tok_per_s": statistics.median(r["real_tokens"] / r["seconds"] for r in w),
        "padded_tok_per_s": statistics.median(r["padded_tokens"] / r["seconds"] for r in w),
        "mfu": flops / (peak * env.world_size),
        "peak_flops_per_gpu": peak,
        "peak_memory_mb_max_gpu": float(mem[0]),
        "windows": w,
    }


SEED_133M_TOK_PER_S = 275_900
"The SpeedrunningPLMs README's 133M model on one H100: the figure issue 26 asks us to double."


def table(results: list[dict]) -> str:
    one = {(r["config"], tuple(r["overrides"])): r for r in results if r["gpus"] == 1}
    peaks = ", ".join(
        f"{'float8' if r.get('fp8') else r['precision']} runs {r['peak_flops_per_gpu'] / 1e12:,.0f}"
        for r in {bool(r.get("fp8")): r for r in results}.values()
    )
    lines = [
        f"GPU: {results[0]['hardware']['gpu']}, torch {results[0]['hardware']['torch']}. MFU is against the "
        f"fastest matmul a run uses, measured here (TFLOP/s per GPU): {peaks}. × seed: real tok/s over the "
        f"seed's 133M model on one H100 ({SEED_133M_TOK_PER_S:,}; issue 26 asks for ≥ 2×).",
        "",
        "| config | params | GPUs | tokens/GPU/step | real tok/s | MFU | peak memory (GB) | scaling | × seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = one.get((r["config"], tuple(r["overrides"])))
        scaling = f"{r['real_tok_per_s'] / (r['gpus'] * base['real_tok_per_s']):.0%}" if base and r["gpus"] > 1 else ""
        seed = (
            f"{r['real_tok_per_s'] / SEED_133M_TOK_PER_S:.2f}×"
            if r["config"] == "speedrun_133m" and r["gpus"] == 1
            else ""
        )
        lines.append(
            f"| {r['config']}{''.join(' `' + o + '`' for o in r['overrides'])} | {r['params'] / 1e6:.1f}M | "
            f"{r['gpus']} | {r['token_budget_per_gpu']:,} | {r['real_tok_per_s']:,.0f} | {r['mfu']:.1%} | "
            f"{r['peak_memory_mb_max_gpu'] / 1024:.1f} | {scaling} | {seed} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="speedrun_133m")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--token-budget", type=int, default=65536, help="tokens per micro-batch per GPU")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--steps-per-window", type=int, default=4)
    ap.add_argument("--out", help="write the result JSON here")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print the table of these result files and exit")
    a = ap.parse_args(argv)
    if a.table:
        print(table([json.loads(Path(p).read_text()) for p in a.table]))
        return 0
    import torch

    if not torch.cuda.is_available():
        print(
            f"error: no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
            "gpu_bench.py needs an NVIDIA GPU",
            file=sys.stderr,
        )
        return 2
    result = bench(a)
    if result is not None:
        print(
            f"{a.config}: {result['gpus']} GPU(s)  {result['real_tok_per_s']:,.0f} real tok/s  "
            f"MFU {result['mfu']:.1%}  peak memory {result['peak_memory_mb_max_gpu'] / 1024:.1f} GB",
            flush=True,
        )
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
