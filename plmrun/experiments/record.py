"""`plmrun record CONFIG --seeds N`: speed-track records with statistics.

A record attempt trains N seeds (train.seed = 0..N-1) of one config to the track's target val loss
and appends one JSON line to records/<track>.jsonl. The speedrun clock is `train_time_s` at the
first eval reaching the target (summary.json's time_to_target). An attempt is compared only with
earlier entries of the same track, hardware, target and validation data; it is a new record when
it has >= 3 seeds, every seed reached the target, and a one-sided Welch t-test says its
time-to-target is lower than the current record's with p < 0.05 (the first complete attempt with
>= 3 seeds on new hardware becomes the record).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

from plmrun.errors import PlmrunError

MIN_SEEDS = 3
P_THRESHOLD = 0.05


class RecordError(PlmrunError, RuntimeError):
    """A record attempt that cannot run as asked (the message says why)."""


@dataclass(frozen=True)
class Track:
    name: str
    description: str
    dataset: str  # 'bundled' or the directory `plmrun data download` writes
    target: float  # val loss to reach
    device: str  # 'cpu' or 'cuda'
    world_size: int  # processes (GPUs under torchrun)
    threads: int = 0  # torch threads on CPU (0 = leave the config's)
    max_params: int | None = None
    eval_subset: int = 256  # in-training eval: the first N sequences of the valid split
    valid_split: str = "valid"


TRACKS = {
    # earlier entries of another target stay in records/cpu-2core.jsonl, labelled by their target
    "cpu-2core": Track(
        "cpu-2core",
        "val loss <= 2.85 (well below the amino-acid-frequency cross-entropy 2.899) "
        "on the bundled Swiss-Prot valid split, 2 CPU threads",
        dataset="bundled",
        target=2.85,
        device="cpu",
        world_size=1,
        threads=2,
    ),
    "gpu-8xH100": Track(
        "gpu-8xH100",
        "val loss <= 2.1 on OMGprot50 valid with < 150M parameters, 8 GPUs "
        "(data: `plmrun data download omg_prot50 --out data/omg_prot50`)",
        dataset="data/omg_prot50",
        target=2.1,
        device="cuda",
        world_size=8,
        max_params=150_000_000,
        eval_subset=4096,
    ),
}


# ------------------------------------------------------------------ hardware
def hardware_info() -> dict:
    """CPU model, usable cores, torch threads and GPU (name, count): what a timing depends on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    # The model name alone does not tell CPU generations apart ("AMD EPYC" is Zen 3 or Zen 4 in a VM);
    # the vector ISA torch uses does, and it decides bf16 speed.
    return {
        "cpu": cpu,
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "cores": cores,
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "gpus": torch.cuda.device_count() if gpu else 0,
        "torch": torch.__version__,
    }


def hardware_key(hw: dict, track: Track) -> str:
    """Records are compared only within one key: the GPU model x count, or the CPU model x threads."""
    if track.device == "cuda":
        return f"{track.world_size}x {hw['gpu']}"
    return cpu_label(hw)


def cpu_label(hw: dict) -> str:
    """'AMD EPYC (AVX2), 2 threads': the CPU model, the vector ISA torch uses and the thread count."""
    isa = f" ({hw['cpu_isa']})" if hw.get("cpu_isa") else ""
    return f"{hw['cpu']}{isa}, {hw['threads']} thread{'' if hw['threads'] == 1 else 's'}"


# ------------------------------------------------------------------ statistics and entries
def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def welch_p_less(new: list[float], old: list[float]) -> float | None:
    """One-sided Welch t-test p-value for mean(new) < mean(old); None when it is undefined."""
    if len(new) < 2 or len(old) < 2:
        return None
    from scipy.stats import ttest_ind

    p = float(ttest_ind(new, old, equal_var=False, alternative="less").pvalue)
    return None if math.isnan(p) else p


def seed_result(summary: dict, seed: int, target: float) -> dict:
    """One seed's time and tokens to `target` from its summary.json (reached: False if it never got there)."""
    hit = summary.get("time_to_target", {}).get(str(float(target)))
    out = {
        "seed": seed,
        "reached": hit is not None,
        "run_dir": summary.get("run_dir"),
        "best_val_loss": summary.get("best_val_loss"),
    }
    if hit:
        out.update(
            train_time_s=hit["train_time_s"],
            tokens=hit["tokens"],
            step=hit["step"],
            val_loss=hit["val_loss"],
            wall_time_s_incl_eval=hit["wall_time_s_incl_eval"],
        )
    return out


def current_record(entries: list[dict], like: dict) -> dict | None:
    """The latest entry marked new_record with the same track, hardware, target and valid data as `like`."""
    keys = ("track", "hardware_key", "target", "valid_fingerprint")
    same = [e for e in entries if e.get("new_record") and all(e.get(k) == like.get(k) for k in keys)]
    return same[-1] if same else None


