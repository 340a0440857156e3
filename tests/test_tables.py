"""plmrun.data.tables: the one reader of whole tables (zeroshot's DMS scans, finetune's labels, probe's tasks)."""

import gzip
import lzma
import re

import pytest

from plmrun.data.errors import DataError
from plmrun.data.tables import MISSING, TableError, is_missing, read_table
from plmrun.errors import PlmrunError


def test_delimiter_comes_from_the_header_so_a_tsv_named_csv_reads(tmp_path):
    want = (["id", "sequence", "label"], [["a", "MKT", "1"], ["b", "QRS", "0"]])
    files = {
        "tsv.csv": "id\tsequence\tlabel\na\tMKT\t1\nb\tQRS\t0\n",
        "semi.csv": "id;sequence;label\na;MKT;1\nb;QRS;0\n",
        "plain.tsv": "id,sequence,label\r\na,MKT,1\r\nb,QRS,0\r\n",
    }  # the content decides, not the name
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        t = read_table(tmp_path / name)
        assert (t.columns, t.rows) == want, name
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + files["semi.csv"].encode())  # Excel's "CSV UTF-8"
    (tmp_path / "z.csv.gz").write_bytes(gzip.compress(files["tsv.csv"].encode()))
    (tmp_path / "z.tsv.xz").write_bytes(lzma.compress(files["tsv.csv"].encode()))
    for name in ("bom.csv", "z.csv.gz", "z.tsv.xz"):
        t = read_table(tmp_path / name)
        assert (t.columns, t.rows) == want, name


def test_rows_know_their_line_across_blank_lines_and_quoted_newlines(tmp_path):
    (tmp_path / "t.csv").write_text('\nid,note\na,"two\nlines"\n\nb,x\n')
    t = read_table(tmp_path / "t.csv")
    assert t.rows == [["a", "two\nlines"], ["b", "x"]] and t.lines == [3, 6]
    assert t.where(1) == f"{tmp_path / 't.csv'}: line 6" and t.column("note") == ["two\nlines", "x"]
    assert t.records() == [{"id": "a", "note": "two\nlines"}, {"id": "b", "note": "x"}]


def test_trailing_delimiters_are_not_fields(tmp_path):
    (tmp_path / "t.csv").write_text("id,x\na,1,\nb,2,,\n")
    assert read_table(tmp_path / "t.csv").rows == [["a", "1"], ["b", "2"]]


@pytest.mark.parametrize(
    "content,message",
    [
        (b"id,x\na,1\nb,2,3\n", "t.csv: line 3: 3 fields, the header has 2 (id, x); check quoting"),
        (b"id,x\na,1\nb\n", "t.csv: line 3: 1 fields, the header has 2 (id, x)"),
        (b"id,x,id\na,1,2\n", "t.csv: line 1: column 'id' appears twice in the header"),
        (
            b"id,x\na,1\n\xe9,2\n",
            "t.csv: not a UTF-8 text table; save it as CSV (UTF-8) and pass that (first non-UTF-8 byte on line 3)",
        ),
        (b"\xff\xfei\x00d\x00", "t.csv: a UTF-16 text table; save it as CSV (UTF-8)"),
        (b"id,x\na,1\nb,\x00\n", "t.csv: line 3: binary data (a NUL byte), not a text table"),
        (b"PK\x03\x04rest", "t.csv: an Excel workbook or zip archive, not a text table; save the sheet as CSV"),
        (gzip.compress(b"id,x\na,1\n")[:-12], "t.csv: truncated or corrupt gzip data"),
    ],
)
def test_bad_tables_are_one_line_naming_file_and_line(tmp_path, content, message):
    (tmp_path / "t.csv").write_bytes(content)
    with pytest.raises(TableError, match=re.escape(message)) as e:
        read_table(tmp_path / "t.csv")
    assert "\n" not in str(e.value)


def test_table_error_is_a_data_error_and_a_value_error(tmp_path):
    """DataError: the CLI prints it as one line; ValueError: zeroshot's reader reports it as its own."""
    assert (
        issubclass(TableError, DataError) and issubclass(TableError, PlmrunError) and issubclass(TableError, ValueError)
    )
    with pytest.raises(TableError, match=re.escape(f"{tmp_path / 'nope.csv'}: no such DMS file; check the path")):
        read_table(tmp_path / "nope.csv", what="DMS")
    with pytest.raises(TableError, match=re.escape("no such table file (a directory)")):
        read_table(tmp_path)


def test_a_missing_column_lists_the_columns_there_are(tmp_path):
    (tmp_path / "t.csv").write_text("sequence,label\nMKT,1\n")
    t = read_table(tmp_path / "t.csv")
    with pytest.raises(
        TableError,
        match=re.escape(
            f"{tmp_path / 't.csv'}: no column 'y' (columns: sequence, label); set --label-column to the right one"
        ),
    ):
        t.column("y", "--label-column")
    assert t.index("label") == 1


def test_headerless_tables_keep_rows_of_any_width(tmp_path):
    (tmp_path / "map.txt").write_text("238 236\n\n239,237\n")
    t = read_table(tmp_path / "map.txt", header=False)
    assert t.columns == [] and t.rows == [["238 236"], ["239", "237"]] and t.lines == [1, 3]


def test_parquet_reads_by_its_magic_bytes_as_text(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"sequence": ["MKT", "QRS", "AAA"], "label": [1.5, float("nan"), None], "n": [1, 2, 3]}),
        tmp_path / "t.csv",
    )  # the name does not decide
    t = read_table(tmp_path / "t.csv")
    assert t.columns == ["sequence", "label", "n"] and t.parquet
    assert t.rows == [["MKT", "1.5", "1"], ["QRS", "nan", "2"], ["AAA", "", "3"]]
    assert t.where(2) == f"{tmp_path / 't.csv'}: row 3"
    assert [is_missing(v) for v in t.column("label")] == [False, True, True]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1" + b"\x00" * 20)
    with pytest.raises(TableError, match="bad.parquet: not a readable parquet file"):
        read_table(tmp_path / "bad.parquet")


def test_missing_values_are_what_spreadsheets_and_pandas_write():
    assert all(is_missing(v) for v in ("", " ", "NA", "nan", "NaN", "None", "null", "N/A", "<NA>", "#N/A"))
    assert not any(is_missing(v) for v in ("0", "no", "-", "neg")) and "" in MISSING
