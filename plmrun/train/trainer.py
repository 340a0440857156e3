"""The training loop: packed micro-batches in, one optimizer step per global batch, honest numbers out.

Loss of a global step = Σ(weight·CE) / Σ normaliser over every micro-batch of every rank (both sums
all-reduced), so 1 process × 4 accumulation steps and 2 processes × 2 give the same update. The run
clock (`train_time_s`) counts only training steps; evals are timed separately, and time-to-target
records both. Everything needed to continue exactly is in the checkpoint (plmrun/checkpoint.py).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from plmrun.config import Config, ConfigError, TrainConfig
from plmrun.errors import PlmrunError
from plmrun.tokenizer import VOCAB_SIZE
from plmrun.eval.mlm import evaluate
from plmrun import checkpoint as ckpt
from plmrun.train.parallelize import (DistEnv, all_reduce_sum, autocast_dtype, init_distributed, native_bf16,
                                      parallelize, unwrap)
from plmrun.train.rundir import (MetricsLog, choose_run_dir, environment_info, plot_curves, read_metrics,
                                 write_json_atomic)


class TrainingError(PlmrunError, RuntimeError):
    """Training stopped for a reason the user must see (NaN/Inf, loss spike, bad resume)."""


# ------------------------------------------------------------------ peak FLOP/s
def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.4) -> float:
    """FLOP/s of a large square matmul on this device and dtype: the MFU denominator."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or reps < 2:
        a @ b
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t0)


# ------------------------------------------------------------------ data
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
    _require_splits(cfg, path)
    return path, open_dataset(path, cfg.data.train_split), open_dataset(path, cfg.data.valid_split)


def _require_splits(cfg: Config, path) -> None:
    """The splits training needs (train, valid, and the test split of eval.final_test), checked before any
    shard opens: a dataset prepared from one input has only 'train', so say how to get a valid split."""
    from plmrun.data.errors import DataError
    from plmrun.data.shards import dataset_splits
    if not Path(path).is_dir():   # a missing directory: open_dataset names it
        return
    splits = dataset_splits(path)
    for key in ("train_split", "valid_split"):
        split = getattr(cfg.data, key)
        if split not in splits:
            raise DataError(f"{path}: no '{split}' split for data.{key} (splits: {', '.join(splits) or 'none'}); "
                            f"make one with `plmrun data split FILE --out DIR` (homology split, then prepare its "
                            f"train/valid FASTA) or `plmrun data prepare TRAIN --valid VALID --out {path} "
                            f"--overwrite`, or set --data.{key}=NAME to an existing split")
    if cfg.eval.final_test and cfg.data.test_split not in splits:
        raise DataError(f"{path}: no '{cfg.data.test_split}' split for eval.final_test (splits: "
                        f"{', '.join(splits) or 'none'}); set data.test_split to one of them or eval.final_test=false")


def build_train_loader(cfg: Config, env: DistEnv, train_src):
    """This rank's packed, masked, prefetching micro-batch stream as configured."""
    from plmrun.data.loader import TrainLoader
    from plmrun.data.masking import Masker
    return TrainLoader(train_src, token_budget=cfg.data.token_budget, max_length=cfg.data.max_length,
                       seed=cfg.train.seed, world_size=env.world_size, rank=env.rank,
                       grad_accum=cfg.train.grad_accum, masker=Masker.from_config(cfg.masking),
                       prefetch=cfg.data.prefetch, num_workers=cfg.data.num_workers,
                       pin_memory=env.device.type == "cuda", device=env.device,
                       max_length_schedule=cfg.data.max_length_schedule)


def grad_accum_for(cfg: Config, world_size: int) -> int:
    """train.grad_accum on this world size: derived from train.global_batch_tokens when set, so one YAML
    gives the same global batches on 1, 4 or 8 ranks (validate() already checked token_budget divides it)."""
    t, budget = cfg.train, cfg.data.token_budget
    if not t.global_batch_tokens:
        return t.grad_accum
    micro = t.global_batch_tokens // budget
    if micro % world_size:
        raise ConfigError(f"train.global_batch_tokens ({t.global_batch_tokens}) is {micro} micro-batches of "
                          f"data.token_budget ({budget}), which {world_size} ranks cannot share evenly; use a "
                          f"multiple of {budget * world_size} tokens or another world size")
    return micro // world_size


def open_test_split(cfg: Config, path):
    """The data.test_split of a prepared dataset for eval.final_test (its presence checked by _require_splits)."""
    from plmrun.data.shards import open_dataset
    return open_dataset(path, cfg.data.test_split)


