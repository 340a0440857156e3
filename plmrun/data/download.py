"""`plmrun data download NAME --out DIR`: fetch a remote corpus from the Hugging Face Hub and
prepare it into shards.

The seed project's corpora are parquet datasets on the Hub, split into train/valid/test files.
Files go through the normal Hub cache (`hf_hub_download`, so `HF_HOME`, `HF_HUB_CACHE`, tokens and
`HF_HUB_OFFLINE=1` work as usual); `--num-chunks N` keeps only the first N train files, for
smaller runs. With `HF_HUB_OFFLINE=1` the file list comes from the cached snapshot instead of the
Hub, so an earlier download can be re-prepared without a network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from plmrun.data.errors import DataError
from plmrun.data.prepare import check_output_dir, prepare

DATASETS = {
    "omg_prot50": "Synthyra/omg_prot50",  # OMG_prot50 (tattabio), the seed's default
    "og_prot90": "Synthyra/og_prot90",  # OG_prot90 (tattabio)
    "uniref50": "Synthyra/uniref50",  # UniRef50 2025-01-09 (agemagician)
}
SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "test": "test"}


def _hub_error(repo: str, e: Exception) -> DataError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return DataError(
        f"cannot get {repo} from the Hugging Face Hub ({type(e).__name__}: {msg[:160]}); "
        "check the network (or HF_ENDPOINT), or set HF_HUB_OFFLINE=1 to use a cached copy"
    )


def _probe_endpoint(repo: str) -> None:
    """Fail in seconds, not after the Hub client's ~25 s of retries, when the Hub is unreachable."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # a proxy decides reachability
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as e:
        raise _hub_error(repo, e) from None


def list_parquet_files(repo: str, revision: str | None = None) -> list[str]:
    """Parquet files of a Hub dataset repo: from the Hub, or from the cache when offline."""
    import huggingface_hub as hf
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        _probe_endpoint(repo)
    try:
        if constants.HF_HUB_OFFLINE:
            root = Path(hf.snapshot_download(repo, repo_type="dataset", revision=revision, local_files_only=True))
            files = [p.relative_to(root).as_posix() for p in root.rglob("*.parquet")]
        else:
            files = hf.HfApi().list_repo_files(repo, repo_type="dataset", revision=revision)
    except Exception as e:  # connection, auth, not-found and offline-cache errors alike
        raise _hub_error(repo, e) from None
    return sorted(f for f in files if f.endswith(".parquet"))


def split_of(filename: str) -> str | None:
    """train/valid/test from a file name such as data/valid-00000-of-00002.parquet."""
    stem = Path(filename).name.lower()
    for part in [Path(filename).parent.name.lower(), re.split(r"[-_.]", stem)[0]]:
        if part in SPLIT_NAMES:
            return SPLIT_NAMES[part]
    return None


def download(
    name: str,
    out_dir,
    *,
    num_chunks: int | None = None,
    column: str = "sequence",
    revision: str | None = None,
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = True,
    command=None,
) -> dict:
    """Download NAME (a key of DATASETS or an 'org/name' repo) and prepare it into `out_dir`."""
    import huggingface_hub as hf

    repo = DATASETS.get(name, name)
    if "/" not in repo:
        raise DataError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)}, or give org/name)")
    if num_chunks is not None and num_chunks < 1:
        raise DataError(f"--num-chunks must be >= 1, got {num_chunks}")
    check_output_dir(Path(out_dir), overwrite)
    by_split: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for f in list_parquet_files(repo, revision):
        if split_of(f):
            by_split[split_of(f)].append(f)
    if not by_split["train"]:
        raise DataError(f"{repo}: no train parquet files found")
    if num_chunks is not None:
        by_split["train"] = by_split["train"][:num_chunks]
    local = {}
    for split, files in by_split.items():
        try:
            local[split] = [hf.hf_hub_download(repo, f, repo_type="dataset", revision=revision) for f in files]
        except Exception as e:
            raise _hub_error(repo, e) from None
    return prepare(
        local["train"],
        out_dir,
        valid=local["valid"] or None,
        test=local["test"] or None,
        column=column,
        overwrite=overwrite,
        workers=workers,
        progress=progress,
        command=command or ["plmrun", "data", "download", name, "--out", str(out_dir)],
    )
