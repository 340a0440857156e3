"""Masked-LM metrics from summable statistics, so they can be all-reduced and never depend on batching.

Everything is derived from three sums over all evaluated target tokens: Σ w·CE, Σ normaliser and
a confusion matrix C[true, predicted]. Summing these over micro-batches, workers and ranks and
computing the metrics once at the end gives the same numbers whatever the batch or world size
(the seed averaged per-batch means, which changed with the eval batch size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from plmrun.tokenizer import VOCAB_SIZE


@dataclass
class MetricSums:
    loss_sum: torch.Tensor  # float64 scalar: Σ w·CE
    normalizer: torch.Tensor  # float64 scalar
    confusion: torch.Tensor  # int64 [V, V], rows = true token, cols = predicted token

    @classmethod
    def zeros(cls, device="cpu") -> "MetricSums":
        return cls(torch.zeros((), dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.float64, device=device),
                   torch.zeros(VOCAB_SIZE, VOCAB_SIZE, dtype=torch.int64, device=device))

    def add(self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, normalizer: float) -> None:
        """Add one batch: logits [N, V] and targets/weights [N] at the target positions only."""
        ce = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        self.loss_sum += (ce.double() * weights.double()).sum()
        self.normalizer += float(normalizer)
        pred = logits.argmax(-1)
        idx = targets * VOCAB_SIZE + pred
        self.confusion += torch.bincount(idx, minlength=VOCAB_SIZE * VOCAB_SIZE).view(VOCAB_SIZE, VOCAB_SIZE)

    def all_reduce(self) -> None:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in (self.loss_sum, self.normalizer, self.confusion):
                dist.all_reduce(t)

    def compute(self) -> dict:
        return compute_metrics(self.loss_sum.item(), self.normalizer.item(), self.confusion.cpu())


def compute_metrics(loss_sum: float, normalizer: float, confusion: torch.Tensor) -> dict:
    """loss, perplexity, accuracy, support-weighted precision/recall/F1 and multiclass MCC."""
    c = confusion.double()
    n = c.sum().item()
    loss = loss_sum / normalizer if normalizer > 0 else float("nan")
    if n == 0:
        return {"loss": loss, "perplexity": math.exp(loss) if loss == loss else float("nan"), "accuracy": float("nan"),
                "precision": float("nan"), "recall": float("nan"), "f1": float("nan"), "mcc": float("nan"), "tokens": 0}
    tp = c.diag()
    support = c.sum(1)  # true counts per class
    predicted = c.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-300),
                     torch.zeros_like(tp))
    w = support / n
    correct = tp.sum().item()
    # Gorodkin's multiclass MCC (what sklearn.metrics.matthews_corrcoef computes).
    cov_ytyp = correct * n - (support * predicted).sum().item()
    cov_ypyp = n * n - (predicted * predicted).sum().item()
    cov_ytyt = n * n - (support * support).sum().item()
    denom = math.sqrt(cov_ytyt * cov_ypyp)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": correct / n,
        "precision": (w * precision).sum().item(),
        "recall": (w * recall).sum().item(),
        "f1": (w * f1).sum().item(),
        "mcc": cov_ytyp / denom if denom > 0 else 0.0,
        "tokens": int(n),
    }


def bootstrap_interval(values, statistic, n: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """(statistic(*values), low, high): a percentile bootstrap interval over rows. `values` is one array
    or a tuple of arrays of the same length; every resample takes the same rows of each (paired), so
    a difference of two models on the same items keeps their pairing. Non-finite resamples are dropped."""
    import numpy as np
    arrays = [np.asarray(a) for a in (values if isinstance(values, (tuple, list)) else (values,))]
    m = len(arrays[0])
    if m == 0 or any(len(a) != m for a in arrays):
        raise ValueError(f"bootstrap_interval: need arrays of one non-zero length, got {[len(a) for a in arrays]}")
    rng = np.random.default_rng(seed)
    boot = np.array([statistic(*(a[idx] for a in arrays)) for idx in rng.integers(0, m, size=(n, m))], float)
    boot = boot[np.isfinite(boot)]
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]) if len(boot) else (math.nan, math.nan)
    return float(statistic(*arrays)), float(lo), float(hi)
