"""`plmrun data stats DIR`: length distribution and what padding vs packing costs at a max length.

All efficiencies are real tokens / computed tokens, with tokens = min(residues, L - 2) + 2
(`<cls>`/`<eos>`, crop to the max length L):
- padded (to L): every sequence padded to L — fixed-shape batching;
- padded (to batch max): random batches of `batch_size` sequences padded to their longest;
- packed: plmrun's packer (best-fit over chunks of the shuffled epoch) at `token_budget`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plmrun.data.errors import DataError
from plmrun.data.shards import dataset_splits, open_dataset

PERCENTILES = (5, 25, 50, 75, 95, 99)


def length_stats(lengths: np.ndarray, max_length: int, token_budget: int, batch_size: int, seed: int = 0) -> dict:
    from plmrun.data.packing import PackingPlan, token_lengths

    lengths = np.asarray(lengths, np.int64)
    tokens = token_lengths(lengths, max_length)
    order = np.random.default_rng(seed).permutation(len(tokens))
    n_full = len(tokens) // batch_size * batch_size
    batch_max = tokens[order[:n_full]].reshape(-1, batch_size).max(axis=1)
    rest = tokens[order[n_full:]]
    dynamic = batch_max.sum() * batch_size + (rest.max() * len(rest) if len(rest) else 0)
    plan = PackingPlan(lengths, token_budget=token_budget, max_length=max_length, seed=seed)
    return {
        "num_sequences": int(len(lengths)),
        "num_residues": int(lengths.sum()),
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "min": int(lengths.min()),
        "max": int(lengths.max()),
        "percentiles": {str(p): float(np.percentile(lengths, p)) for p in PERCENTILES},
        "max_length": max_length,
        "cropped_fraction": float((lengths > max_length - 2).mean()),
        "efficiency": {
            "padded_to_max_length": float(tokens.sum() / (len(tokens) * max_length)),
            "padded_to_batch_max": float(tokens.sum() / dynamic),
            "packed": plan.epoch_efficiency(0),
        },
        "batch_size": batch_size,
        "token_budget": token_budget,
    }


def residue_counts(source) -> np.ndarray:
    """Occurrences of each vocabulary id [V] over all residues of `source` (the unigram baseline's
    frequencies); a sharded split is counted shard by shard, anything else sequence by sequence."""
    from plmrun.tokenizer import VOCAB_SIZE

    blocks = (
        source.residue_blocks()
        if hasattr(source, "residue_blocks")
        else (source.residues(i) for i in range(len(source)))
    )
    counts = np.zeros(VOCAB_SIZE, dtype=np.int64)
    for b in blocks:
        counts += np.bincount(np.asarray(b), minlength=VOCAB_SIZE)[:VOCAB_SIZE]
    return counts


def histogram_png(lengths: np.ndarray, path: Path, title: str, max_length: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.logspace(0, np.log10(max(lengths.max(), 10)), 80)
    ax.hist(lengths, bins=bins, color="#4472c4")
    ax.axvline(max_length - 2, color="#c00000", ls="--", label=f"max_length {max_length} (crop)")
    ax.set_xscale("log")
    ax.set_xlabel("residues per sequence")
    ax.set_ylabel("sequences")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dataset_stats(
    dataset_dir,
    split: str | None = None,
    *,
    max_length: int = 1024,
    token_budget: int = 65536,
    batch_size: int = 32,
    png_dir: str | None = None,
) -> dict:
    """Stats of one split (or every split); writes `lengths_<split>.png` per split."""
    splits = [split] if split else dataset_splits(dataset_dir)
    if not splits:
        raise DataError(f"{dataset_dir}: no prepared splits (run plmrun data prepare)")
    if token_budget < max_length:
        raise DataError(f"--token-budget {token_budget} is smaller than --max-length {max_length}")
    out = {}
    for s in splits:
        src = open_dataset(dataset_dir, s)
        out[s] = length_stats(src.lengths, max_length, token_budget, batch_size)
        png = Path(png_dir or dataset_dir) / f"lengths_{s}.png"
        histogram_png(src.lengths, png, f"{Path(dataset_dir).name} / {s}", max_length)
        out[s]["histogram_png"] = str(png)
    return out


def format_stats(stats: dict) -> str:
    lines = []
    for split, st in stats.items():
        pct = "  ".join(f"p{k}={v:,.0f}" for k, v in st["percentiles"].items())
        eff = st["efficiency"]
        batch_max = f"padded to batch max (B={st['batch_size']})"
        packed = f"packed (budget {st['token_budget']:,})"
        lines += [
            f"[{split}] {st['num_sequences']:,} sequences, {st['num_residues']:,} residues",
            f"  length: mean {st['mean']:,.1f}  median {st['median']:,.0f}  min {st['min']:,}  max {st['max']:,}",
            f"  {pct}",
            f"  at max_length {st['max_length']}: {st['cropped_fraction']:.1%} of sequences cropped",
            "  compute efficiency (real / computed tokens):",
            f"    {'padded to max_length':<34}{eff['padded_to_max_length']:.1%}",
            f"    {batch_max:<34}{eff['padded_to_batch_max']:.1%}",
            f"    {packed:<34}{eff['packed']:.1%}",
            f"  histogram: {st['histogram_png']}",
        ]
    return "\n".join(lines)
