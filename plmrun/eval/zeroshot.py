"""Zero-shot variant effects by masked marginals, compared with a DMS assay by Spearman rho.

For each mutated site i the wild type is fed with <mask> at i and the score of a substitution is
log p(mut | masked) - log p(wt | masked); a multi-mutant scores the sum over its sites (each site
masked on its own, as in Meier et al. 2021). One forward per distinct site, packed into batches.
A wild type longer than max_length - 2 residues is scored in a window of that many residues
centred on the site (clamped to the sequence ends).
"""
from __future__ import annotations

import argparse
import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from plmrun import tokenizer as tok
from plmrun.data.packing import length_batches, pack_tokens
from plmrun.device import resolve_device
from plmrun.eval.errors import EvalError
from plmrun.eval.inference import EvalModel, load_eval_model, window_plan

AMINO_ACIDS = frozenset(tok.VOCAB[i] for i in tok.AMINO_ACID_IDS)
_MUTANT = re.compile(r"^([A-Z])(-?\d+)([A-Z])$")


@dataclass(frozen=True)
class Substitution:
    index: int   # 0-based index into the wild type
    wt: str
    mt: str


@dataclass
class Variant:
    line: int                        # line of the CSV file (header = 1)
    label: str                       # the mutant as written
    subs: tuple[Substitution, ...]
    measured: float


def parse_mutant(text: str, offset: int = 1) -> tuple[Substitution, ...]:
    """`A42G` or `A42G:L50P` (position `offset` = first wild-type residue) -> substitutions."""
    subs = []
    for part in text.strip().split(":"):
        m = _MUTANT.match(part.strip())
        if not m:
            raise ValueError(f"cannot parse mutant {part!r} (expected e.g. A42G, multiple joined by ':')")
        subs.append(_substitution(m.group(1), int(m.group(2)), m.group(3), offset))
    if len({s.index for s in subs}) != len(subs):
        raise ValueError(f"mutant {text!r} changes the same position twice")
    return tuple(subs)


def _substitution(wt: str, pos: int, mt: str, offset: int) -> Substitution:
    for letter in (wt, mt):
        if letter not in AMINO_ACIDS:
            raise ValueError(f"{letter!r} is not one of the 20 standard amino acids")
    return Substitution(pos - offset, wt, mt)


def read_dms(path: str | Path, *, score_column: str = "DMS_score", mutant_column: str = "mutant",
             wt_column: str | None = None, pos_column: str | None = None, mut_column: str | None = None,
             offset: int = 1) -> list[Variant]:
    """Variants of a DMS CSV: a mutant column (A42G:L50P) or wildtype/position/mutant columns."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such DMS file")
    split_cols = [wt_column, pos_column, mut_column]
    if any(split_cols) and not all(split_cols):
        raise ValueError("give all three of --wt-column, --pos-column and --mut-column, or none")
    need = [score_column] + (split_cols if all(split_cols) else [mutant_column])
    variants = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(reader.fieldnames or [])})")
        for row in reader:
            line = reader.line_num
            try:
                if all(split_cols):
                    label = f"{row[wt_column]}{row[pos_column]}{row[mut_column]}"
                    subs = (_substitution(row[wt_column].strip(), int(row[pos_column]), row[mut_column].strip(), offset),)
                else:
                    label = row[mutant_column]
                    subs = parse_mutant(label, offset)
                measured = float(row[score_column]) if row[score_column].strip() else float("nan")
            except ValueError as e:
                raise ValueError(f"{path}:{line}: {e}") from None
            variants.append(Variant(line, label, subs, measured))
    if not variants:
        raise ValueError(f"{path}: no variants")
    return variants


def check_wildtype(variants: list[Variant], wildtype: str, path: str | Path) -> None:
    """Every substitution's wild-type letter must match the sequence; errors name the CSV line."""
    for v in variants:
        for s in v.subs:
            if not 0 <= s.index < len(wildtype):
                raise ValueError(f"{path}:{v.line}: {v.label}: position outside the wild type "
                                 f"(length {len(wildtype)}; check --offset)")
            if wildtype[s.index] != s.wt:
                raise ValueError(f"{path}:{v.line}: {v.label}: the wild type has {wildtype[s.index]} at that "
                                 f"position, not {s.wt} (check --offset and --wildtype)")


