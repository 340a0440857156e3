"""Token-budget packing: crop windows, a chunked best-fit packer, and PackedBatch assembly.

A micro-batch is one flat sequence of exactly `token_budget` tokens: whole `<cls> residues <eos>`
sequences back to back, then `<pad>` to the end (static shapes). Sequences longer than
`max_length - 2` residues are cut to a window whose start is a pure function of
(seed, epoch, sequence index) -- ESM-2 style random crops, not a fixed truncation.

Packing is best-fit decreasing over *chunks* of the epoch permutation: each chunk of about
`chunk_bins` bins' worth of consecutive permuted sequences is packed on its own and its bins are emitted in a
shuffled order fixed by (seed, epoch, chunk). So the bins of chunk c depend only on
(seed, epoch, c), and a loader position is just (epoch, chunk, bin). Only the last bin of a chunk
is left part-empty, so the waste is about half a bin per `chunk_bins` bins.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, fields

import numpy as np
import torch

from plmrun.tokenizer import CLS, EOS, PAD

# Stream tags keep the hash-derived random numbers of different uses independent.
TAG_ORDER, TAG_CROP, TAG_BINS, TAG_MASK, TAG_EVAL_CROP, TAG_EVAL_MASK = 1, 2, 3, 4, 5, 6

_MASK64 = (1 << 64) - 1
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_GOLDEN, _OFFSET = 0x9E3779B97F4A7C15, 0x632BE59BD9B4E019


def _splitmix(x):
    """splitmix64 finaliser on a Python int or a uint64 array (wrapping arithmetic)."""
    if isinstance(x, int):
        x ^= x >> 30
        x = (x * _M1) & _MASK64
        x ^= x >> 27
        x = (x * _M2) & _MASK64
        return x ^ (x >> 31)
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(_M1)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(_M2)
    return x ^ (x >> np.uint64(31))


def hash_u64(*keys):
    """Counter-based hash of integer keys (ints or arrays, broadcast) -> int or uint64 array.

    Random numbers derived this way depend only on the keys, never on call order, batch layout
    or thread, which is what makes crops and eval masks pure functions of their indices.
    """
    h = _GOLDEN
    for k in keys:
        if isinstance(h, int) and isinstance(k, (int, np.integer)):
            h = _splitmix(h ^ ((int(k) * _GOLDEN + _OFFSET) & _MASK64))
        else:
            with np.errstate(over="ignore"):
                k = np.asarray(k).astype(np.uint64)
                h = _splitmix(np.uint64(h) ^ (k * np.uint64(_GOLDEN) + np.uint64(_OFFSET)))
    return h


def hash_uniform(*keys) -> np.ndarray:
    """Uniform floats in [0, 1) from `hash_u64` (53 random bits)."""
    return (np.asarray(hash_u64(*keys), dtype=np.uint64) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def seed_from(*keys) -> int:
    """A 63-bit seed for numpy/torch generators, fixed by the keys."""
    return hash_u64(*keys) >> 1


def crop_starts(lengths: np.ndarray, index: np.ndarray, max_length: int, *keys) -> np.ndarray:
    """Residue offset of each sequence's window (0 when it fits in max_length - 2 residues).

    `keys` (e.g. seed, TAG_CROP, epoch) plus the sequence index fix the window.
    """
    window = max_length - 2
    lengths = np.asarray(lengths, dtype=np.int64)
    index = np.asarray(index, dtype=np.int64)
    starts = np.zeros(lengths.shape, dtype=np.int64)
    long = np.flatnonzero(lengths > window)
    if long.size:
        u = hash_uniform(*keys, index[long])
        starts[long] = np.floor(u * (lengths[long] - window + 1)).astype(np.int64)
    return starts


def token_lengths(lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Tokens each sequence occupies in a batch: cropped residues + <cls> + <eos>."""
    return np.minimum(np.asarray(lengths, dtype=np.int64), max_length - 2) + 2


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Pack items into bins of `capacity`: largest first, each into the fullest bin it fits.

    Deterministic (ties go to the lower remaining capacity, then the older bin). Returns the item
    positions of each bin, ascending, bins in creation order.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size and (sizes.max() > capacity or sizes.min() < 1):
        raise ValueError(f"item sizes must be in [1, {capacity}], got {sizes.min()}..{sizes.max()}")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    smallest = int(sizes.min()) if sizes.size else 1
    for pos in np.argsort(-sizes, kind="stable").tolist():
        s = int(sizes[pos])
        k = bisect.bisect_left(free, (s, -1))
        if k == len(free):
            bins.append([pos])
            rem, b = capacity - s, len(bins) - 1
        else:
            rem, b = free.pop(k)
            bins[b].append(pos)
            rem -= s
        if rem >= smallest:
            bisect.insort(free, (rem, b))
    return [np.sort(np.asarray(b, dtype=np.int64)) for b in bins]


