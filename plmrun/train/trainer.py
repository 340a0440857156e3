"""The training loop: packed micro-batches in, one optimizer step per global batch, honest numbers out.

Loss of a global step = Σ(weight·CE) / Σ normaliser over every micro-batch of every rank (both sums
all-reduced), so 1 process × 4 accumulation steps and 2 processes × 2 give the same update. The run
clock (`train_time_s`) counts only training steps; evals are timed separately, and time-to-target
records both. Everything needed to continue exactly is in the checkpoint (plmrun/checkpoint.py).

The pieces (torchtitan's split): `Trainer` builds the run and steps it; `TrainState` holds the
checkpointed counters; `Checkpointer` decides when to save; `Evaluator` decides when to evaluate and
tracks the targets; `stopping` says why the loop ended.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from plmrun import checkpoint as ckpt
from plmrun.config import Config
from plmrun.dist import all_reduce_sum
from plmrun.errors import PlmrunError
from plmrun.train.checkpointer import Checkpointer
from plmrun.train.evaluator import Evaluator
from plmrun.train.guards import SpikePolicy, check_divergence, check_eval_divergence
from plmrun.train.inputs import (
    build_train_loader,
    grad_accum_for,
    open_test_split,
    open_training_data,
    require_splits,
    resume_grad_accum,
)
from plmrun.train.parallelize import (
    DistEnv,
    autocast_dtype,
    init_distributed,
    matmul_dtypes,
    native_bf16,
    parallelize,
    unwrap,
)
from plmrun.train.peak import mfu as model_flops_utilisation
from plmrun.train.peak import run_peak
from plmrun.train.rundir import (
    MetricsLog,
    choose_run_dir,
    environment_info,
    plot_curves,
    read_metrics,
    truncate_metrics,
    write_json_atomic,
)
from plmrun.train.state import TrainingError, TrainState
from plmrun.train.stopping import StopFlag, StopReason, TimeBudget, any_rank, inject_fault
from plmrun.train.summary import summarize, summary_lines


def train(cfg: Config, *, resume: str | None = None, init_from_hf: str | None = None) -> dict:
    """Train as configured; returns the summary (also written to summary.json).

    Stopped by SIGTERM/SIGINT: saves a checkpoint and returns {"stopped": "signal N", "exit_code": 128 + N, ...}
    without a summary, so the CLI can exit non-zero and a scheduler tell it from a finished run.
    """
    held = []  # rank 0's lock on the run directory, released however train() ends
    try:
        return run_to_end(Trainer(cfg, resume=resume, init_from_hf=init_from_hf, launch=time.perf_counter(), held=held))
    finally:
        for lock in held:
            lock.release()


def run_to_end(trainer: Trainer) -> dict:
    """The loop under a SIGTERM/SIGINT flag, then the trainer's ending (final evals and summary, or where to resume)."""
    with StopFlag() as stop:
        try:
            reason = trainer.train(stop)
        finally:
            trainer.close_stream()
    return trainer.finish(reason, stop)


