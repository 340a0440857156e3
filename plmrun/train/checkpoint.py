"""Resumable checkpoints: one stateful root saved with torch.distributed.checkpoint (DCP).

A checkpoint is `checkpoints/step_XXXXXXXX/` holding the DCP shards of {model, optimizers} and
`train_state.json` (step, tokens, timers, time-to-target bookkeeping, data-loader position,
fingerprints, world size). It is written under `.tmp-step_XXXXXXXX` and renamed only after every
rank has finished, so a directory named step_* is always whole: a process killed mid-save leaves a
.tmp-* directory that is never picked up (and is removed by the next save).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

STATE_FILE = "train_state.json"


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def injected_fault(step: int, rank: int, kinds: tuple[str, ...]) -> Optional[str]:
    """The fault (one of `kinds`) PLMRUN_FAULT=KIND@STEP[:RANK] asks for at this step and rank, else None.

    Only the reliability tests set it (kinds: kill, term, nan after a step; killsave inside the
    save). With PLMRUN_FAULT_ONCE=<file> it fires on the first attempt only, so a restarted job
    runs clean.
    """
    spec = os.environ.get("PLMRUN_FAULT")
    if not spec:
        return None
    kind, _, where = spec.partition("@")
    at, _, frank = where.partition(":")
    if kind not in kinds or int(at) != step or (frank and int(frank) != rank):
        return None
    marker = os.environ.get("PLMRUN_FAULT_ONCE")
    if marker:
        if os.path.exists(marker):
            return None
        Path(marker).write_text(spec)
    return kind


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(root: Path) -> Optional[Path]:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def _opt_list(optimizers) -> list:
    return list(getattr(optimizers, "optimizers", [optimizers]))


def save_checkpoint(root: Path, step: int, model, optimizers, train_state: dict, keep_latest_k: int) -> Path:
    """Save on every rank (collective). Returns the final directory."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, _opt_list(optimizers))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if injected_fault(step, _rank(), ("killsave",)):  # the shards are written, the rename is not
        os.kill(os.getpid(), signal.SIGKILL)
    _barrier()
    if _rank() == 0:
        state_tmp = tmp / (STATE_FILE + ".tmp")
        state_tmp.write_text(json.dumps(train_state, indent=1))
        os.replace(state_tmp, tmp / STATE_FILE)
        os.replace(tmp, final)
        for old in checkpoint_dirs(root)[:-keep_latest_k]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, model, optimizers) -> dict:
    """Load model and optimizer state in place (collective); returns the train state."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a complete plmrun checkpoint (no {STATE_FILE})")
    opts = _opt_list(optimizers)
    model_sd, optim_sd = get_state_dict(model, opts)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opts, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((path / STATE_FILE).read_text())


def read_train_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def rng_state() -> dict:
    return {"torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
