"""Global-norm gradient clipping and auto-clip (clip to a percentile of recent gradient norms).

Auto-clip follows AutoClip (Seetharaman et al., 2020): the current norm joins the history first,
then the threshold is the `auto_clip_percentile` percentile of the last `auto_clip_history`
norms, so a norm is clipped only when it is unusual for the recent run. With both grad_clip and
auto-clip on, the smaller threshold wins. The history is a plain list of floats that the
`Optimizers` object keeps in its state_dict, so a resumed run clips exactly as an unbroken one.
Works with FSDP2 DTensor gradients: the norm is reduced over the shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from plmrun.config import OptimConfig


def clip_gradients(params: Iterable[torch.Tensor], cfg: OptimConfig, history: list[float]) -> tuple[float, float]:
    """Clip gradients in place; returns (global grad norm before clipping, threshold used; 0 = none).

    A non-finite norm is returned as is, without clipping or entering the history: the caller
    stops or skips the step.
    """
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    value = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not math.isfinite(value):
        return value, 0.0
    clip = cfg.grad_clip
    if cfg.auto_clip_percentile > 0:
        history.append(value)
        del history[: -cfg.auto_clip_history]
        auto = float(np.percentile(history, cfg.auto_clip_percentile))
        clip = min(clip, auto) if clip > 0 else auto
    if clip > 0 and value > clip:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return value, clip
