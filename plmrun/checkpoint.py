"""Resumable checkpoints: one checkpoint made of Stateful parts, saved and loaded by one function pair.

A part is anything with state_dict()/load_state_dict() (torch.distributed.checkpoint's Stateful
protocol). The trainer's (plmrun/train/trainer.py) are the model and the optimizers (tensor state, which
may be FSDP2-sharded: saved by DCP, FQN-keyed through torch's state_dict API; the optimizers'
part also carries the LR-schedule step, the clip history and the parameter-group names its guard
checks), and the JSON-able loader position, trainer counters and RNG (train_state.json).

`checkpoints/step_XXXXXXXX/` holds the DCP shards (`.metadata`, `*.distcp`), `train_state.json`
and, written last, `MANIFEST.json` (sizes and sha256 of every file, see plmrun/manifest.py). It is
written under `.tmp-step_XXXXXXXX` and renamed only then, so a directory named step_* is whole: a
save killed or out of disk leaves (or removes) a .tmp-* directory that is never picked up and is
removed by the next save. Loading verifies the manifest, the state file and the DCP metadata
against this run's parts before anything is read into them: a damaged checkpoint, or one from
another model or optimizer config, is refused with one line naming the file and the first
mismatch. Checkpoints without a manifest (written by plmrun before checksums) are refused.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from plmrun.atomic import os_error, replace_dir, write_text
from plmrun.dist import agree, barrier, get_rank, is_distributed
from plmrun.errors import PlmrunError
from plmrun.manifest import MANIFEST, ManifestError, file_sha256, read_manifest, verify_manifest, write_manifest
from plmrun.optim.build import OptimizerStateError
from plmrun.safe_pickle import SafeLoadPlanner, SafeReader, UnsafePickleError, read_dcp_metadata

STATE_FILE = "train_state.json"
FORMAT = 2  # 1: {model, optim} in DCP, grad_norm_history and flat counters in train_state.json, no manifest
TENSOR_PARTS = ("model", "optimizers")  # saved by DCP; every other part is JSON in STATE_FILE
_METADATA = ".metadata"  # DCP's metadata file


class CheckpointError(PlmrunError):
    """A checkpoint that cannot be saved or resumed (damaged, foreign, out of disk); names the file."""


@contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save/load that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def injected_fault(step: int, rank: int, kinds: tuple[str, ...]) -> str | None:
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


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


# ------------------------------------------------------------------ the parts
class ModelState:
    """The model's weights (FSDP2 shards stay DTensors), FQN-keyed so DDP/compile wrappers do not matter."""

    def __init__(self, model):
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state)


class RNGState:
    """torch's CPU generator (rank 0's, restored on every rank as before)."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


class DictState:
    """A dict of JSON-able counters, updated in place; saved counters must have every key, of the same JSON kind."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, saved: dict) -> None:
        for key, mine in self.state.items():
            if key not in saved:
                raise ValueError(f"no {key!r}")
            if mine is not None and saved[key] is not None and _json_kind(mine) != _json_kind(saved[key]):
                raise ValueError(f"{key!r} is {saved[key]!r}, expected a {_json_kind(mine)}")
        self.state.update({k: saved[k] for k in self.state})


def _json_kind(v) -> str:
    return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__


