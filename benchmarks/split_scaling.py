"""How `plmrun data split` grows with data: wall time, CPU time and peak memory at 15k / 60k /
240k / 1M sequences, each size in its own process (so each has its own peak memory).

    python benchmarks/split_scaling.py                       # 15k 60k 240k 1M, --cluster-mode auto
    python benchmarks/split_scaling.py --sizes 15000 60000 --cluster-mode cluster linclust

Inputs: the bundled Swiss-Prot corpus (train + valid + test, ~60k sequences); sizes above it add
synthetic mutants of random corpus sequences (2-30% of residues substituted, a deterministic
RNG), which is how redundancy looks in UniRef-style data: families of near copies. Prints a
table and writes benchmarks/results/split_scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
AA = "ACDEFGHIKLMNPQRSTVWY"


def corpus_sequences() -> list[tuple[str, str]]:
    from plmrun.data.corpus import corpus_files

    records = []
    for split in ("train", "valid", "test"):
        with lzma.open(corpus_files()[split], "rt") as f:
            name, seq = None, []
            for line in f:
                if line.startswith(">"):
                    if name:
                        records.append((name, "".join(seq)))
                    name, seq = line[1:].split()[0], []
                else:
                    seq.append(line.strip())
            if name:
                records.append((name, "".join(seq)))
    return records


def write_input(path: Path, n: int, seed: int = 0) -> None:
    """The first n corpus sequences, then synthetic mutants until there are n."""
    import numpy as np

    base = corpus_sequences()
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(AA.encode(), dtype=np.uint8)
    with open(path, "w") as f:
        for name, seq in base[:n]:
            f.write(f">{name}\n{seq}\n")
        for i in range(max(0, n - len(base))):
            name, seq = base[int(rng.integers(len(base)))]
            arr = np.frombuffer(seq.encode(), dtype=np.uint8).copy()
            hit = rng.random(len(arr)) < rng.uniform(0.02, 0.30)
            arr[hit] = letters[rng.integers(0, 20, int(hit.sum()))]
            f.write(f">mut{i}_{name}\n{arr.tobytes().decode()}\n")


def one(n: int, mode: str, threads: int, work: Path, sensitivity: float) -> dict:
    """Split n sequences in this process; the peak memory of mmseqs is the children's maxrss."""
    from plmrun.data.split import split

    inp = work / f"in_{n}.fasta"
    if not inp.exists():
        write_input(inp, n)
    out = work / f"out_{n}_{mode}"
    t = time.monotonic()
    report = split(inp, out, threads=threads, cluster_mode=mode, overwrite=True, leak_sensitivity=sensitivity)
    wall = time.monotonic() - t
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "sequences": n,
        "cluster_mode": mode,
        "leak_sensitivity": sensitivity,
        "tool": report["cluster"]["tool"],
        "wall_s": wall,
        "seconds": report["seconds"],
        "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
        "peak_rss_mb": {"python": me.ru_maxrss / 1024, "mmseqs": kids.ru_maxrss / 1024},
        "splits": {s: c["kept"] for s, c in report["splits"].items()},
        "clusters": sum(c["clusters"] for c in report["splits"].values()),
        "dropped_as_leaks": len(report["dropped"]),
        "input_mb": inp.stat().st_size / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[15_000, 60_000, 240_000, 1_000_000])
    ap.add_argument("--cluster-mode", nargs="+", default=["auto"], choices=["auto", "cluster", "linclust"])
    ap.add_argument("--leak-sensitivity", type=float, default=5.7, help="mmseqs -s of the leakage search")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--one", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.threads, Path(args.work), args.leak_sensitivity)))
        return
    rows = []
    out_name = "split_scaling" + ("" if args.leak_sensitivity == 5.7 else f"_s{args.leak_sensitivity:g}")
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        for n in args.sizes:
            for mode in args.cluster_mode:
                r = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--one",
                        str(n),
                        mode,
                        "--work",
                        work,
                        "--threads",
                        str(args.threads),
                        "--leak-sensitivity",
                        str(args.leak_sensitivity),
                    ],
                    capture_output=True,
                    text=True,
                )
                if r.returncode:
                    sys.exit(f"size {n} {mode}: {r.stderr.strip().splitlines()[-1]}")
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                row = rows[-1]
                print(
                    f"{n:>9,} {row['tool']:<20} wall {row['wall_s']:7.1f} s  cpu {row['cpu_s']:7.1f} s  "
                    f"mmseqs peak {row['peak_rss_mb']['mmseqs']:6.0f} MB",
                    flush=True,
                )
    head = (
        "| sequences | tool | leak -s | read s | cluster s | leakage search s | wall s | CPU s | "
        "peak RSS mmseqs / python (MB) | clusters | valid / test kept | leaks dropped |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        t = r["seconds"]
        lines.append(
            f"| {r['sequences']:,} | {r['tool']} | {r['leak_sensitivity']} | {t['read']:.0f} | "
            f"{t['cluster']:.0f} | "
            f"{t['leakage_search']:.0f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
            f"{r['peak_rss_mb']['mmseqs']:.0f} / {r['peak_rss_mb']['python']:.0f} | "
            f"{r['clusters']:,} | {r['splits']['valid']:,} / {r['splits']['test']:,} | "
            f"{r['dropped_as_leaks']:,} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "mmseqs": subprocess.run(["mmseqs", "version"], capture_output=True, text=True).stdout.strip(),
    }
    (RESULTS / f"{out_name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (RESULTS / f"{out_name}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
