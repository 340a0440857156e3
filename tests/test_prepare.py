"""prepare: manifests, worker-count independence, output-directory safety, policies."""

import filecmp
import lzma

import numpy as np
import pytest

from plmrun import tokenizer as tok
from plmrun.data.errors import DataError
from plmrun.data.prepare import prepare
from plmrun.data.shards import open_dataset

AA = list("ACDEFGHIKLMNPQRSTVWY")


def fasta(path, n, seed, width=60, bad=None):
    rng = np.random.default_rng(seed)
    seqs = ["".join(rng.choice(AA, size=int(rng.integers(5, 400)))) for _ in range(n)]
    if bad is not None:
        seqs[bad] = seqs[bad][:3] + "J" + seqs[bad][3:]
    with open(path, "w") as f:
        for i, s in enumerate(seqs):
            f.write(f">r{i} seed={seed}\n" + "\n".join(s[k : k + width] for k in range(0, len(s), width)) + "\n")
    return seqs


def test_prepare_splits_and_manifest(tmp_path):
    train = fasta(tmp_path / "train.fa", 300, 0)
    valid = fasta(tmp_path / "valid.fa", 20, 1)
    with lzma.open(tmp_path / "test.fa.xz", "wt") as f:
        f.write((tmp_path / "valid.fa").read_text())
    ms = prepare(
        tmp_path / "train.fa",
        tmp_path / "ds",
        valid=tmp_path / "valid.fa",
        test=[tmp_path / "test.fa.xz"],
        shard_size=10_000,
        progress=False,
        command=["plmrun", "data", "prepare", "x"],
    )
    assert set(ms) == {"train", "valid", "test"}
    m = ms["train"]
    assert m["num_sequences"] == 300 and m["num_tokens"] == sum(map(len, train))
    assert m["num_tokens_with_specials"] == m["num_tokens"] + 600
    assert len(m["shards"]) > 1 and m["command"] == "plmrun data prepare x"
    assert m["sources"][0]["sha256"] and m["normalisation"]["invalid_policy"] == "error"
    src = open_dataset(tmp_path / "ds", "train")
    assert [tok.decode(src.residues(i)) for i in range(len(src))] == train
    assert src.ids(7) == "r7 seed=0"
    assert ms["valid"]["fingerprint"] == ms["test"]["fingerprint"]  # same content
    assert [tok.decode(open_dataset(tmp_path / "ds", "test").residues(i)) for i in range(20)] == valid
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_workers_do_not_change_output(tmp_path):
    fasta(tmp_path / "in.fa", 400, 2)
    from plmrun.data import readers

    old = readers.BLOCK_BYTES
    readers.BLOCK_BYTES = 4096  # many chunks in flight
    try:
        prepare(tmp_path / "in.fa", tmp_path / "a", workers=1, progress=False, command=["c"])
        prepare(tmp_path / "in.fa", tmp_path / "b", workers=2, progress=False, command=["c"])
    finally:
        readers.BLOCK_BYTES = old
    a, b = open_dataset(tmp_path / "a", "train"), open_dataset(tmp_path / "b", "train")
    assert a.fingerprint == b.fingerprint
    assert filecmp.cmp(tmp_path / "a/train/shard-00000.bin", tmp_path / "b/train/shard-00000.bin", shallow=False)


