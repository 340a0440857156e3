"""DDP scaling on this machine: 1 process × grad_accum N vs N processes × 1, the same global batches.

Each process uses one thread (one worker per core, as on GPUs: one worker per device), so the scaling
efficiency is tok/s(N) / (N × tok/s(1)) from each run's summary.json (training time only, no eval
or start-up). Also checks that the loss series agree (DDP is exact, see tests/test_distributed.py).

    python benchmarks/ddp_scaling.py [--nproc 2] [--steps 20] [--hidden 128] [--layers 4] [--cuda]

--cuda runs 1 vs N GPUs instead (the one-command GPU benchmark calls it on multi-GPU machines).
Prints a table and writes benchmarks/results/ddp_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "ddp_scaling.json"


def run(nproc: int, accum: int, args, root: Path, strategy: str) -> dict:
    name = f"w{nproc}_a{accum}_{strategy}"
    train = [
        "-m",
        "plmrun.cli",
        "train",
        f"--model.hidden_size={args.hidden}",
        f"--model.num_layers={args.layers}",
        f"--model.num_heads={max(2, args.hidden // 64)}",
        f"--data.token_budget={args.token_budget}",
        "--data.max_length=512",
        f"--train.max_steps={args.steps}",
        "--train.eval_every=0",
        "--eval.final_full=false",
        "--eval.subset=64",
        "--eval.token_budget=1024",
        "--eval.max_length=512",
        f"--train.grad_accum={accum}",
        "--train.log_every=1",
        f"--dist.strategy={strategy}",
        "--logging.progress=false",
        f"--logging.run_root={root}",
        f"--logging.name={name}",
        f"--train.device={'cuda' if args.cuda else 'cpu'}",
    ]
    if not args.cuda:
        train += ["--train.threads=1", "--train.precision=fp32"]
    cmd = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *train]
        if nproc > 1
        else [sys.executable, *train]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    s = json.loads((root / name / "summary.json").read_text())
    losses = [json.loads(x)["loss"] for x in (root / name / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    return {
        "processes": nproc,
        "grad_accum": accum,
        "strategy": strategy,
        "steps": s["steps"],
        "tokens": s["tokens"],
        "train_time_s": round(s["train_time_s"], 3),
        "tok_per_s": round(s["tok_per_s"], 1),
        "mfu": s["mfu"],
        "losses": losses,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--token-budget", type=int, default=2048)
    ap.add_argument("--cuda", action="store_true", help="1 vs N GPUs (bf16) instead of CPU processes")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args.nproc, args, Path(tmp), "ddp")
        rows.append(one)
        for strategy in ("ddp", "fsdp"):
            r = run(args.nproc, 1, args, Path(tmp), strategy)
            r["speedup"] = round(r["tok_per_s"] / one["tok_per_s"], 3)
            r["efficiency"] = round(r["speedup"] / args.nproc, 3)
            r["max_abs_loss_diff_vs_1"] = max(abs(a - b) for a, b in zip(r["losses"], one["losses"]))
            rows.append(r)
    print(f"{'setup':<22}{'tok/s':>10}{'train s':>9}{'speedup':>9}{'efficiency':>12}{'max |Δloss|':>13}")
    for r in rows:
        label = f"{r['processes']} proc × accum {r['grad_accum']}" + (f" {r['strategy']}" if r["processes"] > 1 else "")
        print(
            f"{label:<22}{r['tok_per_s']:>10,.0f}{r['train_time_s']:>9.2f}{r.get('speedup', 1.0):>9.2f}"
            f"{r.get('efficiency', 1.0):>12.2f}{r.get('max_abs_loss_diff_vs_1', 0.0):>13.1e}"
        )
    import torch

    out = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "device": "cuda" if args.cuda else "cpu, 1 thread per process",
        },
        "config": {k: getattr(args, k) for k in ("nproc", "steps", "hidden", "layers", "token_budget")},
        "runs": [{k: v for k, v in r.items() if k != "losses"} for r in rows],
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
