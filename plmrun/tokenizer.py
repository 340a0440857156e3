"""Vectorised encode/decode of the ESM-2 33-token vocabulary (defined in plmrun.model.vocab).

Ids equal `transformers.EsmTokenizer`'s for every valid input (tests check it), so exported models
work with the Hugging Face tokenizer. Encoding is one 256-entry lookup table applied to the raw
bytes: no per-character Python loop, because data preparation runs at tens of millions of
residues per second.

Normalisation (documented in docs/reference/shard-format.md): lowercase letters are upper-cased, one
trailing `*` (stop codon in `.faa` files) is dropped; anything else outside the vocabulary letters
is an error, or with `policy="x"` becomes `X`, or with `policy="skip"` makes `encode` return None.
"""

from __future__ import annotations

import hashlib

import numpy as np

from plmrun.errors import PlmrunError
from plmrun.model.vocab import CLS, EOS, MASK, PAD, UNK, VOCAB, VOCAB_SIZE  # noqa: F401 (the one vocabulary)

X_ID = VOCAB.index("X")
AMINO_ACID_IDS = np.arange(4, 24, dtype=np.int64)  # the 20 standard residues (MLM replacement pool)
RESIDUE_IDS = np.arange(4, 31, dtype=np.int64)  # every residue letter, incl. X B U Z O . -
VOCAB_HASH = hashlib.sha256("\n".join(VOCAB).encode()).hexdigest()[:16]
POLICIES = ("error", "skip", "x")

INVALID = 255  # LUT value of bytes outside the alphabet
ENCODE_LUT = np.full(256, INVALID, dtype=np.uint8)
for _i in RESIDUE_IDS:
    ENCODE_LUT[ord(VOCAB[_i])] = _i
    ENCODE_LUT[ord(VOCAB[_i].lower())] = _i  # '.'/'-' lower() is themselves
DECODE_TABLE = np.frombuffer("".join(v if len(v) == 1 else "?" for v in VOCAB).encode(), np.uint8)


class InvalidSequenceError(PlmrunError, ValueError):
    """A letter outside the vocabulary; `position` is 0-based within the sequence as given."""

    def __init__(self, letter: str, position: int):
        super().__init__(f"invalid residue {letter!r} at position {position + 1}")
        self.letter, self.position = letter, position


def _as_bytes(seq) -> bytes:
    if isinstance(seq, str):
        try:
            return seq.encode("ascii")
        except UnicodeEncodeError as e:
            raise InvalidSequenceError(seq[e.start], e.start) from None
    return bytes(seq)


def encode(seq, policy: str = "error"):
    """Residue ids (uint8, no specials) of one sequence; None when policy='skip' rejects it."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    try:
        raw = _as_bytes(seq)
    except InvalidSequenceError:
        if policy == "error":
            raise
        if policy == "skip":
            return None
        raw = seq.encode("ascii", errors="replace")  # '?' is invalid -> mapped to X below
    if raw.endswith(b"*"):
        raw = raw[:-1]
    ids = ENCODE_LUT[np.frombuffer(raw, dtype=np.uint8)]
    bad = ids == INVALID
    if bad.any():
        if policy == "error":
            pos = int(np.argmax(bad))
            raise InvalidSequenceError(chr(raw[pos]), pos)
        if policy == "skip":
            return None
        ids[bad] = X_ID
    return ids


def decode(ids) -> str:
    """Letters of residue ids (specials become '?'; use only on residue ids)."""
    return DECODE_TABLE[np.asarray(ids, dtype=np.int64)].tobytes().decode("ascii")


def with_specials(ids) -> np.ndarray:
    """`<cls> ids <eos>` as int64, the model's view of one sequence."""
    ids = np.asarray(ids)
    out = np.empty(len(ids) + 2, dtype=np.int64)
    out[0], out[1:-1], out[-1] = CLS, ids, EOS
    return out
