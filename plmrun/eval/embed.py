"""Embeddings from a frozen model: mean/cls pooled or per-residue, in input order.

Sequences are cut into windows of at most max_length - 2 residues (plus <cls>/<eos>); a longer
sequence gets windows with stride (max_length - 2) / 2, the last one flush with the end, and
each residue's vector is the average over the windows that contain it (cls pooling averages the
windows' <cls> vectors). Windows are packed shortest first into batches of <= token_budget
tokens, so results do not depend on the order or the batch size beyond float rounding.
Mean pooling averages residues only; per-residue output drops <cls>/<eos>.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from plmrun import tokenizer as tok
from plmrun.atomic import atomic_path
from plmrun.data.packing import pack_tokens
from plmrun.data.readers import file_fingerprint
from plmrun.device import resolve_device
from plmrun.eval.errors import EvalError
from plmrun.eval.flags import add_device_flag, add_window_flags, check_window_flags
from plmrun.eval.inference import EvalModel, WindowAverage, load_eval_model, window_batches, window_plan
from plmrun.outputs import check_output_file, model_inputs

POOLS = ("mean", "cls", "per-residue")
CONTROL_SUFFIX = ".random-init"  # emb.safetensors -> emb.random-init.safetensors (--random-init-control)


def control_path(out: str | Path) -> Path:
    """Where `plmrun embed --random-init-control` writes the control's embeddings, beside OUT."""
    out = Path(out)
    return out.with_name(out.stem + CONTROL_SUFFIX + out.suffix)


@torch.no_grad()
def embed_sequences(
    model,
    sequences,
    *,
    pool: str = "mean",
    layer: int | None = None,
    token_budget: int = 8192,
    max_length: int | None = None,
    device=None,
):
    """Embed `sequences` (strings or residue-id arrays) with `model` (EvalModel or a PLM).

    Returns an [N, D] float32 array for mean/cls pooling, a list of [L_i, D] arrays for
    per-residue. `layer` indexes hidden_states (0 = embedding output, -1 = final, the default);
    a tuple of indices gives those hidden states side by side ([N, len(layer) * D]) from one pass.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    net = model.net if isinstance(model, EvalModel) else model
    if max_length is not None and token_budget < max_length:
        raise ValueError(f"token_budget ({token_budget}) must be >= max_length ({max_length})")
    device = torch.device(device) if device is not None else next(net.parameters()).device
    ids = [np.asarray(s, dtype=np.uint8) if not isinstance(s, (str, bytes)) else tok.encode(s) for s in sequences]
    for i, s in enumerate(ids):
        if len(s) == 0:
            raise ValueError(f"sequence {i} is empty")
    width, token_budget = window_plan(model, max_length, [len(x) for x in ids], token_budget)
    average = WindowAverage([len(x) for x in ids], width, per_residue=pool != "cls")
    results: list = [None] * len(ids)  # pooled vectors (or per-residue arrays) of finished sequences
    layer_ids = [-1 if layer is None else layer] if not isinstance(layer, (tuple, list)) else list(layer)
    for batch in window_batches(ids, width, token_budget):
        hs, cu = _hidden_states(net, [w.tokens for w in batch], device)
        for k in layer_ids:
            if not -len(hs) <= k < len(hs):
                raise ValueError(
                    f"layer {k} out of range: the model has {len(hs)} hidden states "
                    f"(0 = embedding output .. {len(hs) - 1} = final)"
                )
        h = torch.cat([hs[k] for k in layer_ids], dim=1).float().cpu().numpy()
        bounds = cu.tolist()
        for k, w in enumerate(batch):
            a, b = bounds[k], bounds[k + 1]
            r = average.add(w, h[a] if pool == "cls" else h[a + 1 : b - 1])
            if r is not None:  # the sequence's last window: pool now
                r = r.astype(np.float32)
                results[w.seq] = r if pool != "mean" else r.mean(0)
    return results if pool == "per-residue" else np.stack(results)


def _hidden_states(net, token_arrays: list, device) -> tuple:
    """Every hidden state of one packed forward (no logits), and the batch's cu_seqlens."""
    tokens, positions, cu, max_seqlen = pack_tokens(token_arrays, device)
    out = net(
        tokens,
        positions,
        cu,
        max_seqlen,
        logits_index=torch.zeros(0, dtype=torch.long, device=device),
        output_hidden_states=True,
    )
    return out.hidden_states, cu


