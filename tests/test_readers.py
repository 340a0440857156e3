"""Readers: every FASTA compression and table kind, block boundaries, and each bad-input error."""

import bz2
import gzip
import lzma
import subprocess
import sys

import numpy as np
import pytest

from plmrun import tokenizer as tok
from plmrun.data import readers
from plmrun.data.errors import DataError

RECORDS = [
    ("sp|P1 first protein", "MKTAYIAKQRQISFVKSHFSRQ"),
    ("p2", "LAGVSERTIDPKQNFYMHWCXBUZO"),
    ("p3 x", "M" * 130),
    ("p4", "A"),
]
FASTA = "".join(f">{n}\n" + "\n".join(s[i : i + 60] for i in range(0, len(s), 60)) + "\n" for n, s in RECORDS)


def write(path, data: bytes, opener=open):
    with opener(path, "wb") as f:
        f.write(data)
    return path


def records(spec, **kw):
    return [(n, s) for n, s, _ in readers.read_records(spec, **kw)]


@pytest.mark.parametrize(
    "name,opener",
    [
        ("a.fasta", open),
        ("a.fa.gz", gzip.open),
        ("a.fa.xz", lzma.open),
        ("a.fa.bz2", bz2.open),
        ("gzip_without_suffix.fa", gzip.open),
    ],
)
def test_fasta_compressions(tmp_path, name, opener):
    path = write(tmp_path / name, FASTA.encode(), opener)
    assert records(path) == RECORDS


def test_normalisation_crlf_lowercase_stop(tmp_path):
    text = "\n\n>a desc\r\nmkta\r\nYIA*\r\n>b\r\nL A G\r\n"
    assert records(write(tmp_path / "x.faa", text.encode())) == [("a desc", "MKTAYIA"), ("b", "LAG")]


def reference_parse(text):
    out, name, seq = [], None, []
    for line in text.splitlines():
        if line.startswith(">"):
            if name is not None:
                out.append((name, "".join(seq)))
            name, seq = line[1:], []
        else:
            seq.append(line.strip())
    out.append((name, "".join(seq)))
    return out


def test_blocks_split_anywhere(tmp_path):
    """Tiny blocks put record boundaries everywhere; the result must equal a line parser's."""
    rng = np.random.default_rng(0)
    text = "".join(
        f">r{i} d\n"
        + "\n".join(
            "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=int(rng.integers(1, 50))))
            for _ in range(int(rng.integers(1, 4)))
        )
        + "\n"
        for i in range(200)
    )
    path = write(tmp_path / "r.fa", text.encode())
    for block in (1, 7, 64, 4096):
        got = []
        for b in readers.fasta_blocks(path, block_bytes=block):
            enc = readers.parse_fasta_block(b)
            ends = np.cumsum(enc.lengths)
            got += [(n.decode(), tok.decode(enc.residues[e - k : e])) for n, e, k in zip(enc.names, ends, enc.lengths)]
        assert got == reference_parse(text), block


def test_policies_report_counts(tmp_path):
    path = write(tmp_path / "bad.fa", b">a\nMKJV\n>b\nMKV\n>c\nJJ\n")
    with pytest.raises(DataError, match=r"bad.fa:2:3: invalid residue 'J' in record 'a'"):
        records(path)

    def run(policy):
        encs = [readers.parse_fasta_block(b, policy) for b in readers.fasta_blocks(path)]
        return (
            sum((e.names for e in encs), []),
            sum(e.skipped for e in encs),
            sum(e.replaced for e in encs),
            "".join(tok.decode(e.residues) for e in encs),
        )

    assert run("skip") == ([b"b"], 2, 0, "MKV")
    assert run("x") == ([b"a", b"b", b"c"], 0, 3, "MKXVMKVXX")


@pytest.mark.parametrize(
    "data,pattern",
    [
        (b"", r"e.fa: empty file"),
        (b"\n  \n", r"e.fa: empty file"),
        (b"MKV\n>a\nMKV\n", r"e.fa:1: sequence text before the first '>' header"),
        (b"\n\nMKV\n", r"e.fa:3: sequence text before the first '>' header"),
        (b">a\nMKV\n>b\n>c\nMKV\n", r"e.fa:3: record 'b' has no sequence"),
        (b">a\nMKV\n>b desc\n", r"e.fa:3: record 'b' has no sequence"),
        (b">a\nMKV\nMK1V\n", r"e.fa:3:3: invalid residue '1' in record 'a'"),
        (b">a\nMK\xc3\xa9V\n", r"e.fa:2:3: invalid residue"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"e.fa:1: sequence text before|not a text FASTA"),
        (b">\x00\x01\x02binary", r"e.fa: not a text FASTA file \(binary data\)"),
    ],
)
def test_bad_fasta(tmp_path, data, pattern):
    path = write(tmp_path / "e.fa", data)
    with pytest.raises(DataError, match=pattern):
        records(path)


