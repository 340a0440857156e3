"""In-training evaluation: when to evaluate, what the evals are compared against, and the final evals.

Evals run every train.eval_every steps, at the last step, and (train.dense_eval_every) more often
while the best val loss is close above a target not reached yet. Each eval updates the best val
loss and the time-to-target records (report_at_val_losses) and says whether stop_at_val_loss is
reached. Eval time is counted apart from the training clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from plmrun.config import Config
from plmrun.eval.mlm import evaluate
from plmrun.train.parallelize import DistEnv
from plmrun.train.rundir import MetricsLog
from plmrun.train.state import TrainState
from plmrun.train.stopping import StopReason


def dense_eval_due(cfg: Config, step: int, best_val_loss: float | None) -> bool:
    """train.dense_eval_every: an extra eval at this step because the best val loss so far is within
    train.dense_eval_margin above a target not reached yet (a function of checkpointed state only)."""
    t, best = cfg.train, best_val_loss
    if not t.dense_eval_every or step % t.dense_eval_every or best is None:
        return False
    levels = [*t.report_at_val_losses, *([] if t.stop_at_val_loss is None else [t.stop_at_val_loss])]
    return any(level < best <= level + t.dense_eval_margin for level in levels)


def prefixed(val: dict, prefix: str) -> dict:
    """An eval result as metric fields: val_loss, ..., and <prefix>targets for its token count."""
    return {(prefix + k if k != "tokens" else prefix + "targets"): v for k, v in val.items()}


class Evaluator:
    """The run's evals on its valid (and, at the end, test) split, logged to metrics.jsonl."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        model: torch.nn.Module,
        state: TrainState,
        log: MetricsLog,
        say: Callable[[str], None],
        valid_src,
        test_src=None,
        unigram: torch.Tensor | None = None,
    ):
        self.cfg, self.env, self.model, self.state, self.log, self.say = cfg, env, model, state, log, say
        self.valid_src, self.test_src, self.unigram = valid_src, test_src, unigram
        self.progress = None  # the trainer's progress bar, when it shows one
        self.wall_start = time.perf_counter()

    def due(self, step: int, *, last: bool) -> bool:
        t = self.cfg.train
        return (
            (bool(t.eval_every) and step % t.eval_every == 0)
            or last
            or dense_eval_due(self.cfg, step, self.state.best_val_loss)
        )

    def run(self, source, subset: int) -> dict:
        """One eval under the run's protocol, its time added to the state's eval clock."""
        t0 = time.perf_counter()
        val = evaluate(
            self.model,
            source,
            self.cfg.eval,
            subset=subset,
            device=self.env.device,
            autocast_dtype=None,
            unigram=self.unigram,
        )
        self.state.eval_time_s += time.perf_counter() - t0
        return val

    def evaluate(self, step: int, train_loss: float) -> dict:
        """Eval on the eval subset: logged, best and time-to-target tracked; returns the result."""
        cfg, st = self.cfg, self.state
        val = self.run(self.valid_src, cfg.eval.subset)
        self.log.write(
            {
                "kind": "eval",
                "step": step,
                "tokens": st.tokens,
                "train_time_s": round(st.train_time_s, 3),
                "wall_time_s": round(time.perf_counter() - self.wall_start, 3),
                **prefixed(val, "val_"),
            }
        )
        if st.best_val_loss is None or val["loss"] < st.best_val_loss:
            st.best_val_loss = val["loss"]
        for thr in sorted(cfg.train.report_at_val_losses, reverse=True):
            if val["loss"] <= thr and str(thr) not in st.time_to_target:
                st.time_to_target[str(thr)] = {
                    "step": step,
                    "tokens": st.tokens,
                    "train_time_s": st.train_time_s,
                    "wall_time_s_incl_eval": st.train_time_s + st.eval_time_s,
                    "val_loss": val["loss"],
                }
                self.say(
                    f"reached val loss {thr} at step {step}: {st.train_time_s:.1f} s of training, {st.tokens:,} tokens"
                )
        if self.progress is not None:
            self.progress.set_postfix(
                loss=f"{train_loss:.3f}", val=f"{val['loss']:.3f}", gain=f"{val['gain']:.3f}", refresh=True
            )
        return val

    def stop_reason(self, val: dict) -> StopReason | None:
        """TARGET when this eval reached train.stop_at_val_loss."""
        target = self.cfg.train.stop_at_val_loss
        return StopReason.TARGET if target is not None and val["loss"] <= target else None

    def final(self) -> tuple[dict | None, dict | None]:
        """(the whole valid split, the whole test split) as eval.final_full / eval.final_test ask, logged."""
        cfg, st = self.cfg, self.state
        full = test = None
        if cfg.eval.final_full:
            full = self.run(self.valid_src, 0)
            self.log.write(
                {
                    "kind": "eval",
                    "final": True,
                    "step": st.step,
                    "tokens": st.tokens,
                    "train_time_s": round(st.train_time_s, 3),
                    **prefixed(full, "val_"),
                }
            )
        if cfg.eval.final_test:
            test = self.run(self.test_src, 0)
            self.log.write(
                {
                    "kind": "eval",
                    "final": True,
                    "split": cfg.data.test_split,
                    "step": st.step,
                    "tokens": st.tokens,
                    "train_time_s": round(st.train_time_s, 3),
                    **prefixed(test, "test_"),
                }
            )
        return full, test