# Clock of train.max_time (a module attribute so tests can drive it deterministically).
_clock = time.perf_counter


def _out_of_time(run: "_Run", budget_start: float) -> bool:
    """train.max_time spent on any rank (all ranks agree, so they stop at the same step)."""
    spent = float(_clock() - budget_start >= run.cfg.train.max_time)
    return float(all_reduce_sum(torch.tensor([spent]))) > 0


# ------------------------------------------------------------------ signals and faults
class _StopFlag:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint at the end of the step and exits cleanly."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._old = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal = signum

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _fault_injection(step: int, rank: int, model) -> None:
    """The reliability tests' faults after `step` (PLMRUN_FAULT, see checkpoint.injected_fault)."""
    kind = ckpt.injected_fault(step, rank, ("kill", "term", "nan"))
    if kind == "nan":  # poison this rank's weights: its next loss and every gradient become NaN
        with torch.no_grad():
            next(unwrap(model).parameters()).fill_(float("nan"))
    elif kind is not None:
        os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGTERM)


class SpikePolicy:
    """train.loss_spike: flags a loss above loss_spike_factor × the mean of the recent non-spike losses.

    warn reports it, skip drops its update, abort stops. skip is bounded: after loss_spike_max_skips
    flagged steps in a row the loss has moved to a new level rather than spiked, and the run stops
    instead of skipping every later update. Its counters live in the checkpointed train state.
    """

    def __init__(self, train_cfg: TrainConfig, state: dict, hint):
        self.cfg, self.state, self.hint = train_cfg, state, hint

    def check(self, step: int, loss: float, warn) -> bool:
        """True when this step's update must be skipped."""
        c: TrainConfig = self.cfg
        st = self.state
        recent = st["recent_losses"]
        if c.loss_spike == "ignore" or not recent or loss <= c.loss_spike_factor * sum(recent) / len(recent):
            st["recent_losses"] = (recent + [loss])[-c.loss_spike_window:]
            st["spikes_in_a_row"] = 0
            return False
        st["spikes"] += 1
        st["spikes_in_a_row"] += 1
        msg = f"step {step}: loss spike {loss:.4f} > {c.loss_spike_factor} × recent mean {sum(recent) / len(recent):.4f}"
        if c.loss_spike == "abort":
            raise TrainingError(f"{msg} (train.loss_spike=abort); {self.hint()}")
        if c.loss_spike == "skip" and st["spikes_in_a_row"] >= c.loss_spike_max_skips:
            raise TrainingError(f"{msg}: {st['spikes_in_a_row']} updates in a row skipped (train.loss_spike_max_skips="
                                f"{c.loss_spike_max_skips}), so the loss has shifted, not spiked; lower the learning "
                                f"rate (optim.lr_*) or use train.loss_spike=warn; {self.hint()}")
        warn(f"warning: {msg}" + ("; update skipped" if c.loss_spike == "skip" else ""))
        return c.loss_spike == "skip"


def check_divergence(cfg: Config, state: dict, step: int, loss: float, precision: str, hint) -> None:
    """Stop a run whose train loss stays above divergence_factor × ln(vocab) for divergence_steps steps in a row.

    ln(vocab) is the loss of guessing uniformly, where every run starts; a healthy run never stays at
    twice that, while a too-high learning rate sits there (or higher) for good. A short excursion
    that comes back down (a spike) resets the count.
    """
    t = cfg.train
    if not t.divergence_factor:
        return
    limit = t.divergence_factor * math.log(VOCAB_SIZE)
    state["diverging_steps"] = state["diverging_steps"] + 1 if loss > limit else 0
    if state["diverging_steps"] < t.divergence_steps:
        return
    o = cfg.optim
    lrs = (f"optim.lr={o.lr:g}" if o.optimizer == "adamw" else
           f"optim.lr_hidden={o.lr_hidden:g}, lr_embed={o.lr_embed:g}, lr_head={o.lr_head:g}, lr_scalar={o.lr_scalar:g}")
    cause = f"the learning rate is likely too high ({lrs})"
    if precision == "bf16":
        cause += " or bf16 is not precise enough (try train.precision=fp32)"
    raise TrainingError(f"step {step}: training diverged: train loss {loss:.4f} above {limit:.2f} "
                        f"({t.divergence_factor:g} × ln {VOCAB_SIZE}, uniform guessing) for "
                        f"{state['diverging_steps']} steps in a row; {cause}; {hint()} "
                        "(train.divergence_factor=0 turns this check off)")