def rng_state() -> dict:
    return {"torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


# ------------------------------------------------------------------ save
def save_checkpoint(root: Path, step: int, parts: dict, keep_latest_k: int) -> Path:
    """Save every part on every rank (collective); returns the final directory.

    A failure (disk full, read-only, ...) on any rank removes the .tmp-* directory and raises the
    same CheckpointError on every rank; the previous checkpoints are untouched.
    """
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    tensors = {name: parts[name].state_dict() for name in TENSOR_PARTS if name in parts}
    failure: BaseException | None = None
    try:
        with _quiet_single_process():
            dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not is_distributed())
    except (CheckpointException, OSError) as e:
        failure = e
    if injected_fault(step, get_rank(), ("killsave",)):  # the shards are written, the rename is not
        os.kill(os.getpid(), signal.SIGKILL)
    if failure is None and get_rank() == 0:
        try:
            state = {"format": FORMAT, **{n: p.state_dict() for n, p in parts.items() if n not in TENSOR_PARTS}}
            write_text(tmp / STATE_FILE, json.dumps(state, indent=1))
            write_manifest(tmp)  # last: a folder with a manifest was completely written
            replace_dir(tmp, final)  # the same step saved again replaces it only now: a failed save must not cost it
        except OSError as e:
            failure = e
    message = agree(_save_failure(failure, tmp, step, tensors, root) if failure is not None else None)
    if message is not None:
        if get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(failure, CheckpointException) and _os_error(failure) is None:
            raise failure  # not an OS problem: a bug, keep DCP's own report
        raise CheckpointError(message)
    if get_rank() == 0:
        for old in checkpoint_dirs(root)[:-keep_latest_k]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind a save failure (DCP wraps each rank's exception in a CheckpointException)."""
    if isinstance(e, CheckpointException):
        return next((err for err in (os_error(exc) for exc, _ in e.failures.values()) if err is not None), None)
    return os_error(e)


def _save_failure(e: BaseException, tmp: Path, step: int, tensors: dict, root: Path) -> str:
    """One line: where, why, how much space the checkpoint needs, and that the previous one is kept."""
    err = _os_error(e)
    if err is None:
        return f"{tmp}: saving the step-{step} checkpoint failed ({str(e).splitlines()[0]})"
    where = err.filename or tmp
    prev = latest_checkpoint(root)
    kept = f"the last complete checkpoint {prev} is kept" if prev else "no earlier checkpoint exists"
    if err.errno == errno.ENOSPC:
        need = sum(
            v.numel() * v.element_size() for v in flatten_state_dict(tensors)[0].values() if isinstance(v, torch.Tensor)
        )
        free = shutil.disk_usage(root).free
        return (
            f"{where}: no space left on device while saving the step-{step} checkpoint (it needs about "
            f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free on {root}); free space or lower "
            f"train.keep_latest_k and resume: {kept}"
        )
    return f"{where}: could not save the step-{step} checkpoint ({err.strerror or err}); {kept}"


# ------------------------------------------------------------------ load
def read_train_state(path: Path) -> dict:
    """The trainer's counters of a checkpoint, from its state file, checked against the manifest first."""
    return _read_state(Path(path))["trainer"]


def _read_state(path: Path) -> dict:
    """train_state.json of checkpoint `path`, verified (manifest entry, JSON, format, parts)."""
    file = path / STATE_FILE
    try:
        table = read_manifest(path)
    except ManifestError as e:
        raise CheckpointError(f"{e}; {_fallback(path)}") from None
    if table is None:
        raise CheckpointError(
            f"{path}: no {MANIFEST} (written by a plmrun from before checkpoint checksums, or "
            f"not completely written), so it cannot be verified; {_fallback(path)}"
        )
    entry = table.get(STATE_FILE)
    if (
        entry is None
        or not file.is_file()
        or file.stat().st_size != entry["bytes"]
        or file_sha256(file) != entry["sha256"]
    ):
        raise CheckpointError(f"{file}: does not match {MANIFEST} (truncated, corrupted or missing); {_fallback(path)}")
    try:
        state = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{file}: not valid JSON (truncated or corrupted); {_fallback(path)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("trainer"), dict):
        raise CheckpointError(f"{file}: not a format-{FORMAT} plmrun train state; {_fallback(path)}")
    return state


def _fallback(path: Path) -> str:
    """What to do about an unusable checkpoint: resume from the one before it, or start over."""
    earlier = [p for p in checkpoint_dirs(path.parent) if p.name < path.name]
    if earlier:
        return f"move {path} away to resume from {earlier[-1].name}"
    return "start a new run (no earlier checkpoint)"


def load_checkpoint(path: Path, parts: dict) -> dict:
    """Restore every part from checkpoint `path` (collective); returns the saved trainer counters.

    Nothing is loaded into a part before the whole checkpoint checks out: manifest (sizes, sha256),
    state file, the optimizers' parameter groups, and the DCP metadata's keys and shapes against
    this run's state dicts. Each refusal is one CheckpointError line naming the file.
    """
    path = Path(path)
    state = _read_state(path)  # every rank: the manifest exists and the (small) state file matches it
    message = None
    if get_rank() == 0:  # hashing is I/O-bound: one rank reads the files, every rank gets the verdict
        try:
            verify_manifest(path, required=True)
        except ManifestError as e:
            message = f"{e}; {_fallback(path)}"
    message = agree(message)
    if message is not None:
        raise CheckpointError(message)
    meta_file = path / _METADATA
    saved = _read_metadata(path)
    tensors = {name: parts[name].state_dict() for name in TENSOR_PARTS if name in parts}
    if "optimizers" in parts:
        _check_optimizer_groups(path, parts["optimizers"], saved)
    _check_layout(meta_file, tensors, saved)
    for name, part in parts.items():
        if name in TENSOR_PARTS:
            continue
        if name not in state:
            raise CheckpointError(f"{path / STATE_FILE}: no {name!r} state; {_fallback(path)}")
        try:
            part.load_state_dict(state[name])
        except PlmrunError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path / STATE_FILE}: {name} state does not fit this run ({e})") from None
    _dcp_load(tensors, path)
    for name, sd in tensors.items():
        parts[name].load_state_dict(sd)
    return state["trainer"]


