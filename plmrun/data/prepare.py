"""`plmrun data prepare`: inputs -> validated, checksummed token shards (docs/reference/shard-format.md).

The main process reads (and decompresses) inputs into chunks of whole records; workers encode
them; the main process appends results in input order, so the output does not depend on the
number of workers. At most 2 chunks per worker are in flight: memory stays bounded whatever
the input size. The dataset is built in a hidden sibling directory and renamed into place only
when every split is complete, so a failed run leaves nothing that looks like a dataset.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

from tqdm import tqdm

import plmrun
from plmrun import outputs
from plmrun import tokenizer as tok
from plmrun.atomic import remove_stale_siblings, replace_dir, temp_sibling
from plmrun.data.errors import DataError
from plmrun.data.readers import chunks, encode_chunk, file_fingerprint, input_kind
from plmrun.data.shards import SHARD_RESIDUES, SplitWriter


def path_list(x) -> list:
    """One input path or several, as a list of strings (None: none)."""
    if x is None:
        return []
    return [str(x)] if isinstance(x, (str, os.PathLike)) else [str(v) for v in x]


def _ordered_map(fn, items: Iterable, pool, window: int):
    """fn over items in order, with at most `window` items in flight (bounded memory)."""
    if pool is None:
        yield from map(fn, items)
        return
    pending = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def check_output_dir(out: Path, overwrite: bool, inputs: Iterable = ()) -> None:
    """plmrun.outputs' rule (not an input, --overwrite only over a folder plmrun made), as a DataError."""
    outputs.check_output_dir(out, inputs, overwrite=overwrite, error=DataError)


def prepare(
    inputs,
    out_dir,
    *,
    valid=None,
    test=None,
    column: str | None = None,
    id_column: str | None = None,
    invalid: str = "error",
    overwrite: bool = False,
    workers: int = 1,
    shard_size: int = SHARD_RESIDUES,
    progress: bool = True,
    command: Sequence[str] | None = None,
) -> dict:
    """Prepare `inputs` (train) and optional valid/test inputs into `out_dir`; returns manifests."""
    if invalid not in tok.POLICIES:
        raise DataError(f"--invalid must be one of {', '.join(tok.POLICIES)}, got {invalid!r}")
    splits = {"train": path_list(inputs), "valid": path_list(valid), "test": path_list(test)}
    splits = {k: v for k, v in splits.items() if v}
    if "train" not in splits:
        raise DataError("no input given")
    for spec in (s for specs in splits.values() for s in specs):
        input_kind(spec)  # missing files fail before any work starts
    out = Path(out_dir)
    check_output_dir(out, overwrite, [s for specs in splits.values() for s in specs])
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)  # what a killed earlier run left behind
    tmp = temp_sibling(out)
    tmp.mkdir()
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    bar = tqdm(
        total=None, unit=" res", unit_scale=True, disable=not progress, file=sys.stderr, desc="prepare", delay=1.0
    )
    try:
        manifests = {}
        for split, specs in splits.items():
            manifests[split] = _prepare_split(
                specs, tmp / split, column, id_column, invalid, pool, 2 * workers, shard_size, bar, command
            )
        if pool is not None:
            pool.terminate()
            pool = None
        outputs.mark_output(tmp, "data prepare")
        swap_into_place(tmp, out, overwrite)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is None or str(tmp) in str(e.filename):  # no file named, or our temp one: name --out
            raise OSError(e.errno, e.strerror, str(out)) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return manifests


def _prepare_split(specs, split_dir, column, id_column, invalid, pool, window, shard_size, bar, command) -> dict:
    writer = SplitWriter(split_dir, shard_size)
    skipped = replaced = 0
    problems = []
    t0 = time.perf_counter()
    try:
        for spec in specs:
            encode = partial(encode_chunk, policy=invalid)
            for enc in _ordered_map(encode, chunks(spec, column, id_column), pool, window):
                writer.add(enc)
                skipped, replaced = skipped + enc.skipped, replaced + enc.replaced
                if enc.first_problem and len(problems) < 5:
                    problems.append(enc.first_problem)
                bar.update(int(enc.lengths.sum()))
    except BaseException:
        writer.abort()
        raise
    return writer.finish(
        sources=[file_fingerprint(s) for s in specs],
        normalisation={
            "uppercase": True,
            "trailing_stop_dropped": True,
            "invalid_policy": invalid,
            "skipped_records": skipped,
            "replaced_letters": replaced,
            "examples": problems,
        },
        command=" ".join(command) if command else "python: plmrun.data.prepare.prepare(...)",
        plmrun_version=plmrun.__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        seconds=round(time.perf_counter() - t0, 3),
    )


def swap_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished dataset into place; an old one is removed only afterwards."""
    if out.exists() and any(out.iterdir()) and not overwrite:  # appeared while we worked
        raise DataError(f"{out}: output directory appeared while preparing (not replaced)")
    replace_dir(tmp, out)
