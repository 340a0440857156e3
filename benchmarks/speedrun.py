"""The speed track made real: train until the target val loss, report tokens-to-target (hardware
independent) and time-to-target (this machine), for a plmrun config and for the ESM-2 recipe inside
plmrun at the same width, depth and MLP ratio (and with --esmc the ESM C architecture under the plmrun
run's training recipe); quote the Hugging Face peer's measured curve.

    python benchmarks/speedrun.py [--config FILE] [--set section.key=value ...] [--target 2.70]
        [--max-tokens N] [--eval-every 10] [--skip-recipe] [--esmc] [--threads 0]

Without --config the plmrun default config is used at the ESM-2 8M width/depth/MLP (as in
throughput.py); `--config default` runs the defaults at their own shape (the default run's model).
Each run stops at the first eval at or below the target (train.stop_at_val_loss) or at its config's
max_steps; --max-tokens lowers max_steps to at most that many token-budget tokens (which also
shortens LR schedules defined over max_steps). A run that ends without reaching the target is
reported as "not reached", never as a number. Time-to-target is summary.json's time_to_target:
training-step time at the first eval reaching the target (evals not counted). Writes
benchmarks/results/speedrun.json and speedrun.md; run directories go to --run-root.
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import RESULTS, plmrun_config, recipe_at_shape, write_report  # noqa: E402

# The peer, measured once on this 2-core CPU (2026-11-22) with the reference script
# ../shared/reference/hf_esm_baseline.py (log: hf_baseline_2026-11-22.log), quoted, not re-run:
# HF EsmForMaskedLM at the ESM-2 8M shape, AdamW 4e-4 (0.9, 0.98), wd 0.01, 200-step warm-up,
# DataCollatorForLanguageModeling batches of 8 (15%, 80/10/10), crop 512, fp32.
# Points: (train seconds, real tokens, val loss on the first 100 valid sequences, collator masks).
HF_REFERENCE = {
    "name": "HF EsmForMaskedLM (ESM-2 8M shape, padded batches, fp32)",
    "params": 7_512_474,
    "tok_per_s": 348,
    "date": "2026-11-22",
    "eval": "first 100 valid sequences, DataCollatorForLanguageModeling masks (15%, 80/10/10)",
    "curve": [(0.0, 0, 3.5585), (187.6, 52_126, 3.0565), (361.1, 108_532, 2.9542), (552.5, 149_435, 2.8988),
              (726.9, 206_160, 2.8323), (903.1, 264_377, 2.7411), (1085.1, 338_718, 2.7156),
              (1261.6, 408_811, 2.6996), (1446.9, 484_221, 2.6982), (1626.5, 556_823, 2.7078),
              (1803.4, 627_852, 2.711)],
}


def hf_reference(target: float) -> dict:
    """The peer's first eval at or below `target` (or not reached within its 30-minute run)."""
    row = {"case": "hf-esm (quoted)", "params": HF_REFERENCE["params"], "tok_per_s": HF_REFERENCE["tok_per_s"],
           "reached": False, "eval": HF_REFERENCE["eval"]}
    for seconds, tokens, loss in HF_REFERENCE["curve"]:
        if loss <= target:
            row.update(reached=True, time_to_target_s=seconds, tokens_to_target=tokens, val_loss=loss)
            break
    return row


def speedrun_config(cfg, *, target: float, eval_every: int, max_tokens: int | None, threads: int, run_root: str,
                    name: str):
    """`cfg` set up to stop at the target, evaluate every `eval_every` steps and respect the token cap."""
    from plmrun.config import validate
    cfg.train.stop_at_val_loss = target
    cfg.train.report_at_val_losses = sorted({*cfg.train.report_at_val_losses, target}, reverse=True)
    cfg.train.eval_every = eval_every
    cfg.train.threads = threads or cfg.train.threads
    if max_tokens is not None:
        per_step = cfg.data.token_budget * cfg.train.grad_accum
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


def result_row(case: str, summary: dict, target: float) -> dict:
    hit = summary["time_to_target"].get(str(float(target)))
    row = {"case": case, "params": summary["params"], "reached": hit is not None, "steps": summary["steps"],
           "tokens": summary["tokens"], "train_time_s": summary["train_time_s"], "tok_per_s": summary["tok_per_s"],
           "mfu": summary["mfu"], "precision": summary["precision"], "best_val_loss": summary["best_val_loss"],
           "stopped": summary["stopped"], "run_dir": summary["run_dir"]}
    if hit:
        row.update(tokens_to_target=hit["tokens"], time_to_target_s=hit["train_time_s"],
                   wall_time_s_incl_eval=hit["wall_time_s_incl_eval"], val_loss=hit["val_loss"], step=hit["step"])
    return row


def _ratio(theirs: float, ours: float, what: str) -> str:
    """'2.0× fewer tokens' or '3.5× more tokens' (never a ratio below 1 called 'fewer'; within 5%: 'the same')."""
    if abs(theirs / ours - 1) <= 0.05:
        return f"**the same {what}** ({theirs / ours:.2f}×)"
    if ours <= theirs:
        return f"**{theirs / ours:.1f}× {'fewer' if what == 'tokens' else 'less'} {what}**"
    return f"**{ours / theirs:.1f}× more {what}**"


