"""Streaming readers: FASTA (plain/gzip/xz/bz2), parquet/CSV columns, Hugging Face datasets.

Inputs are cut into *chunks* (a block of whole FASTA records, or a batch of table rows) that a
worker process turns into residue ids with `encode_chunk`. FASTA blocks are parsed with bytes
methods and one lookup table per block, so the hot path has a Python step per record, never per
character. Every problem is a `DataError` whose one-line message names the file and the line (FASTA)
or row (tables).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from plmrun import tokenizer as tok
from plmrun.data.errors import DataError

BLOCK_BYTES = 8 << 20
TABLE_ROWS = 8192
WHITESPACE = b" \t\r\n\v\f"
MAGIC = {b"\x1f\x8b": "gzip", b"\xfd7zXZ\x00": "xz", b"BZh": "bz2"}
OPENERS = {"gzip": gzip.open, "xz": lzma.open, "bz2": bz2.open}
DECOMPRESS_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error, ValueError)
DELIMITERS = "\t,;"


@dataclass
class FastaBlock:
    path: str
    first_line: int  # 1-based line number of data[0]
    data: bytes  # whole records, starting with b'>'


@dataclass
class TableBatch:
    where: str  # file or dataset name
    first_row: int  # 0-based index of the batch's first row
    names: list
    sequences: list


@dataclass
class Encoded:
    """Residue ids of a chunk's kept records, concatenated; what a shard writer appends."""

    names: list  # bytes per record
    lengths: np.ndarray  # int64
    residues: np.ndarray  # uint8, concatenated
    skipped: int = 0  # records dropped by policy='skip'
    replaced: int = 0  # letters mapped to X by policy='x'
    first_problem: str | None = field(default=None)


# ---------------------------------------------------------------- input kinds


def split_spec(spec: str) -> tuple[str, str | None]:
    """'PATH#SPLIT' -> (PATH, SPLIT) for Hugging Face inputs; other inputs have no '#'."""
    base, sep, split = str(spec).rpartition("#")
    return (base, split) if sep and split and "/" not in split else (str(spec), None)


def input_kind(spec: str) -> str:
    """fasta | parquet | csv | tsv | hf_disk | hf_hub (decided by content where possible)."""
    spec = str(spec)
    if spec.startswith("hf:"):
        return "hf_hub"
    path = Path(split_spec(spec)[0])
    if path.is_dir():
        if any((path / f).exists() for f in ("dataset_dict.json", "state.json", "dataset_info.json")):
            return "hf_disk"
        raise DataError(
            f"{path}: is a directory but not a saved Hugging Face dataset "
            "(datasets.save_to_disk); pass FASTA/parquet/CSV files instead"
        )
    if not path.exists():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PAR1":
        return "parquet"
    name = path.name.lower()
    for suffix in (".csv", ".tsv"):
        if name.endswith(suffix) or name.endswith(suffix + ".gz"):
            return suffix[1:]
    if name.endswith((".parquet", ".pq")):
        raise DataError(f"{path}: not a parquet file (no PAR1 magic bytes)")
    return "fasta"


def open_binary(path) -> tuple:
    """(file object yielding decompressed bytes, compression name), by magic bytes."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a FASTA file")
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return OPENERS[kind](path, "rb"), kind
    return open(path, "rb"), "plain"


def sniff_delimiter(header: str) -> str:
    """The most frequent of tab, comma and ';' in a table's header line (comma when it has none: one
    column), so a TSV saved under a .csv name reads as what it is."""
    return max(DELIMITERS, key=header.count) if any(c in header for c in DELIMITERS) else ","


def header_line(path) -> str:
    """The first non-blank line of a (possibly compressed) text file, without a UTF-8 byte-order mark."""
    f, kind = open_binary(path)
    with f:
        try:
            for raw in f:
                line = raw.decode("utf-8-sig", errors="replace")
                if line.strip():
                    return line
        except DECOMPRESS_ERRORS as e:
            raise DataError(f"{path}: truncated or corrupt {kind} data ({e})") from None
    return ""


# ---------------------------------------------------------------- FASTA


def fasta_blocks(path, block_bytes: int | None = None) -> Iterator[FastaBlock]:
    """Blocks of whole records; checks the start of the file (empty, binary, text before '>')."""
    path, block_bytes = str(path), block_bytes or BLOCK_BYTES
    f, kind = open_binary(path)
    line, carry, started = 1, b"", False
    with f:
        while True:
            try:
                buf = f.read(block_bytes)
            except DECOMPRESS_ERRORS as e:
                raise DataError(f"{path}: truncated or corrupt {kind} data ({e})") from None
            data = carry + buf if carry else buf
            if not started:
                body = data.lstrip()
                if not body:
                    if not buf:
                        raise DataError(f"{path}: empty file (no FASTA records)")
                    carry = data
                    continue
                line += data[: len(data) - len(body)].count(b"\n")
                data, started = body, True
                if b"\x00" in data[:65536]:
                    raise DataError(f"{path}: not a text FASTA file (binary data)")
                if data[:1] != b">":
                    raise DataError(f"{path}:{line}: sequence text before the first '>' header")
            if not buf:
                if data:
                    yield FastaBlock(path, line, data)
                return
            cut = data.rfind(b"\n>")
            if cut < 0:
                carry = data
                continue
            out, carry = data[: cut + 1], data[cut + 1 :]
            yield FastaBlock(path, line, out)
            line += out.count(b"\n")


def _record_starts(records: list) -> list:
    """Offset of each record's header text in the block (records were split on b'\\n>')."""
    starts, pos = [], 1
    for rec in records:
        starts.append(pos)
        pos += len(rec) + 2
    return starts


