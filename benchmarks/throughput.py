"""Training throughput side by side: plmrun (default config), plmrun's `esm2` preset with the ESM-2
recipe (AdamW) at the same shape, and the peer users would pick — Hugging Face `EsmForMaskedLM` with
padded batches from `DataCollatorForLanguageModeling` — on the same machine and the same corpus.

    python benchmarks/throughput.py [--config FILE] [--set section.key=value ...] [--precision fp32 bf16]
        [--windows 5] [--steps-per-window 2] [--warmup 1] [--hf-batch 8] [--hf-steps-per-window 1]
        [--skip-hf] [--threads 0]

Without --config the plmrun default config is used at the ESM-2 8M width, depth and MLP ratio
(320, 6 layers, 4x), the shape of the HF reference numbers (`--config default`: the defaults at their
own shape); the esm2 preset (ESM-2 recipe: AdamW) and the HF model take the plmrun config's width,
depth and MLP ratio, with ESM-2's 20 heads where the width allows. plmrun runs its real training
step (TrainLoader with prefetch, trainer.forward_backward, the optimizer and clipping); the HF
peer's batches are collated before the clock starts (its collation time is not counted).

Real tokens are <cls>, residues and <eos>, never padding; padded tokens are what the model computes
on. MFU counts useful FLOPs only (plmrun.model.registry.flops_per_step on the real sequence lengths,
the same count for all three) against the trainer's matmul peak in the run's dtype (the best-of peak
cached per machine, train/peak.py). Each
case runs in its own process, so peak memory (RSS on CPU, torch.cuda max allocated on GPU) is its
own. Reported values are medians over the timed windows after the warm-up steps.
Writes benchmarks/results/throughput.json and throughput.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
ESM2_8M_SHAPE = {"hidden_size": 320, "num_layers": 6, "expansion_ratio": 4.0}
SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "expansion_ratio")
CASES = ("plmrun", "plmrun-esm2", "hf-esm")


# ------------------------------------------------------------------ configs
def plmrun_config(config: str | None, sets: list[str]):
    """The plmrun case: `config` ('default': plmrun's defaults as they are; None: the defaults at the
    ESM-2 8M width/depth/MLP), then --set."""
    from plmrun.config import build_config

    base = [f"--model.{k}={v}" for k, v in ESM2_8M_SHAPE.items()] if config is None else []
    return build_config(None if config == "default" else config, base + ["--" + s.removeprefix("--") for s in sets])


def recipe_at_shape(speed, recipe: str = "esm2_recipe_8m"):
    """The ESM-2 recipe config at `speed`'s width, depth and MLP ratio (so about its parameter count),
    with 20 heads as every ESM-2 size has (when the width allows), and `speed`'s data, eval and device
    settings, so both see the same batches and the same eval protocol."""
    import copy

    from plmrun.config import build_config, validate

    esm = build_config(recipe)
    for k in ("hidden_size", "num_layers", "expansion_ratio", "attention_backend"):
        setattr(esm.model, k, getattr(speed.model, k))
    head_dim = speed.model.hidden_size / 20
    esm.model.num_heads = 20 if head_dim.is_integer() and head_dim % 2 == 0 else speed.model.num_heads
    esm.data, esm.eval, esm.dist = copy.deepcopy(speed.data), copy.deepcopy(speed.eval), copy.deepcopy(speed.dist)
    for k in ("device", "precision", "threads", "compile", "grad_accum"):
        setattr(esm.train, k, getattr(speed.train, k))
    return validate(esm)


def case_configs(config: str | None, sets: list[str], precision: str) -> dict:
    """{case: Config} of the two plmrun cases at one precision."""
    speed = plmrun_config(config, sets + [f"train.precision={precision}"])
    return {"plmrun": speed, "plmrun-esm2": recipe_at_shape(speed)}


# ------------------------------------------------------------------ timing (shared with gpu_bench.py)
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_plmrun(cfg, env, *, warmup: int, windows: int, steps_per_window: int) -> dict:
    """Time the trainer's own step on `cfg`: per window seconds, real/padded tokens and useful FLOPs.

    Under torchrun every rank calls this; token and FLOP counts are summed over ranks.
    """
    from plmrun.dist import all_reduce_sum
    from plmrun.model.registry import build_model, flops_per_step
    from plmrun.optim.build import build_optimizer
    from plmrun.train.parallelize import autocast_dtype, parallelize
    from plmrun.train.trainer import build_train_loader, forward_backward, open_training_data

    torch.manual_seed(cfg.train.seed)
    _, train_src, _ = open_training_data(cfg, env)
    plm = build_model(cfg.model).to(env.device)
    params = sum(p.numel() for p in plm.parameters())
    model = parallelize(plm, cfg, env)
    steps = warmup + windows * steps_per_window
    ns_dtype = torch.float32 if cfg.train.precision == "fp32" else torch.bfloat16
    optimizers = build_optimizer(plm, cfg.optim, max(steps, cfg.train.max_steps), ns_dtype=ns_dtype)
    loader = build_train_loader(cfg, env, train_src)
    amp = autocast_dtype(cfg, env.device)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    rows, step = [], 0
    try:
        for w in range(-1, windows):
            n = warmup if w < 0 else steps_per_window
            counts = torch.zeros(4, dtype=torch.float64)  # normaliser, real tokens, padded tokens, FLOPs
            _sync(env.device)
            t0 = time.perf_counter()
            for _ in range(n):
                optimizers.set_step(step)
                micro = loader.next_step(step)
                local = torch.zeros(4, dtype=torch.float64)
                for mb in micro:
                    p = mb.packed
                    local += torch.tensor(
                        [
                            mb.normalizer,
                            p.num_real_tokens,
                            len(p.tokens),
                            flops_per_step(cfg.model, p.cu_seqlens[: p.num_sequences + 1], step=step),
                        ],
                        dtype=torch.float64,
                    )
                if env.world_size > 1:  # NCCL reduces device tensors only
                    local = all_reduce_sum(local.to(env.device)).cpu()
                forward_backward(
                    model,
                    micro,
                    global_norm=float(local[0]),
                    world_size=env.world_size,
                    device=env.device,
                    amp_dtype=amp,
                    step=step,
                )
                optimizers.clip_gradients()
                optimizers.step()
                optimizers.zero_grad()
                counts += local
                step += 1
            _sync(env.device)
            if w >= 0:
                rows.append(
                    {
                        "seconds": time.perf_counter() - t0,
                        "real_tokens": int(counts[1]),
                        "padded_tokens": int(counts[2]),
                        "flops": float(counts[3]),
                    }
                )
    finally:
        loader.close()
    return {"params": params, "windows": rows, **_memory(env.device)}


def _hf_batches(cfg, n_steps: int, batch: int, seed: int = 0) -> list:
    """Padded MLM batches the way HF users build them: EsmTokenizer + DataCollatorForLanguageModeling."""
    from transformers import DataCollatorForLanguageModeling, EsmTokenizer

    from plmrun.data.corpus import resolve_dataset
    from plmrun.data.shards import open_dataset
    from plmrun.eval.export import write_tokenizer_files
    from plmrun.tokenizer import decode

    src = open_dataset(resolve_dataset(cfg.data.dataset), cfg.data.train_split)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        tok = EsmTokenizer(str(Path(tmp) / "vocab.txt"))
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(src))
    keep = cfg.data.max_length - 2
    out = []
    for i in range(n_steps):
        seqs = []
        for j in order[i * batch : (i + 1) * batch]:
            r = src.residues(int(j))
            if len(r) > keep:  # one random crop window, as the reference peer does
                start = int(rng.integers(0, len(r) - keep + 1))
                r = r[start : start + keep]
            seqs.append(decode(r))
        out.append(collator([tok(s) for s in seqs]))
    return out


def measure_hf(cfg, device: torch.device, *, warmup: int, windows: int, steps_per_window: int, batch: int) -> dict:
    """Time HF EsmForMaskedLM (AdamW 4e-4, ESM-2 recipe) on padded batches of the same corpus."""
    from transformers import EsmConfig, EsmForMaskedLM

    from plmrun.eval.export import esm_hf_config
    from plmrun.model.registry import flops_per_step
    from plmrun.train.parallelize import autocast_dtype

    torch.manual_seed(0)
    batches = _hf_batches(cfg, warmup + windows * steps_per_window, batch)
    model = EsmForMaskedLM(EsmConfig(**esm_hf_config(cfg.model))).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
    amp = autocast_dtype(cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows, it = [], iter(batches)
    for w in range(-1, windows):
        n = warmup if w < 0 else steps_per_window
        real = padded = 0
        flops = 0.0
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            b = {k: v.to(device) for k, v in next(it).items()}
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            lengths = b["attention_mask"].sum(1).cpu()
            real += int(lengths.sum())
            padded += b["input_ids"].numel()
            flops += flops_per_step(cfg.model, torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))
        _sync(device)
        if w >= 0:
            rows.append(
                {"seconds": time.perf_counter() - t0, "real_tokens": real, "padded_tokens": padded, "flops": flops}
            )
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "windows": rows,
        "attn_implementation": model.config._attn_implementation,
        **_memory(device),
    }


def _memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "memory_kind": "cuda max allocated"}
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "memory_kind": "peak RSS"}


def summarize(result: dict, peak_flops: float) -> dict:
    """Medians over windows: real and padded tokens/s, MFU; plus the padding fraction."""
    w = result["windows"]
    real = statistics.median(r["real_tokens"] / r["seconds"] for r in w)
    padded = statistics.median(r["padded_tokens"] / r["seconds"] for r in w)
    flops = statistics.median(r["flops"] / r["seconds"] for r in w)
    pad = 1 - sum(r["real_tokens"] for r in w) / max(1, sum(r["padded_tokens"] for r in w))
    return {"real_tok_per_s": real, "padded_tok_per_s": padded, "mfu": flops / peak_flops, "padding_frac": pad}


# ------------------------------------------------------------------ one case per process
def worker(spec: dict) -> dict:
    """Run one case (in a fresh process) and return its raw measurements."""
    from plmrun.config import config_from_dict
    from plmrun.device import resolve_device
    from plmrun.train.parallelize import DistEnv

    torch.set_num_threads(spec["threads"] or os.cpu_count() or 1)
    cfg = config_from_dict(spec["config"], "throughput case")
    device = resolve_device(cfg.train.device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kw = dict(warmup=spec["warmup"], windows=spec["windows"])
    if spec["case"] == "hf-esm":
        out = measure_hf(cfg, device, steps_per_window=spec["hf_steps_per_window"], batch=spec["hf_batch"], **kw)
    else:
        out = measure_plmrun(cfg, DistEnv(1, 0, 0, device), steps_per_window=spec["steps_per_window"], **kw)
    return {**out, "base_rss_mb": base_rss, "device": str(device), "threads": torch.get_num_threads()}


def run_case(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"error: case {spec['case']} ({spec['config']['train']['precision']}) failed:\n" + proc.stderr[-3000:]
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_peaks(device: torch.device, precisions: list[str]) -> dict:
    """The trainer's MFU denominator per precision: the stable (best-of, cached) peak of train/peak.py."""
    from plmrun.train.peak import stable_peak

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    return {p: stable_peak(device, dtypes[p], seconds=1.0).flops for p in precisions}


