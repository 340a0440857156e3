"""The long curve: the plmrun default recipe and the ESM-2 recipe at the default shape, on the same
batches, trained far past the default run, with the token ratio at each loss level.

    python benchmarks/long_curve.py [--tokens 10000000] [--eval-tokens 500000] [--jobs 2]
        [--set section.key=value ...] [--seed 0] [--run-root runs/long_curve]
    python benchmarks/long_curve.py --from-runs PLMRUN_RUN RECIPE_RUN   # table and plot of finished runs

Each arm is one full schedule over --tokens (max_steps = tokens / token budget, so plmrun's WSD
cool-down and the recipe's linear decay both end at the last step), evaluated every --eval-tokens
on the eval subset with the one protocol (15% of residues, all <mask>, fixed masks). `--jobs 2`
trains the two arms side by side, one process and one thread each (the losses are the same as
sequential runs: they do not depend on timing). The table gives, on a 0.005 grid of loss levels, the
tokens each arm needed (the first eval at or below the level), the token ratio at the evals and with
each crossing interpolated between evals, and the training-time ratio; a level one arm passed before
its first eval or never reached gives a bound (≥ / ≤). Where the curves separate, and whether
plmrun's advantage grows with tokens. Writes benchmarks/results/long_curve.json, .md and .png.
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
RUN_ORDER = {2: "two runs side by side", 1: "one run after the other"}  # report["jobs"] → label


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


def _first_at_or_below(curve: list[dict], level: float):
    """Index of the first eval at or below `level` (None if never)."""
    return next((i for i, p in enumerate(curve) if p["val_loss"] <= level), None)


def _crossing_tokens(curve: list[dict], i: int, level: float) -> float:
    """Where the curve crosses `level` between eval i - 1 and eval i, linear in tokens (eval 0: its own)."""
    if i == 0:
        return curve[0]["tokens"]
    a, b = curve[i - 1], curve[i]
    return a["tokens"] + (a["val_loss"] - level) / (a["val_loss"] - b["val_loss"]) * (b["tokens"] - a["tokens"])


def tokens_to(curve: list[dict], level: float, interpolate: bool = False):
    """Tokens at the first eval at or below `level` (None if never). With `interpolate`, the crossing
    between that eval and the one before it, linear in tokens: evals are ~0.5M tokens apart, so the
    eval-grid value alone can be off by most of an interval."""
    i = _first_at_or_below(curve, level)
    if i is None:
        return None
    return _crossing_tokens(curve, i, level) if interpolate else curve[i]["tokens"]


def ratio_table(curves: dict, step: float = 0.005) -> list[dict]:
    """Token and training-time ratios (recipe / plmrun) at each loss level on a `step` grid, from the
    higher first eval down to the lowest loss either arm reaches: at the first evals at or below the
    level, and for tokens also between evals (linear interpolation of each crossing).

    A row is a bound when one side is only bounded: an arm already below the level at its first eval
    crossed it somewhere before (its tokens are an upper bound); an arm that never reached the level
    needed more than its whole run (its last eval is a lower bound). `bound` says which way the true
    ratio lies ("≥", "≤" or ""); levels where both sides are bounded in opposite ways are left out."""
    ours, theirs = curves[ARMS[0]], curves[ARMS[1]]

    def crossing(curve, level):
        i = _first_at_or_below(curve, level)
        if i is None:  # never: more than the whole run
            return curve[-1], curve[-1]["tokens"], "never"
        return curve[i], _crossing_tokens(curve, i, level), "first" if i == 0 else ""

    rows = []
    level = round(math.floor(max(ours[0]["val_loss"], theirs[0]["val_loss"]) / step + 1e-9) * step, 6)
    lowest = min(p["val_loss"] for p in ours + theirs)
    while level >= lowest - 1e-9:
        (a, ai, ka), (b, bi, kb) = crossing(ours, level), crossing(theirs, level)
        up = ka == "first" or kb == "never"  # ours overstated or theirs understated: ratio larger
        down = ka == "never" or kb == "first"
        if not (up and down):
            rows.append(
                {
                    "val_loss": round(level, 4),
                    "bound": "≥" if up else "≤" if down else "",
                    "plmrun_tokens": a["tokens"],
                    "recipe_tokens": b["tokens"],
                    "plmrun_crossing": ka,
                    "recipe_crossing": kb,
                    "ratio": b["tokens"] / a["tokens"],
                    "ratio_interpolated": bi / ai,
                    "time_ratio": b["train_time_s"] / a["train_time_s"],
                }
            )
        level = round(level - step, 6)
    return rows


def markdown(report: dict) -> str:
    c = report["curves"]
    side = RUN_ORDER.get(report.get("jobs"), "run order unknown")
    lines = [
        f"Long curve, {report['date']}, {report['machine']} ({side}): one run per arm at the default shape, one"
        f" schedule over {report['tokens']:,} tokens each, eval every {report['eval_every_tokens']:,} tokens"
        f" (first {report['eval_subset']} valid sequences, 15% all <mask>).",
        "",
        "| arm | params | tokens | final val loss | best val loss | training s | tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        s = report["summaries"][arm]
        lines.append(
            f"| {arm} | {s['params'] / 1e6:.2f}M | {s['tokens']:,} | {c[arm][-1]['val_loss']:.4f} | "
            f"{s['best_val_loss']:.4f} | {s['train_time_s']:.0f} | {s['tok_per_s']:,.0f} |"
        )

    def cell(tokens, crossing):  # crossing: "" (between two evals), "first" (by the first eval), "never"
        return {"never": "not reached", "first": f"≤ {tokens:,}"}.get(crossing, f"{tokens:,}")

    lines += [
        "",
        "| val loss | plmrun tokens | ESM-2 recipe tokens | tokens: recipe / plmrun | between evals "
        "(interpolated) | training time: recipe / plmrun |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["ratios"]:
        b = f"{r['bound']} " if r["bound"] else ""
        lines.append(
            f"| {r['val_loss']:.3f} | {cell(r['plmrun_tokens'], r['plmrun_crossing'])} | "
            f"{cell(r['recipe_tokens'], r['recipe_crossing'])} | {b}{r['ratio']:.2f}× | "
            f"{b}{r['ratio_interpolated']:.2f}× | {b}{r['time_ratio']:.2f}× |"
        )
    lines += [
        "",
        "Tokens and training seconds (evals not counted) are those of the first eval at or below the level;"
        " the interpolated column puts each crossing linearly between the two evals around it. ≥ / ≤: one"
        " arm was already below the level at its first eval (≤ its tokens) or never reached it (more than"
        " its whole run), so the ratio is a bound.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.6))
    for arm, style in zip(ARMS, ("-o", "-s")):
        pts = report["curves"][arm]
        ax.plot([p["tokens"] / 1e6 for p in pts], [p["val_loss"] for p in pts], style, ms=3, label=arm)
    ax.axhline(report["unigram_loss"], color="grey", ls=":", label="unigram (same targets)")
    ax.set(xlabel="training tokens (M)", ylabel="val loss (15%, all <mask>)", title="validation loss")
    ax.legend(fontsize=8)
    r = report["ratios"]
    exact = [x for x in r if not x["bound"]]
    bx.plot([x["val_loss"] for x in exact], [x["ratio"] for x in exact], "o", ms=3, label="at the evals")
    bx.plot(
        [x["val_loss"] for x in exact],
        [x["ratio_interpolated"] for x in exact],
        "-",
        label="between evals (interpolated)",
    )
    for sign, marker in (("≥", "^"), ("≤", "v")):
        pts = [x for x in r if x["bound"] == sign]
        if pts:
            bx.plot(
                [x["val_loss"] for x in pts],
                [x["ratio"] for x in pts],
                marker,
                ms=5,
                color="grey",
                label=f"bound ({sign}): one arm at its first eval or never there",
            )
    bx.axhline(1.0, color="grey", ls=":")
    bx.axhline(2.0, color="grey", ls="--", label="2× (the speed-track goal)")
    bx.set(
        xlabel="val loss level", ylabel="ESM-2 recipe tokens / plmrun tokens", title="token ratio to reach each loss"
    )
    bx.invert_xaxis()
    bx.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    side = f", {RUN_ORDER[report['jobs']]}" if report.get("jobs") in RUN_ORDER else ""
    fig.suptitle(f"{report['date']}, {report['machine']}{side}", fontsize=9)
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
        for d in runs.values():
            if not (Path(d) / "summary.json").is_file():
                print(f"error: {d}: no summary.json (not a finished run directory)", file=sys.stderr)
                return 2
    else:
        threads = 1 if a.jobs == 2 else 0
        try:
            cfgs = arm_configs(
                a.set, tokens=a.tokens, eval_tokens=a.eval_tokens, seed=a.seed, threads=threads, run_root=a.run_root
            )
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
    envs = {
        arm: json.loads(f.read_text()) if (f := Path(d) / "environment.json").is_file() else {}
        for arm, d in runs.items()
    }
    jobs = a.jobs
    if a.from_runs:  # how the runs were made, from their own records, not from this call's flags
        # [first start, start + training and eval seconds]: environment.json is stamped before the first
        # step and those seconds leave out set-up, so a span never reaches past the run's real end and
        # runs one after the other overlap by at most the 1-s resolution of "started"
        spans = [
            (
                t := datetime.datetime.fromisoformat(envs[arm]["started"]).timestamp(),
                t + summaries[arm]["train_time_s"] + summaries[arm]["eval_time_s"],
            )
            for arm in ARMS
            if "started" in envs[arm]
        ]
        jobs = (
            (2 if min(spans[0][1], spans[1][1]) - max(spans[0][0], spans[1][0]) > 2 else 1) if len(spans) == 2 else None
        )
    hw = hardware_info()
    hw["threads"] = max(e.get("torch_threads", hw["threads"]) for e in envs.values())
    report = {
        "date": min((e["started"] for e in envs.values() if "started" in e), default=datetime.date.today().isoformat())[
            :10
        ],
        "hardware": hw,
        "machine": hw.get("gpu") or cpu_label(hw),
        "tokens": max(s["tokens"] for s in summaries.values()),
        "eval_every_tokens": curves[ARMS[0]][1]["tokens"] - curves[ARMS[0]][0]["tokens"],
        "unigram_loss": unigram,
        "jobs": jobs,
        "eval_subset": summaries[ARMS[0]]["eval_subset"],
        "runs": {arm: str(d) for arm, d in runs.items()},
        "summaries": {
            arm: {k: s[k] for k in ("params", "tokens", "train_time_s", "tok_per_s", "best_val_loss")}
            for arm, s in summaries.items()
        },
        "curves": curves,
        "ratios": ratio_table(curves),
    }
    write_report(a.out, report, markdown(report))
    plot(report, Path(a.out).with_suffix(".png"))
    print(f"plot: {Path(a.out).with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
