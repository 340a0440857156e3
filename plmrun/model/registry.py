"""build_model(cfg) and the FLOP count the trainer uses for MFU."""

from __future__ import annotations

import functools

import torch

from .config import ModelConfig
from .esm2 import Esm2PLM
from .esmc import EsmcPLM
from .layers import PLM, window_at
from .speedrun import SpeedrunPLM

ARCHITECTURES = {"speedrun": SpeedrunPLM, "esm2": Esm2PLM, "esmc": EsmcPLM}


def build_model(cfg: ModelConfig) -> PLM:
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"model.arch: unknown architecture {cfg.arch!r} (choose from {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[cfg.arch](cfg)


@functools.lru_cache(maxsize=32)
def _matmul_params(cfg_items: tuple) -> int:
    with torch.device("meta"):
        return build_model(ModelConfig(**dict(cfg_items))).matmul_params()


def attention_pairs(lengths: torch.Tensor, window: int) -> int:
    """Number of (query, key) pairs that attend: sum L^2, or the band of width |i-j| < window."""
    L = lengths.long()
    if not window:
        return int((L * L).sum())
    band = L * (2 * window - 1) - window * (window - 1)  # rows lose the keys beyond the window
    return int(torch.where(L <= window, L * L, band).sum())


def flops_per_step(
    cfg: ModelConfig, cu_seqlens: torch.Tensor, *, step: int | None = None, training: bool = True
) -> int:
    """Model FLOPs of one forward(+backward) on the segments of cu_seqlens.

    6N per token (2N forward, 4N backward; N = parameters in matmuls, embedding lookups
    excluded) plus attention: QK^T and PV cost 4 * hidden_size FLOPs per attending pair and
    layer in the forward, x3 with backward. Pass only the real segments
    (cu_seqlens[: num_sequences + 1]) to count useful work, not tail padding.
    """
    cu = cu_seqlens.long().cpu()
    tokens = int(cu[-1] - cu[0])
    pairs = attention_pairs(cu[1:] - cu[:-1], window_at(cfg, step))
    n = _matmul_params(tuple(sorted(vars(cfg).items())))
    fwd = 2 * n * tokens + 4 * cfg.hidden_size * cfg.num_layers * pairs
    return 3 * fwd if training else fwd
