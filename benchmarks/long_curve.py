"""The long curve: the plmrun default recipe and the ESM-2 recipe at the default shape, on the same
batches, trained far past the default run, with the token ratio at each loss level.

    python benchmarks/long_curve.py [--tokens 10000000] [--eval-tokens 500000] [--jobs 2]
        [--set section.key=value ...] [--seed 0] [--run-root runs/long_curve]
    python benchmarks/long_curve.py --from-runs PLMRUN_RUN RECIPE_RUN   # table and plot of finished runs

Each arm is one full schedule over --tokens (max_steps = tokens / token budget, so plmrun's WSD
cool-down and the recipe's linear decay both end at the last step), evaluated every --eval-tokens
on the eval subset with the one protocol (15% of residues, all <mask>, fixed masks). `--jobs 2`
trains the two arms side by side, one process and one thread each (the losses are the same as
sequential runs: they do not depend on timing). The table gives, for each loss level both arms
reach, the tokens each needed (the first eval at or below it) and their ratio: where the curves
separate, and whether plmrun's advantage grows with tokens. Writes benchmarks/results/long_curve.json,
.md and .png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import RESULTS, plmrun_config, recipe_at_shape, write_report  # noqa: E402

ARMS = ("plmrun default", "plmrun esm2 recipe")


def arm_configs(sets: list[str], *, tokens: int, eval_tokens: int, seed: int, threads: int, run_root: str) -> dict:
    """{arm: Config}: the defaults (plus --set) and the ESM-2 recipe at their shape, one schedule over `tokens`."""
    from plmrun.config import validate
    speed = plmrun_config("default", sets)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = {}
    for arm, cfg in zip(ARMS, (speed, recipe_at_shape(speed))):
        per_step = cfg.data.token_budget * cfg.train.grad_accum
        cfg.train.max_steps = max(1, math.ceil(tokens / per_step))
        cfg.train.eval_every = max(1, round(eval_tokens / per_step))
        cfg.train.seed = seed
        cfg.train.threads = threads or cfg.train.threads
        cfg.eval.final_full = False
        cfg.logging.progress = False
        cfg.logging.run_root = run_root
        cfg.logging.name = f"{stamp}-{'plmrun' if arm == ARMS[0] else 'esm2-recipe'}"
        out[arm] = validate(cfg)
    return out


def _train(cfg) -> str:
    from plmrun.train.trainer import train
    return train(cfg)["run_dir"]


def eval_curve(run_dir) -> list[dict]:
    """The run's in-training evals: [{step, tokens, train_time_s, val_loss}] in step order."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: r[k] for k in ("step", "tokens", "train_time_s", "val_loss")} for r in rows if r.get("kind") == "eval"]


def tokens_to(curve: list[dict], level: float):
    """Tokens at the first eval at or below `level` (None if never)."""
    return next((p["tokens"] for p in curve if p["val_loss"] <= level), None)


def ratio_table(curves: dict, step: float = 0.01) -> list[dict]:
    """Token ratio (recipe / plmrun) at each loss level, on a `step` grid, from the highest level both
    curves cross after their first eval down to the lowest both reach."""
    ours, theirs = curves[ARMS[0]], curves[ARMS[1]]
    lo = max(min(p["val_loss"] for p in ours), min(p["val_loss"] for p in theirs))
    hi = min(ours[0]["val_loss"], theirs[0]["val_loss"])
    rows, level = [], math.floor(hi / step) * step
    while level >= lo - 1e-12:
        a, b = tokens_to(ours, level), tokens_to(theirs, level)
        if a and b:
            rows.append({"val_loss": round(level, 4), "plmrun_tokens": a, "recipe_tokens": b, "ratio": b / a})
        level = round(level - step, 6)
    return rows


