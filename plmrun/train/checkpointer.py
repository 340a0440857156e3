"""When and where a run's checkpoints are saved, and which one it continues from.

The format, the checks and the atomic write are plmrun/checkpoint.py's; this owns the cadence
(train.checkpoint_every, every stop, the last step), keep_latest_k and the run's checkpoint folder.
"""

from __future__ import annotations

from pathlib import Path

from plmrun import checkpoint as ckpt


class Checkpointer:
    """The checkpoints of one run directory: RUN/checkpoints/step_XXXXXXXX over the run's Stateful parts."""

    def __init__(
        self, run_dir: Path, every: int, keep_latest_k: int, parts: dict | None = None, resume: str | None = None
    ):
        self.run_dir, self.every, self.keep = Path(run_dir), every, keep_latest_k
        self.resume = resume or f"resume with `plmrun train --resume {self.run_dir}`"  # how to continue the run
        self.root = self.run_dir / "checkpoints"
        self.parts = parts or {}
        self.last_saved: int | None = None

    def due(self, step: int, *, stopping: bool = False) -> bool:
        """Every `every` steps, and at any stop (the last step too: a crash in the final eval costs no training)."""
        return stopping or bool(self.every and step % self.every == 0)

    def save(self, step: int) -> Path:
        """Save every part at `step` (collective), keeping the newest keep_latest_k."""
        path = ckpt.save_checkpoint(self.root, step, self.parts, self.keep)
        self.last_saved = step
        return path

    def latest(self) -> Path | None:
        return ckpt.latest_checkpoint(self.root)

    def load(self, path: Path) -> dict:
        """Restore every part from `path` (collective); returns the saved trainer counters."""
        saved = ckpt.load_checkpoint(path, self.parts)
        self.last_saved = int(Path(path).name.split("_")[1])
        return saved

    def hint(self) -> str:
        """Where to pick up after a stop: the newest checkpoint if there is one (never a folder that does not exist)."""
        latest = self.latest()
        if latest is None:
            return f"no checkpoint was saved yet (train.checkpoint_every={self.every}), so a rerun starts from step 0"
        return f"the last good checkpoint is {latest} ({self.resume})"
