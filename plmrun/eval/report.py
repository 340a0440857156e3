"""Compare runs: loss curves (vs tokens and vs wall time) overlaid in one PNG, plus an HTML page
with the summary table. Reads only the run directories' `metrics.jsonl`, `summary.json` and
`config.yaml`, so it works on finished, running and copied runs alike (a run without summary.json
shows '-'). Train and val losses use different masking protocols, so they get separate panels and
labels naming each protocol: a train/val gap there is not an overfitting gap.
"""

from __future__ import annotations

import argparse
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from plmrun.eval.errors import EvalError

COLUMNS = [
    ("params", "params"),
    ("tokens", "tokens"),
    ("train_time_s", "train time (s)"),
    ("tok_per_s", "tok/s"),
    ("mfu", "MFU"),
    ("best_val_loss", "best val loss"),
    ("final_val", "final val (subset)"),
    ("final_full_val", "final val (full split)"),
    ("time_to_target", "time to target"),
]


@dataclass
class Run:
    name: str
    train: list[dict] = field(default_factory=list)  # metrics lines with kind == "train"
    evals: list[dict] = field(default_factory=list)  # metrics lines with kind == "eval" (in-training)
    summary: dict = field(default_factory=dict)
    final_full: dict | None = None  # the end-of-training full valid split eval line
    config: object | None = None  # the run's config.yaml (a plmrun.config.Config)