@torch.no_grad()
def site_log_probs(model, wildtype: str, sites, *, max_length: int | None = None,
                   token_budget: int = 8192) -> dict[int, np.ndarray]:
    """{site: log-probabilities [33] at that site with <mask> there}, one packed forward per batch."""
    net = model.net if isinstance(model, EvalModel) else model
    device = next(net.parameters()).device
    ids = tok.encode(wildtype)
    width, token_budget = window_plan(model, max_length, [len(ids)], token_budget)
    sites = sorted(set(sites))
    inputs, where = [], []
    for i in sites:
        start = 0 if len(ids) <= width else min(max(i - width // 2, 0), len(ids) - width)
        x = tok.with_specials(ids[start:start + width]).copy()
        x[1 + i - start] = tok.MASK
        inputs.append(x)
        where.append(1 + i - start)
    out = {}
    for batch in length_batches(np.array([len(x) for x in inputs]), token_budget):
        tokens, positions, cu, max_seqlen = pack_tokens([inputs[j] for j in batch], device)
        index = cu[:-1].long() + torch.tensor([where[j] for j in batch], device=device)
        logits = net(tokens, positions, cu, max_seqlen, logits_index=index).logits
        logp = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
        for k, j in enumerate(batch):
            out[sites[j]] = logp[k]
    return out


def score_variants(variants: list[Variant], log_probs: Callable[[int], np.ndarray] | dict) -> np.ndarray:
    """Masked-marginal score of each variant: Σ_sites log p(mut) - log p(wt)."""
    get = log_probs.__getitem__ if isinstance(log_probs, dict) else log_probs
    vocab = {a: i for i, a in enumerate(tok.VOCAB)}
    return np.array([sum(float(get(s.index)[vocab[s.mt]] - get(s.index)[vocab[s.wt]]) for s in v.subs)
                     for v in variants])


def spearman(scores: np.ndarray, measured: np.ndarray) -> tuple[float, int]:
    """Spearman rho over variants with a measured value, and how many there were."""
    from scipy.stats import spearmanr
    ok = np.isfinite(measured)
    if ok.sum() < 3:
        raise ValueError(f"need at least 3 variants with a measured score, got {int(ok.sum())}")
    return float(spearmanr(scores[ok], measured[ok]).statistic), int(ok.sum())


def zeroshot(model, wildtype: str, variants: list[Variant], *, token_budget: int = 8192) -> tuple[np.ndarray, float, int]:
    """Scores, Spearman rho and the number of variants it was computed over."""
    sites = {s.index for v in variants for s in v.subs}
    lp = site_log_probs(model, wildtype, sites, token_budget=token_budget)
    scores = score_variants(variants, lp)
    rho, n = spearman(scores, np.array([v.measured for v in variants]))
    return scores, rho, n


def read_wildtype(arg: str) -> str:
    """A sequence, or a FASTA file with exactly one record."""
    if Path(arg).is_file():
        from plmrun.eval.embed import read_fasta
        records = read_fasta(arg)
        if len(records) != 1:
            raise ValueError(f"{arg}: expected one wild-type record, found {len(records)}")
        return records[0][1]
    seq = arg.strip().upper()
    bad = sorted(set(seq) - AMINO_ACIDS - set("XBZUO"))
    if not seq or bad:
        raise ValueError(f"--wildtype {arg[:20]!r}: not a file and not a protein sequence"
                         + (f" (letters {''.join(bad)})" if bad else ""))
    return seq


# ---------------------------------------------------------------- CLI
def add_zeroshot_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("zeroshot", help="zero-shot variant effects vs a DMS assay (Spearman rho)",
                              description="Masked-marginal scores of the variants in a DMS CSV file.")
    p.add_argument("model", help="run directory, checkpoint, EsmForMaskedLM folder or hub name")
    p.add_argument("--dms", required=True, help="CSV file with one variant per row")
    p.add_argument("--wildtype", required=True, help="wild-type sequence, or a FASTA file with one record")
    p.add_argument("--mutant-column", default="mutant", help="column with mutants like A42G or A42G:L50P")
    p.add_argument("--score-column", default="DMS_score", help="column with the measured scores")
    p.add_argument("--wt-column", help="instead of --mutant-column: wild-type letter column")
    p.add_argument("--pos-column", help="... position column")
    p.add_argument("--mut-column", help="... mutant letter column")
    p.add_argument("--offset", type=int, default=1,
                   help="number of the first wild-type residue in the mutant positions (default 1: 1-based)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per forward incl. <cls>/<eos>; longer wild types are scored in a window "
                        "(default: the whole wild type for rotary presets, 1024 for esm2)")
    p.add_argument("--token-budget", type=int, default=8192, help="tokens per packed batch")
    p.add_argument("--out", help="write line, mutant, measured and score per variant to this CSV")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    try:
        wildtype = read_wildtype(args.wildtype)
        variants = read_dms(args.dms, score_column=args.score_column, mutant_column=args.mutant_column,
                            wt_column=args.wt_column, pos_column=args.pos_column, mut_column=args.mut_column,
                            offset=args.offset)
        check_wildtype(variants, wildtype, args.dms)
        model = load_eval_model(args.model, device=resolve_device(args.device), max_length=args.max_length)
        scores, rho, n = zeroshot(model, wildtype, variants, token_budget=args.token_budget)
    except ValueError as e:
        raise EvalError(f"zeroshot: {e}") from None
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["line", "mutant", "measured", "score"])
            for v, s in zip(variants, scores):
                w.writerow([v.line, v.label, v.measured, f"{s:.6f}"])
    n_sites = len({s.index for v in variants for s in v.subs})
    print(f"{args.dms}: Spearman rho = {rho:.4f} over {n} variants ({n_sites} sites scored, model {args.model})")
    return 0
