"""`plmrun finetune`: LoRA or full fine-tuning of any loadable model on a labelled table, on the trainer's loop.

A linear task head reads the final hidden state: mean-pooled residues (sequence classification or
regression) or each residue (per-residue classification). `FinetuneTrainer` is the pretraining
`Trainer` with a task head, a summed task loss, a labelled packed stream (`plmrun.data.packing`, random
crops of long sequences) and a validation evaluator, so fine-tuning gets what training has: torchrun
DDP (the same global batches on any world size × grad_accum), max_time, TensorBoard/W&B, a progress
bar, SIGTERM/SIGINT checkpoints and an exact resume by rerunning the same command. Validation and
test score every residue by averaging the head's outputs over windows (`eval.inference`, as `plmrun
embed` does). Validation every `eval_every` steps keeps the best weights, saves a checkpoint, and
stops after `patience` passes without improvement. The test report has `plmrun probe`'s form, with the
frozen model's logistic probe (probe's own code) beside the fine-tuned model, paired over the same test
items. The LoRA weights are merged and the model is written as a saved model (RUN/model) and a
Hugging Face folder (RUN/hf, `plmrun export`'s writer).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from plmrun import checkpoint as ckpt
from plmrun import tokenizer as tok
from plmrun.config import Config, LoggingConfig, ModelConfig, OptimConfig, TrainConfig
from plmrun.data.packing import PackedBatch, PackingPlan, pack, pack_tokens
from plmrun.errors import PlmrunError
from plmrun.eval.inference import EvalModel, WindowAverage, load_eval_model, window_batches
from plmrun.eval.probe import TASKS, Task, fit_and_score, model_features, paired_difference, score_row
from plmrun.manifest import follow_umask
from plmrun.optim.build import Optimizers
from plmrun.train.checkpointer import Checkpointer
from plmrun.train.parallelize import init_distributed
from plmrun.train.peak import stable_peak
from plmrun.train.rundir import MetricsLog, RunLock, claim_run_dir, truncate_metrics, write_json_atomic
from plmrun.train.state import TrainState
from plmrun.train.stopping import StopFlag, StopReason
from plmrun.train.trainer import Trainer, from_rank0, run_to_end

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
    for name, p in model.net.named_parameters():  # the MLM head gets no gradient from the task: frozen
        if name.startswith(model.net.head_prefixes):
            p.requires_grad_(False)
    if cfg.method == "full":
        return model, loaded
    names = {n.rsplit(".", 1)[-1] for n, m in model.net.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in cfg.lora_targets if t not in names]
    if missing:
        raise FinetuneError(
            f"finetune: lora_targets {missing} are not linear layers of {cfg.model} "
            f"(its linear layers: {', '.join(sorted(names))})"
        )
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise FinetuneError(
            "finetune: method lora needs peft (pip install 'plmrun[finetune]'), or use --method full"
        ) from None
    pattern = r"net\..*\.(" + "|".join(cfg.lora_targets) + r")$"
    peft_model = get_peft_model(
        model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=pattern)
    )
    for p in model.task_head.parameters():  # peft freezes all but the adapters
        p.requires_grad_(True)
    return peft_model, loaded


def _task_model(model: nn.Module) -> TaskModel:
    return model if isinstance(model, TaskModel) else model.base_model.model


def build_optimizers(model: nn.Module, cfg: FinetuneConfig) -> Optimizers:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        dict(
            params=[p for _, p in named if (p.ndim >= 2) == decay],
            name=name,
            base_lr=cfg.lr,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay if decay else 0.0,
        )
        for decay, name in ((True, "adamw"), (False, "adamw_no_decay"))
    ]
    return Optimizers(
        [torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.98))],
        _optim_config(cfg),
        cfg.max_steps,
        model,
    )


def _optim_config(cfg: FinetuneConfig) -> OptimConfig:
    """AdamW, linear warm-up then a constant LR."""
    return OptimConfig(
        optimizer="adamw",
        lr=cfg.lr,
        betas=(0.9, 0.98),
        weight_decay=cfg.weight_decay,
        schedule="constant",
        warmup=float(cfg.warmup),
    )


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
                r = average.add(w, out[offset : offset + w.residues])
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
        raise FinetuneError(
            "finetune: a regression task is scored by Spearman's rho, which needs scipy (pip install 'plmrun[probe]')"
        ) from None
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def metric_name(data: FinetuneData) -> str:
    if data.kind == "regression":
        return "spearman"
    return "Q3 accuracy" if data.bundled and data.name == "secondary_structure" else "accuracy"


# ------------------------------------------------------------------ run directory
def open_run_dir(cfg: FinetuneConfig) -> tuple[Path, RunLock]:
    """RUN_ROOT/NAME: created, or reopened when it holds the same config and has not finished (rundir's rule)."""
    path = Path(cfg.run_root) / (cfg.name or f"{Path(cfg.task).name.split('.')[0]}-{cfg.method}")
    claim_run_dir(
        path,
        yaml.safe_dump(to_dict(cfg), sort_keys=False),
        rerun="rerun with that config to continue it",
        name_flag="--name",
    )
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
def finetune(cfg: FinetuneConfig, *, device: str = "cpu", log=None) -> dict:
    """Train (or continue) the run of `cfg` on the trainer's loop (torchrun: DDP over the ranks); returns the
    report (probe's results form, on rank 0) plus exit_code."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    held = []  # rank 0's lock on the run directory
    try:
        return run_to_end(FinetuneTrainer(cfg, device, log, held))
    finally:
        for lock in held:
            lock.release()


def trainer_config(cfg: FinetuneConfig, model: ModelConfig, device: str) -> Config:
    """The trainer's settings for a fine-tuning run: its steps, seed, clock, evals, checkpoints and logging
    (fp32; the pretraining loss guards off: the task loss is not a masked-LM loss)."""
    c = Config(model=model, optim=_optim_config(cfg))
    c.train = TrainConfig(
        max_steps=cfg.max_steps,
        grad_accum=cfg.grad_accum,
        max_time=cfg.max_time,
        seed=cfg.seed,
        device=device,
        precision="fp32",
        eval_every=cfg.eval_every,
        report_at_val_losses=[],
        log_every=1,
        checkpoint_every=cfg.eval_every,
        keep_latest_k=cfg.keep_latest_k,
        loss_spike="ignore",
        divergence_factor=0.0,
        divergence_margin=0.0,
    )
    c.logging = LoggingConfig(
        run_root=cfg.run_root,
        name=cfg.name or None,
        progress=cfg.progress,
        tensorboard=cfg.tensorboard,
        wandb=cfg.wandb,
    )
    c.dist.strategy = "ddp"
    return c


@dataclass
class LabelledBatch:
    """A packed micro-batch of labelled training sequences: the residue rows the head reads, their segment
    ids, the labels ([residues] per-residue, [sequences] otherwise) and how many loss items they are."""

    packed: PackedBatch
    rows: torch.Tensor
    seg: torch.Tensor
    labels: torch.Tensor
    normalizer: int


class LabelledStream:
    """This rank's micro-batches of the training split, step by step (the trainer's loader interface).

    The global stream is the packing plan's bins in order (epoch, chunk, bin); step s takes the next
    world_size × grad_accum bins and rank r the grad_accum of them from r × grad_accum on, so one process
    × 2 accumulation steps and 2 processes × 1 train on the same batches. Its state is the position.
    """

    def __init__(
        self,
        data: FinetuneData,
        width: int,
        token_budget: int,
        seed: int,
        norm: tuple[float, float],
        world_size: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
    ):
        self.data, self.width, self.token_budget, self.norm = data, width, token_budget, norm
        self.rank, self.accum, self.world_x_accum = rank, grad_accum, world_size * grad_accum
        self.source = _Residues(data.train.seqs)
        self.plan = PackingPlan(
            np.array([len(x) for x in self.source.ids]),
            token_budget=token_budget,
            max_length=width,
            seed=seed,
            chunk_bins=16,
        )
        self.pos = {"epoch": 0, "chunk": 0, "bin": 0}
        self.epoch = 0  # epoch of this rank's latest micro-batch
        self._real = self._total = 0

    def _next_bin(self) -> tuple[int, np.ndarray]:
        p = self.pos
        while p["bin"] >= len(self.plan.bins(p["epoch"], p["chunk"])):
            p["bin"], p["chunk"] = 0, p["chunk"] + 1
            if p["chunk"] >= self.plan.num_chunks:
                p["chunk"], p["epoch"] = 0, p["epoch"] + 1
        p["bin"] += 1
        return p["epoch"], self.plan.bins(p["epoch"], p["chunk"])[p["bin"] - 1]

    def next_step(self, step: int) -> list[LabelledBatch]:
        bins = [self._next_bin() for _ in range(self.world_x_accum)]
        mine = bins[self.rank * self.accum : (self.rank + 1) * self.accum]
        self.epoch = mine[-1][0]
        return [self._build(epoch, idx) for epoch, idx in mine]

    def _build(self, epoch: int, idx: np.ndarray) -> LabelledBatch:
        crops = self.plan.crops(epoch, idx)
        batch = pack(self.source, idx, crops, token_budget=self.token_budget, max_length=self.width)
        rows, seg = residue_rows(batch.cu_seqlens.tolist(), batch.num_sequences)
        labels, d = self.data.train.labels, self.data
        if d.per_residue:
            y = torch.from_numpy(
                np.concatenate([labels[i][s : s + self.width - 2] for i, s in zip(idx.tolist(), crops.tolist())])
            )
        elif d.kind == "regression":
            y = torch.from_numpy((np.array([labels[i] for i in idx.tolist()]) - self.norm[0]) / self.norm[1]).float()
        else:
            y = torch.from_numpy(np.array([labels[i] for i in idx.tolist()], dtype=np.int64))
        self._real += batch.num_real_tokens
        self._total += batch.token_budget
        return LabelledBatch(batch, rows, seg, y, len(y))

    @property
    def packing_efficiency(self) -> float:
        return self._real / max(self._total, 1)

    def state_dict(self) -> dict:
        return {**self.pos, "world_x_accum": self.world_x_accum}

    def load_state_dict(self, state: dict) -> None:
        if state["world_x_accum"] != self.world_x_accum:
            raise ValueError(
                f"saved with world size × grad_accum {state['world_x_accum']}, now {self.world_x_accum};"
                " rerun it on the world size it was started with, so the batches stay the same"
            )
        self.pos = {k: int(state[k]) for k in ("epoch", "chunk", "bin")}

    def close(self) -> None:
        pass


class Validation:
    """The trainer's evaluator for fine-tuning: the validation metric every eval_every steps and at the end,
    the best weights (RUN/best.safetensors) and early stopping after `patience` passes without improvement."""

    def __init__(self, trainer: FinetuneTrainer):
        self.t = trainer
        self.best = {"best_metric": None, "best_step": 0, "bad_evals": 0}  # checkpointed (part "validation")
        self.progress, self.wall_start = None, 0.0

    def due(self, step: int, *, last: bool) -> bool:
        return step % self.t.ft.eval_every == 0 or last

    def evaluate(self, step: int, train_loss: float) -> dict:
        t, b = self.t, self.best
        t0 = time.perf_counter()
        outputs = predict(t.plain, t.data.valid.seqs, t.data.per_residue, t.width, t.ft.token_budget, t.env.device)
        value, _ = score(t.data, outputs, t.data.valid.labels, t.norm)
        t.plain.train()
        t.state.eval_time_s += time.perf_counter() - t0
        if b["best_metric"] is None or value > b["best_metric"]:
            b.update(best_metric=value, best_step=step, bad_evals=0)
            if t.env.is_main:
                _save_weights(t.plain, t.run_dir / "best.safetensors")
        else:
            b["bad_evals"] += 1
        stopping = bool(t.ft.patience) and b["bad_evals"] >= t.ft.patience
        name = metric_name(t.data)
        t.log.write({"kind": "valid", "step": step, name: value, "best": b["best_metric"], "best_step": b["best_step"]})
        t.say(
            f"step {step}: valid {name} {value:.4f} (best {b['best_metric']:.4f} at step {b['best_step']}"
            f"{', stopping early' if stopping else ''})"
        )
        return {"metric": value, "stopping": stopping}

    def stop_reason(self, val: dict) -> StopReason | None:
        return StopReason.EARLY_STOP if val["stopping"] else None


class FinetuneTrainer(Trainer):
    """The trainer's loop on a task head: a labelled packed stream, the task loss, validation with early
    stopping, and at the end the test report beside the frozen probe."""

    def __init__(self, ft: FinetuneConfig, device: str, log, held: list):
        self.ft, self.log_line, self.launch, self.progress = ft, log, time.perf_counter(), None
        self.data = data = load_data(ft)
        self.env = env = init_distributed(Config(train=TrainConfig(device=device)))
        if env.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
        model, self.loaded = build_task_model(ft, data, env.device)
        self.cfg = cfg = trainer_config(ft, self.loaded.config, device)
        self.amp_dtype = None

        def decide():  # rank 0 opens the run directory; the lock stays in `held`
            run_dir, lock = open_run_dir(ft)
            held.append(lock)
            return run_dir

        self.run_dir = from_rank0(env, decide)
        self.width = window_tokens(ft, data)
        self.norm = (0.0, 1.0)
        if data.kind == "regression":
            y = np.asarray(data.train.labels, dtype=np.float64)
            self.norm = (float(y.mean()), float(y.std()) or 1.0)
        self.plain = model
        self.optimizers = build_optimizers(model, ft)
        self.model = (
            model
            if env.world_size == 1
            else DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        )
        self.loader = LabelledStream(
            data, self.width, ft.token_budget, ft.seed, self.norm, env.world_size, env.rank, ft.grad_accum
        )
        self.peak_info = stable_peak(env.device, torch.float32, update=env.is_main)
        self.state = TrainState(
            world_x_accum=env.world_size * ft.grad_accum,
            data={"task": data.where, "train_sequences": len(data.train.seqs)},
        )
        self.evaluator = Validation(self)
        self.checkpointer = Checkpointer(
            self.run_dir,
            cfg.train.checkpoint_every,
            ft.keep_latest_k,
            {
                "model": ckpt.ModelState(model),
                "optimizers": self.optimizers,
                "loader": self.loader,
                "trainer": self.state,
                "validation": ckpt.DictState(self.evaluator.best),
                "rng": ckpt.RNGState(),
            },
            resume="rerun the same `plmrun finetune` command to continue",
        )
        latest = self.checkpointer.latest()
        if latest is not None:
            self.checkpointer.load(latest)
            self.say(f"continuing {self.run_dir} from step {self.state.step}")
        if env.is_main:
            truncate_metrics(self.run_dir, self.state.step)  # what an attempt wrote after its checkpoint
        self.log = MetricsLog(self.run_dir, cfg, self.run_dir.name, enabled=env.is_main)
        self.plain.train()

    def say(self, msg: str, err: bool = True) -> None:
        if self.env.is_main:
            self.log_line(msg)

    def loss_sum(self, model, mb: LabelledBatch, device: torch.device, step: int, forward_context) -> torch.Tensor:
        """Σ cross-entropy over the micro-batch's residues or sequences, or Σ squared error (regression)."""
        b = mb.packed.to(device)
        with forward_context:
            out = model(
                b.tokens,
                b.positions,
                b.cu_seqlens,
                b.max_seqlen,
                mb.rows.to(device),
                mb.seg.to(device),
                b.num_sequences,
            )
        y = mb.labels.to(device)
        if self.data.kind == "regression":
            return ((out[:, 0] - y) ** 2).sum()
        return nn.functional.cross_entropy(out, y, reduction="sum")

    def train_record(self, r: dict, tok_s: float, mfu: float, mfu_capped: bool = False) -> dict:
        step = self.state.step
        if (step % 10 == 0 or step == 1) and self.progress is None:
            self.say(
                f"step {step}/{self.ft.max_steps} epoch {self.loader.epoch} loss {r['loss']:.4f} {tok_s:,.0f} tok/s"
            )
        return {"kind": "train", "step": step, "epoch": self.loader.epoch, "loss": r["loss"]}

    def finish(self, reason: StopReason, stop: StopFlag) -> dict:
        """Signalled: where it stopped. Otherwise (rank 0) the test report, the merged model and summary.json."""
        st, env = self.state, self.env
        self.log.close()
        if reason is StopReason.SIGNAL:
            self.say(f"stopped by signal {stop.exit_code - 128} at step {st.step}: rerun the same command to continue")
            return {"stopped": f"signal {stop.exit_code - 128}", "exit_code": stop.exit_code, "run": str(self.run_dir)}
        result = {"exit_code": 0, "run": str(self.run_dir)}
        if env.is_main:
            result = _finish(
                self.ft,
                self.data,
                self.plain,
                self.loaded,
                self.run_dir,
                self.width,
                self.norm,
                {"step": st.step, **self.evaluator.best, "stopped": reason.value},
                env.device,
            )
        if env.world_size > 1:
            torch.distributed.barrier()
        return result