def load_run(path: str | Path, name: str | None = None) -> Run:
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{path}: no metrics.jsonl (not a run directory)")
    run = Run(name or path.name)
    with open(metrics) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if lineno > 1 and not line.endswith("\n"):
                    break  # a run still writing its last line
                raise ValueError(f"{metrics}:{lineno}: invalid JSON ({e.msg})") from None
            if rec.get("kind") == "train" and "loss" in rec:
                run.train.append(rec)
            elif rec.get("kind") == "eval" and "val_loss" in rec:
                if rec.get("final"):
                    run.final_full = rec  # whole valid split, not a point of the subset curve
                else:
                    run.evals.append(rec)
    summary = path / "summary.json"
    if summary.is_file():
        try:
            run.summary = json.loads(summary.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{summary}: invalid JSON ({e.msg})") from None
    if not run.train and not run.evals:
        raise ValueError(f"{metrics}: no train or eval lines")
    run.config = _load_config(path / "config.yaml")
    return run


def _load_config(path: Path):
    """The run's config, or None (copied without it, or from another plmrun version): labels then say less."""
    from plmrun.config import load_yaml
    from plmrun.errors import PlmrunError

    try:
        return load_yaml(path)
    except PlmrunError:
        return None


def _pct(frac: float) -> str:
    return f"{100 * frac:.3g}%"


def train_protocol(run: Run) -> str:
    """How train loss was measured, e.g. '30% targets, 80/10/10' (masking.* of config.yaml)."""
    if run.config is None:
        return "protocol unknown: no config.yaml"
    k = run.config.masking
    if k.objective == "diffusion":
        return "masked diffusion, t ~ U(eps, 1]"
    rate = (
        _pct(k.mask_rate)
        if k.mask_rate_end is None
        else f"{_pct(k.mask_rate)}->{_pct(k.mask_rate_end)} over {k.ramp_steps} steps"
    )
    keep = 1.0 - k.mask_token_frac - k.random_token_frac
    text = f"{rate} targets, {100 * k.mask_token_frac:.3g}/{100 * k.random_token_frac:.3g}/{100 * keep:.3g}"
    if k.objective == "mlm_to_diffusion":
        text += f" -> diffusion over {k.ramp_steps} steps"
    return text


def val_protocol(run: Run) -> str:
    """How val loss was measured, e.g. '15%, all <mask>' (eval.mask_rate of config.yaml)."""
    if run.config is None:
        return "protocol unknown: no config.yaml"
    return f"{_pct(run.config.eval.mask_rate)}, all <mask>"


def _axis_label(kind: str, protocols: list[str]) -> str:
    """'train loss (30% targets, 80/10/10)' when all runs agree, else per run in the legend."""
    if len(set(protocols)) == 1:
        return f"{kind} loss ({protocols[0]})"
    return f"{kind} loss (protocol per run: legend)"


def _names(paths: list[Path]) -> list[str]:
    """Directory names, with the parent prepended where two runs share a name."""
    names = [p.resolve().name for p in paths]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def plot(runs: list[Run]):
    """Train curves (top row) and val curves (bottom row) vs tokens and vs time; returns the Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 8.5))
    axes = fig.subplots(2, 2)
    train_label = _axis_label("train", [train_protocol(r) for r in runs])
    val_label = _axis_label("val", [val_protocol(r) for r in runs])
    for col, (x_key, xlabel) in enumerate((("tokens", "tokens"), ("train_time_s", "training time (s)"))):
        top, bottom = axes[0][col], axes[1][col]
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            tr = [r for r in run.train if x_key in r]
            ev = [r for r in run.evals if x_key in r]
            if tr:
                top.plot(
                    [r[x_key] for r in tr],
                    [r["loss"] for r in tr],
                    color=color,
                    alpha=0.7,
                    lw=1,
                    label=f"{run.name}: train loss ({train_protocol(run)})",
                )
            if ev:
                bottom.plot(
                    [r[x_key] for r in ev],
                    [r["val_loss"] for r in ev],
                    color=color,
                    lw=2,
                    marker="o",
                    ms=3,
                    label=f"{run.name}: val loss ({val_protocol(run)}, subset)",
                )
            f = run.final_full
            if f is not None and x_key in f:
                bottom.plot(
                    [f[x_key]],
                    [f["val_loss"]],
                    color=color,
                    marker="*",
                    ms=12,
                    ls="none",
                    label=f"{run.name}: val loss ({val_protocol(run)}, full split)",
                )
        for ax, ylabel, what in ((top, train_label, "train"), (bottom, val_label, "val")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel + " (nats)", fontsize=9)
            ax.set_title(f"{what} loss vs {'tokens' if x_key == 'tokens' else 'time'}")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0] and col == 1:
                ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def fmt(value) -> str:
    """Compact text for a summary value (numbers, dicts of targets, missing)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(value, dict):
        if "loss" in value and not isinstance(value["loss"], dict):
            return fmt(value["loss"])
        return "; ".join(f"{k}: {fmt(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value) or "-"
    return str(value)


def _value(run: Run, key: str):
    """A summary value; the full-split val also from metrics.jsonl's final line (no summary.json yet)."""
    if key == "final_full_val" and run.summary.get(key) is None and run.final_full is not None:
        return run.final_full["val_loss"]
    return run.summary.get(key)


def summary_rows(runs: list[Run]) -> list[list[str]]:
    return [[run.name] + [fmt(_value(run, key)) for key, _ in COLUMNS] for run in runs]


def markdown_table(runs: list[Run]) -> str:
    head = ["run"] + [title for _, title in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(runs)]
    return "\n".join(lines)


def write_html(runs: list[Run], png_name: str, out: Path) -> None:
    head = "".join(f"<th>{html.escape(t)}</th>" for t in ["run"] + [t for _, t in COLUMNS])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in summary_rows(runs)
    )
    out.write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>plmrun report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child{{text-align:left}}</style>
</head><body>
<h1>plmrun report: {len(runs)} run{"s" if len(runs) != 1 else ""}</h1>
<img src="{html.escape(png_name)}" alt="loss curves" style="max-width:100%">
<h2>Summary</h2>
<table><tr>{head}</tr>
{body}</table>
</body></html>
""")


def make_report(run_dirs: list[str | Path], out_dir: str | Path) -> list[Run]:
    """Write loss_curves.png and report.html into out_dir; returns the runs read."""
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, n) for p, n in zip(paths, _names(paths))]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(runs).savefig(out_dir / "loss_curves.png", dpi=110)
    write_html(runs, "loss_curves.png", out_dir / "report.html")
    return runs


# ---------------------------------------------------------------- CLI
def add_report_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report",
        help="overlay loss curves of runs and tabulate their summaries",
        description="Writes loss_curves.png and report.html; prints the summary table.",
    )
    p.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    try:
        runs = make_report(args.runs, args.out)
    except ValueError as e:
        raise EvalError(f"report: {e}") from None
    print(markdown_table(runs))
    print(f"wrote {Path(args.out) / 'report.html'} and {Path(args.out) / 'loss_curves.png'}")
    return 0
