"""The trainer's counters: one Stateful dataclass, saved as the "trainer" part of every checkpoint.

Its field names are the keys of `train_state.json["trainer"]`, so checkpoints written when this
was a plain dict load unchanged. Loading checks every key is there with the right JSON kind, and
`check_continues` refuses a checkpoint whose data or global batch this run could not continue.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from plmrun.checkpoint import DictState
from plmrun.errors import PlmrunError


class TrainingError(PlmrunError, RuntimeError):
    """Training stopped for a reason the user must see (NaN/Inf, loss spike, divergence, bad resume)."""


@dataclass
class TrainState:
    step: int = 0
    "Optimizer steps taken."
    tokens: int = 0
    "Real (non-padding) training tokens seen, all ranks."
    train_time_s: float = 0.0
    "Seconds spent in training steps (evals excluded), across resumes."
    eval_time_s: float = 0.0
    "Seconds spent in evals, across resumes."
    time_to_target: dict = field(default_factory=dict)
    "report_at_val_losses level -> where the first eval reached it."
    best_val_loss: float | None = None
    "Lowest in-training eval loss so far."
    flops: float = 0.0
    "Model FLOPs of the training steps (MFU numerator)."
    world_x_accum: int = 1
    "world_size × grad_accum: fixes the global batch stream (a resume must keep it)."
    data: dict = field(default_factory=dict)
    "The dataset and its split fingerprints."
    recent_losses: list = field(default_factory=list)
    "The last non-spike train losses (train.loss_spike's reference)."
    spikes: int = 0
    "Loss spikes flagged so far."
    spikes_in_a_row: int = 0
    "Consecutive flagged steps (train.loss_spike_max_skips)."
    diverging_steps: int = 0
    "Consecutive steps above the divergence threshold (train.divergence_steps)."

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """Take the saved counters; a missing key or a value of another JSON kind is a ValueError."""
        counters = self.state_dict()
        DictState(counters).load_state_dict(saved)  # checks every key and its JSON kind
        for key, value in counters.items():
            setattr(self, key, value)

    def check_continues(self, saved: dict, path: Path) -> None:
        """Refuse saved counters this run could not continue exactly (other data, other global batch).
        Counters that lack these keys are left to `load_state_dict` to refuse."""
        if (
            isinstance(saved.get("data"), dict)
            and {"train_fingerprint", "valid_fingerprint"} <= saved["data"].keys()
            and "world_x_accum" in saved
        ):
            check_resume(saved, self.state_dict(), path)


def check_resume(saved: dict, now: dict, path: Path) -> None:
    """Refuse a resume that could not continue the same data stream exactly."""
    for key in ("train_fingerprint", "valid_fingerprint"):
        if saved["data"][key] != now["data"][key]:
            raise TrainingError(
                f"{path}: checkpoint was trained on different data ({key} differs); "
                "resume with the same dataset or start a new run"
            )
    if saved["world_x_accum"] != now["world_x_accum"]:
        raise TrainingError(
            f"{path}: checkpoint used world_size × grad_accum = {saved['world_x_accum']}, now "
            f"{now['world_x_accum']}; keep the product equal so the global batch stream is unchanged"
        )
