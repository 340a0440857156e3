import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from plmrun.config import MaskingConfig
from plmrun.data.masking import IGNORE, Masker, eval_masks
from plmrun.data.packing import TAG_EVAL_CROP, crop_starts, pack
from plmrun.data.shards import InMemorySequences
from plmrun.tokenizer import AMINO_ACID_IDS, CLS, EOS, MASK, PAD, RESIDUE_IDS

AMINO = set(int(a) for a in AMINO_ACID_IDS)


def random_source(lengths, seed=0):
    """Random residue ids 4..30 (every residue letter)."""
    rng = np.random.default_rng(seed)
    return InMemorySequences([rng.integers(4, 31, n).astype(np.uint8) for n in lengths])


def packed_batch(lengths, budget, seed=0):
    src = random_source(lengths, seed)
    return pack(src, np.arange(len(lengths)), np.zeros(len(lengths)), token_budget=budget, max_length=budget)


@pytest.fixture(scope="module")
def big():
    """~60k residues in 200 sequences plus a pad tail."""
    return packed_batch([300] * 200, 61_000)


def test_mlm_statistics_and_specials(big):
    m = Masker(mask_rate=0.2)
    b = m(big, seed=1, index=3, step=0)
    tok, inp, tgt = big.tokens, b.inputs, b.targets
    residue = tok >= 4
    sel = tgt != IGNORE
    assert torch.equal(tgt[sel], tok[sel]) and not torch.any(sel & ~residue)
    assert torch.equal(inp[~residue], tok[~residue])  # <cls>/<eos>/<pad> untouched
    assert abs(sel.sum().item() / residue.sum().item() - 0.2) < 0.01
    n = sel.sum().item()
    masked = (inp == MASK) & sel
    kept = (inp == tok) & sel
    changed = sel & ~masked & ~kept
    assert abs(masked.sum().item() / n - 0.8) < 0.015
    # random draws equal to the original (1 in 20) count as kept
    assert abs(changed.sum().item() / n - 0.1 * 19 / 20) < 0.01
    assert set(inp[changed].tolist()) <= AMINO and len(set(inp[changed].tolist())) == 20
    assert torch.equal(b.loss_weights, sel.float()) and b.normalizer == n


def test_mlm_fractions_are_configurable(big):
    b = Masker(mask_rate=0.3, mask_token_frac=0.5, random_token_frac=0.5)(big, seed=0, index=0, step=0)
    sel = b.targets != IGNORE
    frac_mask = ((b.inputs == MASK) & sel).sum().item() / sel.sum().item()
    assert abs(frac_mask - 0.5) < 0.02 and not torch.any((b.inputs == big.tokens) & sel & (big.tokens > 23))


def test_default_masking_keeps_visible_residues_as_targets(big):
    """The default is 30% targets with ESM-2's 80/10/10: with every target <mask>, nothing in the loss
    reads the last block's output at a visible residue and embeddings degrade (docs/results/recipe.md, round 4)."""
    b = Masker.from_config(MaskingConfig())(big, seed=0, index=0, step=0)
    sel = b.targets != IGNORE
    residues = torch.isin(big.tokens, torch.from_numpy(RESIDUE_IDS))
    frac = lambda m: (m & sel).sum().item() / sel.sum().item()
    assert abs(sel.sum().item() / residues.sum().item() - 0.3) < 0.02
    assert abs(frac(b.inputs == MASK) - 0.8) < 0.02
    assert abs(frac(b.inputs == big.tokens) - 0.1) < 0.02  # unchanged (a random draw may repeat the residue)


def test_masks_are_a_pure_function_of_seed_index_step(big):
    m = Masker()
    a = m(big, seed=1, index=5, step=10)
    assert torch.equal(a.inputs, m(big, seed=1, index=5, step=10).inputs)
    for kw in (
        {"seed": 2, "index": 5, "step": 10},
        {"seed": 1, "index": 6, "step": 10},
        {"seed": 1, "index": 5, "step": 11},
    ):
        assert not torch.equal(a.inputs, m(big, **kw).inputs)


def test_diffusion_weights_match_direct_elbo_computation():
    packed = packed_batch([50, 7, 120, 33, 1, 80], 400, seed=3)
    m = Masker(objective="diffusion", diffusion_eps=0.05)
    b = m(packed, seed=4, index=0, step=0)
    assert torch.all(b.t > 0.05) and torch.all(b.t <= 1)
    sel = b.targets != IGNORE
    assert torch.all(b.inputs[sel] == MASK) and torch.equal(b.inputs[~sel], packed.tokens[~sel])
    logits = torch.randn(400, 33, generator=torch.Generator().manual_seed(0))
    ce = F.cross_entropy(logits, b.targets.clamp_min(0), reduction="none")
    batch_loss = (b.loss_weights * ce).sum() / b.normalizer
    # direct: per sequence, (1/t) * sum of CE over its masked residues; divided by all residues
    cu = packed.cu_seqlens.tolist()
    total, residues = 0.0, 0
    for s in range(packed.num_sequences):
        lo, hi = cu[s] + 1, cu[s + 1] - 1  # residues between <cls> and <eos>
        masked = [i for i in range(lo, hi) if b.inputs[i] == MASK]
        total += (
            sum(F.cross_entropy(logits[i : i + 1], packed.tokens[i : i + 1]).item() for i in masked) / b.t[s].item()
        )
        residues += hi - lo
    assert b.normalizer == residues
    assert batch_loss.item() == pytest.approx(total / residues, rel=1e-5)


