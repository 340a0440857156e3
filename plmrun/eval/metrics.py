"""Masked-LM metrics from summable statistics, so they can be all-reduced and never depend on batching.

Everything is derived from three sums over all evaluated target tokens: Σ w·CE, Σ normaliser and
a confusion matrix C[true, predicted]. Summing these over micro-batches, workers and ranks and
computing the metrics once at the end gives the same numbers whatever the batch or world size
(the seed averaged per-batch means, which changed with the eval batch size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from plmrun.dist import all_reduce_sum
from plmrun.tokenizer import RESIDUE_IDS, VOCAB, VOCAB_SIZE

BOOTSTRAP_RESAMPLES = 2000  # paired bootstrap over sequences for "model minus control" (probe, eval)


@dataclass
class MetricSums:
    loss_sum: torch.Tensor  # float64 scalar: Σ w·CE
    normalizer: torch.Tensor  # float64 scalar
    confusion: torch.Tensor  # int64 [V, V], rows = true token, cols = predicted token
    unigram_logp: torch.Tensor | None = None  # float64 [V]: log p of each token under the unigram baseline
    unigram_sum: torch.Tensor | None = None  # float64 scalar: Σ w·CE of the same targets under the unigram
    seq_loss: torch.Tensor | None = None  # float64 [num_sequences]: Σ w·CE per dataset sequence
    seq_weight: torch.Tensor | None = None  # float64 [num_sequences]: Σ w per dataset sequence

    @classmethod
    def zeros(
        cls, device="cpu", *, unigram_logp: torch.Tensor | None = None, num_sequences: int | None = None
    ) -> MetricSums:
        """Empty sums; with `unigram_logp` also the unigram baseline's, with `num_sequences` per-sequence sums."""
        z = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)
        return cls(
            z(),
            z(),
            torch.zeros(VOCAB_SIZE, VOCAB_SIZE, dtype=torch.int64, device=device),
            None if unigram_logp is None else unigram_logp.to(device, torch.float64),
            None if unigram_logp is None else z(),
            None if num_sequences is None else z(num_sequences),
            None if num_sequences is None else z(num_sequences),
        )

    def add(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
        normalizer: float,
        seq: torch.Tensor | None = None,
    ) -> None:
        """Add one batch: logits [N, V] and targets/weights [N] at the target positions only
        (`seq` [N]: each target's dataset sequence index, needed for per-sequence sums)."""
        ce = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        self.loss_sum += (ce.double() * weights.double()).sum()
        self.normalizer += float(normalizer)
        pred = logits.argmax(-1)
        idx = targets * VOCAB_SIZE + pred
        self.confusion += torch.bincount(idx, minlength=VOCAB_SIZE * VOCAB_SIZE).view(VOCAB_SIZE, VOCAB_SIZE)
        if self.unigram_logp is not None:
            self.unigram_sum -= (self.unigram_logp[targets] * weights.double()).sum()
        if self.seq_loss is not None:
            self.seq_loss.index_add_(0, seq, ce.double() * weights.double())
            self.seq_weight.index_add_(0, seq, weights.double())

    def all_reduce(self) -> None:
        for t in (self.loss_sum, self.normalizer, self.confusion, self.unigram_sum, self.seq_loss, self.seq_weight):
            if t is not None:
                all_reduce_sum(t)

    def compute(self) -> dict:
        m = compute_metrics(self.loss_sum.item(), self.normalizer.item(), self.confusion.cpu())
        if self.unigram_sum is not None:  # new keys only: the model's own metrics are unchanged
            n = self.normalizer.item()
            m["unigram_loss"] = self.unigram_sum.item() / n if n > 0 else float("nan")
            m["gain"] = m["unigram_loss"] - m["loss"]
        return m


