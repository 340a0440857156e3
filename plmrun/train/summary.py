"""A finished run's summary: summary.json's fields and the lines printed at the end."""

from __future__ import annotations

import math
import time

from plmrun.config import Config
from plmrun.train.peak import Peak
from plmrun.train.peak import mfu as model_flops_utilisation
from plmrun.train.state import TrainState


def summarize(
    cfg: Config,
    *,
    name: str,
    run_dir,
    state: TrainState,
    n_params: int,
    n_dense: int,
    peak: Peak,
    device,
    world_size: int,
    precision: str,
    final_full: dict | None,
    reason: str,
    launch: float,
    records: list[dict],
) -> dict:
    evals = [r for r in records if r.get("kind") == "eval" and not r.get("final")]
    final_val = {k[4:]: v for k, v in evals[-1].items() if k.startswith("val_")} if evals else None
    t = state.train_time_s
    mfu, mfu_capped = model_flops_utilisation(state.flops, t, peak.flops, world_size)
    total = time.perf_counter() - launch
    summary = {
        "name": name,
        "run_dir": str(run_dir),
        "arch": cfg.model.arch,
        "params": n_params,
        "params_non_embedding": n_dense,
        "steps": state.step,
        "tokens": state.tokens,
        "train_time_s": t,
        "eval_time_s": state.eval_time_s,
        "total_time_s": total,
        "tok_per_s": state.tokens / max(t, 1e-9),
        "mfu": mfu,
        "mfu_capped": mfu_capped,
        "peak_flops_per_device": peak.flops,
        "peak_source": peak.source,
        "machine_contended": peak.contended,
        "device": str(device),
        "world_size": world_size,
        "precision": precision,
        "best_val_loss": state.best_val_loss,
        "final_val": final_val,
        "final_full_val": final_full,
        "eval_subset": cfg.eval.subset,
        "time_to_target": state.time_to_target,
        "stopped": reason,
        "cost_usd": cfg.train.cost_per_hour * world_size * total / 3600.0,
        "data": state.data,
    }
    last = final_full or final_val or {}
    if "gain" in last:
        summary["gain_over_unigram"] = last["gain"]
        summary["worse_than_unigram"] = last["gain"] < 0
    return summary


def unigram_warning(s: dict) -> str | None:
    """A line for a run whose final val loss is above the unigram baseline's (it learned less than residue
    frequencies), else None."""
    if not s.get("worse_than_unigram"):
        return None
    last = s["final_full_val"] or s["final_val"]
    which = "full valid split" if s["final_full_val"] else "eval subset"
    return (
        f"warning: the final val loss {last['loss']:.4f} ({which}) is worse than the unigram baseline "
        f"{last['unigram_loss']:.4f} (gain {last['gain']:.4f} nats): the model predicts masked residues worse "
        "than the training split's residue frequencies; train longer or check the learning rates"
    )


def mfu_text(s: dict) -> str:
    """MFU as printed: a rate above the peak is shown as a bound (the peak was underestimated), never > 100%."""
    if s.get("mfu_capped"):
        return (
            f"≥{s['mfu']:.0%} (the model FLOP rate exceeded the peak {s['peak_flops_per_device'] / 1e9:.0f} "
            "GFLOP/s: set PLMRUN_PEAK_FLOPS to this machine's real peak)"
        )
    return f"{s['mfu']:.1%}"


def summary_lines(s: dict) -> str:
    lines = [
        f"run {s['run_dir']}: {s['steps']} steps, {s['tokens']:,} tokens in {s['train_time_s']:.1f} s of training"
        f" ({s['total_time_s']:.1f} s total) — {s['tok_per_s']:,.0f} tok/s, MFU {mfu_text(s)}"
    ]
    if s["final_val"]:
        lines.append(
            f"val loss (first {s['eval_subset'] or 'all'} valid sequences): {s['final_val']['loss']:.4f}"
            f" ({s['final_val']['loss'] / math.log(2):.4f} bits per masked residue)  best {s['best_val_loss']:.4f}"
        )
    if s["final_full_val"]:
        f = s["final_full_val"]
        lines.append(
            f"full valid split: loss {f['loss']:.4f}  ppl {f['perplexity']:.2f}  acc {f['accuracy']:.3f}"
            f"  F1 {f['f1']:.3f}  MCC {f['mcc']:.3f}  unigram loss {f['unigram_loss']:.4f}"
            f"  gain {f['gain']:.4f}"
        )
    for thr, r in sorted(s["time_to_target"].items(), key=lambda kv: -float(kv[0])):
        lines.append(
            f"time-to-target {thr}: {r['train_time_s']:.1f} s training ({r['wall_time_s_incl_eval']:.1f} s incl."
            f" eval), {r['tokens']:,} tokens, step {r['step']}"
        )
    if s.get("machine_contended"):
        lines.append(
            "note: the machine was contended at start-up (other work slowed its matmul): times and tok/s "
            "are slower than this machine's"
        )
    warning = unigram_warning(s)
    if warning:
        lines.append(warning)
    return "\n".join(lines)
