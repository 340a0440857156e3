"""A stable number in [0, 1) for a string: splits and caps that depend on content, never on file order.

(Integer keys, vectorised over arrays, have their own counter-based hash: `plmrun.data.packing.hash_uniform`.)
"""

from __future__ import annotations

import hashlib


def unit_hash(text: str, digest: str = "blake2b") -> float:
    """The first 8 bytes of `digest`(text), big-endian, over 2**64. `data split` keeps sha256 so the
    splits it made before stay the same; everything else uses blake2b."""
    if digest == "sha256":
        raw = hashlib.sha256(text.encode()).digest()[:8]
    elif digest == "blake2b":
        raw = hashlib.blake2b(text.encode(), digest_size=8).digest()
    else:
        raise ValueError(f"unknown digest {digest!r}")
    return int.from_bytes(raw, "big") / 2.0**64
