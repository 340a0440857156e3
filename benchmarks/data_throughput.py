"""Data-path throughput on one core: FASTA -> shards (residues/s), decompression alone, and the
packed loader + masking (tokens/s, real-token fraction), on the bundled Swiss-Prot train split.

    python benchmarks/data_throughput.py [--quick]

Prints a table and writes benchmarks/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "data_throughput.json"


def one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import torch

    torch.set_num_threads(1)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def prepare_section(tmp: Path, repeats: int) -> list[dict]:
    from plmrun.data.corpus import corpus_files
    from plmrun.data.prepare import prepare

    xz = corpus_files()["train"]
    plain = tmp / "train.fasta"
    t = time.perf_counter()
    with lzma.open(xz) as src, open(plain, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    xz_time = time.perf_counter() - t
    text = plain.read_bytes()
    for name, mod in (("gz", gzip), ("bz2", bz2)):
        with mod.open(tmp / f"train.fasta.{name}", "wb", compresslevel=6) as f:
            f.write(text)
    residues = prepare(plain, tmp / "probe", progress=False)["train"]["num_tokens"]
    rows = []
    for label, path in (("plain", plain), ("gz", tmp / "train.fasta.gz"), ("xz", xz), ("bz2", tmp / "train.fasta.bz2")):

        def run(path=path):
            prepare(path, tmp / "out", overwrite=True, workers=1, progress=False)

        secs = best_of(run, repeats if label == "plain" else 1)
        opener = {"plain": open, "gz": gzip.open, "xz": lzma.open, "bz2": bz2.open}[label]

        def read(path=path, opener=opener):
            with opener(path, "rb") as f:
                while f.read(1 << 22):
                    pass

        dsecs = xz_time if label == "xz" else best_of(read, 1)
        rows.append(
            {
                "input": label,
                "residues": residues,
                "prepare_seconds": round(secs, 3),
                "prepare_residues_per_s": residues / secs,
                "decompress_only_residues_per_s": residues / dsecs,
            }
        )
    return rows


def loader_section(steps: int) -> list[dict]:
    from plmrun.data.corpus import bundled_dataset_dir
    from plmrun.data.loader import TrainLoader
    from plmrun.data.masking import Masker
    from plmrun.data.shards import open_dataset

    src = open_dataset(bundled_dataset_dir(), "train")
    rows = []
    for budget, max_len, objective in ((65536, 1024, "mlm"), (4096, 512, "mlm"), (65536, 1024, "diffusion")):
        loader = TrainLoader(
            src, token_budget=budget, max_length=max_len, seed=0, prefetch=0, masker=Masker(objective=objective)
        )
        loader.next_step(0)  # plan the first chunk
        n = max(4, steps * 65536 // budget)
        t = time.perf_counter()
        for s in range(1, n + 1):
            loader.next_step(s)
        secs = time.perf_counter() - t
        rows.append(
            {
                "token_budget": budget,
                "max_length": max_len,
                "objective": objective,
                "microbatches": n,
                "tokens_per_s": n * budget / secs,
                "real_token_fraction": loader.real_tokens / loader.budget_tokens,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats and loader steps")
    args = ap.parse_args()
    one_core()
    result = {"machine": platform.processor() or platform.machine(), "cores_used": 1}
    with tempfile.TemporaryDirectory() as d:
        result["prepare"] = prepare_section(Path(d), 1 if args.quick else 3)
    print(f"{'FASTA -> shards (1 core)':<26}{'prepare res/s':>16}{'decompress only':>18}")
    for r in result["prepare"]:
        print(
            f"{r['input']:<26}{r['prepare_residues_per_s'] / 1e6:>14.1f} M"
            f"{r['decompress_only_residues_per_s'] / 1e6:>16.1f} M"
        )
    try:
        result["loader"] = loader_section(10 if args.quick else 40)
    except ImportError as e:
        result["loader"] = f"not measured: {e}"
    if isinstance(result["loader"], list):
        print(f"\n{'loader + masking (1 core)':<26}{'tokens/s':>12}{'real tokens':>14}")
        for r in result["loader"]:
            label = f"{r['objective']} T={r['token_budget']} L={r['max_length']}"
            print(f"{label:<26}{r['tokens_per_s'] / 1e6:>10.2f} M{r['real_token_fraction']:>14.2%}")
    else:
        print(result["loader"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
