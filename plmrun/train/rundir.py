"""Run directories: naming, provenance (config, commit, versions, hardware, data) and metric sinks.

Layout (docs/run-directory.md): config.yaml, environment.json, metrics.jsonl, summary.json,
model/{model.safetensors,config.json}, checkpoints/step_XXXXXXXX/, plots/*.png, tb/ (optional).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from plmrun.config import Config
from plmrun.errors import PlmrunError


class RunDirError(PlmrunError, RuntimeError):
    """A run directory that cannot be used as asked (exists, different config, finished)."""


def default_run_name(cfg: Config) -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{cfg.model.arch}"


def config_yaml(cfg: Config) -> str:
    d = cfg.to_dict()
    d["optim"]["betas"] = list(d["optim"]["betas"])
    return yaml.safe_dump(d, sort_keys=False)


def prepare_run_dir(cfg: Config, name: str, *, resume: bool) -> tuple[Path, bool]:
    """Create runs/<name>, or reopen it for resuming. Returns (path, is_resume).

    An existing directory is reopened only when it holds the same config and has not finished;
    with a different config it is refused, never silently reused.
    """
    root = Path(cfg.logging.run_root)
    path = root / name
    text = config_yaml(cfg)
    if path.exists():
        saved = path / "config.yaml"
        if (path / "summary.json").exists() and not resume:
            raise RunDirError(f"{path}: this run already finished; choose another --logging.name")
        if not saved.exists():
            raise RunDirError(f"{path}: exists but is not a plmrun run directory; choose another --logging.name")
        if _normalised(saved.read_text()) != _normalised(text):
            raise RunDirError(f"{path}: exists with a different config; resume it with `plmrun train --resume {path}`"
                              " or choose another --logging.name")
        return path, True
    if resume:
        raise RunDirError(f"{path}: no such run directory to resume")
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(text)
    return path, False


def _normalised(text: str) -> dict:
    d = yaml.safe_load(text)
    for key in ("progress", "run_root", "name"):  # where the run lives and how it prints, not what it computes
        d.get("logging", {}).pop(key, None)
    return d


def git_commit() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
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
            self.wandb = wandb.init(project=cfg.logging.wandb_project, name=run_name, dir=str(path),
                                    config=cfg.to_dict(), resume="allow")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record.get("step", 0)
        prefix = record.get("kind", "train")
        scalars = {f"{prefix}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "kind")}
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
    for xkey, xlabel, fname in (("tokens", "training tokens", "loss_vs_tokens.png"),
                                ("train_time_s", "training time (s)", "loss_vs_time.png")):
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
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
