"""The speed track made real: train until the target val loss, report tokens-to-target (hardware
independent) and time-to-target (this machine), for a plmrun config and for the ESM-2 recipe inside
plmrun at the same width, depth and MLP ratio (and with --esmc the ESM C architecture under the plmrun
run's training recipe); quote the Hugging Face peer's measured curve.

    python benchmarks/speedrun.py [--config FILE] [--set section.key=value ...] [--target 2.85 2.84]
        [--seeds 3] [--max-tokens N] [--baseline-tokens N] [--eval-every 10] [--dense-eval-every N]
        [--dense-margin 0.02] [--skip-recipe] [--esmc] [--jobs 1|2] [--threads 0]

Without --config the plmrun default config is used at the ESM-2 8M width/depth/MLP (as in
throughput.py); `--config default` runs the defaults at their own shape (the default run's model).
Each run stops at the first eval at or below the lowest target (train.stop_at_val_loss) or at its
config's max_steps; --max-tokens lowers max_steps to at most that many token-budget tokens (which also
shortens LR schedules defined over max_steps); --baseline-tokens gives the ESM-2 recipe (and esmc)
arms one schedule of that many tokens, e.g. twice plmrun's budget to test a 2x claim. --dense-eval-every evaluates more
often once the best val loss is near a target (train.dense_eval_every), so the crossing is known to a
few steps. With --seeds N each arm runs with train.seed 0..N-1 and the report gives, per target, the
geometric-mean ratios (ESM-2 recipe / plmrun) of tokens and of training time with one-sided Welch
p-values for "ratio > 1" and "ratio > 2". A run that ends without reaching a target is reported as
"not reached", never as a number; in a ratio it counts with its whole run (a lower bound, marked >=).
Time-to-target is summary.json's time_to_target: training-step time at the first eval reaching the
target (evals not counted). Writes
benchmarks/results/speedrun.json and speedrun.md; run directories go to --run-root.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import RESULTS, plmrun_config, recipe_at_shape, write_report  # noqa: E402

# The Hugging Face reference run, quoted, not re-run (it takes 30 minutes): one run on a 2-core CPU
# with a plain PyTorch training loop:
# HF EsmForMaskedLM at the ESM-2 8M shape, AdamW 4e-4 (0.9, 0.98), wd 0.01, 200-step warm-up,
# DataCollatorForLanguageModeling batches of 8 (15%, 80/10/10), crop 512, fp32.
# Points: (train seconds, real tokens, val loss on the first 100 valid sequences, collator masks).
HF_REFERENCE = {
    "name": "HF EsmForMaskedLM (ESM-2 8M shape, padded batches, fp32)",
    "params": 7_512_474,
    "tok_per_s": 348,
    "date": "2026-11-22",
    "eval": "first 100 valid sequences, DataCollatorForLanguageModeling masks (15%, 80/10/10)",
    "curve": [
        (0.0, 0, 3.5585),
        (187.6, 52_126, 3.0565),
        (361.1, 108_532, 2.9542),
        (552.5, 149_435, 2.8988),
        (726.9, 206_160, 2.8323),
        (903.1, 264_377, 2.7411),
        (1085.1, 338_718, 2.7156),
        (1261.6, 408_811, 2.6996),
        (1446.9, 484_221, 2.6982),
        (1626.5, 556_823, 2.7078),
        (1803.4, 627_852, 2.711),
    ],
}


def hf_reference(target: float) -> dict:
    """The peer's first eval at or below `target` (or not reached within its 30-minute run)."""
    row = {
        "case": "hf-esm (quoted)",
        "params": HF_REFERENCE["params"],
        "tok_per_s": HF_REFERENCE["tok_per_s"],
        "reached": False,
        "eval": HF_REFERENCE["eval"],
    }
    for seconds, tokens, loss in HF_REFERENCE["curve"]:
        if loss <= target:
            row.update(reached=True, time_to_target_s=seconds, tokens_to_target=tokens, val_loss=loss)
            break
    return row


