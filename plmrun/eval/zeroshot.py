"""Zero-shot variant effects by masked marginals, compared with a DMS assay by Spearman rho.

For each mutated site i the wild type is fed with <mask> at i and the score of a substitution is
log p(mut | masked) - log p(wt | masked); a multi-mutant scores the sum over its sites (each site
masked on its own, as in Meier et al. 2021). One forward per distinct site, packed into batches.
A wild type longer than max_length - 2 residues is scored in a window of that many residues
centred on the site (clamped to the sequence ends).

Tables as real scans ship them (ProteinGym `mutant` A42G:L50P, MaveDB `hgvs_pro` p.Ala42Gly or
p.[Ala42Gly;Leu50Pro], CSV/TSV/';', gzip/xz): rows that are no substitution (deletions, insertions,
frameshifts, stops, changes of a wild-type stop, X/B/Z/U/O, synonymous, empty/NA) are skipped and
counted per kind, or refused with `strict`. Sites map to residues by `offset` or by a position map
(numbering with gaps such as Ambler's, insertion codes such as 100A). Columns are never guessed:
a wrong one fails with the table's columns and the ones that fit.

A variant on several rows (in any notation or order) is refused, or scored once with the mean of its
measured scores under --average-duplicates; variants without a measured score are counted in
`skipped`. Beside the model's rho stands a site-independent baseline's: log f(mut) - log f(wt) under
the training split's residue frequencies (RUN/unigram.json), else the wild type's own, saying which.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from plmrun import tokenizer as tok
from plmrun.data.packing import length_batches, pack_tokens
from plmrun.data.shards import InMemorySequences
from plmrun.data.tables import MISSING, read_table
from plmrun.device import resolve_device
from plmrun.eval.errors import EvalError
from plmrun.eval.flags import add_device_flag, add_window_flags, check_window_flags
from plmrun.eval.inference import EvalModel, load_eval_model, window_plan
from plmrun.eval.mlm_command import run_dir_of, unigram_baseline
from plmrun.outputs import check_output_file, model_inputs

AMINO_ACIDS = frozenset(tok.VOCAB[i] for i in tok.AMINO_ACID_IDS)
NONSTANDARD = frozenset("XBZUO")  # X is an unknown residue in IUPAC, not a stop: counted apart
THREE_LETTER = {
    "Ala": "A",
    "Arg": "R",
    "Asn": "N",
    "Asp": "D",
    "Cys": "C",
    "Gln": "Q",
    "Glu": "E",
    "Gly": "G",
    "His": "H",
    "Ile": "I",
    "Leu": "L",
    "Lys": "K",
    "Met": "M",
    "Phe": "F",
    "Pro": "P",
    "Ser": "S",
    "Thr": "T",
    "Trp": "W",
    "Tyr": "Y",
    "Val": "V",
    "Ter": "*",
    "Xaa": "X",
    "Asx": "B",
    "Glx": "Z",
    "Sec": "U",
    "Pyl": "O",
}
# Rows that are valid notation but not a substitution: skipped with a count (or refused by --strict).
SKIP_KINDS = {
    "deletion": "deletion",
    "insertion": "insertion",
    "frameshift": "frameshift",
    "stop_loss": "wild-type stop",
    "stop": "stop",
    "nonstandard": "non-standard residue",
    "synonymous": "synonymous",
    "unknown": "without a protein change",
}  # kind -> its count's noun
_ONE_KIND = {
    "deletion": "a deletion",
    "insertion": "an insertion",
    "frameshift": "a frameshift",
    "stop_loss": "a change of a wild-type stop",
    "stop": "a stop (nonsense)",
    "nonstandard": "a non-standard residue (X is read as unknown, not as a stop)",
    "synonymous": "synonymous",
    "unknown": "without a protein change",
}
_AA = r"[A-Z][a-z]{2}|[A-Z*]"
_PART = re.compile(
    rf"^(?P<wt>{_AA})(?P<pos>-?\d+)(?P<code>[A-Z]?)(?:_(?:{_AA})-?\d+[A-Z]?)?"
    rf"(?P<rest>=|-|del|dup|delins.+|ins.+|(?:{_AA})?fs.*|(?:{_AA})?ext.*|\?|[A-Z][a-z]{{2}}|[A-Z*])$"
)
_SYNONYMOUS_ROWS = {"=", "p.=", "p.(=)", "_wt", "_sy", "wt", "wildtype", "wild-type", "wild_type", "synonymous"}
_MISSING = MISSING | {"p.?", "?", "_?"}


class NotSubstitution(ValueError):
    """A row in valid notation that zero-shot cannot score (a deletion, stop, synonymous row, ...)."""

    def __init__(self, kind: str, text: str):
        super().__init__(f"{text!r} is {_ONE_KIND[kind]}")
        self.kind = kind


@dataclass(frozen=True)
class Substitution:
    index: int  # 0-based index into the wild type
    wt: str
    mt: str
    site: str = field(default="", compare=False)  # the site label as written (e.g. 238, 100A)


@dataclass
class Variant:
    line: int  # line of the CSV file (header = 1)
    label: str  # the mutant as written
    subs: tuple[Substitution, ...]
    measured: float


class VariantTable(list):
    """The scored variants of a DMS table, with how many rows of each SKIP_KINDS kind were skipped."""

    skipped: dict


def _residue(token: str) -> str:
    return THREE_LETTER.get(token, token) if len(token) == 3 else token


def _classify(part: str) -> tuple[str | None, str, str, str, str]:
    """(kind or None for a substitution, wt, site label, mt, position digits) of one `A42G`/`Ala42Gly` part."""
    if part == "=":  # p.[=]
        return "synonymous", "", "", "", ""
    m = _PART.match(part)
    if not m or (len(m["wt"]) == 3 and m["wt"] not in THREE_LETTER):
        raise ValueError(
            f"cannot parse mutant {part!r} (expected e.g. A42G or p.Ala42Gly, multiple joined by ':' or ';')"
        )
    wt, rest, site = _residue(m["wt"]), m["rest"], m["pos"] + m["code"]
    if rest.startswith("delins") or rest.startswith("ins") or rest == "dup":
        return "insertion", wt, site, rest, m["pos"]
    if rest in ("del", "-"):
        return "deletion", wt, site, rest, m["pos"]
    if "fs" in rest:
        return "frameshift", wt, site, rest, m["pos"]
    if rest == "?":
        return "unknown", wt, site, rest, m["pos"]
    if wt == "*" or "ext" in rest:
        return ("synonymous" if rest in ("=", "*", "Ter") else "stop_loss"), wt, site, rest, m["pos"]
    mt = wt if rest == "=" else _residue(rest)
    if len(mt) != 1:
        raise ValueError(f"cannot parse mutant {part!r}: {rest!r} is not an amino-acid code")
    if mt == wt:
        return "synonymous", wt, site, mt, m["pos"]
    if mt == "*":
        return "stop", wt, site, mt, m["pos"]
    for letter in (wt, mt):
        if letter in NONSTANDARD:
            return "nonstandard", wt, site, mt, m["pos"]
        if letter not in AMINO_ACIDS:
            raise ValueError(f"{letter!r} is not one of the 20 standard amino acids")
    return None, wt, site, mt, m["pos"]


def _parts(text: str) -> list[str]:
    """The single-site parts of a (multi-)mutant: `A42G:L50P`, `A42G;L50P`, `p.[Ala42Gly;Leu50Pro]`."""
    t = text.strip()
    if t.lower() in _MISSING:
        raise NotSubstitution("unknown", text)
    if t.lower() in _SYNONYMOUS_ROWS:
        raise NotSubstitution("synonymous", text)
    parts = []
    for part in re.split(r"[:;,]", t):
        part = part.strip()
        part = part[2:] if part.startswith("p.") else part
        parts.append(part.strip("[]()").strip())
    return parts


_PRIORITY = ("deletion", "insertion", "frameshift", "stop_loss", "stop", "nonstandard", "unknown")


def row_kind(text: str) -> str | None:
    """None for a substitution (or multi-mutant), else the SKIP_KINDS kind; ValueError if unparsable."""
    try:
        kinds = {_classify(p)[0] for p in _parts(text)}
    except NotSubstitution as e:
        return e.kind
    worst = [k for k in _PRIORITY if k in kinds]
    return worst[0] if worst else "synonymous" if kinds == {"synonymous"} else None


def parse_mutant(text: str, offset: int = 1, position_map: dict[str, int] | None = None) -> tuple[Substitution, ...]:
    """`A42G`, `A42G:L50P`, `p.Ala42Gly` or `p.[Ala42Gly;Leu50=]` -> substitutions (synonymous parts of a
    multi-mutant are dropped: they score 0). Site `offset` = first wild-type residue, or `position_map`
    {site label: 1-based residue} for numbering with gaps or insertion codes (`100A`). Rows that are no
    substitution raise NotSubstitution with their kind."""
    kind = row_kind(text)
    if kind:
        raise NotSubstitution(kind, text)
    subs = []
    for part in _parts(text):
        k, wt, site, mt, pos = _classify(part)
        if k is None:
            subs.append(Substitution(_index(site, pos, offset, position_map), wt, mt, site))
    if len({s.index for s in subs}) != len(subs):
        raise ValueError(f"mutant {text!r} changes the same position twice")
    return tuple(subs)


def _index(site: str, pos: str, offset: int, position_map: dict[str, int] | None) -> int:
    if position_map is not None:
        if site not in position_map:
            raise ValueError(f"site {site} is not in the --position-map file ({len(position_map)} sites); add it")
        return position_map[site] - 1
    if site != pos:
        raise ValueError(
            f"site {site} has an insertion code: give --position-map FILE (scan site -> 1-based wild-type residue)"
        )
    return int(pos) - offset


def read_position_map(path: str | Path) -> dict[str, int]:
    """A two-column table (site label in the scan, 1-based residue of the wild type); a header is optional."""
    table = read_table(path, what="--position-map", header=False)
    rows = [
        (line, [f.strip() for f in (row[0].split() if len(row) == 1 else row) if f.strip()])
        for line, row in zip(table.lines, table.rows)
    ]
    if rows and not rows[0][1][-1].isdigit():
        rows = rows[1:]  # a header line
    out: dict[str, int] = {}
    for line, fields in rows:
        if len(fields) != 2 or not fields[1].isdigit() or int(fields[1]) < 1:
            raise ValueError(
                f"{path}:{line}: expected two columns, a site label and its 1-based residue "
                f"in the wild type (e.g. 238,236), got {','.join(fields)!r}"
            )
        if fields[0].upper() in out:
            raise ValueError(f"{path}:{line}: site {fields[0]} is mapped twice")
        out[fields[0].upper()] = int(fields[1])
    if not out:
        raise ValueError(f"{path}: empty position map; one row per scan site: label,residue (e.g. 238,236)")
    return out


def _looks_like_mutations(values: list[str]) -> bool:
    """At least half of the non-empty values parse as variants, and not all are synonymous/unknown."""
    kinds = []
    for v in values:
        if v.strip():
            try:
                kinds.append(row_kind(v))
            except ValueError:
                kinds.append("bad")
    good = [k for k in kinds if k != "bad"]
    return bool(kinds) and 2 * len(good) >= len(kinds) and any(k not in ("synonymous", "unknown") for k in good)


def _number(text: str) -> float:
    t = text.strip()
    return float("nan") if t.lower() in _MISSING else float(t)


def _looks_numeric(values: list[str]) -> bool:
    n_ok = n = 0
    for v in values:
        if v.strip().lower() in _MISSING:
            continue
        n += 1
        try:
            _number(v)
            n_ok += 1
        except ValueError:
            pass
    return n > 0 and 2 * n_ok >= n


def _column_problem(path, header, sample, col, kind) -> str:
    """One line: what is wrong with column `col` (given by --KIND-column: mutant, score, wt, pos or mut),
    every column, and which ones fit `kind`."""
    values = sample.get(col, [])
    examples = ", ".join(repr(v) for v in dict.fromkeys(x for x in values if x.strip()).keys()) or "nothing"
    examples = examples if len(examples) < 60 else examples[:57] + "..."
    what = ": no such column" if col not in header else f" holds {examples}, not {{need}}"
    letters = [
        c for c in header if sample[c] and all(v.strip() in AMINO_ACIDS | set("*-") for v in sample[c] if v.strip())
    ]
    ints = [c for c in header if sample[c] and all(v.strip().lstrip("-").isdigit() for v in sample[c] if v.strip())]
    if kind in ("wt", "pos", "mut"):
        fits, noun = (ints, "integer") if kind == "pos" else (letters, "one-letter amino-acid")
        fix = f"{noun} columns: {', '.join(fits)}" if fits else f"no column holds {noun} values"
        need = "positions" if kind == "pos" else "amino acids"
    elif kind == "mutant":
        fits = [c for c in header if _looks_like_mutations(sample[c])]
        fix = (
            f"mutation-like: {', '.join(fits)} (pass --mutant-column {fits[0]})"
            if fits
            else "no column looks like mutations (A42G, A42G:L50P, p.Ala42Gly)"
        )
        if not fits and len(letters) >= 2 and ints:
            fix += (
                f"; for one-letter columns pass --wt-column, --pos-column and --mut-column "
                f"(letter columns: {', '.join(letters)}; integer columns: {', '.join(ints)})"
            )
        need = "mutations like A42G or p.Ala42Gly"
    else:
        fits = [c for c in header if _looks_numeric(sample[c])]
        fix = f"numeric: {', '.join(fits)} (pass --score-column NAME)" if fits else "no column holds numbers"
        need = "measured scores (numbers)"
    has_one = len(header) == 1 and ("," not in header[0] and "\t" not in header[0])
    sep = "; the header has one column: separate columns by commas or tabs" if has_one else ""
    return f"{path}: --{kind}-column {col!r}{what.format(need=need)}; columns: {', '.join(header)}; {fix}{sep}"


def read_dms(
    path: str | Path,
    *,
    score_column: str = "DMS_score",
    mutant_column: str = "mutant",
    wt_column: str | None = None,
    pos_column: str | None = None,
    mut_column: str | None = None,
    offset: int = 1,
    position_map: dict[str, int] | None = None,
    strict: bool = False,
) -> VariantTable:
    """Variants of a DMS CSV/TSV: a mutant column (A42G:L50P, p.Ala42Gly) or wildtype/position/mutant
    columns. Rows that are no substitution (SKIP_KINDS) are counted in `.skipped`, or refused with
    `strict`. The mutant and score columns must exist and hold mutations and numbers."""
    split_cols = [wt_column, pos_column, mut_column]
    if any(split_cols) and not all(split_cols):
        raise ValueError("give all three of --wt-column, --pos-column and --mut-column, or none")
    table = read_table(path, what="DMS")
    if not table.columns:
        raise ValueError(f"{path}: empty file; expected a header line (e.g. mutant,DMS_score) and one row per variant")
    header = table.columns
    body = list(zip(table.lines, table.rows))
    if not body:
        raise ValueError(f"{path}: a header but no variants (columns: {', '.join(header)})")
    sample = {c: [r[k] for _, r in body[:200] if k < len(r)] for k, c in enumerate(header)}
    mutant_cols = split_cols if all(split_cols) else [mutant_column]
    kinds = ["wt", "pos", "mut"] if all(split_cols) else ["mutant"]  # the --KIND-column that named each
    for col, kind in zip(mutant_cols, kinds):
        if col not in header:
            raise ValueError(_column_problem(path, header, sample, col, kind))
    if not all(split_cols) and not _looks_like_mutations(sample[mutant_column]):
        raise ValueError(_column_problem(path, header, sample, mutant_column, "mutant"))
    if score_column not in header or not _looks_numeric(sample[score_column]):
        raise ValueError(_column_problem(path, header, sample, score_column, "score"))
    col = {c: header.index(c) for c in mutant_cols + [score_column]}
    variants, skipped = VariantTable(), {}
    for line, r in body:
        get = lambda c, r=r: r[col[c]].strip()
        label = "".join(get(c) for c in split_cols) if all(split_cols) else get(mutant_column)
        try:
            subs = parse_mutant(label, offset, position_map)
        except NotSubstitution as e:
            if strict:
                raise ValueError(
                    f"{path}:{line}: {e}; zero-shot scores substitutions only: remove the row, "
                    f"or drop --strict to skip such rows with a count"
                ) from None
            skipped[e.kind] = skipped.get(e.kind, 0) + 1
            continue
        except ValueError as e:
            raise ValueError(f"{path}:{line}: {e}") from None
        try:
            measured = _number(get(score_column))
        except ValueError:
            comma = " (write decimals with a dot)" if re.fullmatch(r"-?\d+,\d+", get(score_column)) else ""
            raise ValueError(
                f"{path}:{line}: {score_column} {get(score_column)!r} is not a number{comma}; leave "
                f"it empty or NA for an unmeasured variant"
            ) from None
        variants.append(Variant(line, label, subs, measured))
    variants.skipped = {k: skipped[k] for k in SKIP_KINDS if k in skipped}
    if not variants:
        raise ValueError(f"{path}: no substitutions to score ({format_skipped(variants.skipped)})")
    return variants


def format_skipped(skipped: dict) -> str:
    """`skipped: 12 deletions, 40 stops` (or `skipped: none`)."""

    def noun(k, n):
        if k == UNMEASURED:
            return "without a measured score"
        return SKIP_KINDS[k] + ("s" if n != 1 and k not in ("synonymous", "unknown") else "")

    return "skipped: " + (", ".join(f"{n} {noun(k, n)}" for k, n in skipped.items()) or "none")


def check_wildtype(variants: list[Variant], wildtype: str, path: str | Path, *, offset: int | None = None) -> None:
    """Every substitution's wild-type letter must match the sequence; the error names the first row,
    how many disagree, and an --offset that would fit where one does (`offset`: the one in use)."""
    bad = [(v, s) for v in variants for s in v.subs if not 0 <= s.index < len(wildtype) or wildtype[s.index] != s.wt]
    if not bad:
        return
    v, s = bad[0]
    how = f"--offset {offset}" if offset is not None else "--position-map"
    rows = len({id(b[0]) for b in bad})
    hint = _offset_hint(variants, wildtype, offset)
    where = f"site {s.site or s.index + 1} -> residue {s.index + 1} with {how}"
    if not 0 <= s.index < len(wildtype):
        raise ValueError(
            f"{path}:{v.line}: {v.label}: position outside the wild type ({where}, length "
            f"{len(wildtype)}); {rows} of {len(variants)} rows disagree; {hint}"
        )
    raise ValueError(
        f"{path}:{v.line}: {v.label}: the wild type has {wildtype[s.index]} at that position, not "
        f"{s.wt} ({where}); {rows} of {len(variants)} rows disagree; {hint}"
    )


def _offset_hint(variants: list[Variant], wildtype: str, offset: int | None) -> str:
    """'--offset N matches all rows' when a shift of plain numbering fits >= 95% of the substitutions."""
    fix = "check --offset, --position-map and --wildtype (is it the scanned construct?)"
    subs = [s for v in variants for s in v.subs if s.site.lstrip("-").isdigit()]
    if offset is None or not subs:
        return fix
    pos = np.array([int(s.site) for s in subs])
    letters = np.array([s.wt for s in subs])
    wt = np.array(list(wildtype))
    best, best_n = None, 0
    for o in range(int(pos.min()) - len(wildtype) + 1, int(pos.max()) + 1):
        idx = pos - o
        ok = (idx >= 0) & (idx < len(wt))
        n = int((wt[idx[ok]] == letters[ok]).sum())
        if n > best_n:
            best, best_n = o, n
    if best is not None and best != offset and best_n >= 0.95 * len(subs):
        return f"--offset {best} matches {best_n} of {len(subs)} substitutions; or {fix}"
    idx = pos - offset
    ok = (idx >= 0) & (idx < len(wt))
    fits = ok.copy()
    fits[ok] = wt[idx[ok]] == letters[ok]
    if fits.any() and not fits.all() and pos[fits].max() < pos[~fits].min():
        return (
            f"the rows fit up to site {pos[fits].max()} and none after: numbering with gaps (e.g. Ambler) "
            f"needs --position-map FILE (scan site -> residue); or {fix}"
        )
    return fix


@torch.no_grad()
def site_log_probs(
    model, wildtype: str, sites, *, max_length: int | None = None, token_budget: int = 8192
) -> dict[int, np.ndarray]:
    """{site: log-probabilities [33] at that site with <mask> there}, one packed forward per batch."""
    net = model.net if isinstance(model, EvalModel) else model
    device = next(net.parameters()).device
    ids = tok.encode(wildtype)
    width, token_budget = window_plan(model, max_length, [len(ids)], token_budget)
    sites = sorted(set(sites))
    inputs, where = [], []
    for i in sites:
        start = 0 if len(ids) <= width else min(max(i - width // 2, 0), len(ids) - width)
        x = tok.with_specials(ids[start : start + width]).copy()
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
    return np.array(
        [sum(float(get(s.index)[vocab[s.mt]] - get(s.index)[vocab[s.wt]]) for s in v.subs) for v in variants]
    )


def unigram_scores(variants: list[Variant], unigram_logp) -> np.ndarray:
    """The site-independent baseline: Σ_sites log f(mut) - log f(wt) under residue frequencies f
    (`unigram_logp`, log p [V] as `metrics.unigram_log_probs` gives), the same at every site."""
    logp = np.asarray(unigram_logp, dtype=np.float64)
    return score_variants(variants, lambda _site: logp)


UNMEASURED = "unmeasured"
"The `skipped` key of variants scored but left out of rho: no finite measured score (empty, NA, NaN, inf)."


def count_unmeasured(variants: list[Variant]) -> dict:
    """{UNMEASURED: n} for the variants without a finite measured score (rho leaves them out), else {}."""
    n = int((~np.isfinite(np.array([v.measured for v in variants], dtype=np.float64))).sum())
    return {UNMEASURED: n} if n else {}


def merge_duplicates(variants: VariantTable, path: str | Path, *, average: bool) -> tuple[VariantTable, dict]:
    """One entry per variant. Rows with the same substitutions (in any notation or order: A42G:L50P,
    L50P:A42G, p.[Ala42Gly;Leu50Pro]) would each count as a point in rho, so they are refused naming
    their lines, or with `average` merged into the first such row with the mean of their finite
    measured scores. Returns the variants and {"variants": repeated variants, "rows": rows merged away}."""
    groups: dict[tuple, list[Variant]] = {}
    for v in variants:
        groups.setdefault(tuple(sorted((s.index, s.mt) for s in v.subs)), []).append(v)
    repeated = [g for g in groups.values() if len(g) > 1]
    counts = {"variants": len(repeated), "rows": sum(len(g) - 1 for g in repeated)}
    if not repeated:
        return variants, counts
    if not average:
        g = repeated[0]
        lines = ", ".join(str(v.line) for v in g[:5]) + (", ..." if len(g) > 5 else "")
        raise ValueError(
            f"{path}: {counts['variants']} variant"
            f"{'s occur' if counts['variants'] != 1 else ' occurs'} more than once "
            f"({counts['rows']} extra row{'s' if counts['rows'] != 1 else ''}), e.g. "
            f"{g[0].label} on lines {lines}; each row would be its own point in rho: remove the "
            f"repeats, or pass --average-duplicates to score each variant once with the mean of its "
            f"measured scores"
        )
    out = VariantTable()
    for g in groups.values():
        m = np.array([v.measured for v in g], dtype=np.float64)
        m = m[np.isfinite(m)]
        out.append(Variant(g[0].line, g[0].label, g[0].subs, float(m.mean()) if len(m) else float("nan")))
    out.skipped = variants.skipped
    return out, counts


def measured_ok(measured: np.ndarray) -> np.ndarray:
    """Mask of the variants with a measured score; at least 3 are needed for a rank correlation."""
    ok = np.isfinite(measured)
    if ok.sum() < 3:
        raise ValueError(
            f"need at least 3 variants with a measured score, got {int(ok.sum())} (check "
            f"--score-column and that the table's scores are numbers)"
        )
    return ok


def spearman(scores: np.ndarray, measured: np.ndarray) -> tuple[float, int]:
    """Spearman rho over variants with a measured value, and how many there were."""
    from scipy.stats import spearmanr

    ok = measured_ok(measured)
    return float(spearmanr(scores[ok], measured[ok]).statistic), int(ok.sum())


BOOTSTRAP_RESAMPLES = 1000  # paired bootstrap over variants for "model minus random init"


def zeroshot(
    model, wildtype: str, variants: list[Variant], *, token_budget: int = 8192
) -> tuple[np.ndarray, float, int]:
    """Scores, Spearman rho and the number of variants it was computed over."""
    sites = {s.index for v in variants for s in v.subs}
    lp = site_log_probs(model, wildtype, sites, token_budget=token_budget)
    scores = score_variants(variants, lp)
    rho, n = spearman(scores, np.array([v.measured for v in variants]))
    return scores, rho, n


def spearman_difference(
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    measured: np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict:
    """rho(A) - rho(B) on the same variants, with a paired bootstrap 95% interval over variants.
    Ranks are taken once on all variants (Spearman = Pearson of ranks) and each resample correlates
    its rows' ranks: exact at the point estimate, and O(n) per resample, so 10^5 variants take seconds."""
    from scipy.stats import rankdata

    from plmrun.eval.metrics import bootstrap_interval

    ok = measured_ok(measured)
    ranks = [rankdata(x[ok]) for x in (scores_a, scores_b, measured)]

    def pearson(x, y):
        x, y = x - x.mean(), y - y.mean()
        den = np.sqrt((x * x).sum() * (y * y).sum())
        return (x * y).sum() / den if den > 0 else np.nan  # nan (constant resample) is dropped by the helper

    d, lo, hi = bootstrap_interval(ranks, lambda a, b, m: pearson(a, m) - pearson(b, m), n=resamples, seed=seed)
    return {"diff": d, "ci95": [lo, hi], "resamples": resamples}


