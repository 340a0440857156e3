"""Checks that stop (or flag) a run going wrong: loss spikes, a train loss stuck above uniform guessing,
and an eval loss above the unigram baseline. Each stop is one TrainingError line naming the cause."""

from __future__ import annotations

import math
from collections.abc import Callable

from plmrun.config import Config, OptimConfig, TrainConfig
from plmrun.optim.schedule import steps_of
from plmrun.tokenizer import VOCAB_SIZE
from plmrun.train.state import TrainingError, TrainState


def learning_rates(o: OptimConfig) -> str:
    """The configured learning rates, as flags the user can lower."""
    if o.optimizer == "adamw":
        return f"optim.lr={o.lr:g}"
    return f"optim.lr_hidden={o.lr_hidden:g}, lr_embed={o.lr_embed:g}, lr_head={o.lr_head:g}, lr_scalar={o.lr_scalar:g}"


class SpikePolicy:
    """train.loss_spike: flags a loss above loss_spike_factor × the mean of the recent non-spike losses.

    warn reports it, skip drops its update, abort stops. skip is bounded: after loss_spike_max_skips
    flagged steps in a row the loss has moved to a new level rather than spiked, and the run stops
    instead of skipping every later update. Its counters live in the checkpointed TrainState.
    """

    def __init__(self, train_cfg: TrainConfig, state: TrainState, hint: Callable[[], str]):
        self.cfg, self.state, self.hint = train_cfg, state, hint

    def check(self, step: int, loss: float, warn: Callable[[str], None]) -> bool:
        """True when this step's update must be skipped."""
        c: TrainConfig = self.cfg
        st = self.state
        recent = st.recent_losses
        if c.loss_spike == "ignore" or not recent or loss <= c.loss_spike_factor * sum(recent) / len(recent):
            st.recent_losses = (recent + [loss])[-c.loss_spike_window :]
            st.spikes_in_a_row = 0
            return False
        st.spikes += 1
        st.spikes_in_a_row += 1
        msg = (
            f"step {step}: loss spike {loss:.4f} > {c.loss_spike_factor} × recent mean {sum(recent) / len(recent):.4f}"
        )
        if c.loss_spike == "abort":
            raise TrainingError(f"{msg} (train.loss_spike=abort); {self.hint()}")
        if c.loss_spike == "skip" and st.spikes_in_a_row >= c.loss_spike_max_skips:
            raise TrainingError(
                f"{msg}: {st.spikes_in_a_row} updates in a row skipped (train.loss_spike_max_skips="
                f"{c.loss_spike_max_skips}), so the loss has shifted, not spiked; lower the learning "
                f"rate (optim.lr_*) or use train.loss_spike=warn; {self.hint()}"
            )
        warn(f"warning: {msg}" + ("; update skipped" if c.loss_spike == "skip" else ""))
        return c.loss_spike == "skip"


def _cause(cfg: Config, precision: str) -> str:
    cause = f"the learning rate is likely too high ({learning_rates(cfg.optim)})"
    if precision == "bf16":
        cause += " or bf16 is not precise enough (try train.precision=fp32)"
    elif precision == "bf16+fp8":
        cause += " or float8 is not precise enough (try train.fp8=false)"
    return cause


def check_divergence(
    cfg: Config, state: TrainState, step: int, loss: float, precision: str, hint: Callable[[], str]
) -> None:
    """Stop a run whose train loss stays above divergence_factor × ln(vocab) for divergence_steps steps in a row.

    ln(vocab) is the loss of guessing uniformly, where every run starts; a healthy run never stays at
    twice that, while a too-high learning rate sits there (or higher) for good. A short excursion
    that comes back down (a spike) resets the count.
    """
    t = cfg.train
    if not t.divergence_factor:
        return
    limit = t.divergence_factor * math.log(VOCAB_SIZE)
    state.diverging_steps = state.diverging_steps + 1 if loss > limit else 0
    if state.diverging_steps < t.divergence_steps:
        return
    raise TrainingError(
        f"step {step}: training diverged: train loss {loss:.4f} above {limit:.2f} "
        f"({t.divergence_factor:g} × ln {VOCAB_SIZE}, uniform guessing) for "
        f"{state.diverging_steps} steps in a row; {_cause(cfg, precision)}; {hint()} "
        "(train.divergence_factor=0 turns this check off)"
    )


def divergence_check_from(cfg: Config) -> int:
    """First step whose eval `check_eval_divergence` judges: after the LR warm-up, train.divergence_steps and
    half the run (at most 1,000 steps). A small healthy model can still be 0.37 nats above unigram ten steps
    into a 40-step run (0.22 at its half), while Muon at lr_hidden=1e6 on the default run is 0.41 / 0.28
    above it at steps 80 / 160 of 320: a shorter grace stops healthy short runs."""
    t = cfg.train
    return max(steps_of(cfg.optim.warmup, t.max_steps), t.divergence_steps, min(t.max_steps // 2, 1000))


def check_eval_divergence(cfg: Config, state: TrainState, val: dict, precision: str, hint: Callable[[], str]) -> None:
    """Stop a run whose eval loss is above the unigram baseline's by more than train.divergence_margin.

    The unigram baseline (predicting the training split's residue frequencies) is what any model
    reaches within a few steps; a run far above it after warm-up has diverged, even when its train
    loss looks bounded (Muon's normalised update keeps it near uniform guessing, below the
    divergence_factor threshold). A train loss already above that threshold is left to
    `check_divergence`, whose message names it.
    """
    margin, step = cfg.train.divergence_margin, state.step
    if not margin or "unigram_loss" not in val or step < divergence_check_from(cfg) or state.diverging_steps:
        return
    if val["loss"] <= val["unigram_loss"] + margin:
        return
    raise TrainingError(
        f"step {step}: training diverged: val loss {val['loss']:.4f} is {-val['gain']:.2f} nats above "
        f"the unigram baseline {val['unigram_loss']:.4f} (train.divergence_margin={margin:g}); "
        f"{_cause(cfg, precision)}; {hint()} (train.divergence_margin=0 turns this check off)"
    )