def test_diffusion_weighting_is_unbiased():
    # E_t E_mask [sum_masked 1/t] = number of residues: a constant per-token CE c gives loss c.
    packed = packed_batch([100] * 20, 2100)
    m = Masker(objective="diffusion", diffusion_eps=1e-3)
    ratios = [
        (lambda b: b.loss_weights.sum().item() / b.normalizer)(m(packed, seed=0, index=i, step=0)) for i in range(400)
    ]
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.08)


def test_schedule_comes_from_the_step(big):
    m = Masker(mask_rate=0.1, mask_rate_end=0.3, ramp_steps=100)
    assert [m.rate(s) for s in (0, 50, 100, 1000)] == pytest.approx([0.1, 0.2, 0.3, 0.3])
    for step, rate in ((0, 0.1), (50, 0.2), (200, 0.3)):
        b = m(big, seed=0, index=0, step=step)
        assert abs(b.normalizer / (big.tokens >= 4).sum().item() - rate) < 0.01
    mix = Masker(objective="mlm_to_diffusion", mask_rate=0.15, ramp_steps=10)
    assert [mix.diffusion_fraction(s) for s in (0, 5, 10, 99)] == [0.0, 0.5, 1.0, 1.0]
    first, half, last = (mix(big, seed=0, index=0, step=s) for s in (0, 5, 10))
    assert torch.allclose(first.t, torch.tensor(0.15)) and not torch.allclose(last.t, torch.tensor(0.15))
    assert 0.3 < (half.t != 0.15).float().mean().item() < 0.7
    # mixed mode: one residue normalizer; MLM sequences weighted 1/p
    residues = (big.tokens >= 4).sum().item()
    assert first.normalizer == residues and half.normalizer == residues
    sel = first.targets != IGNORE
    assert torch.allclose(first.loss_weights[sel], torch.tensor(1 / 0.15))


def test_from_config_reads_every_field():
    cfg = MaskingConfig(
        objective="mlm_to_diffusion",
        mask_rate=0.2,
        mask_rate_end=0.4,
        ramp_steps=7,
        mask_token_frac=0.7,
        random_token_frac=0.2,
        diffusion_eps=0.01,
    )
    m = Masker.from_config(cfg)
    for f in dataclasses.fields(MaskingConfig):
        assert getattr(m, f.name) == getattr(cfg, f.name) != getattr(MaskingConfig(), f.name)
    with pytest.raises(ValueError, match="ramp_steps"):
        Masker(objective="mlm_to_diffusion")


def test_eval_masks_do_not_depend_on_batching():
    src = random_source([40, 1500, 300, 9, 700, 120], seed=5)
    n = len(src)
    crops = crop_starts(src.lengths, np.arange(n), 1024, 11, TAG_EVAL_CROP)

    def per_sequence(groups, budget):
        out = {}
        for g in groups:
            g = np.array(g)
            b = eval_masks(pack(src, g, crops[g], token_budget=budget, max_length=1024), eval_seed=11, mask_rate=0.15)
            cu = b.packed.cu_seqlens.tolist()
            for k, i in enumerate(g):
                out[int(i)] = (b.inputs[cu[k] : cu[k + 1]].clone(), b.targets[cu[k] : cu[k + 1]].clone())
        return out

    one = per_sequence([range(n)], 4096)
    many = per_sequence([[0, 1], [2, 3], [4], [5]], 1100)
    for i in range(n):
        assert torch.equal(one[i][0], many[i][0]) and torch.equal(one[i][1], many[i][1])
    b = eval_masks(pack(src, np.arange(n), crops, token_budget=4096, max_length=1024), eval_seed=11, mask_rate=0.15)
    sel = b.targets != IGNORE
    assert torch.all(b.inputs[sel] == MASK) and b.normalizer == sel.sum().item()
    assert not torch.any(sel & ((b.packed.tokens == CLS) | (b.packed.tokens == EOS) | (b.packed.tokens == PAD)))
    assert abs(sel.sum().item() / (b.packed.tokens >= 4).sum().item() - 0.15) < 0.03
    other = eval_masks(b.packed, eval_seed=12, mask_rate=0.15)
    assert not torch.equal(other.targets, b.targets)