def read_wildtype(arg: str) -> str:
    """A sequence, or a FASTA file with exactly one record."""
    if Path(arg).is_file():
        from plmrun.eval.embed import read_fasta

        records = read_fasta(arg)
        if len(records) != 1:
            names = ", ".join(r for r, _ in records[:5]) + (", ..." if len(records) > 5 else "")
            raise ValueError(
                f"{arg}: expected one wild-type record, found {len(records)} ({names}); keep only "
                f"the scanned protein's record, or pass its sequence as --wildtype"
            )
        return records[0][1]
    if any(c in arg for c in "/\\.") or arg.lower().endswith(("fasta", "fa", "faa")):
        raise ValueError(f"--wildtype {arg}: no such file; give a FASTA file with one record or the sequence itself")
    seq = arg.strip().upper()
    bad = sorted(set(seq) - AMINO_ACIDS - NONSTANDARD)
    if not seq or bad:
        raise ValueError(
            f"--wildtype {arg[:20]!r}: not a file and not a protein sequence"
            + (f" (letters {''.join(bad)})" if bad else "")
        )
    return seq


# ---------------------------------------------------------------- CLI
def add_zeroshot_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "zeroshot",
        help="zero-shot variant effects vs a DMS assay (Spearman rho)",
        description="Masked-marginal scores of the substitutions in a DMS table (CSV or "
        "TSV, ProteinGym or MaveDB style); deletions, insertions, stops and "
        "synonymous rows are skipped with a count (--strict: refused).",
    )
    p.add_argument("model", help="run directory, checkpoint, EsmForMaskedLM folder or hub name")
    p.add_argument("--dms", required=True, help="CSV/TSV file with one variant per row")
    p.add_argument("--wildtype", required=True, help="wild-type sequence, or a FASTA file with one record")
    p.add_argument(
        "--mutant-column",
        default="mutant",
        help="column with mutants like A42G, A42G:L50P or p.Ala42Gly (MaveDB: hgvs_pro)",
    )
    p.add_argument("--score-column", default="DMS_score", help="column with the measured scores (MaveDB: score)")
    p.add_argument("--wt-column", help="instead of --mutant-column: wild-type letter column")
    p.add_argument("--pos-column", help="... position column")
    p.add_argument("--mut-column", help="... mutant letter column")
    p.add_argument(
        "--offset",
        type=int,
        default=1,
        help="number of the first wild-type residue in the mutant positions (default 1: 1-based)",
    )
    p.add_argument(
        "--position-map",
        metavar="FILE",
        help="two-column table: site label in the scan (e.g. 238, 100A) -> 1-based residue of the "
        "wild type, for numbering with gaps (Ambler) or insertion codes; replaces --offset",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail on the first row that is no substitution instead of skipping it with a count",
    )
    p.add_argument(
        "--average-duplicates",
        action="store_true",
        help="score a variant that occurs on several rows (in any notation or order) once, with the "
        "mean of its measured scores, and print how many were merged (default: refuse the table)",
    )
    p.add_argument(
        "--random-init-control",
        action="store_true",
        help="also score the same architecture untrained (torch seed 0) and report model minus "
        "control with a paired bootstrap 95%% interval over variants",
    )
    add_window_flags(p, longer="a longer wild type is scored in a window centred on each site")
    p.add_argument("--out", help="write line, mutant, measured and score per variant to this CSV")
    p.add_argument("--json", help="write the summary (rho, counts, skipped rows per kind, control) to this JSON file")
    add_device_flag(p)
    p.set_defaults(func=_run)
    return p


