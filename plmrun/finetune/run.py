"""`plmrun finetune`: LoRA or full fine-tuning of any loadable model on a labelled table.

A linear task head reads the final hidden state: mean-pooled residues (sequence classification or
regression) or each residue (per-residue classification). Training batches are packed to a token
budget by `plmrun.data.packing` (random crops of long sequences); validation and test score every
residue by averaging the head's outputs over windows, as `plmrun embed` averages embeddings.
Validation every `eval_every` steps picks the best weights and stops after `patience` passes without
improvement; each pass also saves a checkpoint (plmrun.checkpoint parts), so a rerun of the same
command continues exactly where it stopped (SIGTERM/SIGINT save one too). The test report has
`plmrun probe`'s form, with the frozen model's logistic probe (probe's own code) beside the
fine-tuned model, paired over the same test items. The LoRA weights are merged and the model is
written as a saved model (RUN/model) and a Hugging Face folder (RUN/hf, `plmrun export`'s writer).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from plmrun import checkpoint as ckpt
from plmrun import tokenizer as tok
from plmrun.config import OptimConfig
from plmrun.data.packing import PackingPlan, pack, pack_tokens
from plmrun.eval.inference import EvalModel, WindowAverage, load_eval_model, window_batches
from plmrun.eval.probe import TASKS, Task, fit_and_score, model_features, paired_difference, score_row
from plmrun.optim.build import Optimizers
from plmrun.errors import PlmrunError
from plmrun.manifest import follow_umask
from plmrun.train.rundir import RunLock, write_json_atomic

from .config import FinetuneConfig, to_dict
from .data import FinetuneData, check_position_limit, load_data


class FinetuneError(PlmrunError, RuntimeError):
    """A fine-tuning run that cannot proceed as asked (the message says what to do)."""


class TaskModel(nn.Module):
    """The pretrained network plus a linear task head on its final hidden state."""

    def __init__(self, net: nn.Module, num_outputs: int, per_residue: bool):
        super().__init__()
        self.net, self.per_residue = net, per_residue
        self.task_head = nn.Linear(net.cfg.hidden_size, num_outputs)

    def forward(self, tokens, positions, cu, max_seqlen, rows, seg, n_seg):
        """Outputs per residue row (per-residue tasks) or per segment (mean of its residue rows)."""
        empty = torch.zeros(0, dtype=torch.long, device=tokens.device)
        h = self.net(tokens, positions, cu, max_seqlen, logits_index=empty, output_hidden_states=True).hidden_states[-1]
        h = h[rows].float()
        if not self.per_residue:
            sums = torch.zeros(n_seg, h.shape[1], device=h.device).index_add_(0, seg, h)
            h = sums / torch.bincount(seg, minlength=n_seg).clamp_min(1)[:, None]
        return self.task_head(h)


def residue_rows(cu: list[int], n_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of the residues of the first n_seq segments (no <cls>/<eos>) and their segment ids."""
    rows = [np.arange(cu[k] + 1, cu[k + 1] - 1) for k in range(n_seq)]
    seg = [np.full(len(r), k) for k, r in enumerate(rows)]
    return torch.from_numpy(np.concatenate(rows)).long(), torch.from_numpy(np.concatenate(seg)).long()


class _Residues:
    """The `source` interface `packing.pack` reads (residue ids of sequence i)."""

    def __init__(self, seqs: list[str]):
        self.ids = [tok.encode(s) for s in seqs]

    def residues(self, i: int) -> np.ndarray:
        return self.ids[i]


# ------------------------------------------------------------------ model
def build_task_model(cfg: FinetuneConfig, data: FinetuneData, device) -> tuple[nn.Module, EvalModel]:
    """(model to train: the task model, LoRA-wrapped for method lora; the loaded model)."""
    loaded = load_eval_model(cfg.model, device=device)
    check_position_limit(data, cfg, loaded.config.arch)
    torch.manual_seed(cfg.seed)
    model = TaskModel(loaded.net, data.num_outputs, data.per_residue).to(device)
    for name, p in model.net.named_parameters():   # the MLM head gets no gradient from the task: frozen
        if name.startswith(model.net.head_prefixes):
            p.requires_grad_(False)
    if cfg.method == "full":
        return model, loaded
    names = {n.rsplit(".", 1)[-1] for n, m in model.net.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in cfg.lora_targets if t not in names]
    if missing:
        raise FinetuneError(f"finetune: lora_targets {missing} are not linear layers of {cfg.model} "
                            f"(its linear layers: {', '.join(sorted(names))})")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise FinetuneError("finetune: method lora needs peft (pip install 'plmrun[finetune]'), or use "
                            "--method full") from None
    pattern = r"net\..*\.(" + "|".join(cfg.lora_targets) + r")$"
    peft_model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                  target_modules=pattern))
    for p in model.task_head.parameters():   # peft freezes all but the adapters
        p.requires_grad_(True)
    return peft_model, loaded