def markdown(report: dict) -> str:
    c = report["curves"]
    side = "the two runs side by side" if report.get("jobs") == 2 else "one run after the other"
    lines = [f"Long curve, {report['date']}, {report['machine']} ({side}): one run per arm at the default shape, one"
             f" schedule over {report['tokens']:,} tokens each, eval every {report['eval_every_tokens']:,} tokens"
             f" (first {report['eval_subset']} valid sequences, 15% all <mask>).", "",
             "| arm | params | tokens | final val loss | best val loss | training s | tok/s |", "|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        s = report["summaries"][arm]
        lines.append(f"| {arm} | {s['params'] / 1e6:.2f}M | {s['tokens']:,} | {c[arm][-1]['val_loss']:.4f} | "
                     f"{s['best_val_loss']:.4f} | {s['train_time_s']:.0f} | {s['tok_per_s']:,.0f} |")
    lines += ["", "| val loss | plmrun tokens | ESM-2 recipe tokens | recipe / plmrun |", "|---|---|---|---|"]
    lines += [f"| {r['val_loss']:.2f} | {r['plmrun_tokens']:,} | {r['recipe_tokens']:,} | {r['ratio']:.2f}× |"
              for r in report["ratios"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, style in zip(ARMS, ("-o", "-s")):
        pts = report["curves"][arm]
        ax.plot([p["tokens"] / 1e6 for p in pts], [p["val_loss"] for p in pts], style, ms=3, label=arm)
    ax.axhline(report["unigram_loss"], color="grey", ls=":", label="unigram (same targets)")
    ax.set(xlabel="training tokens (M)", ylabel="val loss (15%, all <mask>)", title="validation loss")
    ax.legend()
    r = report["ratios"]
    bx.plot([x["val_loss"] for x in r], [x["ratio"] for x in r], "-o", ms=3)
    bx.axhline(1.0, color="grey", ls=":")
    bx.axhline(2.0, color="grey", ls="--", label="2× (the speed-track goal)")
    bx.set(xlabel="val loss level", ylabel="ESM-2 recipe tokens / plmrun tokens", title="token ratio to reach each loss")
    bx.invert_xaxis()
    bx.legend()
    fig.suptitle(f"{report['date']}, {report['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=10_000_000, help="training tokens per arm (one schedule)")
    ap.add_argument("--eval-tokens", type=int, default=500_000, help="tokens between evals")
    ap.add_argument("--jobs", type=int, choices=(1, 2), default=2, help="2: both arms side by side, one thread each")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for both arms")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-root", default="runs/long_curve", help="where the run directories go")
    ap.add_argument("--from-runs", nargs=2, metavar=("PLMRUN_RUN", "RECIPE_RUN"), help="report two finished runs")
    ap.add_argument("--out", default=str(RESULTS / "long_curve"), help="output path stem (.json, .md, .png)")
    a = ap.parse_args(argv)
    if a.tokens < 1 or a.eval_tokens < 1:
        ap.error("--tokens and --eval-tokens must be >= 1")
    from plmrun.config import ConfigError
    from plmrun.experiments.record import cpu_label, hardware_info
    if a.from_runs:
        runs = dict(zip(ARMS, a.from_runs))
        for arm, d in runs.items():
            if not (Path(d) / "summary.json").is_file():
                print(f"error: {d}: no summary.json (not a finished run directory)", file=sys.stderr)
                return 2
    else:
        threads = 1 if a.jobs == 2 else 0
        try:
            cfgs = arm_configs(a.set, tokens=a.tokens, eval_tokens=a.eval_tokens, seed=a.seed, threads=threads,
                               run_root=a.run_root)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for arm, cfg in cfgs.items():
            print(f"== {arm}: {cfg.train.max_steps} steps, eval every {cfg.train.eval_every}", flush=True)
        if a.jobs == 2:
            with multiprocessing.get_context("spawn").Pool(2) as pool:
                runs = dict(zip(ARMS, pool.map(_train, list(cfgs.values()))))
        else:
            runs = {arm: _train(cfg) for arm, cfg in cfgs.items()}
    summaries = {arm: json.loads((Path(d) / "summary.json").read_text()) for arm, d in runs.items()}
    curves = {arm: eval_curve(d) for arm, d in runs.items()}
    if any(len(c) < 2 for c in curves.values()):
        print("error: each run needs at least two evals for a curve", file=sys.stderr)
        return 2
    unigram = None
    for line in (Path(runs[ARMS[0]]) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("kind") == "eval" and "val_unigram_loss" in rec:
            unigram = rec["val_unigram_loss"]
    hw = hardware_info()
    report = {"date": datetime.date.today().isoformat(), "hardware": hw,
              "machine": hw.get("gpu") or cpu_label({**hw, "threads": 1} if a.jobs == 2 and not a.from_runs else hw), "tokens": max(s["tokens"] for s in summaries.values()),
              "eval_every_tokens": curves[ARMS[0]][1]["tokens"] - curves[ARMS[0]][0]["tokens"],
              "unigram_loss": unigram, "jobs": None if a.from_runs else a.jobs,
              "eval_subset": summaries[ARMS[0]]["eval_subset"], "runs": {arm: str(d) for arm, d in runs.items()},
              "summaries": {arm: {k: s[k] for k in ("params", "tokens", "train_time_s", "tok_per_s", "best_val_loss")}
                            for arm, s in summaries.items()},
              "curves": curves, "ratios": ratio_table(curves)}
    write_report(a.out, report, markdown(report))
    plot(report, Path(a.out).with_suffix(".png"))
    print(f"plot: {Path(a.out).with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
