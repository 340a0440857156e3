"""`plmrun data split`: homology-aware train/valid/test split with mmseqs2 and a leakage search.

1. Records are normalised (as `prepare` does) and exact duplicates collapsed.
2. `mmseqs easy-cluster` at `min_seq_id` identity / `coverage` (default 30% / 80%); above
   `LINCLUST_ABOVE` unique sequences (`cluster_mode="auto"`), `mmseqs easy-linclust`, which is
   linear in the input but less sensitive at low identity: the leakage search below is what keeps
   the split honest either way, so it always runs.
3. Whole clusters go to test/valid/train by a hash of (seed, representative's name), so the
   assignment does not depend on input order or on the other clusters.
4. Clustering alone leaks — a fragment or a shared domain fails the 80% coverage test and lands
   in its own cluster — so valid/test are searched against train (`mmseqs easy-search`) and every
   valid/test sequence with a train hit of >= `leak_identity` identity over >= `leak_coverage`
   of its own length is dropped and listed in the leakage report.

Output: `train.fasta`, `valid.fasta`, `test.fasta` (original headers) and `leakage_report.json`
/ `.txt` in OUT; then `plmrun data prepare OUT/train.fasta --valid OUT/valid.fasta --test
OUT/test.fasta --out DATASET`. mmseqs sees internal ids (`s0`, `s1`, ...), so any header works.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

from plmrun.data.errors import DataError
from plmrun.data.prepare import check_output_dir, path_list, swap_into_place
from plmrun.data.readers import read_records
from plmrun.data.shards import remove_stale_siblings, temp_sibling
from plmrun.hashing import unit_hash
from plmrun.outputs import mark_output

SPLITS = ("train", "valid", "test")
CLUSTER_MODES = ("auto", "cluster", "linclust")
LINCLUST_ABOVE = 200_000
"Unique sequences above which `auto` uses linclust (easy-cluster took 7.5 min on 60k here)."


def _mmseqs(mmseqs: str, args: list, log: Path) -> None:
    with open(log, "ab") as f:
        r = subprocess.run([mmseqs, *args], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise DataError(f"mmseqs {args[0]} failed (exit {r.returncode}): {tail[0]} (log: {log})")


def assign(rep_name: str, seed: int, valid_frac: float, test_frac: float) -> str:
    """Split of a whole cluster: a pure function of its representative's name and the seed."""
    u = unit_hash(f"{seed}:{rep_name}", digest="sha256")
    return "test" if u < test_frac else "valid" if u < test_frac + valid_frac else "train"