def _from_rank0(env: DistEnv, decide):
    """Run `decide()` on rank 0 only and give every rank its result, or raise its error on every rank,
    so the ranks never disagree about what rank 0 saw on disk (and none waits for a rank that failed)."""
    result = error = None
    if env.is_main:
        try:
            result = decide()
        except (PlmrunError, OSError) as e:
            error = e
    if env.world_size > 1:
        obj = [(result, error)]
        torch.distributed.broadcast_object_list(obj, src=0)
        result, error = obj[0]
    if error is not None:
        raise error
    return result


# ------------------------------------------------------------------ the loop
@dataclass
class _Run:
    """Everything setup builds and the loop, eval and finish share."""
    cfg: Config
    env: DistEnv
    name: str
    run_dir: Path
    model: torch.nn.Module
    optimizers: object
    loader: object
    valid_src: object
    amp_dtype: Optional[torch.dtype]
    peak: float
    n_params: int
    n_dense: int
    state: dict
    log: MetricsLog
    launch: float
    progress: object = None
    wall_start: float = 0.0
    unigram: Optional[torch.Tensor] = None   # log p [V] of the training split's residues (eval's unigram baseline)
    test_src: object = None

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def precision(self) -> str:
        return "fp32" if self.amp_dtype is None else "bf16"

    def checkpoint_hint(self) -> str:
        """Where to pick up after a stop: the newest checkpoint if there is one (never a folder that does not exist)."""
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        if latest is None:
            return (f"no checkpoint was saved yet (train.checkpoint_every={self.cfg.train.checkpoint_every}), "
                    "so a rerun starts from step 0")
        return f"the last good checkpoint is {latest} (resume with `plmrun train --resume {self.run_dir}`)"

    def say(self, msg: str, err: bool = False) -> None:
        if self.env.is_main:
            if self.progress is not None and not err:
                self.progress.write(msg)
            else:
                print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def train(cfg: Config, *, resume: Optional[str] = None, init_from_hf: Optional[str] = None) -> dict:
    """Train as configured; returns the summary (also written to summary.json).

    Stopped by SIGTERM/SIGINT: saves a checkpoint and returns {"stopped": "signal N", "exit_code": 128 + N, ...}
    without a summary, so the CLI can exit non-zero and a scheduler tell it from a finished run.
    """
    held = []  # rank 0's lock on the run directory, released however train() ends
    try:
        run = _setup(cfg, resume, init_from_hf, time.perf_counter(), held)
        stop = _StopFlag().install()
        try:
            stopped_reason = _loop(run, stop)
        finally:
            stop.restore()
            if run.progress is not None:
                run.progress.close()
            run.loader.close()
        return _finish(run, stopped_reason, stop.signal)
    finally:
        for lock in held:
            lock.release()


def _loop(run: _Run, stop: _StopFlag) -> str:
    """Steps until max_steps, stop_at_val_loss or a signal (checkpointed); returns why it stopped."""
    cfg, state = run.cfg, run.state
    start_step = state["step"]
    if run.env.is_main and cfg.logging.progress:
        from tqdm import tqdm
        run.progress = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
    stopped_reason = "max_steps"
    run.wall_start = time.perf_counter() - state["train_time_s"] - state["eval_time_s"]
    # train.max_time counts training and eval time of every attempt (it is in the checkpointed state)
    budget_start = _clock() - state["train_time_s"] - state["eval_time_s"]
    interval = {"t": 0.0, "tokens": 0, "flops": 0.0}
    for step in range(start_step, cfg.train.max_steps):
        r = _train_step(run, step)
        state["step"] = step + 1
        state["tokens"] += r["tokens"]
        state["train_time_s"] += r["dt"]
        state["flops"] += r["flops"]
        interval["t"] += r["dt"]
        interval["tokens"] += r["tokens"]
        interval["flops"] += r["flops"]
        if run.progress is not None:
            run.progress.update(1)
        if (step + 1) % cfg.train.log_every == 0 or step == start_step:
            _log_train(run, step, r, interval)
            interval = {"t": 0.0, "tokens": 0, "flops": 0.0}
        _fault_injection(step + 1, run.env.rank, run.model)

        done = step + 1 == cfg.train.max_steps
        if cfg.train.max_time and not done and _out_of_time(run, budget_start):
            stopped_reason = "max_time"
            done = True  # evaluated and checkpointed like the last step
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 or done or _dense_eval_due(cfg, state):
            if _eval_and_report(run, step + 1, r["loss"]):
                stopped_reason = "stop_at_val_loss"
        signalled = float(all_reduce_sum(torch.tensor([float(stop.signal is not None)]))) > 0
        periodic = cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0
        # the last step is always checkpointed too: a crash in the final eval or save then costs no training
        if periodic or signalled or done or stopped_reason != "max_steps":
            _save(run.ckpt_root, run.model, run.optimizers, run.loader, state, cfg)
        if signalled:
            return f"signal {int(stop.signal or signal.SIGTERM)}"
        if stopped_reason != "max_steps":
            break
    return stopped_reason


