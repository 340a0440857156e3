"""`plmrun finetune`'s tables: missing labels and sequences shared across splits are refused with their
lines, or dropped with a printed count under drop_bad_labels / drop_leaks (issue 25)."""

import re

import numpy as np
import pytest
import torch

from plmrun.cli import main
from plmrun.config import ModelConfig
from plmrun.data.errors import DataError
from plmrun.finetune.config import FinetuneConfig
from plmrun.finetune.data import load_data
from plmrun.model.loading import save_model_dir
from plmrun.model.registry import build_model

AA = "ACDEFGHIKLMNPQRSTVWY"
NAN_ROWS = [2 + 5 * k for k in range(12)]  # 12 of 60 rows (0-based) have no label


def _seq(i: int) -> str:
    rng = np.random.default_rng(i)
    return "".join(rng.choice(list(AA), size=12 + i % 7))


def _table(path, n=60, label=lambda i: str(i % 2), split=None, seq=_seq):
    head = "sequence,label" + (",split" if split else "")
    rows = [f"{seq(i)},{label(i)}" + (f",{split(i)}" if split else "") for i in range(n)]
    path.write_text("\n".join([head, *rows]) + "\n")
    return str(path)


def _nan_label(i):  # the repro: 12 of 60 labels are nan (some written as NA or left empty)
    return ("nan", "NA", "")[i % 3] if i in NAN_ROWS else str(i % 2)


def _cfg(task, **kw):
    return FinetuneConfig(model="m", task=task, max_train=100, max_valid=20, max_test=20, **kw)


def test_missing_labels_are_refused_naming_their_lines(tmp_path):
    """Old code: 'nan' became a third class and the run ended with exit 0."""
    task = _table(tmp_path / "t.csv", label=_nan_label)
    lines = [i + 2 for i in NAN_ROWS]  # the header is line 1
    want = (
        f"{task}: 12 of 60 rows have no label in column 'label' (empty, NA or nan): lines "
        f"{', '.join(map(str, lines[:8]))} and 4 more; fill them in, or set drop_bad_labels "
        "(--drop-bad-labels true) to train without them"
    )
    with pytest.raises(DataError, match=re.escape(want)):
        load_data(_cfg(task))
    reg = _table(tmp_path / "r.csv", label=lambda i: "nan" if i == 7 else f"{i * 0.1:.1f}")
    with pytest.raises(
        DataError, match=re.escape("1 of 60 rows have no label in column 'label' (empty, NA or nan): line 9;")
    ):
        load_data(_cfg(reg, kind="regression"))


def test_drop_bad_labels_drops_them_with_a_printed_count(tmp_path, capsys):
    task = _table(tmp_path / "t.csv", label=_nan_label)
    data = load_data(_cfg(task, drop_bad_labels=True))
    assert data.classes == ["0", "1"]
    assert sum(len(getattr(data, s).seqs) for s in ("train", "valid", "test")) == 48
    dropped = {_seq(i) for i in NAN_ROWS}
    assert not dropped & {s for split in ("train", "valid", "test") for s in getattr(data, split).seqs}
    err = capsys.readouterr().err
    assert f"{task}: dropped 12 rows without a label in column 'label' (lines 4, 9, " in err


def test_residue_labels_missing_are_refused_too(tmp_path):
    task = _table(
        tmp_path / "t.csv", label=lambda i: "" if i == 3 else "H" * (12 + i % 7) if i % 2 else "E" * (12 + i % 7)
    )
    with pytest.raises(
        DataError, match=re.escape("1 of 60 rows have no label in column 'label' (empty, NA or nan): line 5;")
    ):
        load_data(_cfg(task, kind="residue_classification"))


def _split(i):
    return "train" if i < 40 else "valid" if i < 50 else "test"


def _leaky_seq(i):  # test rows 55, 56 copy train rows 3, 4; valid row 45 copies train row 10
    return _seq({55: 3, 56: 4, 45: 10}.get(i, i))


def test_a_sequence_in_two_splits_is_refused_as_a_leak(tmp_path):
    task = _table(tmp_path / "t.csv", split=_split, seq=_leaky_seq)
    want = (
        f"{task}: 3 valid/test rows repeat a sequence of an earlier split (a leak): line 47 (valid) = line 12 "
        "(train), line 57 (test) = line 5 (train), line 58 (test) = line 6 (train); remove the copies, or set "
        "drop_leaks (--drop-leaks true) to drop them from the later split"
    )
    with pytest.raises(DataError, match=re.escape(want)):
        load_data(_cfg(task))


def test_drop_leaks_drops_the_later_copies_with_a_printed_count(tmp_path, capsys):
    task = _table(tmp_path / "t.csv", split=_split, seq=_leaky_seq)
    data = load_data(_cfg(task, drop_leaks=True))
    assert (len(data.train.seqs) + len(data.valid.seqs), len(data.test.seqs)) == (40 + 9, 8)
    assert not set(data.test.seqs) & set(data.train.seqs) and not set(data.valid.seqs) & set(data.train.seqs)
    assert {_seq(3), _seq(4), _seq(10)} <= set(data.train.seqs) | set(data.valid.seqs)
    assert f"{task}: dropped 3 valid/test rows repeat a sequence of an earlier split" in capsys.readouterr().err
    # duplicates inside one split are no leak; without a split column copies hash to the same split
    same = _table(tmp_path / "s.csv", seq=lambda i: _seq(i % 30))
    load_data(_cfg(same))


def test_a_parquet_table_names_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table(
            {"sequence": [_seq(i) for i in range(60)], "label": [None if i == 5 else float(i % 2) for i in range(60)]}
        ),
        tmp_path / "t.parquet",
    )
    with pytest.raises(
        DataError, match=re.escape("1 of 60 rows have no label in column 'label' (empty, NA or nan): row 6;")
    ):
        load_data(_cfg(str(tmp_path / "t.parquet")))


def test_the_command_refuses_before_writing_and_drops_under_the_flag(tmp_path, capsys):
    """The repro end to end: exit 2 with one line, nothing written; with the flag a 2-class model trains."""
    torch.manual_seed(1)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2)
    save_model_dir(tmp_path / "model", build_model(cfg).state_dict(), cfg)
    task = _table(tmp_path / "t.csv", label=_nan_label)
    args = [
        "finetune",
        str(tmp_path / "model"),
        "--task",
        task,
        "--device",
        "cpu",
        "--run-root",
        str(tmp_path / "runs"),
        "--method",
        "full",
        "--max-steps",
        "2",
        "--eval-every",
        "2",
        "--max-length",
        "32",
        "--token-budget",
        "256",
        "--probe-seeds",
        "0",
        "--export",
        "false",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {task}: 12 of 60 rows have no label") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
    assert main(args + ["--drop-bad-labels", "true"]) == 0
    captured = capsys.readouterr()
    assert "dropped 12 rows without a label" in captured.err
    assert "fine-tuned full" in captured.out