def hardware() -> dict:
    from plmrun.experiments.record import hardware_info

    return hardware_info()


def markdown(report: dict) -> str:
    hw = report["hardware"]
    where = hw["gpu"] or f"{hw['cpu']}, {hw['cores']} cores"
    peaks = ", ".join(f"{p} {v / 1e9:,.0f} GFLOP/s" for p, v in report["peak_flops"].items())
    s = report["shape"]
    lines = [
        f"Throughput, {report['date']}, {where}, {report['threads']} threads, torch {report['torch']}. "
        f"Shape: width {s['hidden_size']}, {s['num_layers']} layers, MLP {s['expansion_ratio']:g}x, heads "
        f"{s['num_heads']} (plmrun) / {s['esm_heads']} (esm2, HF). Measured matmul peak: {peaks}. "
        f"Medians of {report['windows']} windows.",
        "",
        "| model | precision | params | real tok/s | padded tok/s | padding | MFU | peak memory (MB) | × HF |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        x = f"{r['x_hf']:.1f}×" if r.get("x_hf") else ""
        lines.append(
            f"| {r['case']} | {r['precision']} | {r['params'] / 1e6:.2f}M | {r['real_tok_per_s']:,.0f} | "
            f"{r['padded_tok_per_s']:,.0f} | {r['padding_frac']:.0%} | {r['mfu']:.1%} | "
            f"{r['peak_memory_mb']:,.0f} | {x} |"
        )
    lines += [
        "",
        "× HF: real tokens/s over the HF peer's at the same precision. Peak memory: "
        + report["rows"][0]["memory_kind"]
        + " of the case's process.",
    ]
    return "\n".join(lines) + "\n"


def write_report(out, report: dict, table: str) -> None:
    """OUT.json (every raw number) and OUT.md (the table to paste into the README), and print the table."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--config",
        help="plmrun config file, shipped name or 'default' (plmrun's defaults at their own "
        "shape); without it: the defaults at the ESM-2 8M shape",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="config override for the plmrun case (model shape keys also reach the esm2 and HF cases)",
    )
    ap.add_argument(
        "--precision",
        nargs="+",
        choices=["fp32", "bf16"],
        help="default: fp32, and bf16 where this device multiplies bf16 natively",
    )
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--steps-per-window", type=int, default=2, help="plmrun optimizer steps per timed window")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--hf-batch", type=int, default=8, help="sequences per HF batch (the reference peer used 8)")
    ap.add_argument("--hf-steps-per-window", type=int, default=1, help="HF optimizer steps per timed window")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--out", default=str(RESULTS / "throughput"), help="output path stem (.json and .md)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    if min(a.windows, a.steps_per_window, a.hf_steps_per_window, a.hf_batch) < 1 or a.warmup < 0:
        ap.error("--windows, --steps-per-window, --hf-steps-per-window and --hf-batch must be >= 1, --warmup >= 0")
    from plmrun.config import ConfigError
    from plmrun.device import resolve_device
    from plmrun.train.parallelize import native_bf16

    if a.precision is None:
        a.precision = ["fp32", "bf16"] if native_bf16(resolve_device("auto")) else ["fp32"]
    try:
        configs = {p: case_configs(a.config, a.set, p) for p in a.precision}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    first = configs[a.precision[0]]["plmrun"]
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    device = resolve_device(first.train.device)
    peaks = measure_peaks(device, a.precision)
    print("matmul peak: " + ", ".join(f"{p} {v / 1e9:,.0f} GFLOP/s" for p, v in peaks.items()), flush=True)
    rows = []
    for prec in a.precision:
        for case in CASES:
            if case == "hf-esm" and a.skip_hf:
                continue
            cfg = configs[prec]["plmrun-esm2" if case == "hf-esm" else case]
            spec = {
                "case": case,
                "config": cfg.to_dict(),
                "threads": a.threads,
                "warmup": a.warmup,
                "windows": a.windows,
                "steps_per_window": a.steps_per_window,
                "hf_steps_per_window": a.hf_steps_per_window,
                "hf_batch": a.hf_batch,
            }
            raw = run_case(spec)
            row = {"case": case, "precision": prec, **summarize(raw, peaks[prec]), **raw}
            rows.append(row)
            print(
                f"{case:12s} {prec}: {row['real_tok_per_s']:8,.0f} real tok/s  {row['padded_tok_per_s']:8,.0f} "
                f"padded tok/s  MFU {row['mfu']:.1%}  peak mem {row['peak_memory_mb']:,.0f} MB",
                flush=True,
            )
    for r in rows:
        hf = next((h for h in rows if h["case"] == "hf-esm" and h["precision"] == r["precision"]), None)
        r["x_hf"] = r["real_tok_per_s"] / hf["real_tok_per_s"] if hf and r["case"] != "hf-esm" else None
    report = {
        "date": datetime.date.today().isoformat(),
        "hardware": hardware(),
        "torch": torch.__version__,
        "threads": a.threads or os.cpu_count(),
        "device": str(device),
        "peak_flops": peaks,
        "shape": {
            **{k: getattr(first.model, k) for k in SHAPE_KEYS},
            "esm_heads": configs[a.precision[0]]["plmrun-esm2"].model.num_heads,
        },
        "windows": a.windows,
        "steps_per_window": a.steps_per_window,
        "warmup": a.warmup,
        "hf_batch": a.hf_batch,
        "config": a.config,
        "overrides": a.set,
        "rows": rows,
    }
    write_report(a.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