def _setup(cfg: Config, resume: Optional[str], init_from_hf: Optional[str], launch: float, held: list) -> _Run:
    """Processes, run directory, data, model, optimizer and loader, and the checkpoint to continue from."""
    env = init_distributed(cfg)
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if env.device.type == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    accum = grad_accum_for(cfg, env.world_size)  # both refused before a run directory exists
    if cfg.data.dataset != "bundled":
        _require_splits(cfg, Path(cfg.data.dataset))  # so is a dataset without the splits training needs
    if cfg.logging.push_to_hub:
        from plmrun.eval.export import hub_token
        hub_token()  # no token: stop now, not after training

    # run directory and checkpoint: rank 0 decides, everyone agrees
    def decide():  # the lock stays in `held`, out of the broadcast
        run_dir, continuing, note, lock = choose_run_dir(cfg, resume, init_from_hf)
        held.append(lock)
        return run_dir, continuing, note, (ckpt.latest_checkpoint(run_dir / "checkpoints") if continuing else None)
    run_dir, is_resume, note, latest = _from_rank0(env, decide)
    if note and env.is_main:
        print(note, flush=True)
    name = run_dir.name
    if accum != cfg.train.grad_accum:  # derived after the run directory saved the config as written
        cfg = copy.deepcopy(cfg)
        cfg.train.grad_accum = accum

    data_path, train_src, valid_src = open_training_data(cfg, env)
    unigram = _unigram_baseline(run_dir, train_src, data_path, cfg, env)
    test_src = open_test_split(cfg, data_path) if cfg.eval.final_test else None
    if latest is not None:
        accum = resume_grad_accum(ckpt.read_train_state(latest), env.world_size, cfg.train.grad_accum, latest,
                                  verbose=env.is_main)
        if accum != cfg.train.grad_accum:
            cfg = copy.deepcopy(cfg)
            cfg.train.grad_accum = accum

    from plmrun.model.registry import build_model
    if cfg.dist.meta_init:
        if init_from_hf:
            raise TrainingError("--init-from-hf loads full weights; it cannot be combined with dist.meta_init")
        with torch.device("meta"):
            model = build_model(cfg.model)
    else:
        model = build_model(cfg.model)
        if init_from_hf:
            from plmrun.model.loading import load_hf_weights_into
            load_hf_weights_into(model, init_from_hf)
        model.to(env.device)
    plm = model
    n_params = sum(p.numel() for p in plm.parameters())
    kinds = plm.parameter_kinds()
    n_dense = sum(p.numel() for n, p in plm.named_parameters() if kinds[n] in ("hidden", "head", "scalar"))
    model = parallelize(model, cfg, env)

    from plmrun.optim.build import build_optimizer
    amp_dtype = autocast_dtype(cfg, env.device)
    if amp_dtype is not None and not native_bf16(env.device) and env.is_main:
        print(f"warning: train.precision={cfg.train.precision}, but bf16 matmuls are emulated on this {env.device.type}"
              " (tens of times slower than fp32); train.precision=auto picks fp32 here", file=sys.stderr, flush=True)
    # Newton-Schulz in fp32 for fp32 runs, so distributed and resumed runs match single-process ones exactly,
    # and where bf16 matmuls are emulated (bf16 Newton-Schulz was ~50x slower than fp32 on an AVX2 CPU).
    ns_dtype = torch.bfloat16 if amp_dtype is not None and native_bf16(env.device) else torch.float32
    optimizers = build_optimizer(plm, cfg.optim, cfg.train.max_steps, ns_dtype=ns_dtype)

    loader = build_train_loader(cfg, env, train_src)

    peak = measure_matmul_peak(env.device, amp_dtype or torch.float32)
    data_info = {"dataset": str(data_path), "train_fingerprint": train_src.fingerprint,
                 "valid_fingerprint": valid_src.fingerprint, "train_sequences": len(train_src),
                 "valid_sequences": len(valid_src)}

    # state that travels in checkpoints
    state = {"step": 0, "tokens": 0, "train_time_s": 0.0, "eval_time_s": 0.0, "time_to_target": {},
             "best_val_loss": None, "flops": 0.0, "world_x_accum": env.world_size * cfg.train.grad_accum,
             "data": data_info, "recent_losses": [], "spikes": 0, "spikes_in_a_row": 0, "diverging_steps": 0}
    if latest is not None:
        ckpt.load_checkpoint(latest, ckpt.training_parts(model, optimizers, loader, state,
                                                         check=lambda saved: _check_resume(saved, state, latest)))
    if env.is_main:
        if is_resume:  # drop what the attempt that stopped wrote after its checkpoint (all of it without one)
            _truncate_metrics(run_dir, state["step"])
        if latest is None:
            (run_dir / "environment.json").write_text(
                json.dumps(environment_info(env.device, env.world_size, data_info), indent=2))
    log = MetricsLog(run_dir, cfg, name, enabled=env.is_main)  # after the resume truncated metrics.jsonl
    if env.is_main:
        print(f"plmrun: run {run_dir}  params {n_params/1e6:.2f}M  device {env.device}  world {env.world_size}"
              f"  precision {'bf16' if amp_dtype else 'fp32'}  peak {peak/1e9:.0f} GFLOP/s"
              + (f"  resumed at step {state['step']}" if latest is not None else ""), flush=True)
    return _Run(cfg=cfg, env=env, name=name, run_dir=run_dir, model=model, optimizers=optimizers, loader=loader,
                valid_src=valid_src, amp_dtype=amp_dtype, peak=peak, n_params=n_params, n_dense=n_dense, state=state,
                log=log, launch=launch, unigram=unigram, test_src=test_src)