def build_entry(
    *,
    track: Track,
    config: str,
    overrides: list[str],
    resolved: dict,
    commit: str | None,
    hardware: dict,
    params: int,
    target: float,
    valid_fingerprint: str,
    seeds: list[dict],
    previous: list[dict],
) -> dict:
    """The JSON record of an attempt, with its comparison against the current record."""
    entry = {
        "track": track.name,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": config,
        "overrides": list(overrides),
        "commit": commit,
        "hardware": hardware,
        "hardware_key": hardware_key(hardware, track),
        "params": params,
        "target": float(target),
        "valid_fingerprint": valid_fingerprint,
        "resolved_config": resolved,
        "seeds": seeds,
        "all_reached": all(s["reached"] for s in seeds),
    }
    times = [s["train_time_s"] for s in seeds if s["reached"]]
    tokens = [s["tokens"] for s in seeds if s["reached"]]
    entry["time_to_target_s"] = mean_std(times) if entry["all_reached"] else None
    entry["tokens_to_target"] = mean_std(tokens) if entry["all_reached"] else None
    record = current_record(previous, entry)
    p = None
    if record is not None and entry["all_reached"]:
        p = welch_p_less(times, [s["train_time_s"] for s in record["seeds"]])
        entry["vs_record"] = {
            "date": record["date"],
            "commit": record["commit"],
            "time_to_target_s": record["time_to_target_s"]["mean"],
            "p_value": p,
        }
    else:
        entry["vs_record"] = None
    enough = entry["all_reached"] and len(seeds) >= MIN_SEEDS
    entry["new_record"] = bool(enough and (record is None or (p is not None and p < P_THRESHOLD)))
    return entry


# ------------------------------------------------------------------ the records file
def records_path(records_dir: str | Path, track: str) -> Path:
    return Path(records_dir) / f"{track}.jsonl"


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return out


def append_record(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _pm(stat: dict | None, fmt: str) -> str:
    return "not reached" if stat is None else f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}}"