def _fasta_problem(block: FastaBlock, records: list, k: int, what: str) -> str:
    """'file:line: ...' for record k; `what` is 'empty' or 'invalid' (first bad letter)."""
    start = _record_starts(records)[k]
    line = block.first_line + block.data.count(b"\n", 0, start)
    header, _, body = records[k].partition(b"\n")
    name = header.rstrip(b"\r").decode("utf-8", "replace").split(" ")[0]
    if what == "empty":
        return f"{block.path}:{line}: record '{name}' has no sequence"
    arr = np.frombuffer(body, np.uint8)
    bad = (tok.ENCODE_LUT[arr] == tok.INVALID) & ~np.isin(arr, np.frombuffer(WHITESPACE, np.uint8))
    idx = int(np.argmax(bad))
    line += 1 + body.count(b"\n", 0, idx)
    col = idx - (body.rfind(b"\n", 0, idx) + 1) + 1
    return (
        f"{block.path}:{line}:{col}: invalid residue {chr(body[idx])!r} in record '{name}' "
        "(use --invalid skip or --invalid x to accept such records)"
    )


def parse_fasta_block(block: FastaBlock, policy: str = "error") -> Encoded:
    records = block.data[1:].split(b"\n>")
    names, seqs = [], []
    for k, rec in enumerate(records):
        header, _, body = rec.partition(b"\n")
        seq = body.translate(None, WHITESPACE)
        if seq.endswith(b"*"):
            seq = seq[:-1]
        if not seq:
            raise DataError(_fasta_problem(block, records, k, "empty"))
        names.append(header.rstrip(b"\r"))
        seqs.append(seq)
    return _encode_many(names, seqs, policy, lambda k: _fasta_problem(block, records, k, "invalid"))