def _check_args(args) -> None:
    """Flags that need no file, checked before anything is read or loaded."""
    check_window_flags(args)
    if args.position_map and args.offset != 1:
        raise ValueError("give --offset or --position-map, not both (the map gives every site's residue)")
    reads = [args.dms, args.wildtype, args.position_map, *model_inputs(args.model)]
    for flag, path in (("--out", args.out), ("--json", args.json)):
        if path and Path(path).is_dir():
            raise ValueError(f"{flag} {path}: is a folder; give a file path in it")
        if path:
            check_output_file(path, reads, flag=flag, error=ValueError)
        if path and not Path(path).resolve().parent.is_dir():
            raise ValueError(
                f"{flag} {path}: folder {Path(path).parent} does not exist; create it or choose another path"
            )


def _run(args) -> int:
    try:
        _check_args(args)
        wildtype = read_wildtype(args.wildtype)
        position_map = read_position_map(args.position_map) if args.position_map else None
        variants = read_dms(
            args.dms,
            score_column=args.score_column,
            mutant_column=args.mutant_column,
            wt_column=args.wt_column,
            pos_column=args.pos_column,
            mut_column=args.mut_column,
            offset=args.offset,
            position_map=position_map,
            strict=args.strict,
        )
        check_wildtype(variants, wildtype, args.dms, offset=None if position_map else args.offset)
        variants, duplicates = merge_duplicates(variants, args.dms, average=args.average_duplicates)
        measured = np.array([v.measured for v in variants])
        measured_ok(measured)  # enough scores, before the model loads
        model = load_eval_model(args.model, device=resolve_device(args.device), max_length=args.max_length)
        scores, rho, n = zeroshot(model, wildtype, variants, token_budget=args.token_budget)
        unigram, unigram_source = unigram_baseline(run_dir_of(args.model), InMemorySequences([tok.encode(wildtype)]))
        u_scores = unigram_scores(variants, unigram.numpy())
        u_rho, _ = spearman(u_scores, measured)
        u_diff = spearman_difference(scores, u_scores, measured)
        control = None
        if args.random_init_control:
            c_scores, c_rho, _ = zeroshot(model.random_init(0), wildtype, variants, token_budget=args.token_budget)
            control = {
                "seed": 0,
                "spearman": c_rho,
                "model_minus_random_init": spearman_difference(scores, c_scores, measured),
            }
    except ValueError as e:
        raise EvalError(f"zeroshot: {e}") from None
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                ["line", "mutant", "measured", "score", "unigram_score"] + (["random_init_score"] if control else [])
            )
            for k, (v, s) in enumerate(zip(variants, scores)):
                w.writerow(
                    [v.line, v.label, v.measured, f"{s:.6f}", f"{u_scores[k]:.6f}"]
                    + ([f"{c_scores[k]:.6f}"] if control else [])
                )
    n_sites = len({s.index for v in variants for s in v.subs})
    print(f"{args.dms}: Spearman rho = {rho:.4f} over {n} variants ({n_sites} sites scored, model {args.model})")
    skipped = {**variants.skipped, **count_unmeasured(variants)}
    strict = "them" if skipped == variants.skipped else "the rows that are no substitution"
    print(format_skipped(skipped) + ("" if not variants.skipped else f" (--strict refuses {strict} instead)"))
    if duplicates["variants"]:
        print(
            f"duplicates: {duplicates['rows']} repeated rows averaged into {duplicates['variants']} variants "
            f"(--average-duplicates)"
        )
    where = {
        "training-split": f"the training split's residue frequencies, {run_dir_of(args.model)}/unigram.json",
        "eval-data": "the wild type's own residue frequencies; the model has no run with unigram.json",
    }[unigram_source]
    print(
        f"site-independent baseline ({where}): Spearman rho = {u_rho:.4f}; model - baseline = "
        f"{u_diff['diff']:+.4f}, 95% CI [{u_diff['ci95'][0]:+.4f}, {u_diff['ci95'][1]:+.4f}]"
    )
    if control:
        d = control["model_minus_random_init"]
        print(
            f"random init (same architecture, torch seed 0): Spearman rho = {control['spearman']:.4f}; "
            f"model - random init = {d['diff']:+.4f}, 95% CI [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] "
            f"(paired bootstrap over the {n} variants, {d['resamples']} resamples)"
        )
    if args.json:
        summary = {
            "dms": str(args.dms),
            "model": args.model,
            "spearman": rho,
            "n_variants": n,
            "n_rows_scored": len(variants),
            "n_sites": n_sites,
            "skipped": skipped,
            "duplicates": {**duplicates, "policy": "averaged" if args.average_duplicates else "refused"},
            "unigram_spearman": u_rho,
            "unigram_source": unigram_source,
            "model_minus_unigram": u_diff,
            "position_map": args.position_map,
            "offset": None if args.position_map else args.offset,
        }
        if control:
            summary["random_init"] = control
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0
