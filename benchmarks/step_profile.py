"""Where a training step's time goes: forward + backward vs the optimizer, for a plmrun config
(speedrun architecture, Muon + Adam) and the ESM-2 recipe at the same shape (esm2 preset, AdamW),
on the same packed batches; then the step's operator time by kind (matrix multiplies, attention
kernels, everything else) from torch.profiler; then Muon's Newton–Schulz alone at several
iteration counts. With --variants, instead: Muon Newton–Schulz variants side by side (see
profile_variants and ns_errors), including the opt-in optim.ns_gram / ns_per_head / ns_every (parse_variant).

    python benchmarks/step_profile.py [--config default] [--set section.key=value ...] [--steps 12]
        [--ns-steps 5 4 3] [--threads 0] [--precision auto|fp32|bf16]
        [--variants quintic:5 polar_express:5 quintic:3 quintic:5:bf16 quintic:5:gram:heads:every2 ...]

--config works as in throughput.py ('default': the default run's model; none: the ESM-2 8M shape).
--precision is the training precision (auto: what the trainer picks on this device, i.e. bf16 where
bf16 matmuls are native); Newton–Schulz runs in what that precision's run uses (fp32 runs: fp32,
bf16 runs: bf16), on random matrices of the model's Muon shapes, the iteration counts interleaved
in one process so they see the same machine state. Medians after two warm-up steps. The operator
breakdown sums each operator's self time over PROFILED_STEPS steps (profiler overhead included), so
it says which kind of work a faster matmul unit would not speed up (CPU operator time: a CPU tool;
on CUDA, benchmarks/gpu_bench.py measures). Prints tables and writes
benchmarks/results/step_profile.json.
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
PROFILED_STEPS = 3
ERROR_STEP = 3
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def op_kind(name: str) -> str:
    """'matmul', 'attention' or 'other' for a profiler operator name."""
    if name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name or "flex_attention" in name:
        return "attention"
    return "other"


def timed_step(model, optimizers, micro, env, amp_dtype, step: int) -> tuple[float, float]:
    """One real training step on `micro`: seconds of forward + backward, and of clipping + optimizer step."""
    from plmrun.train.trainer import forward_backward

    optimizers.set_step(step)
    t0 = time.perf_counter()
    forward_backward(
        model,
        micro,
        global_norm=float(sum(mb.normalizer for mb in micro)),
        world_size=1,
        device=env.device,
        amp_dtype=amp_dtype,
        step=step,
    )
    t1 = time.perf_counter()
    optimizers.clip_gradients()
    optimizers.step()
    optimizers.zero_grad()
    return t1 - t0, time.perf_counter() - t1


def profile_steps(cfg, steps: int, amp_dtype: torch.dtype | None = None) -> dict:
    """Median seconds of forward + backward and of clipping + optimizer step over `steps` real steps,
    then per-step operator self time by kind over PROFILED_STEPS more steps."""
    from plmrun.model.registry import build_model
    from plmrun.optim.build import build_optimizer
    from plmrun.train.parallelize import init_distributed
    from plmrun.train.trainer import build_train_loader, open_training_data

    env = init_distributed(cfg)
    _, train_src, _ = open_training_data(cfg, env)
    model = build_model(cfg.model)
    optimizers = build_optimizer(model, cfg.optim, cfg.train.max_steps, ns_dtype=amp_dtype or torch.float32)
    loader = build_train_loader(cfg, env, train_src)

    def one_step(step: int) -> tuple[float, float]:
        return timed_step(model, optimizers, loader.next_step(step), env, amp_dtype, step)

    times = [one_step(step) for step in range(WARMUP + steps)][WARMUP:]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for step in range(WARMUP + steps, WARMUP + steps + PROFILED_STEPS):
            one_step(step)
    kinds = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        kinds[op_kind(event.key)] += event.self_cpu_time_total / 1e6 / PROFILED_STEPS
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "optimizer": cfg.optim.optimizer,
        "fwd_bwd_s": statistics.median(t for t, _ in times),
        "optimizer_s": statistics.median(o for _, o in times),
        "op_seconds": kinds,
    }


def profile_newton_schulz(cfg, ns_steps: list[int], dtype: torch.dtype, repeats: int = 7) -> dict:
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
                newton_schulz(g, n, dtype)
            times[n].append(time.perf_counter() - t0)
    return {"matrices": len(grads), "seconds": {str(n): statistics.median(t) for n, t in times.items()}}


VARIANT_FLAGS = "fp32|bf16, gram (optim.ns_gram), heads (optim.ns_per_head), everyK (optim.ns_every=K)"


def parse_variant(text: str) -> dict:
    """'coefficients:steps[:flag...]' -> {coefficients, steps, dtype ('' = the run's), gram, heads, every}; flags:
    fp32|bf16 (Newton–Schulz dtype), gram, heads, everyK (the opt-in optim.ns_* keys), e.g. quintic:5:gram:every2."""
    parts = text.split(":")
    v = {"coefficients": parts[0], "steps": 0, "dtype": "", "gram": False, "heads": False, "every": 1}
    ok = len(parts) >= 2 and parts[1].isdigit()
    if ok:
        v["steps"] = int(parts[1])
    for flag in parts[2:]:
        if flag in ("fp32", "bf16"):
            v["dtype"] = flag
        elif flag in ("gram", "heads"):
            v[flag] = True
        elif flag.startswith("every") and flag[5:].isdigit() and int(flag[5:]) >= 1:
            v["every"] = int(flag[5:])
        else:
            ok = False
    if not ok:
        raise ValueError(
            f"--variants {text!r}: expected coefficients:steps[:fp32|bf16][:gram][:heads][:everyK], "
            "e.g. polar_express:5 or quintic:5:gram:heads:every2"
        )
    return v


def variant_optim(optim, v: dict):
    """The OptimConfig of variant `v` (parse_variant) on top of `optim`."""
    import dataclasses

    return dataclasses.replace(
        optim,
        ns_coefficients=v["coefficients"],
        ns_steps=v["steps"],
        ns_gram=v["gram"],
        ns_per_head=v["heads"],
        ns_every=v["every"],
    )


def per_cycle_median(times: list[float], every: int) -> float:
    """Median over consecutive cycles of `every` steps of the cycle's mean: with optim.ns_every=k one step in k
    orthogonalises, so a plain median would report the cheap steps only."""
    cycles = [sum(times[i : i + every]) / every for i in range(0, len(times) - every + 1, every)]
    return statistics.median(cycles or times)


def profile_variants(cfg, variants: list[str], steps: int, amp_dtype: torch.dtype | None) -> dict:
    """Whole training steps per Newton–Schulz variant, interleaved: one model + optimizer per variant
    (same seed), every step's batch run by each variant in turn, so a busy shared machine slows all of
    them alike. Medians of forward + backward and of clipping + optimizer step (per ns_every cycle); NS
    dtype: the variant's, else what the trainer picks (bf16 only where bf16 matmuls are native)."""
    from plmrun.model.registry import build_model
    from plmrun.optim.build import build_optimizer
    from plmrun.train.parallelize import init_distributed, native_bf16
    from plmrun.train.trainer import build_train_loader, open_training_data

    env = init_distributed(cfg)
    _, train_src, _ = open_training_data(cfg, env)
    loader = build_train_loader(cfg, env, train_src)
    run_ns = torch.bfloat16 if amp_dtype is not None and native_bf16(env.device) else torch.float32
    runs = {}
    for text in variants:
        v = parse_variant(text)
        model = build_model(cfg.model)
        ns_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(v["dtype"], run_ns)
        runs[text] = (
            model,
            build_optimizer(model, variant_optim(cfg.optim, v), cfg.train.max_steps, ns_dtype=ns_dtype),
            [],
            v["every"],
        )
    for step in range(WARMUP + steps):
        micro = loader.next_step(step)
        for model, opt, times, _ in runs.values():
            t = timed_step(model, opt, micro, env, amp_dtype, step)
            if step >= WARMUP:
                times.append(t)
    out = {}
    for text, (_, _, times, every) in runs.items():
        fb, o = statistics.median(t for t, _ in times), per_cycle_median([o for _, o in times], every)
        out[text] = {"fwd_bwd_s": fb, "optimizer_s": o, "optimizer_share": o / (fb + o)}
    return out


def ns_errors(cfg, variants: list[str], amp_dtype: torch.dtype | None) -> dict:
    """Orthogonalisation error of each variant on the model's real hidden gradients (those of step
    ERROR_STEP of an fp32 quintic run: at step 0 the zero-initialised output projections leave other
    gradients rank-deficient): over each gradient's spectrum above 1e-3·σmax (the
    interval Polar Express is tuned for), max |singular
    value − 1| of NS(G) and its RMS distance from the exact polar factor U·Vᵀ, worst matrix of each."""
    from plmrun.model.registry import build_model
    from plmrun.optim.build import build_optimizer
    from plmrun.optim.muon import newton_schulz
    from plmrun.train.parallelize import init_distributed
    from plmrun.train.trainer import build_train_loader, forward_backward, open_training_data

    env = init_distributed(cfg)
    _, train_src, _ = open_training_data(cfg, env)
    loader = build_train_loader(cfg, env, train_src)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim, cfg.train.max_steps, ns_dtype=torch.float32)
    for step in range(ERROR_STEP + 1):
        opt.set_step(step)
        micro = loader.next_step(step)
        forward_backward(
            model,
            micro,
            global_norm=float(sum(mb.normalizer for mb in micro)),
            world_size=1,
            device=env.device,
            amp_dtype=amp_dtype,
            step=step,
        )
        if step < ERROR_STEP:
            opt.clip_gradients()
            opt.step()
            opt.zero_grad()
    from plmrun.optim.build import attention_heads

    kinds, heads = model.parameter_kinds(), attention_heads(model)
    named = [(n, p.grad.float()) for n, p in model.named_parameters() if kinds[n] == "hidden" and p.grad is not None]

    def matrices(per_head: bool) -> list[torch.Tensor]:
        """What gets orthogonalised: whole matrices, or (heads) each head's row block of Q/K/V."""
        out = []
        for n, g in named:
            blocks = heads.get(n, 1) if per_head else 1
            out.extend(g.view(blocks, -1, g.shape[1]).unbind(0))
        return out

    polar = {}
    for per_head in (False, True):
        polar[per_head] = []
        for g in matrices(per_head):
            u, sig, vh = torch.linalg.svd(g.double(), full_matrices=False)
            k = int((sig > 1e-3 * sig[0]).sum())
            polar[per_head].append((g, u[:, :k], vh[:k]))
    out = {}
    for text in variants:
        v = parse_variant(text)
        dtype = torch.bfloat16 if v["dtype"] == "bf16" else torch.float32
        sv, dist = 0.0, 0.0
        for g, u, vh in polar[v["heads"]]:
            o = newton_schulz(g, v["steps"], dtype, coefficients=v["coefficients"], gram=v["gram"]).double()
            sv = max(sv, (torch.linalg.svdvals(o)[: u.shape[1]] - 1).abs().max().item())
            dist = max(dist, ((o - u @ vh).norm() / u.shape[1] ** 0.5).item())
        out[text] = {"max_abs_sv_minus_1": sv, "rms_from_polar": dist}
    return out


def main_variants(speed, a, precision: str, amp_dtype) -> int:
    """--variants: interleaved step times and orthogonalisation errors, one row per variant."""
    try:
        for v in a.variants:
            parse_variant(v)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = profile_variants(speed, a.variants, a.steps, amp_dtype)
    errors = ns_errors(speed, a.variants, amp_dtype)
    base = rows[a.variants[0]]
    step0 = base["fwd_bwd_s"] + base["optimizer_s"]
    print(f"precision {precision}; step time ratio against {a.variants[0]}")
    print(
        f"{'variant':<22} {'fwd+bwd ms':>11} {'optimizer ms':>13} {'optimizer share':>16} {'step ratio':>11}"
        f" {'max|s-1|':>9} {'rms from UVt':>13}"
    )
    for v, r in rows.items():
        e = errors[v]
        r["step_ratio"] = (r["fwd_bwd_s"] + r["optimizer_s"]) / step0
        print(
            f"{v:<22} {r['fwd_bwd_s'] * 1e3:11.1f} {r['optimizer_s'] * 1e3:13.1f} {r['optimizer_share']:15.1%} "
            f"{r['step_ratio']:11.3f} {e['max_abs_sv_minus_1']:9.3f} {e['rms_from_polar']:13.4f}"
        )
    from plmrun.experiments.record import hardware_info

    report = {
        "date": datetime.date.today().isoformat(),
        "hardware": hardware_info(),
        "config": a.config,
        "overrides": a.set,
        "precision": precision,
        "steps": a.steps,
        "variants": rows,
        "ns_errors": errors,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="plmrun config file, shipped name or 'default'; without it: the ESM-2 8M shape")
    ap.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for the plmrun case"
    )
    ap.add_argument("--steps", type=int, default=10, help="timed steps per case (after 2 warm-up steps)")
    ap.add_argument("--ns-steps", type=int, nargs="+", default=[5, 4, 3], help="Newton–Schulz iteration counts")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = the config's)")
    ap.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="training precision (auto: bf16 where this device multiplies bf16 natively, else fp32)",
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        metavar="COEFFICIENTS:STEPS[:FLAG...]",
        help="compare Muon Newton–Schulz variants instead (first = baseline); flags: "
        + VARIANT_FLAGS
        + "; e.g. quintic:5 quintic:3 quintic:5:gram:heads:every2",
    )
    ap.add_argument("--out", default=None, help="JSON report (default benchmarks/results/step_profile[_variants].json)")
    a = ap.parse_args(argv)
    a.out = a.out or str(RESULTS / ("step_profile_variants.json" if a.variants else "step_profile.json"))
    if a.steps < 1 or min(a.ns_steps) < 1:
        ap.error("--steps and --ns-steps must be >= 1")
    from plmrun.config import ConfigError
    from plmrun.experiments.record import hardware_info

    try:
        speed = plmrun_config(a.config, a.set + ([f"train.threads={a.threads}"] if a.threads else []))
        cases = {"plmrun": speed, "plmrun esm2 recipe": recipe_at_shape(speed)}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if speed.train.threads:
        torch.set_num_threads(speed.train.threads)
    from plmrun.device import resolve_device
    from plmrun.train.parallelize import resolve_precision

    precision = resolve_precision(a.precision, resolve_device(speed.train.device))
    amp_dtype = torch.bfloat16 if precision == "bf16" else None
    if a.variants:
        return main_variants(speed, a, precision, amp_dtype)
    print(f"precision {precision}")
    print(
        f"{'case':<20} {'params':>8} {'optimizer':>9} {'fwd+bwd ms':>11} {'optimizer ms':>13} {'optimizer share':>16}"
    )
    rows = {}
    for case, cfg in cases.items():
        r = rows[case] = profile_steps(cfg, a.steps, amp_dtype)
        share = r["optimizer_s"] / (r["fwd_bwd_s"] + r["optimizer_s"])
        print(
            f"{case:<20} {r['params'] / 1e6:7.2f}M {r['optimizer']:>9} {r['fwd_bwd_s'] * 1e3:11.1f} "
            f"{r['optimizer_s'] * 1e3:13.1f} {share:15.0%}",
            flush=True,
        )
    print(f"\noperator self time per step ({PROFILED_STEPS} profiled steps, profiler overhead included)")
    print(f"{'case':<20} {'matmul ms':>10} {'attention ms':>13} {'other ms':>9} {'matmul share':>13}")
    for case, r in rows.items():
        k = r["op_seconds"]
        print(
            f"{case:<20} {k['matmul'] * 1e3:10.1f} {k['attention'] * 1e3:13.1f} {k['other'] * 1e3:9.1f} "
            f"{k['matmul'] / sum(k.values()):12.0%}"
        )
    ns = profile_newton_schulz(speed, a.ns_steps, amp_dtype or torch.float32)
    print(
        f"\nNewton–Schulz, {ns['matrices']} matrices, {precision}: "
        + ", ".join(f"{n} steps {s * 1e3:.1f} ms" for n, s in ns["seconds"].items())
    )
    report = {
        "date": datetime.date.today().isoformat(),
        "hardware": hardware_info(),
        "config": a.config,
        "overrides": a.set,
        "precision": precision,
        "steps": a.steps,
        "cases": rows,
        "newton_schulz": ns,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