def load_model_weights(path: Path, model) -> None:
    """Only the model part of a checkpoint, into a plain model (eval, export, embed, --init-from-hf).

    The same checks as a resume, for that part: the manifest (required: a checkpoint without one was not
    completely written or was altered), then the DCP metadata's keys and shapes.
    """
    path = Path(path)
    try:
        verify_manifest(path, required=True)
    except ManifestError as e:
        raise CheckpointError(f"{e}; {_fallback(path)}") from None
    meta_file = path / _METADATA
    saved = _read_metadata(path)
    part = ModelState(model)
    tensors = {"model": part.state_dict()}
    _check_layout(meta_file, tensors, saved)
    _dcp_load(tensors, path)
    part.load_state_dict(tensors["model"])


def _read_metadata(path: Path) -> dict:
    """The DCP metadata's state_dict_metadata, unpickled through plmrun.safe_pickle's allow-list (no code runs)."""
    try:
        return read_dcp_metadata(path).state_dict_metadata
    except UnsafePickleError as e:
        raise CheckpointError(f"{e}; {_fallback(path)}") from None
    except OSError as e:
        raise CheckpointError(
            f"{path / _METADATA}: unreadable DCP metadata ({e.strerror or e}); {_fallback(path)}"
        ) from None


def _dcp_load(state: dict, path: Path) -> None:
    """dcp.load with the metadata and every non-tensor entry unpickled through plmrun.safe_pickle."""
    try:
        with _quiet_single_process():
            dcp.load(
                state,
                checkpoint_id=str(path),
                storage_reader=SafeReader(str(path)),
                planner=SafeLoadPlanner(path),
                no_dist=not is_distributed(),
            )
    except UnsafePickleError as e:
        raise CheckpointError(f"{e}; {_fallback(path)}") from None
    except CheckpointException as e:
        exc = next(iter(e.failures.values()))[0] if e.failures else e
        if isinstance(exc, UnsafePickleError):
            raise CheckpointError(f"{exc}; {_fallback(path)}") from None
        raise CheckpointError(
            f"{path}: reading the checkpoint failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); {_fallback(path)}"
        ) from None


def _check_optimizer_groups(path: Path, optimizers, saved: dict) -> None:
    """Run the optimizers' guard on the saved group names (read alone) before DCP meets other keys."""
    if "optimizers.param_group_names" not in saved:
        raise CheckpointError(
            f"{path / _METADATA}: no optimizers.param_group_names (not a plmrun format-{FORMAT} "
            f"checkpoint); {_fallback(path)}"
        )
    probe = {"optimizers": {"param_group_names": []}}
    _dcp_load(probe, path)
    try:
        optimizers.check_param_groups(probe["optimizers"]["param_group_names"])
    except OptimizerStateError as e:
        raise CheckpointError(f"{path}: {e}; resume with the optim settings the run was saved with") from None


def _check_layout(meta_file: Path, tensors: dict, saved: dict) -> None:
    """The first key missing from, unexpected in, or shaped differently in the checkpoint: another model config."""
    mine, _ = flatten_state_dict(tensors)
    hint = (
        "the checkpoint is from another model config (hidden size, layer count, ...): "
        "resume with the config it was saved with"
    )
    for key, value in mine.items():
        meta = saved.get(key)
        if meta is None:
            raise CheckpointError(f"{meta_file}: the checkpoint has no {key} ({hint})")
        if isinstance(value, torch.Tensor) != isinstance(meta, TensorStorageMetadata):
            raise CheckpointError(
                f"{meta_file}: {key} is {'not ' if isinstance(value, torch.Tensor) else ''}a tensor "
                f"in the checkpoint ({hint})"
            )
        if isinstance(value, torch.Tensor) and tuple(meta.size) != tuple(value.shape):
            raise CheckpointError(
                f"{meta_file}: {key} has shape {tuple(meta.size)} in the checkpoint, "
                f"{tuple(value.shape)} in this model ({hint})"
            )
    prefixes = tuple(f"{name}." for name in tensors)
    extra = next((k for k in saved if k.startswith(prefixes) and k not in mine), None)
    if extra is not None:
        raise CheckpointError(f"{meta_file}: the checkpoint has {extra}, which this model does not ({hint})")