def test_output_directory_safety(tmp_path):
    fasta(tmp_path / "in.fa", 10, 3)
    fasta(tmp_path / "bad.fa", 10, 4, bad=5)
    out = tmp_path / "ds"
    first = prepare(tmp_path / "in.fa", out, progress=False)["train"]["fingerprint"]
    with pytest.raises(
        DataError,
        match=r"ds: output directory already exists and is not empty "
        r"\(pass --overwrite",
    ):
        prepare(tmp_path / "in.fa", out, progress=False)
    # a failing run (bad valid input) leaves the old dataset untouched and no temp dirs
    with pytest.raises(DataError, match=r"bad.fa:\d+:4: invalid residue 'J' in record 'r5"):
        prepare(tmp_path / "in.fa", out, valid=tmp_path / "bad.fa", overwrite=True, progress=False)
    assert open_dataset(out, "train").fingerprint == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fa", "ds", "in.fa"]
    with pytest.raises(DataError, match=r"nothere.fa: no such file"):
        prepare(tmp_path / "nothere.fa", tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    prepare(tmp_path / "in.fa", tmp_path / "empty", progress=False)
    assert open_dataset(tmp_path / "empty", "train").fingerprint == first


def test_invalid_policies_recorded(tmp_path):
    seqs = fasta(tmp_path / "bad.fa", 10, 4, bad=5)
    m = prepare(tmp_path / "bad.fa", tmp_path / "s", invalid="skip", progress=False)["train"]
    assert m["num_sequences"] == 9 and m["normalisation"]["skipped_records"] == 1
    assert "invalid residue 'J'" in m["normalisation"]["examples"][0]
    m = prepare(tmp_path / "bad.fa", tmp_path / "x", invalid="x", progress=False)["train"]
    assert m["normalisation"]["replaced_letters"] == 1
    assert tok.decode(open_dataset(tmp_path / "x", "train").residues(5)) == seqs[5].replace("J", "X")
    with pytest.raises(DataError, match="--invalid must be one of"):
        prepare(tmp_path / "bad.fa", tmp_path / "y", invalid="drop", progress=False)


def test_parquet_equals_fasta(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    seqs = fasta(tmp_path / "in.fa", 50, 5)
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(50)], "s": seqs}), tmp_path / "in.parquet", row_group_size=7)
    a = prepare(tmp_path / "in.fa", tmp_path / "a", progress=False)["train"]["fingerprint"]
    b = prepare(tmp_path / "in.parquet", tmp_path / "b", column="s", id_column="id", progress=False)["train"][
        "fingerprint"
    ]
    assert a == b and open_dataset(tmp_path / "b", "train").ids(3) == "r3"
    with pytest.raises(DataError, match=r"in.parquet: no column 'seq'"):
        prepare(tmp_path / "in.parquet", tmp_path / "c", column="seq", progress=False)
    with pytest.raises(DataError, match=r"--column applies to parquet"):
        prepare(tmp_path / "in.fa", tmp_path / "c", column="seq", progress=False)


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """A full disk while writing shards (the write names no file): one line naming --out, and no
    dataset or hidden temp folder is left to be taken for a complete one."""
    import errno

    from plmrun.cli import main
    from plmrun.data import shards

    fasta(tmp_path / "train.fa", 300, 0)
    real = shards.SplitWriter._finish_shard

    def second_shard_fails(self):
        if self.shards:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self)

    monkeypatch.setattr(shards.SplitWriter, "_finish_shard", second_shard_fails)
    out = tmp_path / "out" / "ds"
    assert (
        main(
            [
                "data",
                "prepare",
                str(tmp_path / "train.fa"),
                "--out",
                str(out),
                "--shard-size",
                "10000",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err == (
        f"error: {out}: no space left on the device holding it; free space there or choose another --out\n"
    )
    assert not out.exists() and _leftovers(out.parent) == []


KILLED_PREPARE = """
import os, signal, sys
from plmrun.data import shards
from plmrun.data.prepare import prepare
real = shards.SplitWriter._finish_shard
def die_after_first_shard(self):
    real(self)
    os.kill(os.getpid(), signal.SIGKILL)
shards.SplitWriter._finish_shard = die_after_first_shard
prepare(sys.argv[1], sys.argv[2], shard_size=10_000, progress=False)
"""


def test_killed_prepare_leftover_is_removed_by_the_next_run(tmp_path):
    """SIGKILL mid-prepare leaves a hidden temp folder; the next run removes it (its pid is dead) but
    keeps the folders of a live process and of another host, and writes a complete dataset."""
    import os
    import socket
    import subprocess
    import sys

    seqs = fasta(tmp_path / "train.fa", 300, 0)
    out = tmp_path / "ds"
    killed = subprocess.Popen([sys.executable, "-c", KILLED_PREPARE, str(tmp_path / "train.fa"), str(out)])
    assert killed.wait() == -9
    left = _leftovers(tmp_path)
    assert not out.exists() and len(left) == 1 and left[0].startswith(".ds.tmp-")
    assert (tmp_path / left[0] / "train" / "shard-00000.bin").is_file()
    live = tmp_path / f".ds.tmp-{os.getppid()}@{socket.gethostname()}-0123abcd"  # a running prepare's
    other_host = tmp_path / f".ds.tmp-{killed.pid}@elsewhere.example-0123abcd"  # dead pid, other host
    live.mkdir()
    other_host.mkdir()
    prepare(tmp_path / "train.fa", out, shard_size=10_000, progress=False)
    assert _leftovers(tmp_path) == sorted([live.name, other_host.name])
    src = open_dataset(out, "train")
    assert len(src) == 300 and tok.decode(src.residues(299)) == seqs[299]
