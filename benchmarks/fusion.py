"""Where the non-matmul time of a training step goes, and what fusing it buys: real training steps
(trainer.forward_backward, clipping, the optimizer) of one or more variants of a config, interleaved
step by step in one process so a busy shared machine slows all of them alike; then each variant's
operator self time by kind over a few profiled steps (matmul, attention kernels, everything else:
the elementwise work a faster matmul unit would not speed up).

    python benchmarks/fusion.py [--config none] [--precision bf16] [--steps 8] [--threads 1]
        [--variant NAME[:section.key=value,...]] ... [--tag TAG] [--out benchmarks/results/fusion.json]

--config works as in throughput.py (none: the ESM-2 8M shape). A variant is a name and its --set
overrides (e.g. `compile:train.compile=true`); the default is one variant, `base`, with none. To compare
two versions of the code, run this script under each PYTHONPATH in turn with different --tag values:
rows are appended to --out, each with the command, CPU, date and load average. MFU: useful FLOPs
(registry.flops_per_step) over the best of 5 matmul-peak measurements taken at start-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_profile import op_kind, timed_step  # noqa: E402
from throughput import RESULTS, plmrun_config  # noqa: E402

WARMUP = 2
PROFILED_STEPS = 2


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def build_variant(cfg, env, amp):
    from plmrun.model.registry import build_model
    from plmrun.optim.build import build_optimizer
    from plmrun.train.parallelize import parallelize

    torch.manual_seed(cfg.train.seed)
    plm = build_model(cfg.model).to(env.device)
    model = parallelize(plm, cfg, env)
    ns_dtype = torch.float32 if amp is None else torch.bfloat16
    return model, build_optimizer(plm, cfg.optim, cfg.train.max_steps, ns_dtype=ns_dtype)


def one_step(model, optimizers, micro, env, amp, step: int) -> tuple[float, float]:
    """Seconds of forward + backward and of the whole step (clipping and optimizer included)."""
    fwd_bwd, opt = timed_step(model, optimizers, micro, env, amp, step)
    return fwd_bwd, fwd_bwd + opt


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="'default', a shipped config, or omitted: the ESM-2 8M shape")
    ap.add_argument("--set", action="append", default=[], help="override for every variant (section.key=value)")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=WARMUP, help="untimed steps first (torch.compile: its compiles)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", action="append", default=[], help="NAME[:section.key=value,...] (repeatable)")
    ap.add_argument("--tag", default="", help="label of this code version in the output rows")
    ap.add_argument("--out", type=Path, default=RESULTS / "fusion.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from plmrun.model.registry import flops_per_step
    from plmrun.train.inputs import build_train_loader, open_training_data
    from plmrun.train.parallelize import autocast_dtype, init_distributed
    from plmrun.train.peak import stable_peak

    variants = {}
    for spec in a.variant or ["base"]:
        name, _, sets = spec.partition(":")
        variants[name] = [s for s in sets.split(",") if s]
    base = [f"train.precision={a.precision}", f"train.threads={a.threads}", *a.set]
    cfgs = {n: plmrun_config(a.config, base + sets) for n, sets in variants.items()}
    first = next(iter(cfgs.values()))
    env = init_distributed(first)
    amp = autocast_dtype(first, env.device)
    _, src, _ = open_training_data(first, env)
    loader = build_train_loader(first, env, src)
    batches = [loader.next_step(s) for s in range(a.warmup + a.steps + PROFILED_STEPS)]
    loader.close()
    flops = [
        sum(flops_per_step(first.model, mb.packed.cu_seqlens[: mb.packed.num_sequences + 1]) for mb in m)
        for m in batches
    ]
    tokens = [sum(mb.packed.num_real_tokens for mb in m) for m in batches]
    peak = stable_peak(env.device, amp or torch.float32).flops  # the trainer's MFU denominator
    runs = {n: build_variant(c, env, amp) for n, c in cfgs.items()}
    times = {n: [] for n in runs}
    for step in range(a.warmup + a.steps):
        for n, (model, opt) in runs.items():
            t = one_step(model, opt, batches[step], env, amp, step)
            if step >= a.warmup:
                times[n].append((t, flops[step], tokens[step]))
    rows = []
    for n, (model, opt) in runs.items():
        kinds = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for step in range(a.warmup + a.steps, a.warmup + a.steps + PROFILED_STEPS):
                one_step(model, opt, batches[step], env, amp, step)
        for event in prof.key_averages():
            kinds[op_kind(event.key)] += event.self_cpu_time_total / 1e6 / PROFILED_STEPS
        total = sum(kinds.values())
        ts = times[n]
        rows.append(
            {
                "tag": a.tag,
                "variant": n,
                "sets": variants[n],
                "fwd_bwd_s": statistics.median(t[0] for t, _, _ in ts),
                "step_s": statistics.median(t[1] for t, _, _ in ts),
                "tok_per_s": statistics.median(k / t[1] for t, _, k in ts),
                "mfu": statistics.median(f / t[1] for t, f, _ in ts) / peak,
                "op_share": {k: v / total for k, v in kinds.items()},
            }
        )
    report = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "threads": a.threads,
        "precision": a.precision,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_avg": os.getloadavg(),
        "peak_flops": peak,
        "steps": a.steps,
        "warmup": a.warmup,
        "rows": rows,
    }
    for r in rows:
        print(
            f"{a.tag or '-':>8} {r['variant']:>10}  step {r['step_s'] * 1e3:7.1f} ms  "
            f"fwd+bwd {r['fwd_bwd_s'] * 1e3:7.1f} ms  {r['tok_per_s']:7.0f} tok/s  MFU {r['mfu']:.1%}  ops "
            + " ".join(f"{k} {v:.0%}" for k, v in r["op_share"].items()),
            flush=True,
        )
    print(f"load {report['load_avg']}, peak {peak / 1e9:.0f} GFLOP/s")
    old = json.loads(a.out.read_text()) if a.out.exists() else []
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(old + [report], indent=1))
    tmp.replace(a.out)
    return report


if __name__ == "__main__":
    main()