def _fmt(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if row.get("reached") else "not reached"


def markdown(report: dict) -> str:
    t, hw = report["target"], report["hardware"]
    rows, hf = report["rows"], report["hf_reference"]
    from plmrun.experiments.record import cpu_label
    machine = hw["gpu"] or cpu_label(hw)
    lines = [f"Speedrun to val loss {t}, {report['date']}, {machine}."
             f" Eval every {report['eval_every']} steps on the first {report['eval_subset']} valid sequences"
             " (15% of residues, all <mask>, fixed masks).", ""]
    main = rows[0]
    if main["reached"]:
        head = f"**Tokens to {t}: {main['tokens_to_target']:,}** ({main['case']})"
        for other, note in [(r, "same protocol") for r in rows[1:]] + [(hf, "80/10/10 eval masks: an easier protocol")]:
            if not other["reached"]:
                head += f"; {other['case']}: not reached"
            elif abs(main["params"] / other["params"] - 1) > 0.25:
                head += f"; {other['case']} has {other['params'] / 1e6:.2f}M parameters, a different size: no ratio"
            else:
                head += (f"; vs {other['case']} ({note}): {_ratio(other['tokens_to_target'], main['tokens_to_target'], 'tokens')},"
                         f" {_ratio(other['time_to_target_s'], main['time_to_target_s'], 'training time')}")
        lines.append(head + ".")
    else:
        lines.append(f"**{main['case']} did not reach {t}** within {main['tokens']:,} tokens (best {main['best_val_loss']:.4f}).")
    lines += ["", "| run | params | tokens to target | time to target (s) | incl. eval (s) | tok/s | stopped |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['params'] / 1e6:.2f}M | {_fmt(r, 'tokens_to_target', ',')} | "
                     f"{_fmt(r, 'time_to_target_s', '.1f')} | {_fmt(r, 'wall_time_s_incl_eval', '.1f')} | "
                     f"{r['tok_per_s']:,.0f} | {r['stopped']} |")
    lines.append(f"| {hf['case']} | {hf['params'] / 1e6:.2f}M | {_fmt(hf, 'tokens_to_target', ',')} | "
                 f"{_fmt(hf, 'time_to_target_s', '.1f')} | — | {hf['tok_per_s']:,} | (measured {HF_REFERENCE['date']}) |")
    lines += ["", f"The HF row is quoted from the reference measurement on this 2-core CPU ({HF_REFERENCE['eval']}; "
              "unchanged tokens make its loss easier than our all-<mask> protocol, so the comparison favours HF)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="plmrun config file, shipped name or 'default' (plmrun's defaults at their own "
                                     "shape); without it: the defaults at the ESM-2 8M shape")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for the plmrun run")
    ap.add_argument("--target", type=float, default=2.70, help="val loss to reach (default 2.70)")
    ap.add_argument("--max-tokens", type=int, default=None, help="token cap (lowers max_steps)")
    ap.add_argument("--eval-every", type=int, default=10, help="steps between evals (the time-to-target resolution)")
    ap.add_argument("--skip-recipe", action="store_true", help="do not run the ESM-2 recipe")
    ap.add_argument("--esmc", action="store_true", help="also run the ESM C architecture with the plmrun run's recipe")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = the config's)")
    ap.add_argument("--run-root", default="runs/speedrun", help="where the run directories go")
    ap.add_argument("--out", default=str(RESULTS / "speedrun"), help="output path stem (.json and .md)")
    a = ap.parse_args(argv)
    if a.eval_every < 1 or (a.max_tokens is not None and a.max_tokens < 1):
        ap.error("--eval-every and --max-tokens must be >= 1")
    from plmrun.config import ConfigError
    from plmrun.experiments.record import hardware_info
    from plmrun.train.trainer import train
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    common = dict(target=a.target, eval_every=a.eval_every, max_tokens=a.max_tokens, threads=a.threads,
                  run_root=a.run_root)
    try:
        speed = plmrun_config(a.config, a.set)
        cases = {"plmrun" + (f" ({a.config})" if a.config else ""): speedrun_config(speed, name=f"{stamp}-plmrun", **common)}
        if not a.skip_recipe:
            cases["plmrun esm2 recipe"] = speedrun_config(recipe_at_shape(speed), name=f"{stamp}-esm2-recipe", **common)
        if a.esmc:
            cases["plmrun esmc arch"] = speedrun_config(esmc_at_shape(speed), name=f"{stamp}-esmc", **common)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for case, cfg in cases.items():
        print(f"== {case}: up to {cfg.train.max_steps} steps, stop at val loss {a.target}", flush=True)
        rows.append(result_row(case, train(cfg), a.target))
    report = {"date": datetime.date.today().isoformat(), "hardware": hardware_info(), "target": a.target,
              "eval_every": a.eval_every, "eval_subset": speed.eval.subset, "max_tokens": a.max_tokens,
              "config": a.config, "overrides": a.set, "rows": rows, "hf_reference": hf_reference(a.target)}
    write_report(a.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