def _task_model(model: nn.Module) -> TaskModel:
    return model if isinstance(model, TaskModel) else model.base_model.model


def build_optimizers(model: nn.Module, cfg: FinetuneConfig) -> Optimizers:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [dict(params=[p for _, p in named if (p.ndim >= 2) == decay], name=name, base_lr=cfg.lr, lr=cfg.lr,
                   weight_decay=cfg.weight_decay if decay else 0.0)
              for decay, name in ((True, "adamw"), (False, "adamw_no_decay"))]
    ocfg = OptimConfig(optimizer="adamw", lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay,
                       schedule="constant", warmup=float(cfg.warmup))
    return Optimizers([torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.98))], ocfg,
                      cfg.max_steps, model)


# ------------------------------------------------------------------ scoring
def window_tokens(cfg: FinetuneConfig, data: FinetuneData) -> int:
    """Tokens per window incl. <cls>/<eos>: max_length, or the longest sequence + 2 when it is 0."""
    if cfg.max_length:
        return cfg.max_length
    return max(len(s) for sp in (data.train, data.valid, data.test) for s in sp.seqs) + 2


@torch.no_grad()
def predict(model: nn.Module, seqs: list[str], per_residue: bool, width: int, token_budget: int, device) -> list:
    """Head outputs per sequence ([C]) or per residue ([L, C]), averaged over the windows covering them."""
    ids = [tok.encode(s) for s in seqs]
    average = WindowAverage([len(x) for x in ids], width - 2, per_residue)
    results: list = [None] * len(ids)
    for batch in window_batches(ids, width - 2, token_budget):
        tokens, positions, cu, max_seqlen = pack_tokens([w.tokens for w in batch], device)
        rows, seg = residue_rows(cu.tolist(), len(batch))
        out = model(tokens, positions, cu, max_seqlen, rows.to(device), seg.to(device), len(batch))
        out = out.double().cpu().numpy()
        offset = 0
        for k, w in enumerate(batch):
            if per_residue:
                r = average.add(w, out[offset:offset + w.residues])
                offset += w.residues
            else:
                r = average.add(w, out[k])
            if r is not None:
                results[w.seq] = r
    return results


