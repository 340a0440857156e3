"""One reader for the small tables a command reads whole: DMS scans and position maps (zeroshot),
labelled sequences (finetune) and the bundled probe tasks (probe).

CSV, TSV or ';'-separated text, plain or gzip/xz/bz2, with or without Excel's UTF-8 byte-order mark;
the delimiter is read from the header line, so a TSV saved under a .csv name reads too. Parquet is
read by its magic bytes. Every field comes back as text, and every problem is one TableError line
naming the file and the line. Sequence inputs of `plmrun data prepare` can be far larger than memory
and stream batch by batch through `readers.table_batches` instead; both find the delimiter with
`readers.sniff_delimiter`.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from plmrun.data.errors import DataError
from plmrun.data.readers import DECOMPRESS_ERRORS, open_binary, sniff_delimiter

MISSING = frozenset({"", "na", "n/a", "nan", "none", "null", "<na>", "#n/a"})
"Values read as 'no value' (case-insensitive): what spreadsheets, pandas and R write for a missing cell."


class TableError(DataError, ValueError):
    """A table that cannot be read as asked; the message names the file (and line or column)."""


def is_missing(value: str) -> bool:
    return value.strip().lower() in MISSING


@dataclass
class Table:
    """A table read whole: column names, rows of text fields (as many as columns), the line each row starts on."""

    path: str
    columns: list[str]
    rows: list[list[str]]
    lines: list[int]  # file line of each row (the header is line 1 of a headed text table)
    parquet: bool = False
    _index: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        """`FILE: line N` of row i (parquet: `FILE: row N`), for messages."""
        return f"{self.path}: row {i + 1}" if self.parquet else f"{self.path}: line {self.lines[i]}"

    def index(self, name: str, flag: str | None = None) -> int:
        """Position of column `name`; a missing one is one line listing the columns there are."""
        if not self._index:
            self._index.update({c: k for k, c in enumerate(self.columns)})
        if name not in self._index:
            fix = f"; set {flag} to the right one" if flag else ""
            raise TableError(f"{self.path}: no column {name!r} (columns: {', '.join(self.columns) or 'none'}){fix}")
        return self._index[name]

    def column(self, name: str, flag: str | None = None) -> list[str]:
        k = self.index(name, flag)
        return [r[k] for r in self.rows]

    def records(self) -> list[dict]:
        return [dict(zip(self.columns, r)) for r in self.rows]


def read_table(path: str | Path, *, what: str = "table", header: bool = True) -> Table:
    """A CSV/TSV/';' text table (plain or compressed) or a parquet file, whole; `what` names the file's role
    in messages (e.g. 'DMS'). header=False: no header line, rows of any width (columns is empty)."""
    path = Path(path)
    if not path.is_file():
        raise TableError(
            f"{path}: no such {what} file" + (" (a directory)" if path.is_dir() else "") + "; check the path"
        )
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PAR1"):
        return _parquet(path)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\xd0\xcf\x11\xe0"):
        raise TableError(
            f"{path}: an Excel workbook or zip archive, not a text table; save the sheet as CSV "
            f"(File > Save As > CSV) and pass that"
        )
    raw, kind = open_binary(path)
    try:
        with raw:
            data = raw.read()
    except DECOMPRESS_ERRORS as e:
        raise TableError(f"{path}: truncated or corrupt {kind} data ({e})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise TableError(f"{path}: a UTF-16 text table; save it as CSV (UTF-8) and pass that")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TableError(
            f"{path}: not a UTF-8 text table; save it as CSV (UTF-8) and pass that (first "
            f"non-UTF-8 byte on line {line})"
        ) from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise TableError(f"{path}: line {line}: binary data (a NUL byte), not a text table")
    return _parse(path, text, header)


def _parse(path: Path, text: str, header: bool) -> Table:
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sniff_delimiter(first))
    columns: list[str] | None = None if header else []
    rows, lines, end = [], [], 0
    try:
        for row in reader:
            start, end = end + 1, reader.line_num
            if not any(f.strip() for f in row):
                continue
            if columns is None:
                columns = [c.strip() for c in row]
                named = [c for c in columns if c]
                twice = next((c for c in named if named.count(c) > 1), None)
                if twice is not None:
                    raise TableError(f"{path}: line {start}: column {twice!r} appears twice in the header")
                continue
            if header:
                while len(row) > len(columns) and not row[-1].strip():
                    row = row[:-1]  # trailing delimiters
                if len(row) != len(columns):
                    raise TableError(
                        f"{path}: line {start}: {len(row)} fields, the header has {len(columns)} "
                        f"({', '.join(columns)}); check quoting and that the whole file uses one "
                        "delimiter"
                    )
            rows.append(row)
            lines.append(start)
    except csv.Error as e:
        raise TableError(f"{path}: line {reader.line_num}: {e}") from None
    return Table(str(path), columns or [], rows, lines)


def _parquet(path: Path) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TableError(
            f"{path}: a parquet file; reading it needs pyarrow (pip install 'plmrun[hf]'), or save the table as CSV"
        ) from None
    try:
        data = pq.read_table(path).to_pydict()
    except Exception as e:  # pyarrow raises several types for corrupt/truncated input
        raise TableError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    columns = [str(c) for c in data]
    n = len(next(iter(data.values()), []))
    rows = [[_text(data[c][i]) for c in data] for i in range(n)]
    return Table(str(path), columns, rows, [i + 2 for i in range(n)], parquet=True)


def _text(value) -> str:
    """A parquet cell as the text a CSV export would hold ('' for null, 'nan' for a float NaN)."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return str(value)