@torch.no_grad()
def num_hidden_states(model) -> int:
    """How many hidden states `embed_sequences` can index (embedding output, each block, final)."""
    net = model.net if isinstance(model, EvalModel) else model
    hs, _ = _hidden_states(net, [tok.with_specials(tok.encode("MK"))], next(net.parameters()).device)
    return len(hs)


# ---------------------------------------------------------------- FASTA and output files
def read_fasta(path: str | Path) -> list[tuple[str, str]]:
    """(record id, sequence) pairs of a FASTA file (or any input `plmrun data` reads); the id is
    the header's first word and must be unique. Problems raise DataError naming the file."""
    from plmrun.data.errors import DataError
    from plmrun.data.readers import read_records

    records = [(name.split()[0] if name.strip() else "", seq) for name, seq, _ in read_records(str(path))]
    seen: dict = {}
    for k, (rid, _) in enumerate(records, 1):
        if not rid:
            raise DataError(f"{path}: record {k} has an empty header")
        if rid in seen:
            raise DataError(f"{path}: duplicate record id {rid!r} (records {seen[rid]} and {k})")
        seen[rid] = k
    if not records:
        raise DataError(f"{path}: no records")
    return records


def read_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    """An `plmrun embed` output file as {record id: array}, in input order."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), "np") as f:
        order = json.loads(f.metadata()["ids"])
    arrays = load_file(str(path))
    return {rid: arrays[rid] for rid in order}


def _save_atomic(arrays: dict, order: list[str], meta: dict, path: Path) -> None:
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file({k: arrays[k] for k in order}, str(tmp), metadata={**meta, "ids": json.dumps(order)})


def embed_fasta(
    model: EvalModel,
    fasta: str | Path,
    out: str | Path,
    *,
    pool: str = "mean",
    layer: int | None = None,
    token_budget: int = 8192,
    chunk_size: int = 2000,
    log=print,
) -> Path:
    """Embed a FASTA file into `out` (.safetensors), resumably.

    Chunks of `chunk_size` records are written to OUT.partial/ as they finish; a rerun with the
    same input and options skips finished chunks (other options are refused, never mixed). The
    final file is written atomically, then the partial folder is removed.
    """
    out = Path(out)
    records = read_fasta(fasta)
    meta = {
        "model": model.name,
        "pool": pool,
        "layer": str(-1 if layer is None else layer),
        "max_length": str(model.max_length),
        "input_sha256": file_fingerprint(fasta)["sha256"],
    }
    partial = out.with_name(out.name + ".partial")
    state_file = partial / "state.json"
    state = {**meta, "chunk_size": chunk_size, "n_records": len(records)}
    if state_file.is_file():
        old = json.loads(state_file.read_text())
        if old != state:
            diff = ", ".join(k for k in state if old.get(k) != state[k])
            raise EvalError(
                f"{partial}: unfinished run with different {diff}; rerun with the same options or delete that folder"
            )
    else:
        if partial.is_dir() and any(partial.iterdir()):  # removed when done: it must be ours
            raise EvalError(
                f"{partial}: exists and is not an unfinished embed of plmrun (no state.json); move it "
                "away or choose another --out"
            )
        partial.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(state, indent=1))
    chunks = range(0, len(records), chunk_size)
    for k, start in enumerate(chunks):
        path = partial / f"chunk_{k:06d}.safetensors"
        if path.is_file():
            continue
        part = records[start : start + chunk_size]
        vecs = embed_sequences(model, [s for _, s in part], pool=pool, layer=layer, token_budget=token_budget)
        _save_atomic(
            {rid: np.ascontiguousarray(v) for (rid, _), v in zip(part, vecs)}, [rid for rid, _ in part], meta, path
        )
        log(f"embedded {min(start + chunk_size, len(records))}/{len(records)} records")
    merged: dict = {}
    for k in range(len(chunks)):
        merged.update(read_embeddings(partial / f"chunk_{k:06d}.safetensors"))
    _save_atomic(merged, [rid for rid, _ in records], meta, out)
    shutil.rmtree(partial)
    return out


# ---------------------------------------------------------------- CLI
def add_embed_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "embed",
        help="embed the sequences of a FASTA file",
        description="Embeddings keyed by record id, in input order, as safetensors.",
    )
    p.add_argument("model", help="run directory, checkpoint, EsmForMaskedLM folder or hub name")
    p.add_argument("fasta", help="FASTA file (gzip/xz/bz2 allowed)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument(
        "--pool",
        choices=POOLS,
        default="mean",
        help="mean over residues (no specials), the <cls> vector, or one vector per residue",
    )
    p.add_argument(
        "--layer", type=int, default=None, help="index into hidden states: 0 = embedding output, -1 = final (default)"
    )
    add_window_flags(p, longer="longer sequences are averaged over windows")
    p.add_argument("--chunk-size", type=int, default=2000, help="records per resumable chunk")
    p.add_argument(
        "--random-init-control",
        action="store_true",
        help="also embed with the same architecture untrained (torch seed 0) into OUT with the "
        f"suffix {CONTROL_SUFFIX} (e.g. emb{CONTROL_SUFFIX}.safetensors), for your own downstream baseline",
    )
    add_device_flag(p)
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    from plmrun.config import check_at_least

    check_window_flags(args)
    check_at_least(args.chunk_size, 1, "--chunk-size", " (records per resumable chunk)")
    if not Path(args.fasta).exists():
        raise EvalError(f"embed: {args.fasta}: no such FASTA file; check the path")
    from plmrun.data.readers import input_kind

    if input_kind(args.fasta) in ("csv", "tsv", "parquet"):
        raise EvalError(
            f"embed: {args.fasta}: a table; embed reads FASTA: write one '>id' line and its "
            f"sequence per record (plmrun data reads tables for training)"
        )
    if Path(args.out).is_dir():
        raise EvalError(
            f"embed: --out {args.out}: is a folder; give a file path such as {Path(args.out) / 'emb.safetensors'}"
        )
    if not Path(args.out).resolve().parent.is_dir():
        raise EvalError(
            f"embed: --out {args.out}: folder {Path(args.out).parent} does not exist; create it or choose another path"
        )
    reads = [args.fasta, *model_inputs(args.model)]
    for out in [args.out, *([control_path(args.out)] if args.random_init_control else [])]:
        check_output_file(out, reads, error=EvalError)
    model = load_eval_model(args.model, device=resolve_device(args.device), max_length=args.max_length)
    n = num_hidden_states(model)
    if args.layer is not None and not -n <= args.layer < n:
        raise EvalError(
            f"embed: --layer {args.layer} out of range: the model has {n} hidden states "
            f"(0 = embedding output .. {n - 1} = final, -1 = final)"
        )
    jobs = [(model, Path(args.out))]
    if args.random_init_control:
        jobs.append((model.random_init(0), control_path(args.out)))
    for net, out in jobs:
        try:
            out = embed_fasta(
                net,
                args.fasta,
                out,
                pool=args.pool,
                layer=args.layer,
                token_budget=args.token_budget,
                chunk_size=args.chunk_size,
                log=lambda m: print(m, file=sys.stderr),
            )
        except ValueError as e:
            raise EvalError(f"embed: {e}") from None
        print(f"wrote {out}" + (" (random-init control: same architecture, torch seed 0)" if net is not model else ""))
    return 0