def _unigram_baseline(run_dir: Path, train_src, data_path, cfg: Config, env: DistEnv) -> torch.Tensor:
    """Residue frequencies of the training split as eval's unigram baseline, recorded in RUN/unigram.json."""
    from plmrun.data.stats import residue_counts
    from plmrun.eval.metrics import unigram_log_probs
    from plmrun.eval.mlm import write_unigram
    counts = residue_counts(train_src)
    if env.is_main:
        write_unigram(run_dir, counts, f"{data_path} split {cfg.data.train_split} ({train_src.fingerprint})")
    return unigram_log_probs(counts)


def _train_step(run: _Run, step: int) -> dict:
    """One optimizer step over this step's global batch: loss, grad norm, clip, real tokens, FLOPs and time.

    Stops (TrainingError) on a non-finite loss or gradient, on divergence and on an aborting spike.
    """
    from plmrun.model.registry import flops_per_step
    cfg, env, optimizers = run.cfg, run.env, run.optimizers
    t0 = time.perf_counter()
    optimizers.set_step(step)
    micro = run.loader.next_step(step)
    local = torch.zeros(3, dtype=torch.float64)  # normaliser, real tokens, model FLOPs
    for mb in micro:
        p = mb.packed
        local[0] += mb.normalizer
        local[1] += p.num_real_tokens
        local[2] += flops_per_step(cfg.model, p.cu_seqlens[: p.num_sequences + 1], step=step)
    all_reduce_sum(local)
    global_norm = float(local[0])
    if global_norm <= 0:
        raise TrainingError(f"step {step}: no loss targets in the global batch (check the masking settings)")
    loss_sum = forward_backward(run.model, micro, global_norm=global_norm, world_size=env.world_size,
                                device=env.device, amp_dtype=run.amp_dtype, step=step)
    grad_norm, clip_to = optimizers.clip_gradients()
    # one collective: the global loss sum and which ranks saw a non-finite local loss
    red = torch.zeros(1 + env.world_size, dtype=torch.float64)
    red[0] = float(loss_sum)
    red[1 + env.rank] = 0.0 if math.isfinite(float(loss_sum)) else 1.0
    all_reduce_sum(red)
    loss = float(red[0]) / global_norm
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        bad = [r for r in range(env.world_size) if red[1 + r] > 0]
        where = f"rank {', '.join(map(str, bad))}" if bad else "the gradients of all ranks"
        raise TrainingError(f"step {step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'}"
                            f" from {where} (loss {loss}, grad norm {grad_norm}; reported by rank {env.rank});"
                            f" {run.checkpoint_hint()}")
    check_divergence(cfg, run.state, step + 1, loss, run.precision, run.checkpoint_hint)
    skip = SpikePolicy(cfg.train, run.state, run.checkpoint_hint).check(step + 1, loss,
                                                                        lambda m: run.say(m, err=True))
    if not skip:
        optimizers.step()
    optimizers.zero_grad()
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    spike = cfg.train.loss_spike if run.state["spikes_in_a_row"] else None
    return {"loss": loss, "grad_norm": grad_norm, "clip": clip_to, "tokens": int(local[1]), "flops": float(local[2]),
            "dt": time.perf_counter() - t0, "spike": spike}