def speedrun_config(
    cfg,
    *,
    targets,
    eval_every: int,
    max_tokens: int | None,
    threads: int,
    run_root: str,
    name: str,
    seed: int = 0,
    dense_eval_every: int = 0,
    dense_margin: float = 0.02,
    schedule_tokens: int | None = None,
):
    """`cfg` set up to stop at the lowest target, evaluate every `eval_every` steps (every
    `dense_eval_every` near a target) and respect the token cap, with train.seed = `seed`;
    `schedule_tokens` sets max_steps to one schedule of that many tokens instead."""
    from plmrun.config import validate

    targets = [float(t) for t in ([targets] if isinstance(targets, (int, float)) else targets)]
    cfg.train.stop_at_val_loss = min(targets)
    cfg.train.report_at_val_losses = sorted({*cfg.train.report_at_val_losses, *targets}, reverse=True)
    cfg.train.eval_every = eval_every
    cfg.train.dense_eval_every = dense_eval_every
    cfg.train.dense_eval_margin = dense_margin
    cfg.train.threads = threads or cfg.train.threads
    cfg.train.seed = seed
    per_step = cfg.data.token_budget * cfg.train.grad_accum
    if schedule_tokens is not None:
        cfg.train.max_steps = max(1, math.ceil(schedule_tokens / per_step))
    elif max_tokens is not None:
        cfg.train.max_steps = min(cfg.train.max_steps, max(1, math.ceil(max_tokens / per_step)))
    cfg.eval.final_full = False
    cfg.logging.progress = False
    cfg.logging.run_root = run_root
    cfg.logging.name = name
    return validate(cfg)


def esmc_at_shape(speed, preset: str = "esmc_cpu"):
    """The esmc preset (ESM C's blocks, SwiGLU 8/3: about the parameters of a 4x GELU MLP) at `speed`'s
    width, depth and heads, trained exactly as `speed` (optimizer, data, masking, eval): the architecture arm."""
    import copy

    from plmrun.config import build_config, validate

    cfg = copy.deepcopy(speed)
    cfg.model = build_config(preset).model
    for k in ("hidden_size", "num_layers", "num_heads", "attention_backend", "init_std"):
        setattr(cfg.model, k, getattr(speed.model, k))
    return validate(cfg)


def result_row(case: str, summary: dict, targets, seed: int = 0) -> dict:
    """One run: its totals and, per target, the first eval at or below it (`hits[target]` None if never)."""
    targets = [float(t) for t in ([targets] if isinstance(targets, (int, float)) else targets)]
    row = {
        "case": case,
        "seed": seed,
        "params": summary["params"],
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "train_time_s": summary["train_time_s"],
        "tok_per_s": summary["tok_per_s"],
        "mfu": summary["mfu"],
        "precision": summary["precision"],
        "best_val_loss": summary["best_val_loss"],
        "stopped": summary["stopped"],
        "run_dir": summary["run_dir"],
        "hits": {},
    }
    for t in targets:
        hit = summary["time_to_target"].get(str(t))
        row["hits"][str(t)] = (
            None
            if hit is None
            else {
                "tokens_to_target": hit["tokens"],
                "time_to_target_s": hit["train_time_s"],
                "wall_time_s_incl_eval": hit["wall_time_s_incl_eval"],
                "val_loss": hit["val_loss"],
                "step": hit["step"],
            }
        )
    return row


def arm_values(rows: list[dict], target: float, key: str) -> tuple[list[float], int]:
    """`key` (tokens_to_target or time_to_target_s) of each run of an arm at `target`, and how many runs did
    not reach it: those count with their whole run (tokens / training time), a lower bound of the true value."""
    vals, censored = [], 0
    for r in rows:
        hit = r["hits"].get(str(float(target)))
        if hit is None:
            censored += 1
            vals.append(float(r["tokens"] if key == "tokens_to_target" else r["train_time_s"]))
        else:
            vals.append(float(hit[key]))
    return vals, censored


def welch_one_sided(ours: list[float], theirs: list[float], factor: float) -> float | None:
    """One-sided Welch p-value of "theirs / ours > factor" on log values (ratios are multiplicative);
    None with fewer than two runs per arm or no variance at all."""
    if min(len(ours), len(theirs)) < 2:
        return None
    from scipy import stats

    a = np.log(np.asarray(theirs, dtype=float)) - math.log(factor)
    b = np.log(np.asarray(ours, dtype=float))
    if a.std() == 0 and b.std() == 0:
        return None
    return float(stats.ttest_ind(a, b, equal_var=False, alternative="greater").pvalue)


