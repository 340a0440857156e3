"""Labelled sequences for fine-tuning: a bundled probe task (through probe's own reader, split and caps,
so the test set is the one `plmrun probe --max-test N` scores) or a user CSV/TSV table.

Validation rows come out of the training rows by a hash of the sequence (no test row is ever used
to stop). Each problem with a table is one DataError line naming the file and row. Rows without a
label and valid/test sequences already in an earlier split are refused, never read as a class 'nan'
or a fair test row; drop_bad_labels / drop_leaks drop them instead, with a printed count.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from plmrun import tokenizer as tok
from plmrun.data.errors import DataError
from plmrun.data.tables import is_missing, read_table
from plmrun.eval.probe import TASKS, load_task
from plmrun.hashing import unit_hash

from .config import FinetuneConfig

SPLITS = {
    "train": "train",
    "trn": "train",
    "valid": "valid",
    "vld": "valid",
    "validation": "valid",
    "test": "test",
    "tst": "test",
}


@dataclass
class Split:
    seqs: list[str]
    labels: list  # int / float per sequence, or an int array per sequence (residue tasks)


@dataclass
class FinetuneData:
    name: str
    kind: str  # classification, regression, residue_classification
    classes: list  # label names (classification kinds); [] for regression
    train: Split
    valid: Split
    test: Split
    where: str  # the file (or bundled task) for messages
    bundled: bool = False  # one of probe's TASKS (not a user table that happens to share its name)

    @property
    def per_residue(self) -> bool:
        return self.kind == "residue_classification"

    @property
    def num_outputs(self) -> int:
        return 1 if self.kind == "regression" else len(self.classes)


def _carve_valid(seqs: list[str], labels: list, n_valid: int, n_train: int) -> tuple[Split, Split]:
    """Hash-pick n_valid rows for validation; the first n_train of the rest (by another hash) train."""
    order = sorted(range(len(seqs)), key=lambda i: unit_hash("valid:" + seqs[i]))
    valid, rest = order[:n_valid], sorted(order[n_valid:], key=lambda i: unit_hash("train:" + seqs[i]))[:n_train]
    pick = lambda idx: Split([seqs[i] for i in idx], [labels[i] for i in idx])
    return pick(sorted(rest)), pick(sorted(valid))


def load_data(cfg: FinetuneConfig) -> FinetuneData:
    if cfg.task in TASKS:
        return _bundled(cfg)
    return _table(cfg)


def _bundled(cfg: FinetuneConfig) -> FinetuneData:
    task = TASKS[cfg.task]
    kind = "residue_classification" if task.per_residue else "classification"
    if cfg.kind not in ("auto", kind):
        raise DataError(f"bundled task {cfg.task}: is a {kind} task, not {cfg.kind}; drop the kind setting")
    d = load_task(replace(task, max_train=cfg.max_train + cfg.max_valid, max_test=cfg.max_test))
    train, valid = _carve_valid(d.train_seqs, d.train_labels, cfg.max_valid, cfg.max_train)
    data = FinetuneData(
        cfg.task,
        kind,
        list(range(d.classes)),
        train,
        valid,
        Split(d.test_seqs, d.test_labels),
        f"bundled task {cfg.task}",
        bundled=True,
    )
    _check_lengths(data, cfg)
    return data


def _table(cfg: FinetuneConfig) -> FinetuneData:
    path = Path(cfg.task)
    if not path.is_file():
        raise DataError(f"{path}: no such table and not a bundled task (bundled: {', '.join(TASKS)})")
    table = read_table(path, what="finetune table")
    for key in ("sequence_column", "label_column"):
        table.index(getattr(cfg, key), f"--{key.replace('_', '-')}")
    columns, rows = table.columns, table.records()
    if not rows:
        raise DataError(f"{path}: no rows")
    kind = "classification" if cfg.kind == "auto" else cfg.kind
    seq_col, lab_col = cfg.sequence_column, cfg.label_column
    by_split: dict[str, list[tuple[int, dict]]] = {"train": [], "valid": [], "test": []}
    for i, (n, r) in enumerate(zip(table.lines, rows)):
        where = table.where(i)
        seq = (r.get(seq_col) or "").strip().upper()
        if not seq:
            raise DataError(f"{where}: empty sequence in column {seq_col!r}")
        try:
            tok.encode(seq)
        except tok.InvalidSequenceError as e:
            raise DataError(f"{where}: {e}") from None
        r[seq_col] = seq
        if cfg.split_column in columns:
            value = (r.get(cfg.split_column) or "").strip().lower()
            if value not in SPLITS:
                raise DataError(f"{where}: split {value!r} in column {cfg.split_column!r} is not train, valid or test")
            split = SPLITS[value]
        else:
            u = unit_hash("finetune-split:" + seq)
            split = "test" if u < 0.1 else "valid" if u < 0.2 else "train"
        by_split[split].append((n, r))
    _unlabelled(by_split, table, lab_col, cfg.drop_bad_labels)
    _leaks(by_split, table, seq_col, cfg.drop_leaks)
    for split, items in by_split.items():
        if not items:
            how = (
                f"no row has {split!r} in column {cfg.split_column!r}"
                if cfg.split_column in columns
                else f"the 80/10/10 hash split left it empty ({len(rows)} rows); add a {cfg.split_column!r} column"
            )
            raise DataError(f"{path}: the {split} split is empty: {how}")
    classes: list = []
    if kind == "classification":
        classes = sorted({r[lab_col].strip() for _, r in by_split["train"]})
    elif kind == "residue_classification":
        classes = sorted({c for _, r in by_split["train"] for c in r[lab_col].strip()})
    if kind != "regression" and len(classes) < 2:
        raise DataError(
            f"{path}: the train split has {len(classes)} distinct label(s) in column {lab_col!r}; "
            "classification needs at least 2"
        )
    index = {c: i for i, c in enumerate(classes)}

    def label(n: int, r: dict, split: str):
        raw = (r.get(lab_col) or "").strip()
        if kind == "regression":
            try:
                v = float(raw)
            except ValueError:
                raise DataError(
                    f"{path}: line {n}: label {raw!r} in column {lab_col!r} is not a number (regression)"
                ) from None
            if not np.isfinite(v):
                raise DataError(f"{path}: line {n}: label {raw!r} is not finite")
            return v
        if kind == "classification":
            if raw not in index:
                raise DataError(
                    f"{path}: line {n}: label {raw!r} ({split} split) is not among the training "
                    f"labels {classes}; fix the row or add training rows with it"
                )
            return index[raw]
        if len(raw) != len(r[seq_col]):
            raise DataError(
                f"{path}: line {n}: {len(raw)} residue labels for a sequence of {len(r[seq_col])} "
                "residues; give one label character per residue"
            )
        bad = next((c for c in raw if c not in index), None)
        if bad is not None:
            raise DataError(
                f"{path}: line {n}: residue label {bad!r} ({split} split) is not among the training "
                f"labels {classes}; fix the row or add training rows with it"
            )
        return np.array([index[c] for c in raw], dtype=np.int64)

    splits = {}
    caps = {"train": cfg.max_train, "valid": cfg.max_valid, "test": cfg.max_test}
    for split, items in by_split.items():
        items = sorted(items, key=lambda it: unit_hash(f"{split}:{it[1][seq_col]}:{it[0]}"))[: caps[split]]
        items.sort(key=lambda it: it[0])
        splits[split] = Split([r[seq_col] for _, r in items], [label(n, r, split) for n, r in items])
    data = FinetuneData(path.stem, kind, classes, splits["train"], splits["valid"], splits["test"], str(path))
    _check_lengths(data, cfg)
    return data


def _lines(table, items: list[tuple[int, dict]], most: int = 8) -> str:
    """`lines 3, 7 and 9` (the first `most`, then how many more) of (line, row) items; parquet: rows."""
    unit = "row" if table.parquet else "line"
    nums = [str(n - 1 if table.parquet else n) for n, _ in items]
    shown = nums[:most] + ([f"{len(nums) - most} more"] if len(nums) > most else [])
    listed = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]
    return f"{unit}{'s' if len(nums) > 1 else ''} {listed}"


def _unlabelled(by_split: dict, table, lab_col: str, drop: bool) -> None:
    """Rows whose label is missing (empty, NA, nan, ...) are refused with their lines, or dropped with a
    printed count when `drop` (drop_bad_labels): never read as a class named 'nan'."""
    bad = sorted(
        (item for items in by_split.values() for item in items if is_missing(item[1][lab_col])), key=lambda it: it[0]
    )
    if not bad:
        return
    what = f"{len(bad)} of {sum(map(len, by_split.values()))} rows have no label in column {lab_col!r}"
    if not drop:
        raise DataError(
            f"{table.path}: {what} (empty, NA or nan): {_lines(table, bad)}; fill them in, or "
            "set drop_bad_labels (--drop-bad-labels true) to train without them"
        )
    for split, items in by_split.items():
        by_split[split] = [it for it in items if not is_missing(it[1][lab_col])]
    print(
        f"{table.path}: dropped {len(bad)} rows without a label in column {lab_col!r} ({_lines(table, bad)}; "
        "drop_bad_labels)",
        file=sys.stderr,
        flush=True,
    )


def _leaks(by_split: dict, table, seq_col: str, drop: bool) -> None:
    """A sequence in valid or test that is also in an earlier split (train, then valid) leaks the answer
    into early stopping or the test score: refused with the lines of both copies, or, with `drop`
    (drop_leaks), dropped from the later split with a printed count."""
    first: dict[str, tuple[str, int]] = {}
    leaks = []
    for split, items in by_split.items():  # train, valid, test
        for n, r in items:
            earlier = first.get(r[seq_col])
            if earlier is not None and earlier[0] != split:
                leaks.append((split, n, earlier))
        for n, r in items:
            first.setdefault(r[seq_col], (split, n))
    if not leaks:
        return
    unit = "row" if table.parquet else "line"
    num = lambda n: n - 1 if table.parquet else n
    pairs = ", ".join(
        f"{unit} {num(n)} ({split}) = {unit} {num(m)} ({first_split})" for split, n, (first_split, m) in leaks[:5]
    ) + (f" and {len(leaks) - 5} more" if len(leaks) > 5 else "")
    what = f"{len(leaks)} valid/test rows repeat a sequence of an earlier split (a leak): {pairs}"
    if not drop:
        raise DataError(
            f"{table.path}: {what}; remove the copies, or set drop_leaks (--drop-leaks true) to drop "
            "them from the later split"
        )
    gone = {(split, n) for split, n, _ in leaks}
    for split, items in by_split.items():
        by_split[split] = [it for it in items if (split, it[0]) not in gone]
    print(f"{table.path}: dropped {what} (drop_leaks)", file=sys.stderr, flush=True)


def _check_lengths(data: FinetuneData, cfg: FinetuneConfig) -> None:
    """Whole sequences (max_length 0) must fit the token budget (and the esm2 preset's positions; checked
    by the caller with `position_limit`)."""
    if cfg.max_length:
        return
    for split in ("train", "valid", "test"):
        seqs = getattr(data, split).seqs
        k = int(np.argmax([len(s) for s in seqs]))
        if len(seqs[k]) + 2 > cfg.token_budget:
            raise DataError(
                f"{data.where}: a {split} sequence of {len(seqs[k])} residues does not fit "
                f"token_budget {cfg.token_budget} whole (max_length 0); raise --token-budget "
                "or set --max-length to train on crops"
            )


def check_position_limit(data: FinetuneData, cfg: FinetuneConfig, arch: str) -> None:
    """An esm2-preset model covers ESM2_POSITION_LIMIT tokens: longer windows are refused, one line."""
    from plmrun.model.config import ESM2_POSITION_LIMIT

    if arch != "esm2":
        return
    if cfg.max_length > ESM2_POSITION_LIMIT:
        from plmrun.config import ConfigError

        raise ConfigError(
            f"finetune: max_length {cfg.max_length} exceeds the esm2 preset's position limit of "
            f"{ESM2_POSITION_LIMIT} tokens; use --max-length {ESM2_POSITION_LIMIT} or less"
        )
    if cfg.max_length == 0:
        for split in ("train", "valid", "test"):
            seqs = getattr(data, split).seqs
            k = int(np.argmax([len(s) for s in seqs]))
            if len(seqs[k]) + 2 > ESM2_POSITION_LIMIT:
                raise DataError(
                    f"{data.where}: a {split} sequence of {len(seqs[k])} residues is longer than the "
                    f"esm2 preset's position limit ({ESM2_POSITION_LIMIT - 2} residues + <cls>/<eos>); "
                    f"set --max-length {ESM2_POSITION_LIMIT} to train on crops and score "
                    "over windows"
                )
