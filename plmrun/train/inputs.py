"""What a training run reads: its prepared dataset's splits, its packed micro-batch stream and the
gradient accumulation that gives the configured global batch on this world size."""

from __future__ import annotations

from pathlib import Path

import torch

from plmrun.config import Config, ConfigError
from plmrun.train.parallelize import DistEnv
from plmrun.train.state import TrainingError


def open_training_data(cfg: Config, env: DistEnv):
    from plmrun.data.corpus import resolve_dataset
    from plmrun.data.shards import open_dataset

    # Rank 0 prepares the shipped corpus on first use; the others wait and reuse it.
    wait = cfg.data.dataset == "bundled" and env.world_size > 1
    if wait and not env.is_main:
        torch.distributed.barrier()
    path = resolve_dataset(cfg.data.dataset)
    if wait and env.is_main:
        torch.distributed.barrier()
    require_splits(cfg, path)
    return path, open_dataset(path, cfg.data.train_split), open_dataset(path, cfg.data.valid_split)


def require_splits(cfg: Config, path) -> None:
    """The splits training needs (train, valid, and the test split of eval.final_test), checked before any
    shard opens: a dataset prepared from one input has only 'train', so say how to get a valid split."""
    from plmrun.data.errors import DataError
    from plmrun.data.shards import dataset_splits

    if not Path(path).is_dir():  # a missing directory: open_dataset names it
        return
    splits = dataset_splits(path)
    for key in ("train_split", "valid_split"):
        split = getattr(cfg.data, key)
        if split not in splits:
            raise DataError(
                f"{path}: no '{split}' split for data.{key} (splits: {', '.join(splits) or 'none'}); "
                f"make one with `plmrun data split FILE --out DIR` (homology split, then prepare its "
                f"train/valid FASTA) or `plmrun data prepare TRAIN --valid VALID --out {path} "
                f"--overwrite`, or set --data.{key}=NAME to an existing split"
            )
    if cfg.eval.final_test and cfg.data.test_split not in splits:
        raise DataError(
            f"{path}: no '{cfg.data.test_split}' split for eval.final_test (splits: "
            f"{', '.join(splits) or 'none'}); set data.test_split to one of them or eval.final_test=false"
        )


def build_train_loader(cfg: Config, env: DistEnv, train_src):
    """This rank's packed, masked, prefetching micro-batch stream as configured."""
    from plmrun.data.loader import TrainLoader
    from plmrun.data.masking import Masker

    return TrainLoader(
        train_src,
        token_budget=cfg.data.token_budget,
        max_length=cfg.data.max_length,
        seed=cfg.train.seed,
        world_size=env.world_size,
        rank=env.rank,
        grad_accum=cfg.train.grad_accum,
        masker=Masker.from_config(cfg.masking),
        prefetch=cfg.data.prefetch,
        num_workers=cfg.data.num_workers,
        pin_memory=env.device.type == "cuda",
        device=env.device,
        max_length_schedule=cfg.data.max_length_schedule,
    )


def grad_accum_for(cfg: Config, world_size: int) -> int:
    """train.grad_accum on this world size: derived from train.global_batch_tokens when set, so one YAML
    gives the same global batches on 1, 4 or 8 ranks (validate() already checked token_budget divides it)."""
    t = cfg.train
    budget = cfg.data.token_budget
    if not t.global_batch_tokens:
        return t.grad_accum
    micro = t.global_batch_tokens // budget
    if micro % world_size:
        raise ConfigError(
            f"train.global_batch_tokens ({t.global_batch_tokens}) is {micro} micro-batches of "
            f"data.token_budget ({budget}), which {world_size} ranks cannot share evenly; use a "
            f"multiple of {budget * world_size} tokens or another world size"
        )
    return micro // world_size


def open_test_split(cfg: Config, path):
    """The data.test_split of a prepared dataset for eval.final_test (its presence checked by require_splits)."""
    from plmrun.data.shards import open_dataset

    return open_dataset(path, cfg.data.test_split)


def resume_grad_accum(saved: dict, world_size: int, grad_accum: int, path: Path, verbose: bool = False) -> int:
    """grad_accum that keeps the checkpoint's global batch stream (world_size × grad_accum) on this world size.

    The loader's stream position only depends on that product, so a run pre-empted on 8 GPUs can
    continue exactly on 4 with twice the accumulation. A product the world size does not divide
    is refused: it would change the global batch.
    """
    product = saved["world_x_accum"]
    if product == world_size * grad_accum:
        return grad_accum
    if product % world_size:
        raise TrainingError(
            f"{path}: checkpoint used world_size × grad_accum = {product}, which {world_size} ranks "
            f"cannot reproduce; resume on a world size that divides {product}"
        )
    if verbose:
        print(
            f"plmrun: resuming on {world_size} ranks with grad_accum {product // world_size} (was "
            f"world_size × grad_accum = {product}): the same global batches",
            flush=True,
        )
    return product // world_size