def _encode_many(names: list, seqs: list, policy: str, describe) -> Encoded:
    """LUT-encode all records at once; apply the invalid-letter policy per record."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    ids = tok.ENCODE_LUT[np.frombuffer(b"".join(seqs), np.uint8)]
    bad = ids == tok.INVALID
    if not bad.any():
        return Encoded(names, lengths, ids)
    ends = np.cumsum(lengths)
    bad_records = np.unique(np.searchsorted(ends, np.flatnonzero(bad), side="right"))
    first = describe(int(bad_records[0]))
    if policy == "error":
        raise DataError(first)
    if policy == "x":
        n_bad = int(bad.sum())
        ids[bad] = tok.X_ID
        return Encoded(names, lengths, ids, replaced=n_bad, first_problem=first)
    keep = np.ones(len(seqs), bool)
    keep[bad_records] = False
    keep_res = np.repeat(keep, lengths)
    return Encoded(
        [n for n, k in zip(names, keep) if k],
        lengths[keep],
        ids[keep_res],
        skipped=len(bad_records),
        first_problem=first,
    )


# ---------------------------------------------------------------- tables


def table_batches(
    spec: str, column: str | None, id_column: str | None = None, rows: int = TABLE_ROWS
) -> Iterator[TableBatch]:
    """Row batches of a parquet/CSV/TSV file or a Hugging Face dataset (disk or hub)."""
    kind = input_kind(spec)
    if column is None:
        raise DataError(f"{spec}: {kind} input needs --column (the sequence column)")
    if kind == "parquet":
        batches, names = _parquet(spec, rows)
    elif kind in ("csv", "tsv"):
        batches, names = _csv(spec, sniff_delimiter(header_line(spec)), rows)
    else:
        batches, names = _hf(spec, kind, rows)
    for c in (column, id_column):
        if c is not None and c not in names:
            raise DataError(f"{spec}: no column {c!r} (columns: {', '.join(map(str, names))})")
    row = 0
    for b in batches:
        seqs = b[column]
        ids = [str(v) for v in b[id_column]] if id_column else [str(row + i) for i in range(len(seqs))]
        yield TableBatch(str(spec), row, ids, seqs)
        row += len(seqs)


def _arrow_batches(reader, spec):
    try:
        for b in reader:
            yield b.to_pydict()
    except Exception as e:  # pyarrow raises several types for corrupt/truncated input
        raise DataError(f"{spec}: cannot read ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _parquet(spec, rows):
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(spec)
    except Exception as e:
        raise DataError(f"{spec}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    return _arrow_batches(f.iter_batches(batch_size=rows), spec), f.schema_arrow.names


def _csv(spec, delimiter, rows):
    import pyarrow.csv as pcsv

    try:
        reader = pcsv.open_csv(
            spec,
            read_options=pcsv.ReadOptions(block_size=1 << 22),
            parse_options=pcsv.ParseOptions(delimiter=delimiter),
            convert_options=pcsv.ConvertOptions(strings_can_be_null=True),
        )
    except Exception as e:
        raise DataError(
            f"{spec}: cannot read as {'TSV' if delimiter == chr(9) else 'CSV'} ({str(e).splitlines()[0]})"
        ) from None
    return _arrow_batches(reader, spec), reader.schema.names


def _hf(spec, kind, rows):
    """A saved dataset directory or a hub dataset (streamed); '#SPLIT' picks a split."""
    import datasets

    base, split = split_spec(spec)
    try:
        if kind == "hf_disk":
            ds = datasets.load_from_disk(base)
        else:
            ds = datasets.load_dataset(base[3:], split=split or "train", streaming=True)
            split = None
    except Exception as e:
        where = "load the saved dataset" if kind == "hf_disk" else "load it from the Hugging Face Hub"
        raise DataError(
            f"{base}: cannot {where} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); check the name and network "
            "or use a local copy"
        ) from None
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise DataError(f"{base}: choose a split with {base}#SPLIT (splits: {', '.join(ds)})")
        ds = ds[split]
    return ds.iter(batch_size=rows), list(ds.column_names or [])


def encode_table_batch(batch: TableBatch, policy: str = "error") -> Encoded:
    seqs = []
    for k, s in enumerate(batch.sequences):
        if not isinstance(s, str) or not s.strip():
            raise DataError(
                f"{batch.where}: row {batch.first_row + k + 1} ({batch.names[k]}): missing or non-text sequence"
            )
        b = s.strip().encode("ascii", "replace")
        seqs.append(b[:-1] if b.endswith(b"*") else b)

    def describe(k):
        s = batch.sequences[k].strip()
        pos = next(
            i
            for i, ch in enumerate(s)
            if ord(ch) > 127 or tok.ENCODE_LUT[ord(ch)] == tok.INVALID and not (ch == "*" and i == len(s) - 1)
        )
        return (
            f"{batch.where}: row {batch.first_row + k + 1} ({batch.names[k]}): invalid residue "
            f"{s[pos]!r} at position {pos + 1} (use --invalid skip or --invalid x)"
        )

    return _encode_many([n.encode() for n in batch.names], seqs, policy, describe)


# ---------------------------------------------------------------- uniform access


Chunk = FastaBlock | TableBatch


def chunks(spec, column=None, id_column=None) -> Iterator[Chunk]:
    """Work units of one input, whatever its kind."""
    if input_kind(spec) == "fasta":
        if column is not None:
            raise DataError(f"{spec}: --column applies to parquet/CSV/datasets inputs, not FASTA")
        return fasta_blocks(spec)
    return table_batches(spec, column, id_column)


def encode_chunk(chunk: Chunk, policy: str = "error") -> Encoded:
    if policy not in tok.POLICIES:
        raise DataError(f"invalid-letter policy must be one of {tok.POLICIES}, got {policy!r}")
    if isinstance(chunk, FastaBlock):
        return parse_fasta_block(chunk, policy)
    return encode_table_batch(chunk, policy)


def read_records(spec, column=None, id_column=None, policy: str = "error"):
    """(name, normalised sequence, where) per record — the simple API (tests, split)."""
    for chunk in chunks(spec, column, id_column):
        enc = encode_chunk(chunk, policy)
        ends = np.cumsum(enc.lengths)
        where = chunk.path if isinstance(chunk, FastaBlock) else chunk.where
        for name, end, n in zip(enc.names, ends, enc.lengths):
            yield name.decode("utf-8", "replace"), tok.decode(enc.residues[end - n : end]), where


def file_fingerprint(spec) -> dict:
    """Identity of an input for the manifest: content hash of files, fingerprint of datasets."""
    import hashlib

    kind = input_kind(spec)
    if kind == "hf_hub":
        return {"input": str(spec), "kind": kind}
    base = Path(split_spec(spec)[0])
    files = sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else [base]
    h = hashlib.sha256()
    size = 0
    for p in files:
        with open(p, "rb") as f:
            while b := f.read(1 << 22):
                h.update(b)
                size += len(b)
    return {"input": str(spec), "kind": kind, "bytes": size, "sha256": h.hexdigest()}
