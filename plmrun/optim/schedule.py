"""Learning-rate schedules and the Muon momentum warm-up: pure functions of the optimizer step.

`step` is the 0-based index of the optimizer step about to be taken. Warm-up is linear and
reaches the peak on its last step: m(s) = (s + 1) / W for s < W. Decay phases are linear in s
and reach `final_lr_ratio` at s = max_steps, one past the last step, so no step is wasted at LR 0
and the first step after warm-up runs at the peak. Steps past max_steps stay at the final ratio.
"""

from __future__ import annotations

import math

from plmrun.config import OptimConfig


def steps_of(value: float, max_steps: int) -> int:
    """A length given as steps (>= 1) or as a fraction of max_steps (< 1), in whole steps."""
    return int(round(value if value >= 1 else value * max_steps))


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Factor applied to every group's base LR at `step` (1.0 = peak)."""
    warm = steps_of(cfg.warmup, max_steps)
    if step < warm:
        return (step + 1) / warm
    r = cfg.final_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        cool = steps_of(cfg.cooldown, max_steps)
        start = max_steps - cool
        if step < start:
            return 1.0
        return 1.0 - (1.0 - r) * min(1.0, (step - start) / max(1, cool))
    progress = min(1.0, (step - warm) / max(1, max_steps - warm))
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - r) * progress
    if cfg.schedule == "cosine":
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.schedule: unknown schedule {cfg.schedule!r}")


def muon_momentum(step: int, cfg: OptimConfig) -> float:
    """Muon momentum: linear from muon_momentum_start at step 0 to muon_momentum after the warm-up."""
    if step >= cfg.muon_momentum_warmup_steps:
        return cfg.muon_momentum
    frac = step / cfg.muon_momentum_warmup_steps
    return (1 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum
