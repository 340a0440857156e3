"""The on-disk dataset format (docs/reference/shard-format.md) and the SequenceSource implementations.

A prepared dataset is a directory with one sub-directory per split; a split is a list of shard
files plus `manifest.json`. Every file is written under a temporary name and renamed when
complete, and the manifest is written last, so a split without a manifest is never read. Shards
are memory-mapped: sequence i is a zero-copy view, which is what random-access packing, cropping
and shuffling need. Checksums are verified on open (sha256, so opening reads every byte once).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from plmrun import tokenizer as tok
from plmrun.atomic import commit, temp_sibling, write_text
from plmrun.atomic import remove_stale_siblings as remove_stale_siblings  # re-exported: data/split.py imports both here
from plmrun.data.errors import DataError
from plmrun.data.readers import Encoded

FORMAT = "plmrun-shards"
VERSION = 1
MAGIC = b"PLMSHARD"
HEADER = struct.Struct("<8sIIQQQ16s32s")  # magic version header_size n residues names vocab sha
HEADER_SIZE = 128
SHARD_RESIDUES = 256 << 20  # default residues per shard
HIST_EDGES = list(range(0, 2048, 32)) + [2048, 4096, 8192, 16384, 32768, 1 << 62]


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


def shard_bytes(n: int, residues: int, names: int) -> int:
    """Exact file size implied by a shard's counts (truncation check before hashing)."""
    return HEADER_SIZE + _pad8(residues) + 16 * (n + 1) + names


def content_fingerprint(lengths: np.ndarray, residue_hash: bytes) -> str:
    """Fingerprint of a sequence collection: vocabulary, lengths and residues, in order."""
    h = hashlib.sha256(tok.VOCAB_HASH.encode())
    h.update(hashlib.sha256(np.ascontiguousarray(lengths, dtype="<i8").tobytes()).digest())
    h.update(residue_hash)
    return h.hexdigest()[:32]


# ---------------------------------------------------------------- writing


class SplitWriter:
    """Appends encoded chunks to shards of about `shard_residues` residues, then the manifest."""

    def __init__(self, split_dir: Path, shard_residues: int = SHARD_RESIDUES):
        self.dir = Path(split_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_residues = max(1, int(shard_residues))
        self.shards: list[dict] = []
        self.all_lengths: list[np.ndarray] = []
        self.residue_hash = hashlib.sha256()
        self._open = None  # (file, body hash, lengths list, names list, residues)

    def add(self, enc: Encoded) -> None:
        lengths, start, i = enc.lengths, 0, 0
        while i < len(lengths):
            if self._open is None:
                self._start_shard()
            f, h, lens, names, used = self._open
            room = self.shard_residues - used
            ends = np.cumsum(lengths[i:])
            take = max(int(np.searchsorted(ends, room, side="right")), 0 if used else 1)
            if take == 0:
                self._finish_shard()
                continue
            n_res = int(ends[take - 1])
            data = enc.residues[start : start + n_res]
            f.write(data)
            h.update(data)
            self.residue_hash.update(data)
            lens.append(lengths[i : i + take])
            names.extend(enc.names[i : i + take])
            self._open = (f, h, lens, names, used + n_res)
            i, start = i + take, start + n_res
            if used + n_res >= self.shard_residues:
                self._finish_shard()

    def _start_shard(self) -> None:
        name = f"shard-{len(self.shards):05d}.bin"
        f = open(temp_sibling(self.dir / name), "wb")
        f.write(b"\0" * HEADER_SIZE)
        self._open = (f, hashlib.sha256(), [], [], 0)

    def _finish_shard(self) -> None:
        f, h, lens, names, residues = self._open
        self._open = None
        lengths = np.concatenate(lens) if lens else np.zeros(0, np.int64)
        self.all_lengths.append(lengths)
        name_lens = np.fromiter(map(len, names), np.int64, len(names))
        tail = [
            b"\0" * (_pad8(residues) - residues),
            np.concatenate([[0], np.cumsum(lengths)]).astype("<i8").tobytes(),
            np.concatenate([[0], np.cumsum(name_lens)]).astype("<i8").tobytes(),
            b"".join(names),
        ]
        for part in tail:
            f.write(part)
            h.update(part)
        digest = h.digest()
        f.seek(0)
        f.write(
            HEADER.pack(
                MAGIC,
                VERSION,
                HEADER_SIZE,
                len(lengths),
                residues,
                int(name_lens.sum()),
                tok.VOCAB_HASH.encode(),
                digest,
            )
        )
        f.close()
        final = self.dir / f"shard-{len(self.shards):05d}.bin"
        commit(f.name, final)
        self.shards.append(
            {
                "file": final.name,
                "num_sequences": len(lengths),
                "num_tokens": residues,
                "names_bytes": int(name_lens.sum()),
                "bytes": final.stat().st_size,
                "sha256": digest.hex(),
            }
        )

    def finish(self, **extra) -> dict:
        """Close the last shard and write manifest.json (last, atomically); returns it."""
        if self._open is not None:
            self._finish_shard()
        lengths = np.concatenate(self.all_lengths) if self.all_lengths else np.zeros(0, np.int64)
        if len(lengths) == 0:
            raise DataError(f"{self.dir}: no sequences left for split '{self.dir.name}'")
        counts, _ = np.histogram(lengths, bins=HIST_EDGES)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "split": self.dir.name,
            "vocab_hash": tok.VOCAB_HASH,
            "num_sequences": int(len(lengths)),
            "num_tokens": int(lengths.sum()),
            "num_tokens_with_specials": int(lengths.sum() + 2 * len(lengths)),
            "min_length": int(lengths.min()),
            "max_length": int(lengths.max()),
            "mean_length": float(lengths.mean()),
            "length_histogram": {"edges": HIST_EDGES[:-1] + ["inf"], "counts": counts.tolist()},
            "fingerprint": content_fingerprint(lengths, self.residue_hash.digest()),
            **extra,
            "shards": self.shards,
        }
        write_text(self.dir / "manifest.json", json.dumps(manifest, indent=1) + "\n")
        return manifest

    def abort(self) -> None:
        if self._open is not None:
            f, self._open = self._open[0], None
            try:
                f.close()
            finally:
                os.unlink(f.name)


