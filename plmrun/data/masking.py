"""Masking of packed batches: MLM 80/10/10, masked diffusion, their schedule, and the eval protocol.

Only residues (ids 4..30) are ever selected; <cls>/<eos>/<pad> never are. Every MaskedBatch
carries per-token loss weights and the normalizer they belong to, so the trainer computes
    loss = sum_microbatches sum_i w_i * CE_i / sum_microbatches normalizer
with both sums all-reduced over ranks.

MLM (rate p): each residue is a target with probability p; of the targets, `mask_token_frac`
become <mask>, `random_token_frac` a random standard amino acid (never a special token), the rest
stay. w = 1 on targets, normalizer = number of targets.

Masked diffusion (MDLM/LLaDA): per sequence t ~ U(eps, 1], every residue independently <mask>
with probability t. For a sequence x of n residues the bound on the negative log-likelihood is

    -log p(x) <= E_{t ~ U(0,1]} E_{x_t ~ q(.|x, t)} [ (1/t) * sum_{i : x_t[i] = <mask>} -log p(x[i] | x_t) ]

so w = 1/t on masked residues and normalizer = number of residues: the batch loss is the
residue-weighted per-residue bound  sum_s sum_{i masked in s} CE_i / t_s  /  sum_s n_s.

mlm_to_diffusion: each sequence is a diffusion sequence with probability f(step) rising linearly
from 0 to 1 over ramp_steps, else an MLM sequence. In this mixed mode MLM sequences use the same
residue-normalised form (w = 1/p, i.e. diffusion at fixed t = p; its expectation is the MLM loss),
so the one normalizer (number of residues) is right for both and the loss moves smoothly from the
MLM to the diffusion objective.

Schedules are evaluated from the `step` argument that travels with each batch request, never from
state kept in a worker (the seed's bug). Training masks are a pure function of
(seed, global micro-batch index, step); eval masks of (eval seed, sequence index, residue position).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from plmrun.config import MaskingConfig
from plmrun.data.packing import TAG_EVAL_MASK, TAG_MASK, PackedBatch, hash_uniform, map_tensors, seed_from
from plmrun.tokenizer import AMINO_ACID_IDS, MASK, RESIDUE_IDS, VOCAB_SIZE

IGNORE = -100
_RESIDUE = np.zeros(VOCAB_SIZE, dtype=bool)
_RESIDUE[np.asarray(RESIDUE_IDS, dtype=np.int64)] = True
_AMINO = np.asarray(AMINO_ACID_IDS, dtype=np.int64)


@dataclass(eq=False)
class MaskedBatch:
    packed: PackedBatch
    inputs: torch.Tensor  # int64 [T]: model input ids after masking
    targets: torch.Tensor  # int64 [T]: original id at loss positions, -100 elsewhere
    loss_weights: torch.Tensor  # float32 [T]: per-token weight (0 where targets == -100)
    normalizer: float  # what the weighted sum is divided by (summed over the global batch)
    t: torch.Tensor  # float32 [num_sequences]: each sequence's masking probability

    def pin_memory(self) -> MaskedBatch:
        return map_tensors(self, lambda x: x.pin_memory())

    def to(self, device, non_blocking: bool = False) -> MaskedBatch:
        return map_tensors(self, lambda x: x.to(device, non_blocking=non_blocking))


def _segment_lengths(packed: PackedBatch) -> np.ndarray:
    """Tokens per segment (the pad tail, if any, is the last segment)."""
    return np.diff(packed.cu_seqlens.numpy()).astype(np.int64)


@dataclass(frozen=True)
class Masker:
    objective: str = "mlm"
    mask_rate: float = 0.15
    mask_rate_end: float | None = None
    ramp_steps: int = 0
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1
    diffusion_eps: float = 1e-3

    def __post_init__(self):
        if self.objective not in ("mlm", "diffusion", "mlm_to_diffusion"):
            raise ValueError(f"masking.objective: unknown {self.objective!r}")
        if not (0 < self.mask_rate < 1) or (self.mask_rate_end is not None and not 0 < self.mask_rate_end < 1):
            raise ValueError("masking: mask rates must be in (0, 1)")
        if self.mask_token_frac < 0 or self.random_token_frac < 0 or self.mask_token_frac + self.random_token_frac > 1:
            raise ValueError("masking: mask_token_frac + random_token_frac must be <= 1")
        if not 0 < self.diffusion_eps < 1:
            raise ValueError("masking.diffusion_eps must be in (0, 1)")
        if (self.objective == "mlm_to_diffusion" or self.mask_rate_end is not None) and self.ramp_steps <= 0:
            raise ValueError("masking: a ramp (mask_rate_end or mlm_to_diffusion) needs ramp_steps > 0")

    @classmethod
    def from_config(cls, cfg: MaskingConfig) -> Masker:
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(MaskingConfig)})

    def _progress(self, step: int) -> float:
        return min(max(step, 0) / self.ramp_steps, 1.0) if self.ramp_steps > 0 else 1.0

    def rate(self, step: int) -> float:
        """MLM mask rate at this global step (linear ramp to mask_rate_end over ramp_steps)."""
        if self.mask_rate_end is None:
            return self.mask_rate
        return self.mask_rate + (self.mask_rate_end - self.mask_rate) * self._progress(step)

    def diffusion_fraction(self, step: int) -> float:
        """Probability that a sequence is masked by diffusion rather than MLM at this step."""
        return {"mlm": 0.0, "diffusion": 1.0}.get(self.objective, self._progress(step))

    def __call__(self, packed: PackedBatch, *, seed: int, index: int, step: int) -> MaskedBatch:
        """Mask micro-batch number `index` of the stream for global step `step`."""
        rng = np.random.Generator(np.random.PCG64(seed_from(seed, TAG_MASK, index, step)))
        tokens = packed.tokens.numpy()
        n = packed.num_sequences
        p, f = self.rate(step), self.diffusion_fraction(step)
        u_t = rng.random(n)
        is_diff = rng.random(n) < f
        t_seq = np.where(is_diff, 1.0 - (1.0 - self.diffusion_eps) * u_t, p)
        residue = _RESIDUE[tokens]
        u = rng.random(tokens.shape[0])
        if f == 0.0:  # pure MLM: one rate, no per-token lookups
            sel = np.flatnonzero(residue & (u < p))
            diff_sel, t_sel = np.zeros(sel.size, dtype=bool), p
        else:
            seglen = _segment_lengths(packed)
            seq = np.repeat(np.arange(len(seglen)), seglen)
            t_tok = np.append(t_seq, 0.0)[seq]  # pad tail: t = 0
            sel = np.flatnonzero(residue & (u < t_tok))
            diff_sel, t_sel = np.append(is_diff, False)[seq[sel]], t_tok[sel]
        inputs = tokens.copy()
        v = rng.random(sel.size)
        inputs[sel[diff_sel | (v < self.mask_token_frac)]] = MASK
        rand = sel[~diff_sel & (v >= self.mask_token_frac) & (v < self.mask_token_frac + self.random_token_frac)]
        inputs[rand] = _AMINO[rng.integers(0, len(_AMINO), rand.size)]
        targets = np.full_like(tokens, IGNORE)
        targets[sel] = tokens[sel]
        weights = np.zeros(tokens.shape[0], dtype=np.float32)
        if self.objective == "mlm":
            weights[sel], normalizer = 1.0, float(sel.size)
        else:
            weights[sel], normalizer = 1.0 / t_sel, float(np.count_nonzero(residue))
        return MaskedBatch(
            packed,
            torch.from_numpy(inputs),
            torch.from_numpy(targets),
            torch.from_numpy(weights),
            normalizer,
            torch.from_numpy(t_seq.astype(np.float32)),
        )


def eval_masks(packed: PackedBatch, *, eval_seed: int, mask_rate: float = 0.15) -> MaskedBatch:
    """The one evaluation protocol: `mask_rate` of residues, all <mask>, fixed per residue.

    Whether residue j of sequence i is masked depends only on (eval_seed, i, j) -- j counted in
    the full sequence, so with the fixed eval crop the masks are identical for any batch size,
    world size or worker count. w = 1 on targets, normalizer = number of targets.
    """
    tokens = packed.tokens.numpy()
    n, real = packed.num_sequences, packed.num_real_tokens
    seg = np.repeat(np.arange(n), _segment_lengths(packed)[:n])
    residue_pos = packed.crop_start.numpy()[seg] + packed.positions[:real].numpy() - 1
    u = hash_uniform(eval_seed, TAG_EVAL_MASK, packed.seq_index.numpy()[seg], residue_pos)
    sel = np.zeros(tokens.shape[0], dtype=bool)
    sel[:real] = _RESIDUE[tokens[:real]] & (u < mask_rate)
    inputs = np.where(sel, MASK, tokens)
    targets = np.where(sel, tokens, IGNORE)
    return MaskedBatch(
        packed,
        torch.from_numpy(inputs),
        torch.from_numpy(targets),
        torch.from_numpy(sel.astype(np.float32)),
        float(sel.sum()),
        torch.full((n,), float(mask_rate)),
    )
