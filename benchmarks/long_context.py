"""Long context: per-token loss of whole long sequences, before and after training on long crops.

    python benchmarks/long_context.py [--steps 250] [--long-steps 250] [--long-max-length 2050]
        [--per-bucket 64] [--set section.key=value ...] [--threads 1] [--run-root runs/long_context]

Two runs of a small rotary (speedrun) model share their first --steps steps at 512-token crops
(data.max_length_schedule phase 0 is bitwise a plain 512 run): the control keeps 512-token crops for
--long-steps more steps, the long run switches to --long-max-length (2,048 residues + <cls>/<eos>)
at step --steps (ESM C's 512 -> 2,048 schedule). Each model is evaluated on whole sequences (no
crop: eval.max_length = the bucket's longest sequence) of the bundled corpus's valid and test splits,
bucketed by residue length, with the one eval protocol (15% masked, all <mask>, fixed masks), so the
table says what the longer crops bought on long proteins, and what they cost on short ones, at equal
steps and tokens. Writes benchmarks/results/long_context.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BUCKETS = [(1, 511), (512, 1022), (1023, 2048), (2049, None)]
"Residue-length buckets: ESM-2's 1,022-residue window and ESM C's 2,048-residue crop as edges."


def bucket_name(lo: int, hi: int | None) -> str:
    return f"<{hi + 1}" if lo == 1 else (f"{lo}-{hi}" if hi else f">{lo - 1}")


def bucket_sources(per_bucket: int, splits=("valid", "test")) -> dict:
    """{bucket: InMemorySequences} of the first `per_bucket` sequences (valid, then test) in each length bucket."""
    from plmrun.data.corpus import resolve_dataset
    from plmrun.data.shards import InMemorySequences, open_dataset

    path = resolve_dataset("bundled")
    seqs = [src.residues(i) for src in (open_dataset(path, s) for s in splits) for i in range(len(src))]
    out = {}
    for lo, hi in BUCKETS:
        picked = [s for s in seqs if lo <= len(s) <= (hi or len(s))][:per_bucket]
        if picked:
            out[bucket_name(lo, hi)] = InMemorySequences(picked)
    return out


def whole_sequence_loss(model, sources: dict, token_budget: int = 8192) -> dict:
    """{bucket: (per-token loss, masked tokens)} with every sequence whole (eval.max_length = the longest)."""
    import torch

    from plmrun.config import EvalConfig
    from plmrun.eval.mlm import evaluate

    out = {}
    for name, src in sources.items():
        longest = int(np.max(src.lengths)) + 2
        cfg = EvalConfig(max_length=longest, token_budget=max(token_budget, longest))
        with torch.inference_mode():
            m = evaluate(model, src, cfg)
        out[name] = {"loss": m["loss"], "sequences": len(src), "longest": longest - 2}
    return out


def run_configs(a) -> dict:
    from plmrun.config import build_config

    common = [
        f"--data.token_budget={a.token_budget}",
        "--data.max_length=512",
        f"--train.max_steps={a.steps + a.long_steps}",
        f"--train.checkpoint_every={a.steps}",
        "--train.keep_latest_k=2",
        "--train.eval_every=0",
        "--eval.subset=16",
        "--eval.final_full=false",
        "--logging.progress=false",
        f"--train.threads={a.threads}",
        f"--logging.run_root={a.run_root}",
        "--model.hidden_size=64",
        "--model.num_layers=2",
        "--model.num_heads=2",
        *["--" + s.removeprefix("--") for s in a.set],
    ]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return {
        "crop 512 throughout": build_config(None, common + [f"--logging.name={stamp}-512"]),
        f"crop 512, then {a.long_max_length - 2}": build_config(
            None,
            common
            + [
                f"--data.max_length_schedule=[[0, 512], [{a.steps}, {a.long_max_length}]]",
                f"--logging.name={stamp}-long",
            ],
        ),
    }


def markdown(report: dict) -> str:
    cols = list(report["rows"][0]["buckets"])
    lines = [
        f"Per-token loss of whole sequences (bundled valid+test, first {report['per_bucket']} per bucket, "
        f"15% masked), {report['date']}: {report['steps']} steps at 512-token crops, then {report['long_steps']} "
        f"more at 512 or {report['long_max_length']} tokens ({report['token_budget']} tokens per step).",
        "",
        "| model | step | " + " | ".join(f"{c} residues" for c in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['case']} | {r['step']} | " + " | ".join(f"{r['buckets'][c]['loss']:.4f}" for c in cols) + " |"
        )
    lines.append(
        "| sequences (longest) | | "
        + " | ".join(
            f"{report['rows'][0]['buckets'][c]['sequences']} ({report['rows'][0]['buckets'][c]['longest']})"
            for c in cols
        )
        + " |"
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=250, help="steps at 512-token crops (both runs)")
    ap.add_argument("--long-steps", type=int, default=250, help="steps after the switch")
    ap.add_argument("--long-max-length", type=int, default=2050, help="crop after the switch, tokens incl. <cls>/<eos>")
    ap.add_argument("--token-budget", type=int, default=4096, help="tokens per step (>= --long-max-length)")
    ap.add_argument("--per-bucket", type=int, default=64, help="eval sequences per length bucket")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for both runs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--run-root", default="runs/long_context", help="where the run directories go")
    ap.add_argument("--out", default=str(RESULTS / "long_context"), help="output path stem (.json and .md)")
    a = ap.parse_args(argv)
    if min(a.steps, a.long_steps, a.per_bucket) < 1:
        ap.error("--steps, --long-steps and --per-bucket must be >= 1")
    import torch

    from plmrun.config import ConfigError
    from plmrun.model.loading import load_model
    from plmrun.train.trainer import train

    torch.set_num_threads(a.threads)
    try:
        cases = run_configs(a)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sources = bucket_sources(a.per_bucket)
    rows = []
    for i, (case, cfg) in enumerate(cases.items()):
        print(f"== {case}: {cfg.train.max_steps} steps", flush=True)
        summary = train(cfg)
        run = Path(summary["run_dir"])
        if i == 0:  # the shared first phase, once
            model, _ = load_model(run / "checkpoints" / f"step_{a.steps:08d}")
            rows.append({"case": "crop 512 (before)", "step": a.steps, "buckets": whole_sequence_loss(model, sources)})
        model, _ = load_model(run)
        rows.append(
            {
                "case": case,
                "step": summary["steps"],
                "run_dir": str(run),
                "buckets": whole_sequence_loss(model, sources),
            }
        )
    report = {
        "date": datetime.date.today().isoformat(),
        "steps": a.steps,
        "long_steps": a.long_steps,
        "long_max_length": a.long_max_length,
        "token_budget": a.token_budget,
        "per_bucket": a.per_bucket,
        "overrides": a.set,
        "rows": rows,
    }
    write_report(a.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
