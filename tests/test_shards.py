"""Shard format: exact round trip, layout as documented, and every corruption is caught."""

import json
import struct

import numpy as np
import pytest

from plmrun import tokenizer as tok
from plmrun.data.errors import DataError
from plmrun.data.readers import Encoded
from plmrun.data.shards import InMemorySequences, SplitWriter, dataset_fingerprint, dataset_splits, open_dataset


def random_sequences(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 31, size=int(rng.integers(1, 300))).astype(np.uint8) for _ in range(n)]


def write_split(root, seqs, names, shard_residues, chunk=7):
    w = SplitWriter(root / "train", shard_residues)
    for a in range(0, len(seqs), chunk):
        part = seqs[a : a + chunk]
        w.add(
            Encoded(
                [n.encode() for n in names[a : a + chunk]],
                np.array([len(s) for s in part], np.int64),
                np.concatenate(part),
            )
        )
    return w.finish(command="test")


@pytest.fixture
def dataset(tmp_path):
    seqs = random_sequences(100)
    names = [f"seq{i} é description" for i in range(100)]
    manifest = write_split(tmp_path, seqs, names, shard_residues=2000)
    return tmp_path, seqs, names, manifest


def test_round_trip_multi_shard(dataset):
    root, seqs, names, manifest = dataset
    assert len(manifest["shards"]) > 3
    src = open_dataset(root, "train")
    assert len(src) == 100 and src.lengths.dtype == np.int64
    assert src.lengths.tolist() == [len(s) for s in seqs]
    for i in range(100):
        assert np.array_equal(src.residues(i), seqs[i]) and src.residues(i).dtype == np.uint8
        assert src.ids(i) == names[i]
    with pytest.raises(ValueError):
        src.residues(0)[0] = 5  # read-only view of the memory map
    with pytest.raises(IndexError):
        src.residues(100)
    assert src.fingerprint == InMemorySequences(seqs).fingerprint
    assert src.fingerprint != InMemorySequences(seqs[::-1]).fingerprint
    assert manifest["num_tokens"] == sum(map(len, seqs))
    assert sum(manifest["length_histogram"]["counts"]) == 100
    assert dataset_splits(root) == ["train"] and len(dataset_fingerprint(root)) == 32
    assert not list(root.rglob(".*tmp*"))


def test_documented_layout(dataset):
    """Parse shard 0 by hand, following docs/reference/shard-format.md."""
    root, seqs, names, manifest = dataset
    raw = (root / "train" / "shard-00000.bin").read_bytes()
    magic, version, hsize, n, residues, nbytes, vocab, digest = struct.unpack_from("<8sIIQQQ16s32s", raw)
    assert (magic, version, hsize, vocab.decode()) == (b"PLMSHARD", 1, 128, tok.VOCAB_HASH)
    assert n == manifest["shards"][0]["num_sequences"] and digest.hex() == manifest["shards"][0]["sha256"]
    pad = (residues + 7) // 8 * 8
    offsets = np.frombuffer(raw, "<i8", n + 1, 128 + pad)
    name_off = np.frombuffer(raw, "<i8", n + 1, 128 + pad + 8 * (n + 1))
    blob = raw[128 + pad + 16 * (n + 1) :]
    assert len(blob) == nbytes == name_off[-1]
    assert np.array_equal(np.frombuffer(raw, np.uint8, offsets[1], 128), seqs[0])
    assert blob[name_off[1] : name_off[2]].decode() == names[1]
    import hashlib

    assert hashlib.sha256(raw[128:]).digest() == digest


def test_corruption_detected(dataset):
    root, *_ = dataset
    shard = root / "train" / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[200] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-00001.bin: checksum mismatch"):
        open_dataset(root, "train")
    data[200] ^= 1
    shard.write_bytes(bytes(data[:-5]))
    with pytest.raises(DataError, match=r"shard-00001.bin: .* bytes, expected .*truncated"):
        open_dataset(root, "train")
    shard.write_bytes(b"XXXXXXXX" + bytes(data[8:]))
    with pytest.raises(DataError, match=r"shard-00001.bin: not a plmrun shard"):
        open_dataset(root, "train")
    shard.unlink()
    with pytest.raises(DataError, match=r"shard-00001.bin: shard file missing"):
        open_dataset(root, "train")


def test_manifest_problems(dataset):
    root, *_ = dataset
    with pytest.raises(DataError, match=r"valid/manifest.json: missing .*splits here: train.*plmrun data prepare"):
        open_dataset(root, "valid")
    with pytest.raises(DataError, match=r"no such dataset directory"):
        open_dataset(root / "nope", "train")
    m = root / "train" / "manifest.json"
    d = json.loads(m.read_text())
    m.write_text(json.dumps({**d, "vocab_hash": "0" * 16}))
    with pytest.raises(DataError, match=r"vocabulary hash"):
        open_dataset(root, "train")
    m.write_text(json.dumps({**d, "version": 99}))
    with pytest.raises(DataError, match=r"version 99"):
        open_dataset(root, "train")
    m.write_text(json.dumps({**d, "fingerprint": "f" * 32}))  # a hand-edited fingerprint
    with pytest.raises(DataError, match=r"train/manifest.json: its fingerprint does not match the shards' contents"):
        open_dataset(root, "train")
    assert open_dataset(root, "train", verify=False).fingerprint == "f" * 32  # only verification catches it
    m.write_text(json.dumps(d))
    assert open_dataset(root, "train").fingerprint == d["fingerprint"]
    m.write_text('{"format": "plmrun-sh')  # torn write (cannot happen via rename)
    with pytest.raises(DataError, match=r"unreadable manifest"):
        open_dataset(root, "train")
    m.unlink()  # shards without a manifest: not a dataset
    with pytest.raises(DataError, match=r"manifest.json: missing"):
        open_dataset(root, "train")


def test_in_memory_source():
    seqs = [tok.encode("MKV"), tok.encode("LAGW")]
    src = InMemorySequences(seqs, ids=["a", "b"])
    assert len(src) == 2 and src.lengths.tolist() == [3, 4] and src.ids(1) == "b"
    assert tok.decode(src.residues(1)) == "LAGW"
    with pytest.raises(ValueError):
        InMemorySequences(seqs, ids=["a"])