def score(data: FinetuneData, outputs: list, labels: list, norm: tuple[float, float]) -> tuple[float, np.ndarray]:
    """(metric, per-item correctness or None): accuracy (per residue for residue tasks) or Spearman's rho."""
    if data.kind == "regression":
        pred = np.array([o[0] for o in outputs]) * norm[1] + norm[0]
        return spearman(pred, np.asarray(labels, dtype=np.float64)), None
    if data.per_residue:
        right = np.concatenate([o.argmax(1) == y for o, y in zip(outputs, labels)])
    else:
        right = np.array([o.argmax() == y for o, y in zip(outputs, labels)])
    right = right.astype(np.float64)
    return float(right.mean()), right


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (scipy; average ranks for ties); 0 when either side is constant."""
    try:
        from scipy.stats import spearmanr
    except ImportError:
        raise FinetuneError("finetune: a regression task is scored by Spearman's rho, which needs scipy "
                            "(pip install 'plmrun[probe]')") from None
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def metric_name(data: FinetuneData) -> str:
    if data.kind == "regression":
        return "spearman"
    return "Q3 accuracy" if data.bundled and data.name == "secondary_structure" else "accuracy"


# ------------------------------------------------------------------ run directory
def open_run_dir(cfg: FinetuneConfig) -> tuple[Path, RunLock]:
    """RUN_ROOT/NAME: created, or reopened when it holds the same config and has not finished."""
    name = cfg.name or f"{Path(cfg.task).name.split('.')[0]}-{cfg.method}"
    path = Path(cfg.run_root) / name
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path.exists():
        saved = path / "config.yaml"
        if not saved.is_file():
            raise FinetuneError(f"{path}: exists but is not a fine-tuning run directory; choose another --name")
        if (path / "summary.json").is_file():
            raise FinetuneError(f"{path}: this fine-tuning run already finished; choose another --name")
        if yaml.safe_load(saved.read_text()) != yaml.safe_load(text):
            raise FinetuneError(f"{path}: exists with a different config; rerun with that config to continue it "
                                "or choose another --name")
    else:
        path.mkdir(parents=True)
        (path / "config.yaml").write_text(text)
    return path, RunLock(path)


def _save_weights(model: nn.Module, file: Path) -> None:
    from safetensors.torch import save_file
    tmp = file.with_name(file.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(tmp))
    follow_umask(tmp)
    os.replace(tmp, file)


def _load_weights(model: nn.Module, file: Path) -> None:
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(file)), strict=True)


# ------------------------------------------------------------------ training
def finetune(cfg: FinetuneConfig, *, device="cpu", log=None) -> dict:
    """Train (or continue) the run of `cfg`; returns the report (probe's results form) plus exit_code."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    data = load_data(cfg)
    device = torch.device(device)
    model, loaded = build_task_model(cfg, data, device)
    opt = build_optimizers(model, cfg)
    run, lock = open_run_dir(cfg)
    try:
        return _train(cfg, data, model, loaded, opt, run, device, log)
    finally:
        lock.release()


def _train(cfg, data, model, loaded, opt, run, device, log) -> dict:
    from plmrun.train.checkpointer import Checkpointer
    from plmrun.train.rundir import truncate_metrics
    from plmrun.train.stopping import StopFlag, inject_fault
    width = window_tokens(cfg, data)
    train_y = data.train.labels
    norm = (0.0, 1.0)
    if data.kind == "regression":
        y = np.asarray(train_y, dtype=np.float64)
        norm = (float(y.mean()), float(y.std()) or 1.0)
    source = _Residues(data.train.seqs)
    plan = PackingPlan(np.array([len(s) for s in source.ids]), token_budget=cfg.token_budget, max_length=width,
                       seed=cfg.seed, chunk_bins=16)
    state = {"step": 0, "epoch": 0, "chunk": 0, "bin": 0, "best_metric": None, "best_step": 0, "bad_evals": 0}
    checkpointer = Checkpointer(run, cfg.eval_every, cfg.keep_latest_k,
                                {"model": ckpt.ModelState(model), "optimizers": opt, "trainer": ckpt.DictState(state),
                                 "rng": ckpt.RNGState()})
    latest = checkpointer.latest()
    metrics_file = run / "metrics.jsonl"
    if latest is not None:
        checkpointer.load(latest)
        truncate_metrics(run, state["step"])
        log(f"continuing {run} from step {state['step']}")
    else:
        metrics_file.write_text("")
    best_file = run / "best.safetensors"
    t0, tokens_seen, exit_code = time.perf_counter(), 0, 0
    model.train()
    with StopFlag() as stop, open(metrics_file, "a") as metrics:
        while state["step"] < cfg.max_steps:
            bins = plan.bins(state["epoch"], state["chunk"])
            if state["bin"] >= len(bins):
                state["bin"], state["chunk"] = 0, state["chunk"] + 1
                if state["chunk"] >= plan.num_chunks:
                    state["chunk"], state["epoch"] = 0, state["epoch"] + 1
                continue
            idx = bins[state["bin"]]
            loss = _step(model, opt, data, source, plan, idx, state, cfg, width, norm, device)
            state["step"] += 1
            state["bin"] += 1
            step = state["step"]
            tokens_seen += int(sum(min(len(source.ids[i]), width - 2) + 2 for i in idx))
            record = {"kind": "train", "step": step, "epoch": state["epoch"], "loss": loss}
            metrics.write(json.dumps(record) + "\n")
            if step % 10 == 0 or step == 1:
                rate = tokens_seen / max(time.perf_counter() - t0, 1e-9)
                log(f"step {step}/{cfg.max_steps} epoch {state['epoch']} loss {loss:.4f} {rate:,.0f} tok/s")
            done = False
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                outputs = predict(model, data.valid.seqs, data.per_residue, width, cfg.token_budget, device)
                value, _ = score(data, outputs, data.valid.labels, norm)
                model.train()
                better = state["best_metric"] is None or value > state["best_metric"]
                if better:
                    state["best_metric"], state["best_step"], state["bad_evals"] = value, step, 0
                    _save_weights(model, best_file)
                else:
                    state["bad_evals"] += 1
                done = bool(cfg.patience) and state["bad_evals"] >= cfg.patience
                metrics.write(json.dumps({"kind": "valid", "step": step, metric_name(data): value,
                                          "best": state["best_metric"], "best_step": state["best_step"]}) + "\n")
                metrics.flush()
                log(f"step {step}: valid {metric_name(data)} {value:.4f} (best {state['best_metric']:.4f} at "
                    f"step {state['best_step']}{', stopping early' if done else ''})")
                checkpointer.save(step)
            metrics.flush()
            if done:
                break
            inject_fault(step, 0, model)
            if stop.signal is not None:
                if checkpointer.last_saved != step:
                    checkpointer.save(step)
                log(f"stopped by signal {int(stop.signal)} at step {step}: rerun the same command to continue")
                exit_code = 128 + int(stop.signal)
                return {"stopped": f"signal {int(stop.signal)}", "exit_code": exit_code, "run": str(run)}
    return _finish(cfg, data, model, loaded, run, width, norm, state, device, log)


def _step(model, opt, data, source, plan, idx, state, cfg, width, norm, device) -> float:
    crops = plan.crops(state["epoch"], idx)
    batch = pack(source, idx, crops, token_budget=cfg.token_budget, max_length=width).to(device)
    rows, seg = residue_rows(batch.cu_seqlens.tolist(), batch.num_sequences)
    out = model(batch.tokens, batch.positions, batch.cu_seqlens, batch.max_seqlen, rows.to(device), seg.to(device),
                batch.num_sequences)
    labels = data.train.labels
    if data.per_residue:
        y = np.concatenate([labels[i][s:s + width - 2] for i, s in zip(idx.tolist(), crops.tolist())])
        loss = nn.functional.cross_entropy(out, torch.from_numpy(y).to(device))
    elif data.kind == "regression":
        y = (np.array([labels[i] for i in idx.tolist()]) - norm[0]) / norm[1]
        loss = nn.functional.mse_loss(out[:, 0], torch.from_numpy(y).float().to(device))
    else:
        y = np.array([labels[i] for i in idx.tolist()], dtype=np.int64)
        loss = nn.functional.cross_entropy(out, torch.from_numpy(y).to(device))
    opt.set_step(state["step"])
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def _finish(cfg, data, model, loaded, run, width, norm, state, device, log) -> dict:
    """Best weights -> test report beside the frozen probe; merged model saved and exported; summary.json."""
    _load_weights(model, run / "best.safetensors")
    model.eval()
    outputs = predict(model, data.test.seqs, data.per_residue, width, cfg.token_budget, device)
    value, right = score(data, outputs, data.test.labels, norm)
    label = f"fine-tuned {cfg.method}"
    rows = {label: score_row([value])}
    minus = {}
    t0 = time.perf_counter()
    if cfg.probe_seeds and data.kind != "regression":
        frozen = load_eval_model(cfg.model, device=device, max_length=width)
        task = replace(TASKS[data.name], max_train=cfg.max_train, max_test=cfg.max_test) if data.bundled \
            else Task(data.name, data.per_residue, cfg.max_train, cfg.max_test, 20000 if data.per_residue else 0)
        budget = max(cfg.token_budget, width)
        feats = [model_features(frozen, s, data.per_residue, budget) for s in (data.train.seqs, data.test.seqs)]
        fit = fit_and_score(task, feats[0], data.train.labels, feats[1], data.test.labels,
                            range(cfg.probe_seeds), "logistic")
        rows["frozen probe"] = score_row(fit.scores)
        sizes = [len(y) for y in data.test.labels] if data.per_residue else None
        minus["frozen probe"] = paired_difference(right, fit.correct, sizes)
    report = {"model": cfg.model, "head": "logistic", "layer": -1, "seeds": list(range(cfg.probe_seeds)),
              "max_length": width,
              "note": f"fine-tuned {state['step']} steps, weights of step {state['best_step']} (best validation "
                      f"{metric_name(data)} {state['best_metric']:.4f}); run {run}",
              "tasks": {data.name: {"metric": metric_name(data), "classes": len(data.classes),
                                    "n_train": len(data.train.seqs), "n_test": len(data.test.seqs),
                                    "n_test_residues": int(sum(len(s) for s in data.test.seqs)),
                                    "rows": rows, "model_minus": minus}},
              "time_s": round(time.perf_counter() - t0, 1)}
    tm = _task_model(model.merge_and_unload() if cfg.method == "lora" else model)
    from plmrun.model.loading import save_model_dir
    save_model_dir(run / "model", tm.net.state_dict(), loaded.config)
    _save_weights(tm.task_head, run / "task_head.safetensors")
    (run / "task_head.json").write_text(json.dumps({"kind": data.kind, "classes": data.classes,
                                                    "target_mean_std": list(norm)}, indent=1) + "\n")
    if cfg.export:
        from plmrun.eval.export import export
        export(run / "model", run / "hf", overwrite=True)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    write_json_atomic(run / "summary.json", {**report, "steps": state["step"], "best_step": state["best_step"]})
    return {**report, "exit_code": 0, "run": str(run)}
