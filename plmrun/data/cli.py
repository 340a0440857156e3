"""`plmrun data prepare|split|download|stats|cat`.

`add_data_commands(subparsers)` registers the commands on the `data` group of the main CLI;
handlers return an exit status and raise `DataError` for bad input (printed as one line
`error: ...`, exit status 2, by `plmrun.cli.main`).
"""

from __future__ import annotations

import json
import os
import sys


def _workers_default() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))


def add_data_commands(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="FASTA/parquet/CSV/HF datasets -> token shards",
        description="Prepare inputs into a sharded dataset (docs/reference/shard-format.md). "
        "Positional inputs form the train split.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="FASTA (plain/.gz/.xz/.bz2), .parquet, .csv/.tsv, a datasets.save_to_disk "
        "directory, or hf:ORG/NAME (append #SPLIT to pick a dataset split)",
    )
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--valid", nargs="+", metavar="INPUT", help="inputs of the valid split")
    p.add_argument("--test", nargs="+", metavar="INPUT", help="inputs of the test split")
    p.add_argument("--column", help="sequence column (parquet/CSV/datasets inputs)")
    p.add_argument("--id-column", help="record-name column (default: row number)")
    p.add_argument(
        "--invalid",
        choices=["error", "skip", "x"],
        default="error",
        help="letters outside the ESM alphabet: fail (default), skip the record, or map to X",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--workers", type=int, default=_workers_default(), help="encoding processes (default: usable cores, at most 8)"
    )
    p.add_argument("--shard-size", type=int, default=256 << 20, help="residues per shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "split",
        help="homology-aware train/valid/test split with mmseqs2",
        description="Cluster with mmseqs2, assign whole clusters, then drop "
        "valid/test sequences with a train hit (leakage search). Writes "
        "OUT/{train,valid,test}.fasta and OUT/leakage_report.{json,txt}.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="FASTA/parquet/CSV inputs")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--valid-frac", type=float, default=0.02, help="fraction of clusters for valid")
    p.add_argument("--test-frac", type=float, default=0.02, help="fraction of clusters for test")
    p.add_argument("--min-seq-id", type=float, default=0.3, help="clustering identity")
    p.add_argument("--coverage", type=float, default=0.8, help="clustering coverage (-c)")
    p.add_argument(
        "--leak-identity",
        type=float,
        default=0.5,
        help="drop valid/test sequences with a train hit at this identity or more",
    )
    p.add_argument(
        "--leak-coverage",
        type=float,
        default=0.3,
        help="... covering at least this fraction of the valid/test sequence",
    )
    p.add_argument("--seed", type=int, default=0, help="cluster assignment seed")
    p.add_argument("--invalid", choices=["error", "skip", "x"], default="error")
    p.add_argument(
        "--cluster-mode",
        choices=["auto", "cluster", "linclust"],
        default="auto",
        help="mmseqs easy-cluster, or easy-linclust (linear time, less sensitive at low "
        "identity; the leakage search runs either way); auto: linclust above 200,000 "
        "unique sequences",
    )
    p.add_argument(
        "--leak-sensitivity",
        type=float,
        default=5.7,
        help="mmseqs -s of the leakage search (5.7; 2 is ~3x faster on redundant data and "
        "found 99.5%% of the leaks in benchmarks/split_scaling.py)",
    )
    p.add_argument("--threads", type=int, default=None, help="mmseqs threads (default: all)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("download", help="download a Hub corpus (omg_prot50, og_prot90, uniref50) and prepare it")
    p.add_argument("name", help="omg_prot50, og_prot90, uniref50, or an org/name dataset repo")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--num-chunks", type=int, default=None, help="only the first N train parquet files")
    p.add_argument("--column", default="sequence", help="sequence column (default: sequence)")
    p.add_argument("--revision", default=None, help="dataset revision (branch, tag or commit)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--workers", type=int, default=_workers_default())
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("stats", help="length statistics, padding vs packing efficiency, histogram PNG")
    p.add_argument("dataset", help="prepared dataset directory, or 'bundled'")
    p.add_argument("--split", default=None, help="one split (default: all)")
    p.add_argument("--max-length", type=int, default=1024, help="tokens incl. <cls>/<eos> (crop length)")
    p.add_argument("--token-budget", type=int, default=65536, help="tokens per packed micro-batch")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per padded batch")
    p.add_argument("--png-dir", default=None, help="where to write lengths_<split>.png (default: DATASET)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("cat", help="write a split back as FASTA")
    p.add_argument("dataset", help="prepared dataset directory, or 'bundled'")
    p.add_argument("--split", required=True)
    p.add_argument("--limit", type=int, default=None, help="first N sequences only")
    p.add_argument("--width", type=int, default=60, help="residues per line (0: one line)")
    p.add_argument("--out", default="-", help="output file (default: stdout)")
    p.set_defaults(func=cmd_cat)


def _dataset(name: str) -> str:
    from plmrun.data.corpus import resolve_dataset

    return str(resolve_dataset(name, progress=True))


def cmd_prepare(args) -> int:
    from plmrun.data.prepare import prepare

    manifests = prepare(
        args.inputs,
        args.out,
        valid=args.valid,
        test=args.test,
        column=args.column,
        id_column=args.id_column,
        invalid=args.invalid,
        overwrite=args.overwrite,
        workers=args.workers,
        shard_size=args.shard_size,
        progress=not args.no_progress,
        command=_command_line(),
    )
    for split, m in manifests.items():
        norm = m["normalisation"]
        extra = ""
        if norm["skipped_records"] or norm["replaced_letters"]:
            extra = f" ({norm['skipped_records']} records skipped, {norm['replaced_letters']} letters mapped to X)"
        print(
            f"{split}: {m['num_sequences']:,} sequences, {m['num_tokens']:,} residues, "
            f"{len(m['shards'])} shard(s){extra}"
        )
    print(f"wrote {args.out}")
    return 0


def cmd_split(args) -> int:
    from plmrun.data.split import split

    report = split(
        args.inputs,
        args.out,
        valid_frac=args.valid_frac,
        test_frac=args.test_frac,
        min_seq_id=args.min_seq_id,
        coverage=args.coverage,
        leak_identity=args.leak_identity,
        leak_coverage=args.leak_coverage,
        seed=args.seed,
        invalid=args.invalid,
        threads=args.threads,
        overwrite=args.overwrite,
        cluster_mode=args.cluster_mode,
        leak_sensitivity=args.leak_sensitivity,
    )
    t = report["seconds"]
    print(
        f"{report['cluster']['tool']}: {t['cluster']:.0f} s, leakage search: "
        f"{t['leakage_search']:.0f} s, total {t['total']:.0f} s"
    )
    for s, c in report["splits"].items():
        print(f"{s}: {c['kept']:,} sequences ({c['assigned'] - c['kept']} dropped as leaks)")
    print(
        f"wrote {args.out}/{{train,valid,test}}.fasta and leakage_report.txt; next: "
        f"plmrun data prepare {args.out}/train.fasta --valid {args.out}/valid.fasta "
        f"--test {args.out}/test.fasta --out DATASET"
    )
    return 0


def cmd_download(args) -> int:
    from plmrun.data.download import download

    manifests = download(
        args.name,
        args.out,
        num_chunks=args.num_chunks,
        column=args.column,
        revision=args.revision,
        overwrite=args.overwrite,
        workers=args.workers,
        progress=not args.no_progress,
        command=_command_line(),
    )
    for split, m in manifests.items():
        print(f"{split}: {m['num_sequences']:,} sequences, {m['num_tokens']:,} residues")
    print(f"wrote {args.out}")
    return 0


def cmd_stats(args) -> int:
    from plmrun.data.stats import dataset_stats, format_stats

    stats = dataset_stats(
        _dataset(args.dataset),
        args.split,
        max_length=args.max_length,
        token_budget=args.token_budget,
        batch_size=args.batch_size,
        png_dir=args.png_dir,
    )
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
    return 0


def cmd_cat(args) -> int:
    from plmrun.data.shards import open_dataset
    from plmrun.tokenizer import decode

    src = open_dataset(_dataset(args.dataset), args.split)
    if args.out != "-":
        from plmrun.data.errors import DataError
        from plmrun.outputs import check_output_file

        check_output_file(args.out, [_dataset(args.dataset)], error=DataError)
    n = len(src) if args.limit is None else min(args.limit, len(src))
    out = sys.stdout if args.out == "-" else open(args.out, "w")
    try:
        for i in range(n):
            seq = decode(src.residues(i))
            if args.width > 0:
                seq = "\n".join(seq[k : k + args.width] for k in range(0, len(seq), args.width))
            out.write(f">{src.ids(i)}\n{seq}\n")
        if out is not sys.stdout:
            out.close()
    except BrokenPipeError:  # `plmrun data cat ... | head`
        sys.stderr.close()
    except OSError as e:  # a failed write or close (e.g. disk full) names no file: name --out
        raise OSError(e.errno, e.strerror, e.filename or args.out) from e
    finally:
        if out is not sys.stdout and not out.closed:
            out.close()
    return 0


def _command_line() -> list:
    """The command as typed (recorded in manifest.json)."""
    return [os.path.basename(sys.argv[0]), *sys.argv[1:]]
