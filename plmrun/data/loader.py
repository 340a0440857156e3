"""Deterministic, rank-disjoint, resumable, prefetching loaders of masked packed batches.

The training stream is one deterministic sequence of micro-batches (see packing.PackingPlan):
epoch e, chunk c, bin b, numbered 0, 1, 2, ... across epochs. Global step s uses W*A consecutive
micro-batches; rank r takes stream positions base + r*A + j (j < A), where base advances by W*A per
step (base = s*W*A for a run that started at step 0). So 1 process x 4 accumulation steps and 2
processes x 2 see the same micro-batches. Micro-batch m is masked as a pure function of
(seed, m, step), with `step` the one the caller passes, so background threads can never use a
stale schedule. The loader state is the position (epoch, chunk, bin, micro-batch number).

A crop-length schedule [(step, max_length), ...] gives each phase its own packing plan (same seed:
epoch orders are shared, only crops and bins differ). The first step of a new phase starts the next
epoch of the new plan (the epoch in progress is left unfinished, or kept if it had not begun), so the
stream stays a pure function of the steps and a resume after the switch needs only the phase number.
"""

from __future__ import annotations

import collections
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from plmrun.data.masking import MaskedBatch, Masker, eval_masks
from plmrun.data.packing import TAG_EVAL_CROP, PackingPlan, crop_starts, pack


@dataclass(frozen=True)
class _Cursor:
    epoch: int = 0
    chunk: int = 0
    bin: int = 0
    microbatch: int = 0
    phase: int = 0  # index into the crop-length schedule


@dataclass
class _Pending:
    step: int  # the step these masks were drawn for
    after: _Cursor  # loader position once this step is consumed
    work: list  # per micro-batch: (epoch, seq indices, stream position)
    futures: list