class PackingPlan:
    """Which sequences go into which micro-batch, as a pure function of (seed, epoch, chunk).

    `bins(epoch, chunk)` returns the dataset indices of each bin of that chunk in emission order.
    """

    def __init__(self, lengths: np.ndarray, *, token_budget: int, max_length: int, seed: int, chunk_bins: int = 128):
        if max_length < 3 or token_budget < max_length:
            raise ValueError(f"need 3 <= max_length ({max_length}) <= token_budget ({token_budget})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.size == 0:
            raise ValueError("cannot pack an empty dataset")
        self.token_budget, self.max_length, self.seed = token_budget, max_length, seed
        self.tokens = token_lengths(self.lengths, max_length)
        # Enough sequences per chunk to fill about chunk_bins bins.
        self.chunk_size = max(1, int(round(chunk_bins * token_budget / float(self.tokens.mean()))))
        # The remainder joins the last chunk, so no epoch ends with a tiny, poorly packed chunk.
        self.num_chunks = max(1, len(self.lengths) // self.chunk_size)
        self._order_epoch, self._order = -1, None
        self._bins: dict[tuple[int, int], list[np.ndarray]] = {}  # the two latest chunks

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of sequence indices (cached for the current epoch)."""
        if epoch != self._order_epoch:
            rng = np.random.Generator(np.random.Philox(seed_from(self.seed, TAG_ORDER, epoch)))
            self._order, self._order_epoch = rng.permutation(len(self.lengths)), epoch
        return self._order

    def bins(self, epoch: int, chunk: int) -> list[np.ndarray]:
        if (epoch, chunk) not in self._bins:
            end = len(self.lengths) if chunk == self.num_chunks - 1 else (chunk + 1) * self.chunk_size
            idx = self.order(epoch)[chunk * self.chunk_size : end]
            packed = best_fit_decreasing(self.tokens[idx], self.token_budget)
            rng = np.random.Generator(np.random.Philox(seed_from(self.seed, TAG_BINS, epoch, chunk)))
            if len(self._bins) == 2:
                del self._bins[next(iter(self._bins))]
            self._bins[epoch, chunk] = [idx[packed[k]] for k in rng.permutation(len(packed))]
        return self._bins[epoch, chunk]

    def crops(self, epoch: int, index: np.ndarray) -> np.ndarray:
        return crop_starts(self.lengths[index], index, self.max_length, self.seed, TAG_CROP, epoch)

    def epoch_efficiency(self, epoch: int = 0) -> float:
        """Real tokens / (bins x budget) over one whole epoch (for reports and `data stats`)."""
        nbins = sum(len(self.bins(epoch, c)) for c in range(self.num_chunks))
        return float(self.tokens.sum()) / (nbins * self.token_budget)


@dataclass(eq=False)
class PackedBatch:
    tokens: torch.Tensor  # int64 [T]: <cls> residues <eos> ..., then <pad> to T
    positions: torch.Tensor  # int64 [T]: position within its segment (0 = <cls>)
    cu_seqlens: torch.Tensor  # int32 [n+1]: segment boundaries; the pad tail is the last segment
    max_seqlen: int  # longest segment (the pad tail included, so kernels cover it)
    num_sequences: int  # real sequences
    num_real_tokens: int  # tokens before the pad tail
    seq_index: torch.Tensor  # int64 [num_sequences]: dataset index of each sequence
    crop_start: torch.Tensor  # int64 [num_sequences]: residue offset of each window

    @property
    def token_budget(self) -> int:
        return int(self.tokens.numel())

    def pin_memory(self) -> PackedBatch:
        return map_tensors(self, lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = False) -> PackedBatch:
        return map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))


def map_tensors(obj, fn):
    vals = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        vals[f.name] = (
            fn(v) if isinstance(v, torch.Tensor) else (map_tensors(v, fn) if hasattr(v, "__dataclass_fields__") else v)
        )
    return type(obj)(**vals)


def _assemble(pieces: list[np.ndarray], seg: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Token pieces back to back as segments of lengths `seg` -> (tokens, positions, cu_seqlens, max_seqlen)."""
    cu = np.zeros(len(seg) + 1, dtype=np.int32)
    np.cumsum(seg, out=cu[1:])
    ramp = np.arange(max(seg), dtype=np.int64)
    return (
        torch.from_numpy(np.concatenate(pieces).astype(np.int64)),
        torch.from_numpy(np.concatenate([ramp[:n] for n in seg])),
        torch.from_numpy(cu),
        max(seg),
    )


def pack_tokens(token_arrays: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Whole token arrays (with specials) back to back, no pad tail, on `device` (inference batches)."""
    tokens, positions, cu, max_seqlen = _assemble(token_arrays, [len(t) for t in token_arrays])
    return tokens.to(device), positions.to(device), cu.to(device), max_seqlen


def length_batches(lengths: np.ndarray, token_budget: int) -> list[np.ndarray]:
    """Indices grouped into batches of <= token_budget tokens, shortest first (little attention waste).

    For inference, where every sequence is used whole and order does not matter; training batches
    are packed by `best_fit_decreasing` into fixed-size bins instead.
    """
    order = np.argsort(lengths, kind="stable")
    batches, cur, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if cur and used + n > token_budget:
            batches.append(np.array(cur))
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        batches.append(np.array(cur))
    return batches


_CLS = np.array([CLS], dtype=np.uint8)
_EOS = np.array([EOS], dtype=np.uint8)


def pack(source, seq_index: np.ndarray, crop_start: np.ndarray, *, token_budget: int, max_length: int) -> PackedBatch:
    """Assemble one micro-batch from dataset indices and their crop offsets."""
    window = max_length - 2
    seq_index = np.asarray(seq_index, dtype=np.int64)
    crop_start = np.asarray(crop_start, dtype=np.int64)
    pieces, seg = [], []
    for i, s in zip(seq_index.tolist(), crop_start.tolist()):
        r = source.residues(i)[s : s + window]
        pieces += (_CLS, r, _EOS)
        seg.append(len(r) + 2)
    total = sum(seg)
    if total > token_budget:
        raise ValueError(f"{len(seg)} sequences need {total} tokens > token budget {token_budget}")
    if total < token_budget:
        pieces.append(np.full(token_budget - total, PAD, dtype=np.uint8))
        seg.append(token_budget - total)
    tokens, positions, cu_seqlens, max_seqlen = _assemble(pieces, seg)
    return PackedBatch(
        tokens=tokens,
        positions=positions,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        num_sequences=len(seq_index),
        num_real_tokens=total,
        seq_index=torch.from_numpy(seq_index.copy()),
        crop_start=torch.from_numpy(crop_start.copy()),
    )