def _finish(cfg, data, model, loaded, run, width, norm, state, device) -> dict:
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
        task = (
            replace(TASKS[data.name], max_train=cfg.max_train, max_test=cfg.max_test)
            if data.bundled
            else Task(data.name, data.per_residue, cfg.max_train, cfg.max_test, 20000 if data.per_residue else 0)
        )
        budget = max(cfg.token_budget, width)
        feats = [model_features(frozen, s, data.per_residue, budget) for s in (data.train.seqs, data.test.seqs)]
        fit = fit_and_score(
            task, feats[0], data.train.labels, feats[1], data.test.labels, range(cfg.probe_seeds), "logistic"
        )
        rows["frozen probe"] = score_row(fit.scores)
        sizes = [len(y) for y in data.test.labels] if data.per_residue else None
        minus["frozen probe"] = paired_difference(right, fit.correct, sizes)
    report = {
        "model": cfg.model,
        "head": "logistic",
        "layer": -1,
        "seeds": list(range(cfg.probe_seeds)),
        "max_length": width,
        "note": f"fine-tuned {state['step']} steps, weights of step {state['best_step']} (best validation "
        f"{metric_name(data)} {state['best_metric']:.4f}); run {run}",
        "tasks": {
            data.name: {
                "metric": metric_name(data),
                "classes": len(data.classes),
                "n_train": len(data.train.seqs),
                "n_test": len(data.test.seqs),
                "n_test_residues": int(sum(len(s) for s in data.test.seqs)),
                "rows": rows,
                "model_minus": minus,
            }
        },
        "time_s": round(time.perf_counter() - t0, 1),
    }
    tm = _task_model(model.merge_and_unload() if cfg.method == "lora" else model)
    from plmrun.model.loading import save_model_dir

    save_model_dir(run / "model", tm.net.state_dict(), loaded.config)
    _save_weights(tm.task_head, run / "task_head.safetensors")
    (run / "task_head.json").write_text(
        json.dumps({"kind": data.kind, "classes": data.classes, "target_mean_std": list(norm)}, indent=1) + "\n"
    )
    if cfg.export:
        from plmrun.eval.export import export

        export(run / "model", run / "hf", overwrite=True)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    write_json_atomic(
        run / "summary.json",
        {**report, "steps": state["step"], "best_step": state["best_step"], "stopped": state["stopped"]},
    )
    return {**report, "exit_code": 0, "run": str(run)}