def _log_train(run: _Run, step: int, r: dict, interval: dict) -> None:
    tok_s = interval["tokens"] / max(interval["t"], 1e-9)
    mfu = interval["flops"] / max(interval["t"], 1e-9) / (run.peak * run.env.world_size)
    rec = {"kind": "train", "step": step + 1, "tokens": run.state["tokens"],
           "train_time_s": round(run.state["train_time_s"], 3), "loss": r["loss"], "grad_norm": r["grad_norm"],
           "clip": r["clip"], "tok_per_s": tok_s, "mfu": mfu, "lr_mult": run.optimizers.lr_multiplier(step),
           "packing_efficiency": run.loader.packing_efficiency}
    if r["spike"]:
        rec["spike"] = r["spike"]
    run.log.write(rec)
    if run.progress is not None:
        run.progress.set_postfix(loss=f"{r['loss']:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}", refresh=False)


def _dense_eval_due(cfg: Config, state: dict) -> bool:
    """train.dense_eval_every: an extra eval at this step because the best val loss so far is within
    train.dense_eval_margin above a target not reached yet (a function of checkpointed state only)."""
    t, best = cfg.train, state["best_val_loss"]
    if not t.dense_eval_every or state["step"] % t.dense_eval_every or best is None:
        return False
    levels = [*t.report_at_val_losses, *([] if t.stop_at_val_loss is None else [t.stop_at_val_loss])]
    return any(level < best <= level + t.dense_eval_margin for level in levels)


def _eval_and_report(run: _Run, step: int, loss: float) -> bool:
    """Evaluate on the eval subset, log it, track the best and time-to-target; True if stop_at_val_loss is reached."""
    cfg, state = run.cfg, run.state
    val = _timed_eval(run.model, run.valid_src, cfg, run.env, amp_dtype=None, subset=cfg.eval.subset, state=state,
                      unigram=run.unigram)
    run.log.write({"kind": "eval", "step": step, "tokens": state["tokens"],
                   "train_time_s": round(state["train_time_s"], 3),
                   "wall_time_s": round(time.perf_counter() - run.wall_start, 3), **_val_record(val)})
    if state["best_val_loss"] is None or val["loss"] < state["best_val_loss"]:
        state["best_val_loss"] = val["loss"]
    for thr in sorted(cfg.train.report_at_val_losses, reverse=True):
        if val["loss"] <= thr and str(thr) not in state["time_to_target"]:
            state["time_to_target"][str(thr)] = {
                "step": step, "tokens": state["tokens"], "train_time_s": state["train_time_s"],
                "wall_time_s_incl_eval": state["train_time_s"] + state["eval_time_s"], "val_loss": val["loss"]}
            run.say(f"reached val loss {thr} at step {step}: {state['train_time_s']:.1f} s of training,"
                    f" {state['tokens']:,} tokens")
    if run.progress is not None:
        run.progress.set_postfix(loss=f"{loss:.3f}", val=f"{val['loss']:.3f}", gain=f"{val['gain']:.3f}", refresh=True)
    return cfg.train.stop_at_val_loss is not None and val["loss"] <= cfg.train.stop_at_val_loss


def _val_record(val: dict) -> dict:
    return {("val_" + k if k != "tokens" else "val_targets"): v for k, v in val.items()}