def compare(ours: list[dict], theirs: list[dict], target: float) -> dict | None:
    """Geometric-mean ratios theirs / ours in tokens and training time at `target`, with one-sided Welch
    p-values for ratio > 1 and ratio > 2; None when a run of ours did not reach the target (no ratio exists).
    Runs of theirs that did not reach it count with their whole run, so the ratio is a lower bound ('>=')."""
    out = {}
    for what, key in (("tokens", "tokens_to_target"), ("time", "time_to_target_s")):
        a, a_cens = arm_values(ours, target, key)
        b, b_cens = arm_values(theirs, target, key)
        if a_cens:
            return None
        out[what] = {
            "ratio": float(np.exp(np.mean(np.log(b)) - np.mean(np.log(a)))),
            "lower_bound": b_cens > 0,
            "not_reached": b_cens,
            "p_gt_1": welch_one_sided(a, b, 1.0),
            "p_gt_2": welch_one_sided(a, b, 2.0),
        }
    return out


def _ratio(theirs: float, ours: float, what: str) -> str:
    """'2.0× fewer tokens' or '3.5× more tokens' (never a ratio below 1 called 'fewer'; within 5%: 'the same')."""
    if abs(theirs / ours - 1) <= 0.05:
        return f"**the same {what}** ({theirs / ours:.2f}×)"
    if ours <= theirs:
        return f"**{theirs / ours:.1f}× {'fewer' if what == 'tokens' else 'less'} {what}**"
    return f"**{ours / theirs:.1f}× more {what}**"


def _p(p: float | None) -> str:
    return "n/a" if p is None else (f"{p:.2g}" if p >= 1e-4 else "<1e-4")


def _mean_sd(vals: list[float], fmt: str) -> str:
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{format(float(np.mean(vals)), fmt)} ± {format(float(np.std(vals, ddof=1)), fmt)}"


def headline(case: str, c: dict | None, other_params: float, params: float) -> str:
    if abs(params / other_params - 1) > 0.25:
        return f"{case} has {other_params / 1e6:.2f}M parameters, a different size: no ratio"
    if c is None:
        return f"vs {case}: no ratio (plmrun did not reach it in every run)"
    parts = []
    for what, label in (("tokens", "tokens"), ("time", "training time")):
        x = c[what]
        ge = "≥ " if x["lower_bound"] else ""
        word = ("fewer" if what == "tokens" else "less") if x["ratio"] >= 1 else "more"
        r = x["ratio"] if x["ratio"] >= 1 else 1 / x["ratio"]
        parts.append(
            f"**{ge}{r:.2f}× {word} {label}** (one-sided Welch p: ratio > 1 {_p(x['p_gt_1'])}, "
            f"ratio > 2 {_p(x['p_gt_2'])})"
        )
    return f"vs {case}: " + ", ".join(parts)


