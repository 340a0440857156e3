import numpy as np
import pytest
import torch

from plmrun.data.packing import PackingPlan, best_fit_decreasing, crop_starts, hash_uniform, pack, token_lengths
from plmrun.data.shards import InMemorySequences
from plmrun.tokenizer import CLS, EOS, PAD


def random_source(lengths, seed=0):
    """Random residue ids 4..30 (every residue letter)."""
    rng = np.random.default_rng(seed)
    return InMemorySequences([rng.integers(4, 31, n).astype(np.uint8) for n in lengths])


def protein_lengths(n, seed=0):
    """Lognormal lengths like UniProt proteins (median ~300, long tail)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(300), 0.75, n), 5, 5000).astype(np.int64)


def test_hash_uniform_is_pure_and_uniform():
    idx = np.arange(100_000)
    u = hash_uniform(7, 2, idx)
    assert np.array_equal(u[5000:6000], hash_uniform(7, 2, idx[5000:6000]))
    assert not np.array_equal(u, hash_uniform(8, 2, idx))
    assert 0 <= u.min() and u.max() < 1
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(hist - 10_000) < 500)


def test_crop_starts_are_a_pure_function_within_bounds():
    lengths = np.array([10, 600, 2000, 510, 511, 5000])
    idx = np.arange(6)
    s = crop_starts(lengths, idx, 512, 0, 2, 0)
    assert s[0] == 0 and s[3] == 0  # fits in 510 residues: no crop
    assert np.all(s >= 0) and np.all(s <= np.maximum(lengths - 510, 0))
    assert np.array_equal(s[[5, 2]], crop_starts(lengths[[5, 2]], idx[[5, 2]], 512, 0, 2, 0))
    many = crop_starts(np.full(200, 5000), np.arange(200), 512, 0, 2, 0)
    other_epoch = crop_starts(np.full(200, 5000), np.arange(200), 512, 0, 2, 1)
    assert len(np.unique(many)) > 150 and not np.array_equal(many, other_epoch)
    # every offset can occur, including the last one
    assert set(crop_starts(np.full(5000, 511), np.arange(5000), 512, 3, 2, 0)) == {0, 1}


def _reference_best_fit(sizes, cap):
    bins, free = [], []
    for pos in sorted(range(len(sizes)), key=lambda p: (-sizes[p], p)):
        fits = [b for b in range(len(bins)) if free[b] >= sizes[pos]]
        if fits:
            b = min(fits, key=lambda b: (free[b], b))
        else:
            bins.append([])
            free.append(cap)
            b = len(bins) - 1
        bins[b].append(pos)
        free[b] -= sizes[pos]
    return [sorted(b) for b in bins]


def test_best_fit_decreasing_matches_reference():
    rng = np.random.default_rng(1)
    for cap in (50, 512, 4096):
        sizes = rng.integers(2, cap + 1, 300) if cap == 50 else np.minimum(protein_lengths(300, cap), cap - 2) + 2
        got = best_fit_decreasing(sizes, cap)
        assert [b.tolist() for b in got] == _reference_best_fit(sizes.tolist(), cap)
        assert sorted(np.concatenate(got).tolist()) == list(range(len(sizes)))
        assert max(sizes[b].sum() for b in got) <= cap
    with pytest.raises(ValueError):
        best_fit_decreasing(np.array([3, 70]), 64)


def test_plan_epochs_cover_every_sequence_once_and_are_deterministic():
    lengths = protein_lengths(3000)
    plan = PackingPlan(lengths, token_budget=4096, max_length=512, seed=5, chunk_bins=8)
    assert plan.num_chunks > 1
    for epoch in (0, 1):
        bins = [b for c in range(plan.num_chunks) for b in plan.bins(epoch, c)]
        assert sorted(np.concatenate(bins).tolist()) == list(range(3000))
        assert max(plan.tokens[b].sum() for b in bins) <= 4096
    again = PackingPlan(lengths, token_budget=4096, max_length=512, seed=5, chunk_bins=8)
    assert all(np.array_equal(a, b) for a, b in zip(plan.bins(1, 2), again.bins(1, 2)))
    assert not np.array_equal(plan.bins(0, 0)[0], plan.bins(1, 0)[0])
    other = PackingPlan(lengths, token_budget=4096, max_length=512, seed=6, chunk_bins=8)
    assert not np.array_equal(plan.order(0), other.order(0))


@pytest.mark.parametrize("budget,max_length,goal", [(4096, 512, 0.97), (8192, 512, 0.97), (65536, 1024, 0.99)])
def test_packing_efficiency_on_protein_like_lengths(budget, max_length, goal):
    plan = PackingPlan(protein_lengths(40_000, seed=2), token_budget=budget, max_length=max_length, seed=0)
    assert plan.epoch_efficiency(0) >= goal


def test_pack_layout():
    src = random_source([3, 700, 0, 20])
    idx = np.array([1, 0, 2, 3])
    crops = crop_starts(src.lengths[idx], idx, 64, 9, 2, 0)
    b = pack(src, idx, crops, token_budget=256, max_length=64)
    seg = [64, 5, 2, 22]
    assert b.tokens.dtype == torch.int64 and b.tokens.numel() == 256
    assert b.cu_seqlens.dtype == torch.int32
    assert b.cu_seqlens.tolist() == [0, 64, 69, 71, 93, 256]
    assert b.num_sequences == 4 and b.num_real_tokens == 93 and b.max_seqlen == 256 - 93
    assert b.seq_index.tolist() == idx.tolist() and b.crop_start.tolist() == crops.tolist()
    pos = 0
    for k, (i, n) in enumerate(zip(idx, seg)):
        t = b.tokens[pos : pos + n].numpy()
        window = src.residues(i)[crops[k] : crops[k] + 62]
        assert t[0] == CLS and t[-1] == EOS and np.array_equal(t[1:-1], window)
        assert b.positions[pos : pos + n].tolist() == list(range(n))
        pos += n
    assert crops[0] > 0 and np.all(crops[1:] == 0)
    assert torch.all(b.tokens[93:] == PAD) and b.positions[93:].tolist() == list(range(256 - 93))


def test_pack_full_budget_has_no_tail_and_overflow_is_an_error():
    src = random_source([6, 6])
    b = pack(src, np.array([0, 1]), np.zeros(2), token_budget=16, max_length=16)
    assert b.cu_seqlens.tolist() == [0, 8, 16] and b.num_real_tokens == 16 and b.max_seqlen == 8
    with pytest.raises(ValueError, match="token budget"):
        pack(src, np.array([0, 1]), np.zeros(2), token_budget=15, max_length=15)


def test_token_lengths_crop():
    assert token_lengths(np.array([0, 10, 510, 511, 4000]), 512).tolist() == [2, 12, 512, 512, 512]
