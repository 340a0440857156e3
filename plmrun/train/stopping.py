"""Why a run stops: the reasons, the signal flag, train.max_time, and the reliability tests' injected faults."""

from __future__ import annotations

import os
import signal
import time
from enum import Enum

import torch

from plmrun import checkpoint as ckpt
from plmrun.dist import all_reduce_sum
from plmrun.train.parallelize import unwrap


class StopReason(str, Enum):
    """Why the loop ended; the value is what summary.json's "stopped" says."""

    MAX_STEPS = "max_steps"
    MAX_TIME = "max_time"
    TARGET = "stop_at_val_loss"
    EARLY_STOP = "early_stopping"
    SIGNAL = "signal"


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a collective), so all ranks stop at the same step."""
    return float(all_reduce_sum(torch.tensor([float(flag)]))) > 0


class StopFlag:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint at the end of the step and exits cleanly.

    A context manager: the previous handlers come back on exit. A second Ctrl-C stops at once.
    """

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def exit_code(self) -> int:
        """128 + the signal (143 for SIGTERM, 130 for SIGINT), as shells report a signalled process."""
        return 128 + int(self.signal or signal.SIGTERM)


clock = time.perf_counter
"The clock of train.max_time (a module attribute so tests can drive it deterministically)."


class TimeBudget:
    """train.max_time: seconds of training and evals over every attempt (`spent` is in the checkpointed state)."""

    def __init__(self, seconds: float, spent: float):
        self.seconds = seconds
        self.start = clock() - spent

    def exhausted(self) -> bool:
        """Spent on any rank (a collective; every rank must ask at the same step)."""
        return any_rank(clock() - self.start >= self.seconds)


def inject_fault(step: int, rank: int, model) -> None:
    """The reliability tests' faults after `step` (PLMRUN_FAULT, see checkpoint.injected_fault)."""
    kind = ckpt.injected_fault(step, rank, ("kill", "term", "nan"))
    if kind == "nan":  # poison this rank's weights: its next loss and every gradient become NaN
        with torch.no_grad():
            next(unwrap(model).parameters()).fill_(float("nan"))
    elif kind is not None:
        os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGTERM)