def markdown(report: dict) -> str:
    targets, hw, hf = report["targets"], report["hardware"], report["hf_reference"]
    from plmrun.experiments.record import cpu_label

    side = report.get("jobs") == 2  # each run's own thread count, not the parent's
    machine = hw["gpu"] or cpu_label({**hw, "threads": 1} if side else hw) + (", two runs side by side" if side else "")
    arms: dict[str, list[dict]] = {}
    for r in report["rows"]:
        arms.setdefault(r["case"], []).append(r)
    names = list(arms)
    seeds = sorted({r["seed"] for r in report["rows"]})
    dense = (
        f", every {report['dense_eval_every']} within {report['dense_margin']} of a target"
        if report.get("dense_eval_every")
        else ""
    )
    lines = [
        f"Speedrun to val loss {' and '.join(map(str, targets))}, {report['date']}, {machine}."
        f" Eval every {report['eval_every']} steps{dense} on the first {report['eval_subset']} valid sequences"
        f" (15% of residues, all <mask>, fixed masks); seeds {', '.join(map(str, seeds))} per arm.",
        "",
    ]
    if report.get("overrides"):
        lines += [f"{names[0]} with {', '.join(f'`{o}`' for o in report['overrides'])}.", ""]
    if report.get("baseline_tokens") and len(names) > 1:
        lines += [f"{', '.join(names[1:])}: one schedule of {report['baseline_tokens']:,} tokens.", ""]
    main_rows = arms[names[0]]
    for t in targets:
        hits = [r["hits"][str(float(t))] for r in main_rows]
        if all(hits):
            toks, _ = arm_values(main_rows, t, "tokens_to_target")
            head = f"**{t}: {names[0]} in {_mean_sd(toks, ',.0f')} tokens**"
            for other in names[1:]:
                head += "; " + headline(
                    other, compare(main_rows, arms[other], t), arms[other][0]["params"], main_rows[0]["params"]
                )
            hf_row = hf[str(float(t))]
            if hf_row["reached"] and len(seeds) == 1:
                head += (
                    f"; vs {hf_row['case']} (80/10/10 eval masks: an easier protocol): "
                    f"{_ratio(hf_row['time_to_target_s'], hits[0]['time_to_target_s'], 'training time')}"
                )
            lines.append(head + ".")
        else:
            lines.append(
                f"**{names[0]} did not reach {t} in {sum(h is None for h in hits)} of {len(hits)} runs**"
                f" (best {min(r['best_val_loss'] for r in main_rows):.4f})."
            )
    lines += [
        "",
        "| run | seeds | params | "
        + " | ".join(f"tokens to {t} | training s to {t}" for t in targets)
        + " | tok/s | stopped |",
        "|---|---|---|" + "---|---|" * len(targets) + "---|---|",
    ]
    for name in names:
        rs = arms[name]
        cells = []
        for t in targets:
            for key, fmt in (("tokens_to_target", ",.0f"), ("time_to_target_s", ".1f")):
                vals, cens = arm_values(rs, t, key)
                cells.append(
                    "not reached"
                    if cens == len(rs)
                    else _mean_sd(vals, fmt) + (f" (≥; {cens} not reached)" if cens else "")
                )
        stopped = ", ".join(sorted({r["stopped"] for r in rs}))
        lines.append(
            f"| {name} | {len(rs)} | {rs[0]['params'] / 1e6:.2f}M | "
            + " | ".join(cells)
            + f" | {_mean_sd([r['tok_per_s'] for r in rs], ',.0f')} | {stopped} |"
        )
    cells = []
    for t in targets:
        h = hf[str(float(t))]
        cells += [f"{h['tokens_to_target']:,}", f"{h['time_to_target_s']:.1f}"] if h["reached"] else ["not reached"] * 2
    lines.append(
        f"| {hf[str(float(targets[0]))]['case']} | 1 | {HF_REFERENCE['params'] / 1e6:.2f}M | "
        + " | ".join(cells)
        + f" | {HF_REFERENCE['tok_per_s']:,} | (measured {HF_REFERENCE['date']}) |"
    )
    lines += [
        "",
        "Ratios are geometric means over seeds (theirs / ours); p-values are one-sided Welch tests on the log"
        " values. A run that did not reach a target counts with its whole run, so such a ratio is a lower"
        " bound (≥). Time is training-step time to the first eval at or below the target (evals not counted).",
        f"The HF row is quoted from the reference measurement on a 2-core CPU ({HF_REFERENCE['eval']}; "
        "unchanged tokens make its loss easier than our all-<mask> protocol, so the comparison favours HF).",
    ]
    return "\n".join(lines) + "\n"


