"""`plmrun sweep`: run experiment YAMLs one after another and print one table at the end.

Each experiment is `plmrun train --config FILE` in its own process (torchrun with one process per
visible GPU, or a single process on CPU), so one failure cannot take the others down; its output
goes to RUN_ROOT/NAME.log. A finished experiment (summary.json present) is not rerun, and an
unfinished one resumes from its checkpoint, so rerunning a sweep after a crash continues it.
Secrets come from the environment (HF_TOKEN is inherited as is), or for the W&B key from a prompt
asked once before anything runs when stdin is a terminal; they never come from YAML (the config rejects unknown keys)
and are never written to logs. Without a terminal nothing ever waits for input.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import getpass
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def collect(paths: list[str]) -> list[Path]:
    """YAML files from files and directories (a directory's *.yaml / *.yml, sorted), in the order given."""
    from plmrun.config import ConfigError

    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix in (".yaml", ".yml"))
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"{p}: no such experiment file or directory")
    if not out:
        raise ConfigError(f"no experiment YAMLs in {', '.join(paths)}")
    return out


def get_secret(name: str, why: str) -> str | None:
    """The environment's value, else a hidden prompt when stdin is a terminal, else None (never blocks)."""
    if os.environ.get(name):
        return os.environ[name]
    if sys.stdin is not None and sys.stdin.isatty():
        value = getpass.getpass(f"{name} ({why}; leave empty to skip): ").strip()
        return value or None
    return None


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def launch_command(config: Path, name: str, run_root: Path, nproc: int) -> list[str]:
    train = [
        "-m",
        "plmrun.cli",
        "train",
        "--config",
        str(config),
        f"--logging.name={name}",
        f"--logging.run_root={run_root}",
        "--logging.progress=false",
    ]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *train]
    return [sys.executable, *train]


def _result(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    val = (s.get("final_full_val") or s.get("final_val") or {}).get("loss")
    ttt = s.get("time_to_target") or {}
    best = min(ttt, key=float) if ttt else None  # the lowest loss reached
    return {
        "val_loss": val,
        "tok_per_s": s.get("tok_per_s"),
        "steps": s.get("steps"),
        "time_to_target": f"{best} @ {ttt[best]['train_time_s']:.1f}s" if best else None,
    }


def run_sweep(paths: list[str], run_root: Path, nproc: int) -> list[dict]:
    from plmrun.config import ConfigError, build_config

    run_root.mkdir(parents=True, exist_ok=True)
    plan = []
    for path in collect(paths):
        row = {"experiment": path.stem, "config": str(path), "status": "pending"}
        try:
            cfg = build_config(str(path))
            row["experiment"] = cfg.logging.name or path.stem
            row["wandb"] = cfg.logging.wandb
        except ConfigError as e:
            row["status"] = f"invalid: {e}"
        plan.append(row)
    env = dict(os.environ)
    if any(r.get("wandb") for r in plan) and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        key = get_secret("WANDB_API_KEY", "experiments log to Weights & Biases")
        if key:
            env["WANDB_API_KEY"] = key
        else:
            for r in plan:
                if r.get("wandb") and r["status"] == "pending":
                    r["status"] = (
                        "skipped: WANDB_API_KEY is not set and there is no terminal to ask"
                        " (export it, or WANDB_MODE=offline)"
                    )
    for row in plan:
        if row["status"] != "pending":
            print(f"sweep: {row['experiment']}: {row['status']}", flush=True)
            continue
        name, run_dir = row["experiment"], run_root / row["experiment"]
        if (run_dir / "summary.json").exists():
            row.update(status="ok (earlier)", **_result(run_dir))
            print(f"sweep: {name}: finished earlier, not rerun", flush=True)
            continue
        log = run_root / f"{name}.log"
        cmd = launch_command(Path(row["config"]), name, run_root, nproc)
        print(f"sweep: {name}: running ({nproc} process{'es' if nproc > 1 else ''}), log {log}", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        if rc == 0 and (run_dir / "summary.json").exists():
            row.update(status="ok", **_result(run_dir))
        else:
            errors = [ln for ln in log.read_text().splitlines() if ln.startswith("error:")]
            row["status"] = f"failed (exit {rc})" + (f": {errors[-1][7:]}" if errors else f"; see {log}")
        print(f"sweep: {name}: {row['status']} in {row['wall_s']} s", flush=True)
    rows = [{k: v for k, v in r.items() if k != "wandb"} for r in plan]
    (run_root / "sweep_summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def summary_table(rows: list[dict]) -> str:
    head = ("experiment", "status", "val loss", "time-to-target", "tok/s")
    body = [
        (
            r["experiment"],
            r["status"] if len(r["status"]) <= 60 else r["status"][:57] + "...",
            f"{r['val_loss']:.4f}" if r.get("val_loss") is not None else "-",
            r.get("time_to_target") or "-",
            f"{r['tok_per_s']:,.0f}" if r.get("tok_per_s") else "-",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


def add_sweep_command(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="run experiment YAMLs one after another and summarise them",
        description="Run each experiment YAML (files or directories of them) with `plmrun train`, "
        "continuing past failures, and print a summary table.",
    )
    p.add_argument("paths", nargs="+", metavar="DIR_OR_FILE", help="experiment YAMLs or directories of them")
    p.add_argument("--run-root", help="where the runs go (default: runs/sweep-<timestamp>; reuse it to continue)")
    p.add_argument("--nproc", type=int, default=None, help="processes per experiment (default: visible GPUs, or 1)")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from plmrun.config import ConfigError

    nproc = args.nproc if args.nproc is not None else default_nproc()
    if nproc < 1:
        raise ConfigError("--nproc must be >= 1")
    root = Path(args.run_root or f"runs/sweep-{_dt.datetime.now():%Y%m%d-%H%M%S}")
    rows = run_sweep(args.paths, root, nproc)
    print(summary_table(rows))
    failed = [r for r in rows if not r["status"].startswith("ok")]
    print(f"{len(rows) - len(failed)} of {len(rows)} experiments succeeded; summary in {root / 'sweep_summary.json'}")
    return 1 if failed else 0