class TrainLoader:
    """Micro-batches of one rank, step by step: `next_step(step) -> list[MaskedBatch]` (A of them)."""

    def __init__(
        self,
        source,
        *,
        token_budget: int,
        max_length: int,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        masker: Masker,
        prefetch: int = 4,
        num_workers: int = 1,
        pin_memory: bool = False,
        device=None,
        max_length_schedule=None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if grad_accum < 1 or prefetch < 0 or num_workers < 1:
            raise ValueError("grad_accum >= 1, prefetch >= 0 and num_workers >= 1 are required")
        self.device = torch.device(device) if device is not None else None
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory needs CUDA")
        self.source, self.masker, self.seed = source, masker, seed
        self.token_budget, self.max_length = token_budget, max_length
        self.schedule = [(int(s), int(n)) for s, n in max_length_schedule] if max_length_schedule else [(0, max_length)]
        steps = [s for s, _ in self.schedule]
        if steps[0] != 0 or any(a >= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"max_length_schedule must start at step 0 with increasing steps, got {self.schedule}")
        self.world_size, self.rank, self.grad_accum = world_size, rank, grad_accum
        self.prefetch, self.num_workers = prefetch, num_workers
        self._pin = pin_memory and self.device is not None and self.device.type == "cuda"
        self._plans = [
            PackingPlan(source.lengths, token_budget=token_budget, max_length=n, seed=seed) for _, n in self.schedule
        ]
        self._pos = _Cursor()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._pool = None
        self.real_tokens = 0
        self.budget_tokens = 0

    @property
    def plan(self) -> PackingPlan:
        """The packing plan of the current phase."""
        return self._plans[self._pos.phase]

    # ------------------------------------------------------------------ stream walking
    def phase_at(self, step: int) -> int:
        return max(k for k, (s, _) in enumerate(self.schedule) if s <= step) if step >= 0 else 0

    @staticmethod
    def _enter(cur: _Cursor, phase: int) -> _Cursor:
        """The cursor moved into `phase`: the next epoch, or this one if it has not begun."""
        if cur.phase == phase:
            return cur
        fresh = cur.chunk == 0 and cur.bin == 0
        return _Cursor(cur.epoch if fresh else cur.epoch + 1, 0, 0, cur.microbatch, phase)

    def _walk(self, cur: _Cursor, count: int) -> tuple[list, _Cursor]:
        """The next `count` stream entries (epoch, seq indices, position) from `cur`, and the cursor after."""
        out = []
        e, c, b, m, k = cur.epoch, cur.chunk, cur.bin, cur.microbatch, cur.phase
        plan = self._plans[k]
        for _ in range(count):
            bins = plan.bins(e, c)
            out.append((k, e, bins[b], m))
            b, m = b + 1, m + 1
            if b == len(bins):
                b, c = 0, c + 1
                if c == plan.num_chunks:
                    c, e = 0, e + 1
        return out, _Cursor(e, c, b, m, k)

    def _step_work(self, cur: _Cursor) -> tuple[list, _Cursor]:
        entries, after = self._walk(cur, self.world_size * self.grad_accum)
        a = self.rank * self.grad_accum
        return entries[a : a + self.grad_accum], after

    def _build(self, phase: int, epoch: int, idx: np.ndarray, position: int, step: int) -> MaskedBatch:
        plan = self._plans[phase]
        packed = pack(
            self.source, idx, plan.crops(epoch, idx), token_budget=self.token_budget, max_length=plan.max_length
        )
        batch = self.masker(packed, seed=self.seed, index=position, step=step)
        return batch.pin_memory() if self._pin else batch

    # ------------------------------------------------------------------ prefetch queue
    def _submit(self, step: int, cur: _Cursor) -> _Pending:
        work, after = self._step_work(self._enter(cur, self.phase_at(step)))
        if self.prefetch == 0:
            futures = [None] * len(work)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="plmrun-loader")
            futures = [self._pool.submit(self._build, *w, step) for w in work]
        return _Pending(step, after, work, futures)

    def _drop_queue(self) -> None:
        for p in self._queue:
            for f in p.futures:
                if f is not None:
                    f.cancel()
        self._queue.clear()

    def next_step(self, step: int) -> list[MaskedBatch]:
        """This rank's grad_accum micro-batches for global step `step` (masked for that step)."""
        if not self._queue or self._queue[0].step != step:
            self._drop_queue()  # first call, or the caller's step differs from the prediction
            self._queue.append(self._submit(step, self._pos))
        pending = self._queue.popleft()
        batches = [
            f.result() if f is not None else self._build(*w, step) for f, w in zip(pending.futures, pending.work)
        ]
        self._pos = pending.after
        ahead = math.ceil(self.prefetch / self.grad_accum)
        while len(self._queue) < ahead:
            last = self._queue[-1] if self._queue else pending
            self._queue.append(self._submit(last.step + 1, last.after))
        for b in batches:
            self.real_tokens += b.packed.num_real_tokens
            self.budget_tokens += b.packed.token_budget
        if self.device is not None:
            nb = self.device.type == "cuda"
            batches = [b.to(self.device, non_blocking=nb) for b in batches]
        return batches

    # ------------------------------------------------------------------ state and stats
    @property
    def epoch(self) -> int:
        return self._pos.epoch

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / budget over the micro-batches this rank has returned so far."""
        return self.real_tokens / self.budget_tokens if self.budget_tokens else float("nan")

    def _schedule_state(self):
        """The schedule as JSON lists, None without one (so older loader states still match)."""
        return [list(p) for p in self.schedule] if len(self.schedule) > 1 else None

    def state_dict(self) -> dict:
        p = self._pos
        state = {
            "epoch": p.epoch,
            "chunk": p.chunk,
            "bin": p.bin,
            "microbatch": p.microbatch,
            "seed": self.seed,
            "token_budget": self.token_budget,
            "max_length": self.schedule[0][1],
            "num_sequences": len(self.plan.lengths),
            "real_tokens": self.real_tokens,
            "budget_tokens": self.budget_tokens,
        }
        if len(self.schedule) > 1:
            state.update(phase=p.phase, max_length_schedule=self._schedule_state())
        return state

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (
            ("seed", self.seed),
            ("token_budget", self.token_budget),
            ("max_length", self.schedule[0][1]),
            ("num_sequences", len(self.plan.lengths)),
            ("max_length_schedule", self._schedule_state()),
        ):
            if state.get(key) != mine:
                raise ValueError(
                    f"loader state: {key} was {state.get(key)!r}, this run has {mine!r}; the data stream would differ"
                )
        phase = int(state.get("phase", 0))
        if not 0 <= phase < len(self._plans):
            raise ValueError(f"loader state: phase {phase} is out of range")
        if not 0 <= state["chunk"] < self._plans[phase].num_chunks:
            raise ValueError(f"loader state: chunk {state['chunk']} is out of range")
        self._drop_queue()
        self._pos = _Cursor(
            int(state["epoch"]), int(state["chunk"]), int(state["bin"]), int(state["microbatch"]), phase
        )
        # packing-efficiency counters (absent from older checkpoints: counted from this resume on)
        self.real_tokens = int(state.get("real_tokens", 0))
        self.budget_tokens = int(state.get("budget_tokens", 0))

    def close(self) -> None:
        self._drop_queue()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EvalBatches:
    """Eval micro-batches in dataset order with fixed windows and masks (see masking.eval_masks).

    Sequences (the first `subset`, 0 = all) are cut into windows of at most max_length tokens:
    `windows="crop"` keeps one fixed window per sequence, `windows="chunk"` keeps every consecutive
    window (each with its own <cls>/<eos>), so every residue of a long sequence is scored. Windows
    are filled into batches in order; batch k belongs to rank k % world_size, so ranks hold disjoint
    parts whose union is the split. Results summed over batches do not depend on the budget, the
    world size or the worker count.
    """

    def __init__(
        self,
        source,
        *,
        token_budget: int,
        max_length: int,
        eval_seed: int,
        mask_rate: float,
        subset: int = 0,
        world_size: int = 1,
        rank: int = 0,
        windows: str = "crop",
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if max_length < 3 or token_budget < max_length:
            raise ValueError(f"need 3 <= max_length ({max_length}) <= token_budget ({token_budget})")
        if windows not in ("crop", "chunk"):
            raise ValueError(f"windows must be 'crop' or 'chunk', got {windows!r}")
        n = len(source) if subset <= 0 else min(subset, len(source))
        self.source, self.token_budget, self.max_length = source, token_budget, max_length
        self.eval_seed, self.mask_rate = eval_seed, mask_rate
        lengths = np.asarray(source.lengths[:n], dtype=np.int64)
        self.index, self.starts = _eval_windows(lengths, max_length, eval_seed, windows)
        tok = (np.minimum(lengths[self.index] - self.starts, max_length - 2) + 2).tolist()
        bounds, start, used = [], 0, 0
        for i, t in enumerate(tok):
            if used + t > token_budget:
                bounds.append((start, i))
                start, used = i, 0
            used += t
        if tok:
            bounds.append((start, len(tok)))
        self.num_sequences = n
        self.num_batches_total = len(bounds)
        self.padding_fraction = 1.0 - sum(tok) / (len(bounds) * token_budget) if bounds else 0.0
        self._mine = bounds[rank::world_size]

    def __len__(self) -> int:
        return len(self._mine)

    def __iter__(self):
        for a, b in self._mine:
            packed = pack(
                self.source,
                self.index[a:b],
                self.starts[a:b],
                token_budget=self.token_budget,
                max_length=self.max_length,
            )
            yield eval_masks(packed, eval_seed=self.eval_seed, mask_rate=self.mask_rate)


def _eval_windows(lengths: np.ndarray, max_length: int, eval_seed: int, windows: str) -> tuple[np.ndarray, np.ndarray]:
    """(sequence index, residue offset) of every eval window, in dataset order."""
    index = np.arange(len(lengths), dtype=np.int64)
    if windows == "crop":
        return index, crop_starts(lengths, index, max_length, eval_seed, TAG_EVAL_CROP)
    per_seq = np.maximum(1, -(-lengths // (max_length - 2)))  # ceil(L / window), an empty sequence once
    seq = np.repeat(index, per_seq)
    first = np.cumsum(per_seq) - per_seq
    starts = (np.arange(len(seq), dtype=np.int64) - np.repeat(first, per_seq)) * (max_length - 2)
    return seq, starts
