"""Where a training step's time goes: forward + backward vs the optimizer, for a plmrun config
(speedrun architecture, Muon + Adam) and the ESM-2 recipe at the same shape (esm2 preset, AdamW),
on the same packed batches; then Muon's Newton–Schulz alone at several iteration counts.

    python benchmarks/step_profile.py [--config default] [--set section.key=value ...] [--steps 12]
        [--ns-steps 5 4 3] [--threads 0]

--config works as in throughput.py ('default': the default run's model; none: the ESM-2 8M shape).
Newton–Schulz runs in fp32 (what an fp32 run uses) on random matrices of the model's Muon shapes,
the iteration counts interleaved in one process so they see the same machine state. Medians after
two warm-up steps. Prints a table and writes benchmarks/results/step_profile.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import RESULTS, plmrun_config, recipe_at_shape  # noqa: E402

WARMUP = 2


def profile_steps(cfg, steps: int) -> dict:
    """Median seconds of forward + backward and of clipping + optimizer step over `steps` real steps."""
    from plmrun.model.registry import build_model
    from plmrun.optim.build import build_optimizer
    from plmrun.train.parallelize import init_distributed
    from plmrun.train.trainer import build_train_loader, forward_backward, open_training_data
    env = init_distributed(cfg)
    _, train_src, _ = open_training_data(cfg, env)
    model = build_model(cfg.model)
    optimizers = build_optimizer(model, cfg.optim, cfg.train.max_steps, ns_dtype=torch.float32)
    loader = build_train_loader(cfg, env, train_src)
    fwd_bwd, opt = [], []
    for step in range(WARMUP + steps):
        optimizers.set_step(step)
        micro = loader.next_step(step)
        t0 = time.perf_counter()
        forward_backward(model, micro, global_norm=float(sum(mb.normalizer for mb in micro)), world_size=1,
                         device=env.device, step=step)
        t1 = time.perf_counter()
        optimizers.clip_gradients()
        optimizers.step()
        optimizers.zero_grad()
        if step >= WARMUP:
            fwd_bwd.append(t1 - t0)
            opt.append(time.perf_counter() - t1)
    return {"params": sum(p.numel() for p in model.parameters()), "optimizer": cfg.optim.optimizer,
            "fwd_bwd_s": statistics.median(fwd_bwd), "optimizer_s": statistics.median(opt)}


def profile_newton_schulz(cfg, ns_steps: list[int], repeats: int = 7) -> dict:
    """Median seconds of one step's Newton–Schulz over the model's Muon matrices, per iteration count."""
    from plmrun.model.registry import build_model
    from plmrun.optim.muon import newton_schulz
    model = build_model(cfg.model)
    kinds = model.parameter_kinds()
    grads = [torch.randn_like(p) for n, p in model.named_parameters() if kinds[n] == "hidden" and p.ndim == 2]
    times = {n: [] for n in ns_steps}
    for _ in range(repeats):
        for n in ns_steps:
            t0 = time.perf_counter()
            for g in grads:
                newton_schulz(g, n, torch.float32)
            times[n].append(time.perf_counter() - t0)
    return {"matrices": len(grads), "seconds": {str(n): statistics.median(t) for n, t in times.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="plmrun config file, shipped name or 'default'; without it: the ESM-2 8M shape")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for the plmrun case")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per case (after 2 warm-up steps)")
    ap.add_argument("--ns-steps", type=int, nargs="+", default=[5, 4, 3], help="Newton–Schulz iteration counts")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = the config's)")
    ap.add_argument("--out", default=str(RESULTS / "step_profile.json"))
    a = ap.parse_args(argv)
    if a.steps < 1 or min(a.ns_steps) < 1:
        ap.error("--steps and --ns-steps must be >= 1")
    from plmrun.config import ConfigError
    from plmrun.train.record import hardware_info
    try:
        speed = plmrun_config(a.config, a.set + ([f"train.threads={a.threads}"] if a.threads else []))
        cases = {"plmrun": speed, "plmrun esm2 recipe": recipe_at_shape(speed)}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if speed.train.threads:
        torch.set_num_threads(speed.train.threads)
    print(f"{'case':<20} {'params':>8} {'optimizer':>9} {'fwd+bwd ms':>11} {'optimizer ms':>13} {'optimizer share':>16}")
    rows = {}
    for case, cfg in cases.items():
        r = rows[case] = profile_steps(cfg, a.steps)
        share = r["optimizer_s"] / (r["fwd_bwd_s"] + r["optimizer_s"])
        print(f"{case:<20} {r['params'] / 1e6:7.2f}M {r['optimizer']:>9} {r['fwd_bwd_s'] * 1e3:11.1f} "
              f"{r['optimizer_s'] * 1e3:13.1f} {share:15.0%}", flush=True)
    ns = profile_newton_schulz(speed, a.ns_steps)
    print(f"Newton–Schulz, {ns['matrices']} matrices, fp32: "
          + ", ".join(f"{n} steps {s * 1e3:.1f} ms" for n, s in ns["seconds"].items()))
    report = {"date": datetime.date.today().isoformat(), "hardware": hardware_info(), "config": a.config,
              "overrides": a.set, "steps": a.steps, "cases": rows, "newton_schulz": ns}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