def records_table(entries: list[dict], target: float | None = None) -> str:
    """Markdown tables of attempts, one per target val loss (the track's current `target` first, then
    earlier targets, highest first), oldest first within each; ✓ marks those that set a record."""
    head = [
        "| date | config | commit | hardware | params | seeds | time to target (s) | tokens to target "
        "| p vs record | record |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    found = {e.get("target") for e in entries} | ({target} if target is not None else set())
    targets = sorted(found, key=lambda t: (t != target, -(t if t is not None else 0))) or [None]
    blocks = []
    for t in targets:
        label = "unknown" if t is None else f"{t:.2f}"
        note = "" if target is None or t == target else " (earlier target)"
        lines = [f"**target val loss ≤ {label}**{note}", "", *head]
        if not any(e.get("target") == t for e in entries):
            lines.append("| no attempts yet |" + " |" * 9)
        for e in (e for e in entries if e.get("target") == t):
            p = e["vs_record"]["p_value"] if e.get("vs_record") else None
            config = e["config"] + ("".join(f" `{o}`" for o in e["overrides"]) if e["overrides"] else "")
            lines.append(
                f"| {e['date'][:10]} | {config} | {(e['commit'] or '?')[:12]} | {e['hardware_key']} | "
                f"{e['params'] / 1e6:.2f}M | {len(e['seeds'])} | {_pm(e['time_to_target_s'], '.1f')} | "
                f"{_pm(e['tokens_to_target'], ',.0f')} | {'—' if p is None else f'{p:.3g}'} | "
                f"{'✓' if e['new_record'] else ''} |"
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# ------------------------------------------------------------------ running an attempt
def track_config(config: str, overrides: list[str], track: Track, target: float, dataset: str | None):
    """The config as the track runs it: its data, eval subset, device, threads and stop-at-target."""
    from plmrun.config import ConfigError, build_config, validate

    try:
        cfg = build_config(None if config == "default" else config, overrides)
    except ConfigError as e:
        raise RecordError(str(e)) from None
    cfg.data.dataset = dataset or track.dataset
    cfg.data.valid_split = track.valid_split
    cfg.eval.subset = track.eval_subset
    cfg.train.device = track.device
    if track.threads:
        cfg.train.threads = track.threads
    cfg.train.stop_at_val_loss = float(target)
    cfg.train.report_at_val_losses = sorted({*cfg.train.report_at_val_losses, float(target)}, reverse=True)
    cfg.logging.progress = False
    return validate(cfg)


def run_attempt(
    config: str,
    overrides: list[str],
    *,
    track: Track,
    seeds: int,
    target: float,
    records_dir: str | Path,
    run_root: str | Path,
    dataset: str | None = None,
) -> dict | None:
    """Train seeds 0..N-1 to the target and append the entry (rank 0 returns it; other ranks None)."""
    import torch

    from plmrun.model.registry import build_model
    from plmrun.train.rundir import git_commit
    from plmrun.train.trainer import train

    cfg = track_config(config, overrides, track, target, dataset)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != track.world_size:
        raise RecordError(
            f"track {track.name} runs on {track.world_size} process(es)"
            f"{f' (torchrun --nproc_per_node={track.world_size})' if track.world_size > 1 else ''},"
            f" this is {world}"
        )
    if track.device == "cuda" and not torch.cuda.is_available():
        raise RecordError(f"track {track.name} needs CUDA GPUs; none is visible")
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(cfg.model).parameters())
    if track.max_params is not None and params >= track.max_params:
        raise RecordError(f"{config}: {params:,} parameters; track {track.name} allows < {track.max_params:,}")
    if seeds < 1:
        raise RecordError("--seeds must be >= 1")
    if cfg.data.dataset != "bundled" and not Path(cfg.data.dataset).is_dir():
        raise RecordError(f"{cfg.data.dataset}: dataset not found; see the track: {track.description}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    cfg.logging.run_root = str(run_root)
    summaries = []
    for seed in range(seeds):
        cfg.train.seed = seed
        cfg.logging.name = f"record-{track.name}-{Path(config).stem}-{stamp}-seed{seed}"
        summaries.append(train(cfg))
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    path = records_path(records_dir, track.name)
    entry = build_entry(
        track=track,
        config=config,
        overrides=overrides,
        resolved=cfg.to_dict(),
        commit=git_commit(),
        hardware=hardware_info(),
        params=params,
        target=target,
        valid_fingerprint=summaries[0]["data"]["valid_fingerprint"],
        seeds=[seed_result(s, i, target) for i, s in enumerate(summaries)],
        previous=read_records(path),
    )
    append_record(path, entry)
    return entry


# ------------------------------------------------------------------ command line
def add_record_command(sub) -> None:
    p = sub.add_parser(
        "record",
        help="run N seeds to a speed-track target and append a record (records/)",
        description="Train CONFIG with seeds 0..N-1 until the track's target val loss, append the "
        "result to RECORDS_DIR/<track>.jsonl and print the track's records table. "
        "Extra --section.key=value arguments override the config.",
    )
    p.add_argument("config", nargs="?", help="YAML config file, shipped config name, or 'default' (plmrun's defaults)")
    p.add_argument("--seeds", type=int, default=MIN_SEEDS, help=f"seeds to run (a record needs >= {MIN_SEEDS})")
    p.add_argument("--track", default="cpu-2core", choices=sorted(TRACKS))
    p.add_argument("--target", type=float, default=None, help="val loss to reach (default: the track's)")
    p.add_argument("--dataset", help="prepared dataset directory (default: the track's)")
    p.add_argument("--records-dir", default="records", help="where <track>.jsonl lives (default: records)")
    p.add_argument("--run-root", default="runs/records", help="where the seeds' run directories go")
    p.add_argument("--table", action="store_true", help="only print the track's records table")
    p.set_defaults(func=_cmd_record, takes_overrides=True)


def _cmd_record(args, overrides) -> int:
    import sys

    track = TRACKS[args.track]
    try:
        if not args.table:
            if not args.config:
                raise RecordError("give a CONFIG to run (or --table to print the records)")
            target = track.target if args.target is None else args.target
            entry = run_attempt(
                args.config,
                overrides,
                track=track,
                seeds=args.seeds,
                target=target,
                records_dir=args.records_dir,
                run_root=args.run_root,
                dataset=args.dataset,
            )
            if entry is None:
                return 0
            _print_verdict(entry)
        print(records_table(read_records(records_path(args.records_dir, track.name)), track.target))
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _print_verdict(e: dict) -> None:
    missed = [s["seed"] for s in e["seeds"] if not s["reached"]]
    if missed:
        print(f"not reached: seeds {missed} never got to val loss {e['target']} (appended, not a record)")
        return
    msg = (
        f"time to {e['target']}: {_pm(e['time_to_target_s'], '.1f')} s, tokens {_pm(e['tokens_to_target'], ',.0f')}"
        f" over {len(e['seeds'])} seeds"
    )
    if e["vs_record"]:
        p = e["vs_record"]["p_value"]
        msg += f"; record {e['vs_record']['time_to_target_s']:.1f} s, one-sided Welch p = " + (
            "n/a" if p is None else f"{p:.3g}"
        )
    if e["new_record"]:
        msg += " — NEW RECORD"
    elif len(e["seeds"]) < MIN_SEEDS:
        msg += f" — not a record (needs >= {MIN_SEEDS} seeds)"
    print(msg)