def _finish(run: _Run, stopped_reason: str, signum: Optional[int]) -> dict:
    """Final full eval, model and summary for a finished run; for a signalled one, where to resume."""
    cfg, env, state = run.cfg, run.env, run.state
    summary = None
    if stopped_reason.startswith("signal"):
        latest = ckpt.latest_checkpoint(run.ckpt_root)
        run.say(f"stopped at step {state['step']}, checkpoint saved at {latest}, resume with "
                f"`plmrun train --resume {run.run_dir}`", err=True)
        summary = {"stopped": stopped_reason, "exit_code": 128 + int(signum or signal.SIGTERM),
                   "run_dir": str(run.run_dir), "step": state["step"], "checkpoint": str(latest)}
    else:
        final_full = None
        if cfg.eval.final_full:
            final_full = _timed_eval(run.model, run.valid_src, cfg, env, amp_dtype=None, subset=0, state=state,
                                     unigram=run.unigram)
            run.log.write({"kind": "eval", "final": True, "step": state["step"], "tokens": state["tokens"],
                           "train_time_s": round(state["train_time_s"], 3), **_val_record(final_full)})
        final_test = None
        if cfg.eval.final_test:
            final_test = _timed_eval(run.model, run.test_src, cfg, env, amp_dtype=None, subset=0, state=state,
                                     unigram=run.unigram)
            run.log.write({"kind": "eval", "final": True, "split": cfg.data.test_split, "step": state["step"],
                           "tokens": state["tokens"], "train_time_s": round(state["train_time_s"], 3),
                           **{("test_" + k if k != "tokens" else "test_targets"): v for k, v in final_test.items()}})
        _save_final_model(run.run_dir, run.model, cfg, env)
        if env.is_main:
            summary = _summary(cfg, run.name, run.run_dir, state, run.n_params, run.n_dense, run.peak, env, final_full,
                               stopped_reason, run.launch, read_metrics(run.run_dir), run.precision)
            if cfg.eval.final_test:
                summary["final_test"] = final_test
            write_json_atomic(run.run_dir / "summary.json", summary)
            plot_curves(run.run_dir)
            _print_summary(summary)
            if cfg.logging.push_to_hub:
                summary["hub"] = _push_run(run)
                write_json_atomic(run.run_dir / "summary.json", summary)
    run.log.close()
    if env.world_size > 1:
        torch.distributed.barrier()
    return summary or {"stopped": stopped_reason, "run_dir": str(run.run_dir), "step": state["step"]}


def _push_run(run: _Run) -> dict:
    """logging.push_to_hub: the `plmrun export --push-to-hub` path on the finished run. A failed upload is one
    line; the run stays finished (model, checkpoint, summary) and can be uploaded later by hand."""
    from plmrun.eval.export import ExportError, export, push_to_hub
    repo = run.cfg.logging.push_to_hub
    try:
        url = push_to_hub(export(run.run_dir, run.run_dir / "hf", overwrite=True), repo)
    except ExportError as e:
        run.say(f"warning: {e}; the run is finished, upload it later with `plmrun export {run.run_dir} --out "
                f"{run.run_dir / 'hf'} --overwrite --push-to-hub {repo}`", err=True)
        return {"repo": repo, "error": str(e)}
    run.say(f"uploaded to {url}")
    return {"repo": repo, "url": url}


def forward_backward(model, micro: list, *, global_norm: float, world_size: int, device: torch.device,
                     amp_dtype=None, step: Optional[int] = None) -> torch.Tensor:
    """Accumulate the gradient of Σ(w·CE) / global_norm over this rank's micro-batches.

    Returns this rank's Σ(w·CE) (float64). Gradient sync happens on the last micro-batch only.
    DDP/FSDP average gradients over ranks, so each rank scales by world_size / global_norm:
    the result is the gradient of the global-sum loss, whatever the split into ranks and
    micro-batches.
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for j, mb in enumerate(micro):
        p = mb.packed
        tokens = mb.inputs.to(device, non_blocking=True)
        targets = mb.targets.to(device, non_blocking=True)
        index = (targets != -100).nonzero().squeeze(1)
        with _no_sync(model, last=j == len(micro) - 1), _autocast(device, amp_dtype):
            out = model(tokens, p.positions.to(device, non_blocking=True), p.cu_seqlens.to(device, non_blocking=True),
                        p.max_seqlen, logits_index=index, step=step)
        ce = F.cross_entropy(out.logits.float(), targets[index], reduction="none")
        weighted = (ce * mb.loss_weights.to(device, non_blocking=True)[index]).sum()
        (weighted * (world_size / global_norm)).backward()
        loss_sum += weighted.detach().double()
    return loss_sum


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _no_sync(model, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch (DDP no_sync / FSDP2 equivalent)."""
    if last:
        return contextlib.nullcontext()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        @contextlib.contextmanager
        def fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return contextlib.nullcontext()


