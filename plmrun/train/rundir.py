"""Run directories: naming, provenance (config, commit, versions, hardware, data) and metric sinks.

Layout (docs/reference/run-directory.md): config.yaml, environment.json, metrics.jsonl, summary.json,
model/{model.safetensors,config.json}, checkpoints/step_XXXXXXXX/, plots/*.png, tb/ (optional), .lock (flocked
by rank 0 while it trains).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from plmrun.atomic import write_json
from plmrun.config import Config
from plmrun.errors import PlmrunError
from plmrun.eval.mlm import UNIGRAM_FILE
from plmrun.outputs import foreign_entries, names_line


class RunDirError(PlmrunError, RuntimeError):
    """A run directory that cannot be used as asked (exists, different config, finished)."""


def default_run_name(cfg: Config) -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{cfg.model.arch}"


def config_yaml(cfg: Config) -> str:
    d = cfg.to_dict()
    d["optim"]["betas"] = list(d["optim"]["betas"])
    return yaml.safe_dump(d, sort_keys=False)


INIT_FILE = "init_from.txt"
"The --init-from-hf source a run started from (absent: random init); part of the run's identity."
RUN_ENTRIES = (
    "config.yaml",
    INIT_FILE,
    ".lock",
    "environment.json",
    "metrics.jsonl",
    "summary.json",
    "model",
    "checkpoints",
    "plots",
    "tb",
    "wandb",
    "hf",
    UNIGRAM_FILE,
)
"What a run directory holds (docs/run-directory.md): anything else is the user's, and never removed."


def prepare_run_dir(cfg: Config, name: str, *, resume: bool, init_from: str | None = None) -> tuple[Path, bool]:
    """Create runs/<name>, or reopen it for resuming. Returns (path, is_resume).

    An existing directory is reopened only when it holds the same config and has not finished;
    with a different config it is refused, never silently reused. `resume` (--resume) also needs a
    checkpoint: a finished run or one without a checkpoint is refused with what to do instead.
    """
    root = Path(cfg.logging.run_root)
    path = root / name
    if path.exists() and resume:
        if (path / "config.yaml").is_file():
            _extend(path, cfg)
        if (path / "summary.json").exists():
            raise RunDirError(f"{path} finished at step {finished_step(path)} (summary.json); nothing to resume")
    elif resume:
        raise RunDirError(f"{path}: no such run directory to resume")
    if claim_run_dir(
        path, config_yaml(cfg), rerun=f"resume it with `plmrun train --resume {path}`", name_flag="--logging.name"
    ):
        if not resume and _init_source(path) != _source(init_from):
            raise RunDirError(
                f"{path}: started from {_init_source(path) or 'random init'}, not "
                f"{_source(init_from) or 'random init'}; resume it with `plmrun train --resume {path}` "
                "or choose another --logging.name"
            )
        if resume and latest_step(path) is None:
            raise RunDirError(
                f"{path} has no checkpoint yet; rerun the command that started it without --resume"
                " to continue it (from step 0)"
            )
        return path, True
    if init_from:
        (path / INIT_FILE).write_text(_source(init_from) + "\n")
    return path, False


def claim_run_dir(path: Path, text: str, *, rerun: str, name_flag: str) -> bool:
    """A run's identity is its config: create `path` holding `text` as config.yaml, or reopen it when it holds
    the same config and has not finished (True). Anything else is refused, naming `name_flag` and how to
    continue the run that is there (`rerun`)."""
    if not path.exists():
        path.mkdir(parents=True)
        (path / "config.yaml").write_text(text)
        return False
    saved = path / "config.yaml"
    if (path / "summary.json").exists():
        raise RunDirError(f"{path}: this run already finished; choose another {name_flag}")
    if not saved.exists():
        raise RunDirError(f"{path}: exists but is not a plmrun run directory; choose another {name_flag}")
    if _normalised(saved.read_text()) != _normalised(text):
        raise RunDirError(f"{path}: exists with a different config; {rerun} or choose another {name_flag}")
    return True


EXTENDABLE = ("train.max_steps", "train.max_time", "logging.progress")
"""Keys `plmrun train --resume RUN --key=value` may change: when the run stops and how it prints, not
what a step computes."""
HISTORY_FILE = "config_history.jsonl"
"One line per resume that changed the config: the step it continued from and each changed key's old and new value."


def _flat(cfg: Config) -> dict:
    return {f"{section}.{key}": value for section, values in cfg.to_dict().items() for key, value in values.items()}


def extension_changes(saved: Config, cfg: Config) -> dict[str, list]:
    """{key: [old, new]} of what a resume changes; a ConfigError unless each key is in EXTENDABLE and
    train.max_steps, if changed, is raised (a run's steps so far stay the steps of its new schedule)."""
    from plmrun.config import ConfigError

    old, new = _flat(saved), _flat(cfg)
    changes = {
        k: [old[k], new[k]] for k in new if old.get(k) != new[k] and k not in ("logging.run_root", "logging.name")
    }
    refused = [k for k in changes if k not in EXTENDABLE]
    if refused:
        raise ConfigError(
            f"--resume: --{refused[0]} would change what the run computes; a resume may change only "
            f"{', '.join(EXTENDABLE)} (start a new run for other settings)"
        )
    if "train.max_steps" in changes and changes["train.max_steps"][1] < changes["train.max_steps"][0]:
        raise ConfigError(
            f"--resume: train.max_steps {changes['train.max_steps'][1]} is below the run's "
            f"{changes['train.max_steps'][0]}; an extension may only raise it"
        )
    return changes


def _extend(path: Path, cfg: Config) -> None:
    """A resume with changed EXTENDABLE keys: recorded in config_history.jsonl, then config.yaml rewritten;
    a finished run whose stop the change lifts is reopened (its summary.json kept as summary.step_N.json)."""
    from plmrun.config import load_yaml

    changes = extension_changes(load_yaml(path / "config.yaml"), cfg)
    if not changes:
        return
    step = latest_step(path)
    if step is None:
        return  # no checkpoint: refused below with what to do
    summary = path / "summary.json"
    if summary.exists() and not {"train.max_steps", "train.max_time"} & changes.keys():
        return  # still finished: refused below
    record = {"step": step, "changes": changes, "time": _dt.datetime.now().isoformat(timespec="seconds")}
    with open(path / HISTORY_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
    tmp = path / "config.yaml.tmp"
    tmp.write_text(config_yaml(cfg))
    os.replace(tmp, path / "config.yaml")
    if summary.exists():
        os.replace(summary, path / f"summary.step_{_summary_steps(summary)}.json")


def _summary_steps(summary: Path) -> str:
    try:
        return f"{int(json.loads(summary.read_text())['steps']):08d}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def _source(init_from: str | None) -> str | None:
    """An --init-from-hf argument as recorded: a local path made absolute, a Hub name as given."""
    if not init_from:
        return None
    return str(Path(init_from).resolve()) if Path(init_from).exists() else str(init_from)


def _init_source(run: Path) -> str | None:
    file = Path(run) / INIT_FILE
    return file.read_text().strip() if file.is_file() else None


def choose_run_dir(
    cfg: Config, resume: str | None, init_from: str | None = None
) -> tuple[Path, bool, str | None, RunLock]:
    """Rank 0's choice of run directory: (path, continuing, a line to print or None, the lock held on it).

    A run's identity is its config and its --init-from-hf source: without --logging.name, the newest
    unfinished run under run_root with the same identity (and no live process) is continued rather than
    started over, which is also what makes a torchrun --max-restarts restart continue its own run. A named
    run that died before its first checkpoint does not block its name: with another config it is replaced.
    """
    root = Path(cfg.logging.run_root)
    note = None
    if resume:
        name = Path(resume).name
    elif cfg.logging.name:
        name = cfg.logging.name
        path = root / name
        if _replaceable(path, cfg, init_from):
            shutil.rmtree(path)
            note = (
                f"replacing {path}: it has another config or --init-from-hf source and stopped before its first "
                "checkpoint"
            )
    else:
        found = find_unfinished_run(cfg, init_from)
        if found is not None:
            lock = RunLock(found)
            return found, True, _continuing(found), lock
        name = default_run_name(cfg)
        while (root / name).exists():  # two runs started in the same second
            name += "-1"
    _refuse_if_running(root / name)
    path, continuing = prepare_run_dir(cfg, name, resume=bool(resume), init_from=init_from)
    lock = RunLock(path)
    return path, continuing, _continuing(path) if continuing and not resume else note, lock


def _continuing(path: Path) -> str:
    return (
        f"continuing unfinished run {path} (same config) from step {latest_step(path) or 0}; pass "
        "--logging.name NEW to start a separate run"
    )


def find_unfinished_run(cfg: Config, init_from: str | None = None) -> Path | None:
    """The newest run under run_root with this config and init source, no summary.json and no process training it."""
    root = Path(cfg.logging.run_root)
    want = _normalised(config_yaml(cfg))
    found = []
    for saved in root.glob("*/config.yaml") if root.is_dir() else []:
        run = saved.parent
        if (run / "summary.json").exists() or RunLock.held(run) or _init_source(run) != _source(init_from):
            continue
        try:
            same = _normalised(saved.read_text()) == want
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if same:
            found.append((saved.stat().st_mtime, run.name, run))
    return max(found)[2] if found else None


def latest_step(run: Path) -> int | None:
    """Step of the run's newest complete checkpoint, None without one."""
    from plmrun.checkpoint import latest_checkpoint

    latest = latest_checkpoint(Path(run) / "checkpoints")
    return None if latest is None else int(latest.name.split("_")[1])


def resume_config(run: Path, overrides: list[str]) -> Config:
    """The config of `plmrun train --resume RUN [overrides]`: RUN's config.yaml with the overrides applied,
    which may only change EXTENDABLE keys (checked again, and recorded, when the run directory is reopened)."""
    from plmrun.config import ConfigError, build_config, load_yaml, validate

    file = Path(run) / "config.yaml"
    if not file.is_file():
        raise ConfigError(f"{run}: not a run directory (no config.yaml)")
    saved = validate(load_yaml(file))
    cfg = build_config(str(file), overrides) if overrides else saved
    extension_changes(saved, cfg)
    cfg.logging.run_root = str(Path(run).parent)
    return cfg


def finished_step(run: Path) -> str:
    try:
        return str(json.loads((Path(run) / "summary.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def _replaceable(path: Path, cfg: Config, init_from: str | None = None) -> bool:
    """An unfinished plmrun run with another config or init source and no checkpoint: nothing in it is worth keeping."""
    saved = path / "config.yaml"
    if not saved.is_file() or (path / "summary.json").exists() or latest_step(path) is not None:
        return False
    _refuse_if_running(path)
    try:
        other = _normalised(saved.read_text()) != _normalised(config_yaml(cfg)) or _init_source(path) != _source(
            init_from
        )
    except (yaml.YAMLError, AttributeError):
        return False
    foreign = foreign_entries(path, RUN_ENTRIES)
    if other and foreign:  # replacing it would delete what plmrun did not write
        raise RunDirError(
            f"{path}: has another config and stopped before its first checkpoint, but holds files "
            f"plmrun did not write ({names_line(foreign)}); move them away or choose another "
            "--logging.name"
        )
    return other


def _refuse_if_running(path: Path) -> None:
    if RunLock.held(path):
        raise _busy(path)


def _busy(path: Path) -> RunDirError:
    return RunDirError(
        f"{path}: another process is training this run right now; wait for it or choose another --logging.name"
    )


class RunLock:
    """An flock on RUN/.lock held while rank 0 trains (released by the OS when the process dies), so a rerun
    never continues or replaces a run that is still alive."""

    def __init__(self, run: Path):
        import fcntl

        self.fd = os.open(Path(run) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise _busy(run) from None

    @staticmethod
    def held(run: Path) -> bool:
        import fcntl

        if not (Path(run) / ".lock").exists():
            return False
        fd = os.open(Path(run) / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)  # closing our own descriptor drops only our lock

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _normalised(text: str) -> dict:
    d = yaml.safe_load(text)
    for key in ("progress", "run_root", "name"):  # where the run lives and how it prints, not what it computes
        d.get("logging", {}).pop(key, None)
    return d


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment_info(device, world_size: int, data: dict) -> dict:
    import numpy
    import torch

    import plmrun

    info = {
        "plmrun": plmrun.__version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "world_size": world_size,
        "command": sys.argv,
        "data": data,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


class MetricsLog:
    """Append-only metrics.jsonl plus optional TensorBoard / W&B sinks (rank 0 only)."""

    def __init__(self, path: Path, cfg: Config, run_name: str, enabled: bool = True):
        self.enabled = enabled
        self.file = open(path / "metrics.jsonl", "a") if enabled else None
        self.tb = self.wandb = None
        if enabled and cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path / "tb"))
        if enabled and cfg.logging.wandb:
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project, name=run_name, dir=str(path), config=cfg.to_dict(), resume="allow"
            )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record.get("step", 0)
        prefix = record.get("kind", "train")
        scalars = {
            f"{prefix}/{k}": v
            for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "kind")
        }
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    f = Path(path) / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint of `step` by an attempt that stopped (and final evals)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step and not r.get("final")]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


def plot_curves(path: Path) -> list[Path]:
    """loss vs tokens and vs training time (train and val) as PNGs under plots/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "eval" and not r.get("final")]
    out_dir = Path(path) / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for xkey, xlabel, fname in (
        ("tokens", "training tokens", "loss_vs_tokens.png"),
        ("train_time_s", "training time (s)", "loss_vs_time.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if train:
            ax.plot([r[xkey] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.6)
        if val:
            ax.plot([r[xkey] for r in val], [r["val_loss"] for r in val], "o-", label="val loss (eval subset)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(out_dir / fname)
    return written


def write_json_atomic(path: Path, data: dict) -> None:
    write_json(path, data, indent=2, default=str)