@pytest.mark.parametrize("opener,kind", [(gzip.open, "gzip"), (lzma.open, "xz"), (bz2.open, "bz2")])
def test_truncated_compressed(tmp_path, opener, kind):
    full = write(tmp_path / "full", (FASTA * 200).encode(), opener).read_bytes()
    path = write(tmp_path / "t.fa.z", full[: len(full) // 2])
    with pytest.raises(DataError, match=rf"t.fa.z: truncated or corrupt {kind} data"):
        records(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"nope.fa: no such file"):
        records(tmp_path / "nope.fa")
    with pytest.raises(DataError, match=r"not a saved Hugging Face dataset"):
        records(tmp_path)


def test_parquet_csv_and_datasets(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"name": [n for n, _ in RECORDS], "seq": [s.lower() + "*" for _, s in RECORDS]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    assert records(tmp_path / "t.parquet", column="seq", id_column="name") == RECORDS
    assert [n for n, _ in records(tmp_path / "t.parquet", column="seq")] == ["0", "1", "2", "3"]
    (tmp_path / "t.csv").write_text("name,seq\n" + "".join(f"{n},{s}\n" for n, s in RECORDS))
    assert records(tmp_path / "t.csv", column="seq", id_column="name") == RECORDS
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"sequence": [s for _, s in RECORDS]}).save_to_disk(tmp_path / "ds")
    assert [s for _, s in records(tmp_path / "ds", column="sequence")] == [s for _, s in RECORDS]
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"sequence": ["MKV"]}),
            "valid": datasets.Dataset.from_dict({"sequence": ["LAG"]}),
        }
    )
    dd.save_to_disk(tmp_path / "dd")
    assert records(f"{tmp_path / 'dd'}#valid", column="sequence") == [("0", "LAG")]
    with pytest.raises(DataError, match=r"choose a split with .*#SPLIT \(splits: train, valid\)"):
        records(tmp_path / "dd", column="sequence")


def test_bad_tables(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"seq": ["MKV", "MK1"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet: no column 'sequence' \(columns: seq\)"):
        records(tmp_path / "t.parquet", column="sequence")
    with pytest.raises(DataError, match=r"t.parquet: row 2 \(1\): invalid residue '1' at position 3"):
        records(tmp_path / "t.parquet", column="seq")
    with pytest.raises(DataError, match=r"t.parquet: parquet input needs --column"):
        records(tmp_path / "t.parquet")
    pq.write_table(pa.table({"seq": ["MKV", None]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n.parquet: row 2 \(1\): missing or non-text sequence"):
        records(tmp_path / "n.parquet", column="seq")
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"fake.parquet: not a parquet file"):
        records(tmp_path / "fake.parquet", column="seq")
    good = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cut.parquet: not a readable parquet file"):
        records(tmp_path / "cut.parquet", column="seq")


def test_hub_unreachable_is_one_line():
    code = (
        "from plmrun.data.readers import read_records\n"
        "list(read_records('hf:Synthyra/omg_prot50', column='sequence'))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode != 0
    assert "DataError: hf:Synthyra/omg_prot50: cannot load it from the Hugging Face Hub" in r.stderr


def test_streamed_tables_take_the_delimiter_from_the_header(tmp_path):
    """`data prepare` read a TSV saved as .csv (and a ';' CSV) as one column named 'name\\tseq'."""
    pytest.importorskip("pyarrow")
    rows = "".join(f"{n}\t{s}\n" for n, s in RECORDS)
    write(tmp_path / "tsv.csv", b"\xef\xbb\xbfname\tseq\n" + rows.encode())
    write(tmp_path / "semi.csv.gz", ("name;seq\n" + rows.replace("\t", ";")).encode(), gzip.open)
    for name in ("tsv.csv", "semi.csv.gz"):
        assert records(tmp_path / name, column="seq", id_column="name") == RECORDS, name
    assert readers.sniff_delimiter("a,b\tc,d") == "," and readers.sniff_delimiter("sequence") == ","