def _train_case(job):
    from plmrun.train.trainer import train

    case, seed, cfg, targets = job
    print(
        f"== {case} seed {seed}: up to {cfg.train.max_steps} steps, stop at val loss {cfg.train.stop_at_val_loss}",
        flush=True,
    )
    return result_row(case, train(cfg), targets, seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--config",
        help="plmrun config file, shipped name or 'default' (plmrun's defaults at their own "
        "shape); without it: the defaults at the ESM-2 8M shape",
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for the plmrun run"
    )
    ap.add_argument(
        "--target",
        type=float,
        nargs="+",
        default=[2.85, 2.84],
        help="val losses to reach (default 2.85 2.84); each run stops at the lowest",
    )
    ap.add_argument("--seeds", type=int, default=1, help="runs per arm, train.seed 0..N-1 (≥ 2 for p-values)")
    ap.add_argument("--max-tokens", type=int, default=None, help="token cap (lowers max_steps)")
    ap.add_argument(
        "--baseline-tokens",
        type=int,
        default=None,
        help="the ESM-2 recipe and esmc arms train one schedule of this many tokens (default: their "
        "config's max_steps, lowered by --max-tokens), e.g. twice plmrun's to test a 2x claim",
    )
    ap.add_argument("--eval-every", type=int, default=10, help="steps between evals (the time-to-target resolution)")
    ap.add_argument(
        "--dense-eval-every",
        type=int,
        default=0,
        help="steps between evals once the best val loss is within --dense-margin of a target (0 = off)",
    )
    ap.add_argument("--dense-margin", type=float, default=0.02, help="nats above a target where dense evals start")
    ap.add_argument("--skip-recipe", action="store_true", help="do not run the ESM-2 recipe")
    ap.add_argument("--esmc", action="store_true", help="also run the ESM C architecture with the plmrun run's recipe")
    ap.add_argument(
        "--jobs",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: two runs side by side, one thread each (losses and tokens are unchanged; times share the machine)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = the config's; --jobs 2 sets 1)")
    ap.add_argument("--run-root", default="runs/speedrun", help="where the run directories go")
    ap.add_argument("--out", default=str(RESULTS / "speedrun"), help="output path stem (.json and .md)")
    a = ap.parse_args(argv)
    if a.eval_every < 1 or a.seeds < 1 or any(x is not None and x < 1 for x in (a.max_tokens, a.baseline_tokens)):
        ap.error("--eval-every, --seeds, --max-tokens and --baseline-tokens must be >= 1")
    if a.seeds > 1:
        try:
            import scipy  # noqa: F401
        except ImportError:
            ap.error("--seeds > 1 needs scipy for the Welch tests: pip install 'plmrun[probe]'")
    from plmrun.config import ConfigError
    from plmrun.experiments.record import hardware_info

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    threads = 1 if a.jobs == 2 else a.threads
    common = dict(
        targets=a.target,
        eval_every=a.eval_every,
        threads=threads,
        run_root=a.run_root,
        dense_eval_every=a.dense_eval_every,
        dense_margin=a.dense_margin,
    )
    jobs = []
    try:
        speed = plmrun_config(a.config, a.set)
        arms = [("plmrun" + (f" ({a.config})" if a.config else ""), "plmrun", lambda: copy.deepcopy(speed), None)]
        if not a.skip_recipe:
            arms.append(("plmrun esm2 recipe", "esm2-recipe", lambda: recipe_at_shape(speed), a.baseline_tokens))
        if a.esmc:
            arms.append(("plmrun esmc arch", "esmc", lambda: esmc_at_shape(speed), a.baseline_tokens))
        for seed in range(a.seeds):  # seed-major: with --jobs 2 the arms of one seed run side by side
            for case, tag, make, schedule in arms:
                cfg = speedrun_config(
                    make(),
                    name=f"{stamp}-{tag}-s{seed}",
                    seed=seed,
                    max_tokens=a.max_tokens,
                    schedule_tokens=schedule,
                    **common,
                )
                jobs.append((case, seed, cfg, a.target))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.jobs == 2:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(2) as pool:
            rows = pool.map(_train_case, jobs, chunksize=1)
    else:
        rows = [_train_case(j) for j in jobs]
    report = {
        "date": datetime.date.today().isoformat(),
        "hardware": hardware_info(),
        "targets": a.target,
        "seeds": a.seeds,
        "eval_every": a.eval_every,
        "dense_eval_every": a.dense_eval_every,
        "dense_margin": a.dense_margin,
        "eval_subset": speed.eval.subset,
        "max_tokens": a.max_tokens,
        "baseline_tokens": a.baseline_tokens,
        "jobs": a.jobs,
        "config": a.config,
        "overrides": a.set,
        "rows": rows,
        "comparisons": {},
        "hf_reference": {str(float(t)): hf_reference(t) for t in a.target},
    }
    names = list(dict.fromkeys(r["case"] for r in rows))
    for t in a.target:
        for other in names[1:]:
            report["comparisons"][f"{other} @ {t}"] = compare(
                [r for r in rows if r["case"] == names[0]], [r for r in rows if r["case"] == other], t
            )
    write_report(a.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
