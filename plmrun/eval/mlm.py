"""The one evaluation protocol, used by training evals, `plmrun eval` and the ESM comparison.

15% of residues (eval.mask_rate), all replaced by <mask>, never specials; sequences longer than
eval.max_length get one crop window; masks and windows are fixed by (eval seed, sequence index).
Loss is token-weighted over the whole split (Σ CE / Σ targets), metrics come from one confusion
matrix; both are summed over batches and ranks before anything is divided, so the result does not
depend on the batch size, the world size or the worker count.
"""

from __future__ import annotations

import contextlib

import torch

from plmrun.config import EvalConfig
from plmrun.data.loader import EvalBatches
from plmrun.dist import get_rank, get_world_size, max_over_ranks
from plmrun.eval.metrics import MetricSums
from plmrun.tokenizer import PAD


def eval_batches(
    source,
    cfg: EvalConfig,
    *,
    subset: int = 0,
    token_budget: int | None = None,
    world_size: int | None = None,
    rank: int | None = None,
) -> EvalBatches:
    """The fixed-mask batches of `source` for this rank (all of them when world_size == 1)."""
    ws, rk = get_world_size(), get_rank()
    return EvalBatches(
        source,
        token_budget=token_budget or cfg.token_budget,
        max_length=cfg.max_length,
        eval_seed=cfg.seed,
        mask_rate=cfg.mask_rate,
        subset=subset,
        windows=cfg.windows,
        world_size=ws if world_size is None else world_size,
        rank=rk if rank is None else rank,
    )


@torch.no_grad()
def evaluate(
    model,
    source,
    cfg: EvalConfig,
    *,
    subset: int = 0,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    token_budget: int | None = None,
    world_size: int | None = None,
    rank: int | None = None,
    batches=None,
    unigram: torch.Tensor | None = None,
    per_sequence: bool = False,
) -> dict:
    """Evaluate `model` (anything with the PLM forward signature) under the one protocol.

    `unigram` (log p [V], `metrics.unigram_log_probs`) adds unigram_loss and gain on the same targets;
    `per_sequence` adds "per_sequence": (Σ CE, targets) per evaluated sequence as arrays (bootstraps).
    Every rank must call this (it all-reduces). Ranks whose share has fewer batches than others
    run the forward on their last batch with zero weight, so sharded (FSDP) models stay in step.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    batches = list(
        batches
        if batches is not None
        else eval_batches(source, cfg, subset=subset, token_budget=token_budget, world_size=world_size, rank=rank)
    )
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    n_seq = (len(source) if subset <= 0 else min(subset, len(source))) if per_sequence else None
    sums = accumulate(
        model, batches, device, amp, max_over_ranks(len(batches), device), unigram=unigram, num_sequences=n_seq
    )
    sums.all_reduce()
    if was_training:
        model.train()
    out = sums.compute()
    if per_sequence:
        out["per_sequence"] = (sums.seq_loss.cpu().numpy(), sums.seq_weight.cpu().numpy())
    return out


def accumulate(
    model,
    batches: list,
    device: torch.device,
    amp=None,
    n_batches: int | None = None,
    *,
    unigram: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> MetricSums:
    """Metric sums of `batches` on this rank (no communication); n_batches >= len(batches) pads with idle forwards."""
    amp = amp or contextlib.nullcontext()
    sums = MetricSums.zeros(device, unigram_logp=unigram, num_sequences=num_sequences)
    for i in range(len(batches) if n_batches is None else n_batches):
        if i >= len(batches):  # this rank's share is used up: a throw-away forward keeps FSDP collectives in step
            with amp:
                model(*_idle_batch(device))
            continue
        mb = batches[i]
        p = mb.packed
        tokens = mb.inputs.to(device, non_blocking=True)
        targets = mb.targets.to(device, non_blocking=True)
        index = (targets != -100).nonzero().squeeze(1)
        with amp:
            out = model(tokens, p.positions.to(device), p.cu_seqlens.to(device), p.max_seqlen, logits_index=index)
        seq = _target_sequences(p, index) if num_sequences is not None else None
        sums.add(out.logits, targets[index], mb.loss_weights.to(device)[index], mb.normalizer, seq=seq)
    return sums


def _target_sequences(p, index: torch.Tensor) -> torch.Tensor:
    """Dataset sequence index of each target position (targets lie in real segments only)."""
    seg_len = (p.cu_seqlens[1:] - p.cu_seqlens[:-1])[: p.num_sequences].long()
    of_token = torch.repeat_interleave(p.seq_index.long(), seg_len)
    return of_token.to(index.device)[index]


def _idle_batch(device) -> tuple:
    """One short all-<pad> sequence in the packed forward's argument order."""
    n = 8
    return (
        torch.full((n,), PAD, dtype=torch.long, device=device),
        torch.arange(n, device=device),
        torch.tensor([0, n], dtype=torch.int32, device=device),
        n,
    )


UNIGRAM_FILE = "unigram.json"
"Residue counts of a run's training split, written by the trainer at setup (the unigram baseline)."


def write_unigram(run_dir, counts, source: str) -> None:
    """Record `counts` [V] (residue occurrences) and what they were counted on in RUN/unigram.json."""
    from pathlib import Path

    from plmrun.atomic import write_json
    from plmrun.eval.metrics import counts_to_letters

    write_json(
        Path(run_dir) / UNIGRAM_FILE,
        {"source": source, "smoothing": "add-one over residue letters", "counts": counts_to_letters(counts)},
        indent=1,
    )


def read_unigram(run_dir):
    """Counts [V] from RUN/unigram.json, or None for a run trained before it was written."""
    import json
    from pathlib import Path

    from plmrun.eval.errors import EvalError
    from plmrun.eval.metrics import letters_to_counts

    path = Path(run_dir) / UNIGRAM_FILE
    if not path.is_file():
        return None
    try:
        return letters_to_counts(json.loads(path.read_text())["counts"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise EvalError(
            f"{path}: unreadable ({type(e).__name__}: {e}); delete it to use the eval data's frequencies instead"
        ) from None