def _timed_eval(model, source, cfg, env, *, amp_dtype, subset, state, unigram=None) -> dict:
    t0 = time.perf_counter()
    val = evaluate(model, source, cfg.eval, subset=subset, device=env.device, autocast_dtype=amp_dtype,
                   unigram=unigram)
    state["eval_time_s"] += time.perf_counter() - t0
    return val


def _save(root, model, optimizers, loader, state, cfg):
    ckpt.save_checkpoint(root, state["step"], ckpt.training_parts(model, optimizers, loader, state),
                         cfg.train.keep_latest_k)


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
        raise TrainingError(f"{path}: checkpoint used world_size × grad_accum = {product}, which {world_size} ranks "
                            f"cannot reproduce; resume on a world size that divides {product}")
    if verbose:
        print(f"plmrun: resuming on {world_size} ranks with grad_accum {product // world_size} (was "
              f"world_size × grad_accum = {product}): the same global batches", flush=True)
    return product // world_size


def _check_resume(saved: dict, state: dict, path: Path) -> None:
    """Refuse a resume that could not continue the same data stream exactly."""
    for key in ("train_fingerprint", "valid_fingerprint"):
        if saved["data"][key] != state["data"][key]:
            raise TrainingError(f"{path}: checkpoint was trained on different data ({key} differs); "
                                "resume with the same dataset or start a new run")
    if saved["world_x_accum"] != state["world_x_accum"]:
        raise TrainingError(f"{path}: checkpoint used world_size × grad_accum = {saved['world_x_accum']}, now "
                            f"{state['world_x_accum']}; keep the product equal so the global batch stream is unchanged")


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint by the attempt that crashed."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step and not r.get("final")]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


def _save_final_model(run_dir: Path, model, cfg: Config, env: DistEnv) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from plmrun.model.loading import save_model_dir
    sd = get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        save_model_dir(run_dir / "model", sd, cfg.model)


def _summary(cfg, name, run_dir, state, n_params, n_dense, peak, env, final_full, reason, launch, records,
             precision) -> dict:
    evals = [r for r in records if r.get("kind") == "eval" and not r.get("final")]
    t = state["train_time_s"]
    total = time.perf_counter() - launch
    return {
        "name": name,
        "run_dir": str(run_dir),
        "arch": cfg.model.arch,
        "params": n_params,
        "params_non_embedding": n_dense,
        "steps": state["step"],
        "tokens": state["tokens"],
        "train_time_s": t,
        "eval_time_s": state["eval_time_s"],
        "total_time_s": total,
        "tok_per_s": state["tokens"] / max(t, 1e-9),
        "mfu": state["flops"] / max(t, 1e-9) / (peak * env.world_size),
        "peak_flops_per_device": peak,
        "device": str(env.device),
        "world_size": env.world_size,
        "precision": precision,
        "best_val_loss": state["best_val_loss"],
        "final_val": {k[4:]: v for k, v in evals[-1].items() if k.startswith("val_")} if evals else None,
        "final_full_val": final_full,
        "eval_subset": cfg.eval.subset,
        "time_to_target": state["time_to_target"],
        "stopped": reason,
        "cost_usd": cfg.train.cost_per_hour * env.world_size * total / 3600.0,
        "data": state["data"],
    }


def _print_summary(s: dict) -> None:
    lines = [f"run {s['run_dir']}: {s['steps']} steps, {s['tokens']:,} tokens in {s['train_time_s']:.1f} s of training"
             f" ({s['total_time_s']:.1f} s total) — {s['tok_per_s']:,.0f} tok/s, MFU {s['mfu']:.1%}"]
    if s["final_val"]:
        lines.append(f"val loss (first {s['eval_subset'] or 'all'} valid sequences): {s['final_val']['loss']:.4f}"
                     f"  best {s['best_val_loss']:.4f}")
    if s["final_full_val"]:
        f = s["final_full_val"]
        lines.append(f"full valid split: loss {f['loss']:.4f}  ppl {f['perplexity']:.2f}  acc {f['accuracy']:.3f}"
                     f"  F1 {f['f1']:.3f}  MCC {f['mcc']:.3f}  unigram loss {f['unigram_loss']:.4f}"
                     f"  gain {f['gain']:.4f}")
    for thr, r in sorted(s["time_to_target"].items(), key=lambda kv: -float(kv[0])):
        lines.append(f"time-to-target {thr}: {r['train_time_s']:.1f} s training ({r['wall_time_s_incl_eval']:.1f} s incl."
                     f" eval), {r['tokens']:,} tokens, step {r['step']}")
    print("\n".join(lines), flush=True)
