"""The bundled Swiss-Prot corpus: package data, prepared into shards once per cache directory.

The shards live in `$PLMRUN_CACHE` (default `~/.cache/plmrun/`) under a name that includes the
corpus fingerprint (sha256 of the shipped `.xz` files), so a changed corpus never reuses stale
shards. Two processes preparing at once are safe: each builds in its own temporary directory and
the first rename wins; the loser discards its copy and uses the winner's.
"""

from __future__ import annotations

import errno
import hashlib
import os
from importlib import resources
from pathlib import Path

from plmrun.data.errors import DataError
from plmrun.data.prepare import prepare
from plmrun.data.shards import dataset_splits

CORPUS_NAME = "swissprot2014_small"
SPLITS = ("train", "valid", "test")


def corpus_files() -> dict:
    """Split name -> path of the shipped `.fasta.xz` file (works from wheels and checkouts)."""
    root = resources.files("plmrun") / "corpus" / CORPUS_NAME
    files = {s: Path(str(root / f"{s}.fasta.xz")) for s in SPLITS}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(f"bundled corpus incomplete: {', '.join(missing)} missing (reinstall plmrun)")
    return files


def corpus_fingerprint() -> str:
    h = hashlib.sha256()
    for split, path in corpus_files().items():
        h.update(split.encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def cache_root(cache_dir=None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("PLMRUN_CACHE") or Path.home() / ".cache" / "plmrun")


def bundled_dataset_dir(cache_dir=None, progress: bool = False) -> Path:
    """Directory of the prepared bundled corpus (train/valid/test), preparing it on first use."""
    final = cache_root(cache_dir) / f"{CORPUS_NAME}-{corpus_fingerprint()}"
    files = corpus_files()
    return _prepared_once(
        final,
        SPLITS,
        lambda: prepare(
            files["train"],
            final,
            valid=files["valid"],
            test=files["test"],
            progress=progress,
            command=["plmrun", "(bundled corpus)", CORPUS_NAME],
        ),
    )


def _prepared_once(final: Path, splits, build) -> Path:
    """`final` if it holds `splits`, else build it (a concurrent builder winning the rename is fine)."""
    if set(splits) <= set(dataset_splits(final)):
        return final
    try:
        build()
    except (DataError, OSError) as e:  # another process won the rename, or a real failure
        if not set(splits) <= set(dataset_splits(final)):
            if final.is_dir() and any(final.iterdir()):
                raise DataError(f"{final}: exists but is not a complete prepared corpus; delete it and retry") from None
            if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
                raise DataError(
                    f"{final}: no space left on the device holding the plmrun cache (PLMRUN_CACHE); "
                    "free space there or set PLMRUN_CACHE to a folder on another disk"
                ) from None
            raise
    return final


FILE_SPLIT = "train"
"The one split a lone input file is prepared into (`plmrun data prepare` puts its first input there)."


def file_dataset_dir(
    spec, *, column: str | None = None, invalid: str = "error", cache_dir=None, progress: bool = False
) -> Path:
    """A lone input (FASTA[.gz/.xz], parquet, CSV/TSV, saved HF dataset) prepared into the cache as
    split FILE_SPLIT, keyed by its content hash and the reading options: the second call reuses it,
    an edited file is prepared again."""
    from plmrun.data.readers import file_fingerprint

    fp = file_fingerprint(str(spec))  # DataError for a missing file or an unusable directory
    key = hashlib.sha256(f"{fp['sha256']}|{column}|{invalid}".encode()).hexdigest()[:16]
    final = cache_root(cache_dir) / "files" / f"{Path(str(spec)).name}-{key}"
    return _prepared_once(
        final,
        [FILE_SPLIT],
        lambda: prepare(
            str(spec),
            final,
            column=column,
            invalid=invalid,
            progress=progress,
            command=["plmrun", "eval", "--dataset", str(spec)],
        ),
    )


def resolve_dataset(spec: str | os.PathLike, *, progress: bool = False) -> Path:
    """The one meaning of a dataset argument: 'bundled' is the shipped corpus (prepared on first use);
    anything else is a prepared dataset directory, which `shards.open_dataset` checks when it opens a split."""
    return bundled_dataset_dir(progress=progress) if str(spec) == "bundled" else Path(spec)