# ---------------------------------------------------------------- reading


def read_manifest(split_dir: Path) -> dict:
    path = Path(split_dir) / "manifest.json"
    hint = f"run `plmrun data prepare INPUT --out {Path(split_dir).parent}`"
    if not Path(split_dir).parent.is_dir():
        raise DataError(f"{Path(split_dir).parent}: no such dataset directory ({hint})")
    if not path.exists():
        have = sorted(p.parent.name for p in Path(split_dir).parent.glob("*/manifest.json"))
        raise DataError(
            f"{path}: missing — split '{Path(split_dir).name}' is not a complete "
            f"prepared dataset (splits here: {', '.join(have) or 'none'}; {hint})"
        )
    try:
        m = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); {hint}") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise DataError(
            f"{path}: format {m.get('format')!r} version {m.get('version')!r}, expected "
            f"{FORMAT!r} version {VERSION}; re-run plmrun data prepare"
        )
    if m.get("vocab_hash") != tok.VOCAB_HASH:
        raise DataError(
            f"{path}: vocabulary hash {m.get('vocab_hash')} differs from this "
            f"tokenizer's {tok.VOCAB_HASH}; re-run plmrun data prepare"
        )
    return m


def _open_shard(path: Path, entry: dict, verify: bool):
    """(offsets, residues, name offsets, names) views of a verified shard."""
    redo = "the file is damaged; re-run plmrun data prepare"
    if not path.exists():
        raise DataError(f"{path}: shard file missing; {redo}")
    size = path.stat().st_size
    expect = shard_bytes(entry["num_sequences"], entry["num_tokens"], entry["names_bytes"])
    if size != expect:
        raise DataError(f"{path}: {size} bytes, expected {expect} (truncated?); {redo}")
    mm = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))  # plain ndarray views
    magic, version, hsize, n, residues, names, vocab, digest = HEADER.unpack(bytes(mm[: HEADER.size]))
    if magic != MAGIC:
        raise DataError(f"{path}: not a plmrun shard (bad magic bytes); {redo}")
    if version != VERSION or hsize != HEADER_SIZE or vocab.decode() != tok.VOCAB_HASH:
        raise DataError(f"{path}: shard version {version} / vocab {vocab!r} not supported; {redo}")
    if (n, residues, names) != (entry["num_sequences"], entry["num_tokens"], entry["names_bytes"]):
        raise DataError(f"{path}: header counts disagree with manifest.json; {redo}")
    if verify and (hashlib.sha256(mm[HEADER_SIZE:]).digest() != digest or digest.hex() != entry["sha256"]):
        raise DataError(f"{path}: checksum mismatch (corrupted after writing); {redo}")
    a = HEADER_SIZE + _pad8(residues)
    b = a + 8 * (n + 1)
    c = b + 8 * (n + 1)
    return (mm[a:b].view("<i8"), mm[HEADER_SIZE : HEADER_SIZE + residues], mm[b:c].view("<i8"), mm[c : c + names])