def split(
    inputs,
    out_dir,
    *,
    valid_frac: float = 0.02,
    test_frac: float = 0.02,
    min_seq_id: float = 0.3,
    coverage: float = 0.8,
    leak_identity: float = 0.5,
    leak_coverage: float = 0.3,
    seed: int = 0,
    invalid: str = "error",
    threads: int | None = None,
    overwrite: bool = False,
    mmseqs: str = "mmseqs",
    cluster_mode: str = "auto",
    leak_sensitivity: float = 5.7,
) -> dict:
    """Split `inputs` into OUT/{train,valid,test}.fasta; returns the leakage report."""
    if shutil.which(mmseqs) is None:
        raise DataError(
            f"{mmseqs}: mmseqs2 not found (install it: apt-get install mmseqs2, or conda install -c bioconda mmseqs2)"
        )
    if not (0 <= valid_frac and 0 <= test_frac and valid_frac + test_frac < 1):
        raise DataError(f"--valid-frac {valid_frac} and --test-frac {test_frac} must be >= 0 and sum to less than 1")
    if not 1 <= leak_sensitivity <= 7.5:
        raise DataError(
            f"--leak-sensitivity {leak_sensitivity}: must be in [1, 7.5] (mmseqs -s; "
            "5.7 is its search default, lower is faster and finds fewer remote leaks)"
        )
    if cluster_mode not in CLUSTER_MODES:
        raise DataError(f"--cluster-mode {cluster_mode!r}: must be one of {', '.join(CLUSTER_MODES)}")
    inputs = path_list(inputs)
    out = Path(out_dir)
    check_output_dir(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    tmp = temp_sibling(out)
    work = tmp / "work"
    work.mkdir(parents=True)
    thr = ["--threads", str(threads)] if threads else []
    seconds, clock = {}, time.monotonic()
    try:
        names, n_dupes = _write_unique(inputs, work / "all.fasta", invalid)
        seconds["read"], clock = time.monotonic() - clock, time.monotonic()
        log = work / "mmseqs.log"
        tool = (
            "easy-linclust"
            if cluster_mode == "linclust" or (cluster_mode == "auto" and len(names) > LINCLUST_ABOVE)
            else "easy-cluster"
        )
        _mmseqs(
            mmseqs,
            [
                tool,
                str(work / "all.fasta"),
                str(work / "clu"),
                str(work / "tmp"),
                "--min-seq-id",
                str(min_seq_id),
                "-c",
                str(coverage),
                "--cov-mode",
                "0",
                "-v",
                "1",
                *thr,
            ],
            log,
        )
        seconds["cluster"], clock = time.monotonic() - clock, time.monotonic()
        where, n_clusters = {}, {s: 0 for s in SPLITS}
        for line in open(work / "clu_cluster.tsv"):
            rep, member = line.split()
            if rep not in where:
                where[rep] = assign(names[int(rep[1:])].split(" ")[0], seed, valid_frac, test_frac)
                n_clusters[where[rep]] += 1
            where[member] = where[rep]
        _write_splits(work / "all.fasta", where, {s: work / f"{s}.fasta" for s in SPLITS})
        leaks = _leakage_search(mmseqs, work, leak_identity, leak_coverage, leak_sensitivity, thr, log)
        seconds["leakage_search"] = time.monotonic() - clock
        kept = _write_splits(
            work / "all.fasta", where, {s: tmp / f"{s}.fasta" for s in SPLITS}, drop=leaks, names=names
        )
        counts = {
            s: {"clusters": n_clusters[s], "assigned": sum(v == s for v in where.values()), "kept": kept[s]}
            for s in SPLITS
        }
        report = {
            "inputs": inputs,
            "seed": seed,
            "valid_frac": valid_frac,
            "test_frac": test_frac,
            "cluster": {
                "tool": f"mmseqs {tool}",
                "mode": cluster_mode,
                "min_seq_id": min_seq_id,
                "coverage": coverage,
                "cov_mode": 0,
            },
            "leakage_search": {
                "tool": "mmseqs easy-search",
                "min_identity": leak_identity,
                "min_query_coverage": leak_coverage,
                "sensitivity": leak_sensitivity,
            },
            "exact_duplicates_removed": n_dupes,
            "splits": counts,
            "dropped": [
                {
                    "name": names[int(k[1:])],
                    "split": where[k],
                    "train_hit": names[int(h["target"][1:])],
                    "identity": h["identity"],
                    "query_coverage": h["coverage"],
                }
                for k, h in sorted(leaks.items())
            ],
        }
        seconds["total"] = sum(seconds.values())
        report["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
        (tmp / "leakage_report.json").write_text(json.dumps(report, indent=1) + "\n")
        (tmp / "leakage_report.txt").write_text(_report_text(report))
        shutil.rmtree(work)
        mark_output(tmp, "data split")
        swap_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _write_unique(inputs: list, path: Path, invalid: str) -> tuple[list, int]:
    """Normalised records as `>s{i}`; returns original names and the number of duplicates."""
    names, seen, dupes = [], set(), 0
    with open(path, "w") as f:
        for spec in inputs:
            for name, seq, _ in read_records(spec, policy=invalid):
                digest = hashlib.sha256(seq.encode()).digest()[:16]
                if digest in seen:
                    dupes += 1
                    continue
                seen.add(digest)
                f.write(f">s{len(names)}\n{seq}\n")
                names.append(name)
    if not names:
        raise DataError(f"{', '.join(inputs)}: no sequences to split")
    return names, dupes


def _write_splits(all_fasta: Path, where: dict, paths: dict, drop=(), names=None) -> dict:
    """Stream `all_fasta` (two lines a record) into one FASTA per split, skipping `drop`; with
    `names`, records get their original headers back. Streams, so memory does not grow with the
    residues (1M sequences are ~400 MB of them). Returns records written per split."""
    files = {s: open(p, "w") for s, p in paths.items()}
    written = dict.fromkeys(paths, 0)
    try:
        with open(all_fasta) as f:
            for header in f:
                key, seq = header[1:].rstrip("\n"), next(f)
                if key in drop:
                    continue
                s = where[key]
                files[s].write(f">{names[int(key[1:])] if names else key}\n{seq}")
                written[s] += 1
    finally:
        for fh in files.values():
            fh.close()
    return written


def _leakage_search(mmseqs, work: Path, identity, cov, sensitivity, thr, log) -> dict:
    """Internal id -> a qualifying train hit, for valid/test sequences. `--max-accept 1`: one
    qualifying hit is enough to drop a sequence, so alignment stops there (a third of the search
    time on redundant data); the dropped set is the same, the hit reported is the first found."""
    query = work / "query.fasta"
    with open(query, "w") as f:
        for s in ("valid", "test"):
            with open(work / f"{s}.fasta") as part:
                shutil.copyfileobj(part, f)
    if query.stat().st_size == 0 or (work / "train.fasta").stat().st_size == 0:
        return {}
    hits = work / "hits.m8"
    _mmseqs(
        mmseqs,
        [
            "easy-search",
            str(query),
            str(work / "train.fasta"),
            str(hits),
            str(work / "tmp"),
            "--format-output",
            "query,target,fident,qcov",
            "--min-seq-id",
            str(identity),
            "-c",
            str(cov),
            "--cov-mode",
            "2",
            "--max-accept",
            "1",
            "-s",
            str(sensitivity),
            "-v",
            "1",
            *thr,
        ],
        log,
    )
    leaks = {}
    for line in open(hits):
        q, t, fid, qcov = line.split("\t")
        fid, qcov = float(fid), float(qcov)
        if fid >= identity and qcov >= cov and (q not in leaks or fid > leaks[q]["identity"]):
            leaks[q] = {"target": t, "identity": fid, "coverage": qcov}
    return leaks


def _report_text(r: dict) -> str:
    lines = [
        "plmrun data split — leakage report",
        f"clustering: {r['cluster']['tool']} --min-seq-id {r['cluster']['min_seq_id']} "
        f"-c {r['cluster']['coverage']}; seed {r['seed']}",
        f"leakage search: valid/test vs train, drop hits >= {r['leakage_search']['min_identity']:.0%}"
        f" identity over >= {r['leakage_search']['min_query_coverage']:.0%} of the query",
        f"exact duplicates removed: {r['exact_duplicates_removed']}",
    ]
    for s, c in r["splits"].items():
        lines.append(
            f"{s:>5}: {c['clusters']} clusters, {c['assigned']} sequences assigned, "
            f"{c['kept']} kept ({c['assigned'] - c['kept']} dropped as leaks)"
        )
    lines.append("dropped (split, name, train hit, identity, query coverage):")
    lines += [
        f"  {d['split']}\t{d['name']}\t{d['train_hit']}\t{d['identity']:.3f}\t{d['query_coverage']:.3f}"
        for d in r["dropped"]
    ] or ["  none"]
    return "\n".join(lines) + "\n"