def unigram_log_probs(counts) -> torch.Tensor:
    """log p of each vocabulary token under residue frequencies `counts` [V] (add-one smoothed over
    the residue letters, so a letter the training data never had costs a finite amount)."""
    c = torch.zeros(VOCAB_SIZE, dtype=torch.float64)
    ids = torch.from_numpy(RESIDUE_IDS)
    c[ids] = torch.as_tensor(np.asarray(counts, dtype=np.float64))[ids] + 1.0
    return (c / c.sum()).log()


def counts_to_letters(counts) -> dict:
    """Residue counts [V] as {letter: count} (the form unigram.json stores)."""
    return {VOCAB[i]: int(counts[i]) for i in RESIDUE_IDS}


def letters_to_counts(letters: dict) -> np.ndarray:
    counts = np.zeros(VOCAB_SIZE, dtype=np.int64)
    for letter, n in letters.items():
        counts[VOCAB.index(letter)] = int(n)
    return counts


def paired_bootstrap(diff_per_seq, sizes, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Σ diff / Σ sizes of a paired comparison, with a 95% bootstrap interval that resamples whole
    sequences (items of one chain are not independent). diff_per_seq: each sequence's summed
    difference; sizes: its number of items (targets, residues)."""

    def ratio(d, n):
        with np.errstate(divide="ignore", invalid="ignore"):  # a resample of empty sequences: dropped
            return d.sum() / n.sum()

    diff, lo, hi = bootstrap_interval(
        (np.asarray(diff_per_seq, dtype=np.float64), np.asarray(sizes)), ratio, n=resamples, seed=seed
    )
    return {"diff": diff, "ci95": [lo, hi]}


def compute_metrics(loss_sum: float, normalizer: float, confusion: torch.Tensor) -> dict:
    """loss, perplexity, accuracy, support-weighted precision/recall/F1 and multiclass MCC."""
    c = confusion.double()
    n = c.sum().item()
    loss = loss_sum / normalizer if normalizer > 0 else float("nan")
    if n == 0:
        return {
            "loss": loss,
            "bits": loss / math.log(2),
            "perplexity": math.exp(loss) if loss == loss else float("nan"),
            "accuracy": float("nan"),
            "precision": float("nan"),
            "recall": float("nan"),
            "f1": float("nan"),
            "mcc": float("nan"),
            "tokens": 0,
        }
    tp = c.diag()
    support = c.sum(1)  # true counts per class
    predicted = c.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(
        precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-300), torch.zeros_like(tp)
    )
    w = support / n
    correct = tp.sum().item()
    # Gorodkin's multiclass MCC (what sklearn.metrics.matthews_corrcoef computes).
    cov_ytyp = correct * n - (support * predicted).sum().item()
    cov_ypyp = n * n - (predicted * predicted).sum().item()
    cov_ytyt = n * n - (support * support).sum().item()
    denom = math.sqrt(cov_ytyt * cov_ypyp)
    return {
        "loss": loss,
        "bits": loss / math.log(2),
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": correct / n,
        "precision": (w * precision).sum().item(),
        "recall": (w * recall).sum().item(),
        "f1": (w * f1).sum().item(),
        "mcc": cov_ytyp / denom if denom > 0 else 0.0,
        "tokens": int(n),
    }


def bootstrap_interval(
    values, statistic, n: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(statistic(*values), low, high): a percentile bootstrap interval over rows. `values` is one array
    or a tuple of arrays of the same length; every resample takes the same rows of each (paired), so
    a difference of two models on the same items keeps their pairing. Non-finite resamples are dropped."""
    arrays = [np.asarray(a) for a in (values if isinstance(values, (tuple, list)) else (values,))]
    m = len(arrays[0])
    if m == 0 or any(len(a) != m for a in arrays):
        raise ValueError(f"bootstrap_interval: need arrays of one non-zero length, got {[len(a) for a in arrays]}")
    rng = np.random.default_rng(seed)
    boot = np.array([statistic(*(a[idx] for a in arrays)) for idx in rng.integers(0, m, size=(n, m))], float)
    boot = boot[np.isfinite(boot)]
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]) if len(boot) else (math.nan, math.nan)
    return float(statistic(*arrays)), float(lo), float(hi)