class ShardedSequences:
    """SequenceSource over a prepared split: memory-mapped, verified, random access."""

    def __init__(self, split_dir, verify: bool = True):
        self.dir = Path(split_dir)
        self.manifest = read_manifest(self.dir)
        self._shards = [_open_shard(self.dir / e["file"], e, verify) for e in self.manifest["shards"]]
        counts = [len(s[0]) - 1 for s in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.lengths = np.concatenate([np.diff(s[0]) for s in self._shards]).astype(np.int64)
        self.fingerprint = self.manifest["fingerprint"]
        if len(self.lengths) != self.manifest["num_sequences"]:
            raise DataError(f"{self.dir}/manifest.json: sequence count disagrees with its shards")
        if verify:  # the fingerprint runs record and resumes compare: recomputed, so an edited one is caught
            h = hashlib.sha256()
            for shard in self._shards:
                h.update(shard[1])
            if content_fingerprint(self.lengths, h.digest()) != self.fingerprint:
                raise DataError(
                    f"{self.dir}/manifest.json: its fingerprint does not match the shards' contents "
                    f"(the manifest was edited); re-run plmrun data prepare"
                )

    def __len__(self) -> int:
        return len(self.lengths)

    def _locate(self, i: int):
        if not 0 <= i < len(self.lengths):
            raise IndexError(f"sequence index {i} out of range [0, {len(self.lengths)})")
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._shards[s], i - int(self._starts[s])

    def residues(self, i: int) -> np.ndarray:
        (offsets, residues, _, _), j = self._locate(int(i))
        return residues[offsets[j] : offsets[j + 1]]

    def residue_blocks(self) -> list:
        """Every shard's residues as one array each (whole-split counts without a per-sequence loop)."""
        return [shard[1] for shard in self._shards]

    def ids(self, i: int) -> str:
        """The record's name: FASTA header without '>', or the id column value / row number."""
        (_, _, name_offsets, names), j = self._locate(int(i))
        return names[name_offsets[j] : name_offsets[j + 1]].tobytes().decode("utf-8", "replace")


def open_dataset(dataset_dir, split: str, verify: bool = True) -> ShardedSequences:
    """Open split `split` of a prepared dataset; DataError (one line, what to do) if unusable."""
    return ShardedSequences(Path(dataset_dir) / split, verify=verify)


def dataset_splits(dataset_dir) -> list[str]:
    """Names of the complete splits (those with a manifest) of a prepared dataset."""
    return sorted(p.parent.name for p in Path(dataset_dir).glob("*/manifest.json"))


def dataset_fingerprint(dataset_dir) -> str:
    """One fingerprint for all complete splits (their content fingerprints, by split name)."""
    parts = [f"{s}={read_manifest(Path(dataset_dir) / s)['fingerprint']}" for s in dataset_splits(dataset_dir)]
    if not parts:
        raise DataError(f"{dataset_dir}: no prepared splits (run plmrun data prepare)")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


class InMemorySequences:
    """SequenceSource over arrays already in memory (tests, embedding a FASTA file)."""

    def __init__(self, sequences, ids: list | None = None):
        self._seqs = [np.asarray(s, dtype=np.uint8) for s in sequences]
        if ids is not None and len(ids) != len(self._seqs):
            raise ValueError(f"{len(ids)} ids for {len(self._seqs)} sequences")
        self._ids = ids
        self.lengths = np.fromiter(map(len, self._seqs), np.int64, len(self._seqs))
        h = hashlib.sha256()
        for s in self._seqs:
            h.update(s.tobytes())
        self.fingerprint = content_fingerprint(self.lengths, h.digest())

    def __len__(self) -> int:
        return len(self._seqs)

    def residues(self, i: int) -> np.ndarray:
        return self._seqs[i]

    def ids(self, i: int) -> str:
        return self._ids[i] if self._ids is not None else str(i)
