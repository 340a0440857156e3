"""`plmrun eval`'s inputs: the --dataset argument as one evaluable split, and the unigram baseline.

--dataset is 'bundled', a prepared dataset directory, or a lone input file (FASTA[.gz/.xz],
parquet, CSV/TSV, saved HF dataset) that is prepared into the cache on the fly and evaluated whole.
"""

from __future__ import annotations

from pathlib import Path

from plmrun.data.errors import DataError
from plmrun.eval.errors import EvalError
from plmrun.model.loading import run_config_file

DEFAULT_SPLIT = "valid"
_INPUTS = "a FASTA/parquet/CSV file, a prepared dataset directory (`plmrun data prepare FILE --out DIR`) or 'bundled'"


def eval_source(dataset: str, split: str | None, *, column: str | None = None, invalid: str = "error"):
    """(source, split label, dataset directory) for `plmrun eval --dataset D [--split S]`; one-line
    errors for a missing path, a directory that is not a dataset, a split the data does not have."""
    from plmrun.data.corpus import FILE_SPLIT, bundled_dataset_dir, file_dataset_dir
    from plmrun.data.readers import input_kind
    from plmrun.data.shards import dataset_splits, open_dataset

    if dataset == "bundled":
        return _open_split(bundled_dataset_dir(progress=True), split, "bundled")
    path = Path(dataset)
    if not path.exists():
        raise DataError(f"--dataset {dataset}: no such file or directory; give {_INPUTS}")
    if path.is_dir() and dataset_splits(path):
        return _open_split(path, split, dataset)
    if path.is_dir() and (path / "manifest.json").is_file():
        raise DataError(
            f"--dataset {dataset}: is one split of a prepared dataset; use --dataset {path.parent} --split {path.name}"
        )
    if path.is_dir():
        try:
            input_kind(str(path))  # a saved Hugging Face dataset is an input like a file
        except DataError:
            raise DataError(
                f"--dataset {dataset}: a directory but not a prepared dataset (no SPLIT/manifest.json) "
                f"nor a saved Hugging Face dataset; give {_INPUTS}"
            ) from None
    if split is not None:
        raise DataError(f"--split {split}: {dataset} is one input, evaluated whole (it has no splits); drop --split")
    try:
        prepared = file_dataset_dir(str(path), column=column, invalid=invalid, progress=True)
    except DataError as e:
        if "no sequences left" not in str(e):  # the split writer's refusal of an all-skipped input
            raise
        raise DataError(
            f"--dataset {dataset}: no sequences left to evaluate (--invalid {invalid} skipped every "
            "record); use --invalid x to read unknown letters as X"
        ) from None
    return open_dataset(prepared, FILE_SPLIT), "all", prepared


def _open_split(directory: Path, split: str | None, name: str):
    from plmrun.data.shards import dataset_splits, open_dataset

    split = split or DEFAULT_SPLIT
    have = dataset_splits(directory)
    if split not in have:
        pick = next(s for s in ("valid", "test", "train", *have) if s in have)
        raise DataError(
            f"--split {split}: dataset {name} has no split {split!r} (it has: {', '.join(have)}); use --split {pick}"
        )
    return open_dataset(directory, split), split, directory


def check_subset(subset: int, source, split: str, dataset: str) -> None:
    if subset > len(source):
        what = dataset if split == "all" else f"split {split} of {dataset}"
        raise EvalError(
            f"--subset {subset}: {what} has only {len(source)} sequences; use --subset {len(source)} or 0 (all of them)"
        )


def run_dir_of(spec: str) -> Path | None:
    """The run directory a model path belongs to (the run directory itself, its model/ folder or one of
    its checkpoints), or None for a model from elsewhere (HF folder, export, hub name)."""
    run_cfg = run_config_file(spec)
    # the run layout of plmrun.train.rundir
    return run_cfg.parent if run_cfg.is_file() and (run_cfg.parent / "metrics.jsonl").is_file() else None


def unigram_baseline(run_dir: Path | None, source):
    """(log p [V], source name): the run's training-split frequencies (RUN/unigram.json) when the model
    has a run that recorded them, else the frequencies of the eval data itself."""
    from plmrun.data.stats import residue_counts
    from plmrun.eval.metrics import unigram_log_probs
    from plmrun.eval.mlm import read_unigram

    counts = read_unigram(run_dir) if run_dir is not None else None
    if counts is not None:
        return unigram_log_probs(counts), "training-split"
    return unigram_log_probs(residue_counts(source)), "eval-data"


def format_line(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