class Trainer:
    """One run: its directory, data, model, optimizers, loader, checkpointer and evaluator, and the loop.

    The loop (`train`, `train_step`) needs only those parts; a task other than pretraining (plmrun
    finetune) builds its own in its constructor and overrides `loss_sum`, `train_record` and `finish`.
    """

    def __init__(self, cfg: Config, *, resume: str | None, init_from_hf: str | None, launch: float, held: list):
        self.launch, self.progress = launch, None
        self.env = env = init_distributed(cfg)
        if env.device.type == "cpu":
            local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // local))
        torch.manual_seed(cfg.train.seed)
        accum = grad_accum_for(cfg, env.world_size)  # both refused before a run directory exists
        if cfg.data.dataset != "bundled":
            require_splits(cfg, Path(cfg.data.dataset))  # so is a dataset without the splits training needs
        if cfg.logging.push_to_hub:
            from plmrun.eval.export import hub_token

            hub_token()  # no token: stop now, not after training

        def decide():  # rank 0 picks the run directory and checkpoint, everyone agrees; the lock stays in `held`
            run_dir, continuing, note, lock = choose_run_dir(cfg, resume, init_from_hf)
            held.append(lock)
            return run_dir, continuing, note, (ckpt.latest_checkpoint(run_dir / "checkpoints") if continuing else None)

        self.run_dir, is_resume, note, latest = from_rank0(env, decide)
        if note and env.is_main:
            print(note, flush=True)
        self.name = self.run_dir.name
        if accum != cfg.train.grad_accum:  # derived after the run directory saved the config as written
            cfg = _with_grad_accum(cfg, accum)

        data_path, train_src, self.valid_src = open_training_data(cfg, env)
        unigram = _unigram_baseline(self.run_dir, train_src, data_path, cfg, env)
        test_src = open_test_split(cfg, data_path) if cfg.eval.final_test else None
        if latest is not None:
            accum = resume_grad_accum(
                ckpt.read_train_state(latest), env.world_size, cfg.train.grad_accum, latest, verbose=env.is_main
            )
            if accum != cfg.train.grad_accum:
                cfg = _with_grad_accum(cfg, accum)
        self.cfg = cfg

        plm = _build_model(cfg, env, init_from_hf)
        self.n_params = sum(p.numel() for p in plm.parameters())
        kinds = plm.parameter_kinds()
        self.n_dense = sum(p.numel() for n, p in plm.named_parameters() if kinds[n] in ("hidden", "head", "scalar"))
        self.model = parallelize(plm, cfg, env)

        from plmrun.optim.build import build_optimizer

        self.amp_dtype = autocast_dtype(cfg, env.device)
        if self.amp_dtype is not None and not native_bf16(env.device) and env.is_main:
            print(
                f"warning: train.precision={cfg.train.precision}, but bf16 matmuls are emulated on this "
                f"{env.device.type} (tens of times slower than fp32); train.precision=auto picks fp32 here",
                file=sys.stderr,
                flush=True,
            )
        # Newton-Schulz in fp32 for fp32 runs, so distributed and resumed runs match single-process ones exactly,
        # and where bf16 matmuls are emulated (bf16 Newton-Schulz is much slower than fp32 there).
        ns_dtype = torch.bfloat16 if self.amp_dtype is not None and native_bf16(env.device) else torch.float32
        self.optimizers = build_optimizer(plm, cfg.optim, cfg.train.max_steps, ns_dtype=ns_dtype)
        self.loader = build_train_loader(cfg, env, train_src)
        self.peak_info = run_peak(env.device, matmul_dtypes(cfg, env.device), update=env.is_main)

        data_info = {
            "dataset": str(data_path),
            "train_fingerprint": train_src.fingerprint,
            "valid_fingerprint": self.valid_src.fingerprint,
            "train_sequences": len(train_src),
            "valid_sequences": len(self.valid_src),
        }
        self.state = TrainState(world_x_accum=env.world_size * cfg.train.grad_accum, data=data_info)
        self.checkpointer = Checkpointer(
            self.run_dir,
            cfg.train.checkpoint_every,
            cfg.train.keep_latest_k,
            {
                "model": ckpt.ModelState(self.model),
                "optimizers": self.optimizers,
                "loader": self.loader,
                "trainer": self.state,
                "rng": ckpt.RNGState(),
            },
        )
        if latest is not None:
            self.state.check_continues(ckpt.read_train_state(latest), latest)
            self.checkpointer.load(latest)
        if env.is_main:
            if is_resume:  # drop what the attempt that stopped wrote after its checkpoint (all of it without one)
                truncate_metrics(self.run_dir, self.state.step)
            if latest is None:
                (self.run_dir / "environment.json").write_text(
                    json.dumps(environment_info(env.device, env.world_size, data_info), indent=2)
                )
        self.log = MetricsLog(self.run_dir, cfg, self.name, enabled=env.is_main)  # after the truncation
        self.evaluator = Evaluator(
            cfg, env, self.model, self.state, self.log, self.say, self.valid_src, test_src, unigram
        )
        if env.is_main:
            print(
                f"plmrun: run {self.run_dir}  params {self.n_params / 1e6:.2f}M  device {env.device}  world "
                f"{env.world_size}  precision {self.precision}  {self.peak_info.describe()}"
                + (f"  resumed at step {self.state.step}" if latest is not None else ""),
                flush=True,
            )

    @property
    def precision(self) -> str:
        return "fp32" if self.amp_dtype is None else "bf16+fp8" if self.cfg.train.fp8 else "bf16"

    def say(self, msg: str, err: bool = False) -> None:
        if self.env.is_main:
            if self.progress is not None and not err:
                self.progress.write(msg)
            else:
                print(msg, file=sys.stderr if err else sys.stdout, flush=True)

    # ------------------------------------------------------------------ the loop
    def train(self, stop: StopFlag) -> StopReason:
        """Steps until max_steps, max_time, stop_at_val_loss or a signal, checkpointing as due; returns why."""
        cfg, st = self.cfg, self.state
        self._open_progress()
        self.evaluator.wall_start = time.perf_counter() - st.train_time_s - st.eval_time_s
        budget = TimeBudget(cfg.train.max_time, st.train_time_s + st.eval_time_s)
        first = st.step
        for step in range(first, cfg.train.max_steps):
            result = self.train_step(step)
            self._count(result, log=(step + 1) % cfg.train.log_every == 0 or step == first)
            inject_fault(st.step, self.env.rank, self.model)
            reason = StopReason.MAX_STEPS if st.step == cfg.train.max_steps else None
            if reason is None and cfg.train.max_time and budget.exhausted():
                reason = StopReason.MAX_TIME  # evaluated and checkpointed like the last step
            if self.evaluator.due(st.step, last=reason is not None):
                val = self.evaluator.evaluate(st.step, result["loss"])
                if reason is None:  # a run that ends here is not stopped: its summary says if it is worse than unigram
                    check_eval_divergence(cfg, st, val, self.precision, self.checkpointer.hint)
                reason = self.evaluator.stop_reason(val) or reason
            if any_rank(stop.signal is not None):
                reason = StopReason.SIGNAL
            if self.checkpointer.due(st.step, stopping=reason is not None):
                self.checkpointer.save(st.step)
            if reason is not None:
                return reason
        return StopReason.MAX_STEPS

    def train_step(self, step: int) -> dict:
        """One optimizer step over this step's global batch: loss, grad norm, clip, real tokens, FLOPs and time.

        Stops (TrainingError) on a non-finite loss or gradient, on divergence and on an aborting spike.
        """
        from plmrun.model.registry import flops_per_step

        cfg, env, optimizers = self.cfg, self.env, self.optimizers
        t0 = time.perf_counter()
        optimizers.set_step(step)
        micro = self.loader.next_step(step)
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
        loss_sum = forward_backward(
            self.model,
            micro,
            global_norm=global_norm,
            world_size=env.world_size,
            device=env.device,
            amp_dtype=self.amp_dtype,
            step=step,
            loss_sum=self.loss_sum,
        )
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
            raise TrainingError(
                f"step {step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'}"
                f" from {where} (loss {loss}, grad norm {grad_norm}; reported by rank {env.rank});"
                f" {self.checkpointer.hint()}"
            )
        check_divergence(cfg, self.state, step + 1, loss, self.precision, self.checkpointer.hint)
        skip = SpikePolicy(cfg.train, self.state, self.checkpointer.hint).check(
            step + 1, loss, lambda m: self.say(m, err=True)
        )
        if not skip:
            optimizers.step()
        optimizers.zero_grad()
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        spike = cfg.train.loss_spike if self.state.spikes_in_a_row else None
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            "clip": clip_to,
            "tokens": int(local[1]),
            "flops": float(local[2]),
            "dt": time.perf_counter() - t0,
            "spike": spike,
        }

    def _open_progress(self) -> None:
        if self.env.is_main and self.cfg.logging.progress:
            from tqdm import tqdm

            self.progress = tqdm(
                total=self.cfg.train.max_steps,
                initial=self.state.step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
            )
            self.evaluator.progress = self.progress
        self._interval = {"t": 0.0, "tokens": 0, "flops": 0.0}

    def _count(self, r: dict, log: bool) -> None:
        """Add a step to the state and the logging interval; write the train line when `log`."""
        st, iv = self.state, self._interval
        st.step += 1
        st.tokens += r["tokens"]
        st.train_time_s += r["dt"]
        st.flops += r["flops"]
        iv["t"] += r["dt"]
        iv["tokens"] += r["tokens"]
        iv["flops"] += r["flops"]
        if self.progress is not None:
            self.progress.update(1)
        if not log:
            return
        tok_s = iv["tokens"] / max(iv["t"], 1e-9)
        mfu, over = model_flops_utilisation(iv["flops"], iv["t"], self.peak_info.flops, self.env.world_size)
        self.log.write(self.train_record(r, tok_s, mfu, over))
        if self.progress is not None:
            shown = f"≥{mfu:.0%}" if over else f"{mfu:.1%}"  # a rate above the peak: the peak is underestimated
            self.progress.set_postfix(loss=f"{r['loss']:.3f}", tok_s=f"{tok_s:,.0f}", mfu=shown, refresh=False)
        self._interval = {"t": 0.0, "tokens": 0, "flops": 0.0}

    def train_record(self, r: dict, tok_s: float, mfu: float, mfu_capped: bool = False) -> dict:
        """The metrics.jsonl line of a logged step."""
        st = self.state
        rec = {
            "kind": "train",
            "step": st.step,
            "tokens": st.tokens,
            "train_time_s": round(st.train_time_s, 3),
            "loss": r["loss"],
            "grad_norm": r["grad_norm"],
            "clip": r["clip"],
            "tok_per_s": tok_s,
            "mfu": mfu,
            "lr_mult": self.optimizers.lr_multiplier(st.step - 1),
            "packing_efficiency": self.loader.packing_efficiency,
        }
        if mfu_capped:
            rec["mfu_capped"] = True
        if r["spike"]:
            rec["spike"] = r["spike"]
        return rec

    def loss_sum(self, model, mb, device: torch.device, step: int, forward_context) -> torch.Tensor:
        """A micro-batch's summed loss (forward_backward's `loss_sum`): the masked-LM objective."""
        return mlm_loss_sum(model, mb, device, step, forward_context)

    def close_stream(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.loader.close()

    # ------------------------------------------------------------------ the end
    def finish(self, reason: StopReason, stop: StopFlag) -> dict:
        """Final full eval, model and summary for a finished run; for a signalled one, where to resume."""
        cfg, env, st = self.cfg, self.env, self.state
        summary = None
        if reason is StopReason.SIGNAL:
            stopped = f"signal {stop.exit_code - 128}"
            latest = self.checkpointer.latest()
            self.say(
                f"stopped at step {st.step}, checkpoint saved at {latest}, resume with "
                f"`plmrun train --resume {self.run_dir}`",
                err=True,
            )
            summary = {
                "stopped": stopped,
                "exit_code": stop.exit_code,
                "run_dir": str(self.run_dir),
                "step": st.step,
                "checkpoint": str(latest),
            }
        else:
            stopped = reason.value
            final_full, final_test = self.evaluator.final()
            _save_final_model(self.run_dir, self.model, cfg, env)
            if env.is_main:
                summary = summarize(
                    cfg,
                    name=self.name,
                    run_dir=self.run_dir,
                    state=st,
                    n_params=self.n_params,
                    n_dense=self.n_dense,
                    peak=self.peak_info,
                    device=env.device,
                    world_size=env.world_size,
                    precision=self.precision,
                    final_full=final_full,
                    reason=stopped,
                    launch=self.launch,
                    records=read_metrics(self.run_dir),
                )
                if cfg.eval.final_test:
                    summary["final_test"] = final_test
                plot_curves(self.run_dir)  # before summary.json, which marks the run finished
                write_json_atomic(self.run_dir / "summary.json", summary)
                print(summary_lines(summary), flush=True)
                if cfg.logging.push_to_hub:
                    summary["hub"] = self._push()
                    write_json_atomic(self.run_dir / "summary.json", summary)
        self.log.close()
        if env.world_size > 1:
            torch.distributed.barrier()
        return summary or {"stopped": stopped, "run_dir": str(self.run_dir), "step": st.step}

    def _push(self) -> dict:
        """logging.push_to_hub: the `plmrun export --push-to-hub` path on the finished run. A failed upload is one
        line; the run stays finished (model, checkpoint, summary) and can be uploaded later by hand."""
        from plmrun.eval.export import ExportError, export, push_to_hub

        repo = self.cfg.logging.push_to_hub
        try:
            url = push_to_hub(export(self.run_dir, self.run_dir / "hf", overwrite=True), repo)
        except ExportError as e:
            self.say(
                f"warning: {e}; the run is finished, upload it later with `plmrun export {self.run_dir} --out "
                f"{self.run_dir / 'hf'} --overwrite --push-to-hub {repo}`",
                err=True,
            )
            return {"repo": repo, "error": str(e)}
        self.say(f"uploaded to {url}")
        return {"repo": repo, "url": url}


# ------------------------------------------------------------------ the step's math
def mlm_loss_sum(model, mb, device: torch.device, step: int, forward_context) -> torch.Tensor:
    """Σ weight·CE over the masked targets of micro-batch `mb` (the forward runs inside `forward_context`)."""
    p = mb.packed
    tokens = mb.inputs.to(device, non_blocking=True)
    targets = mb.targets.to(device, non_blocking=True)
    index = (targets != -100).nonzero().squeeze(1)
    with forward_context:
        out = model(
            tokens,
            p.positions.to(device, non_blocking=True),
            p.cu_seqlens.to(device, non_blocking=True),
            p.max_seqlen,
            logits_index=index,
            step=step,
        )
    ce = F.cross_entropy(out.logits.float(), targets[index], reduction="none")
    return (ce * mb.loss_weights.to(device, non_blocking=True)[index]).sum()


def forward_backward(
    model,
    micro: list,
    *,
    global_norm: float,
    world_size: int,
    device: torch.device,
    amp_dtype=None,
    step: int | None = None,
    loss_sum=None,
) -> torch.Tensor:
    """Accumulate the gradient of Σ loss / global_norm over this rank's micro-batches.

    `loss_sum(model, mb, device, step, forward_context)` gives a micro-batch's summed loss (default: the
    masked-LM Σ weight·CE). Returns this rank's Σ loss (float64). Gradient sync happens on the last
    micro-batch only. DDP/FSDP average gradients over ranks, so each rank scales by world_size /
    global_norm: the result is the gradient of the global-sum loss, whatever the split into ranks and
    micro-batches.
    """
    loss_sum = loss_sum or mlm_loss_sum
    total = torch.zeros((), dtype=torch.float64, device=device)
    for j, mb in enumerate(micro):
        weighted = loss_sum(model, mb, device, step, _forward_context(model, j == len(micro) - 1, device, amp_dtype))
        (weighted * (world_size / global_norm)).backward()
        total += weighted.detach().double()
    return total


@contextlib.contextmanager
def _forward_context(model, last: bool, device: torch.device, amp_dtype):
    """A micro-batch's forward: without gradient sync unless it is the last one, under autocast when asked."""
    with _no_sync(model, last), _autocast(device, amp_dtype):
        yield


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


# ------------------------------------------------------------------ set-up helpers
def _with_grad_accum(cfg: Config, accum: int) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.train.grad_accum = accum
    return cfg


def _build_model(cfg: Config, env: DistEnv, init_from_hf: str | None) -> torch.nn.Module:
    """The configured model (random init, or --init-from-hf weights), on the device or on meta for dist.meta_init."""
    from plmrun.model.registry import build_model

    if cfg.dist.meta_init:
        if init_from_hf:
            raise TrainingError("--init-from-hf loads full weights; it cannot be combined with dist.meta_init")
        with torch.device("meta"):
            return build_model(cfg.model)
    model = build_model(cfg.model)
    if init_from_hf:
        from plmrun.model.loading import load_hf_weights_into

        load_hf_weights_into(model, init_from_hf)
    return model.to(env.device)


def from_rank0(env: DistEnv, decide):
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


def _unigram_baseline(run_dir: Path, train_src, data_path, cfg: Config, env: DistEnv) -> torch.Tensor:
    """Residue frequencies of the training split as eval's unigram baseline, recorded in RUN/unigram.json."""
    from plmrun.data.stats import residue_counts
    from plmrun.eval.metrics import unigram_log_probs
    from plmrun.eval.mlm import write_unigram

    counts = residue_counts(train_src)
    if env.is_main:
        write_unigram(run_dir, counts, f"{data_path} split {cfg.data.train_split} ({train_src.fingerprint})")
    return unigram_log_probs(counts)


def _save_final_model(run_dir: Path, model, cfg: Config, env: DistEnv) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from plmrun.model.loading import save_model_dir

    sd = get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        save_model_dir(run_dir / "model", sd, cfg.model)
