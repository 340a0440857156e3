"""Models for inference commands (embed, probe, zeroshot): one packed forward for every source.

Every source (run directory, checkpoint, saved model, export, Hugging Face ESM-2 folder or Hub
name) is loaded by `plmrun.model.loading.load_model` into our own model (ESM-2 folders into the
`esm2` preset, which matches EsmForMaskedLM to fp32 rounding), so `plmrun export` and `plmrun embed`
run the same code on the same folder. Batching and packing of token arrays: `plmrun.data.packing`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from plmrun.config import check_window
from plmrun.eval.errors import EvalError
from plmrun.model.config import POSITION_LIMIT, ModelConfig

DEFAULT_MAX_LENGTH = 1024
"""Tokens per forward window incl. <cls>/<eos> of presets with a position limit (the ESM-2 crop and
eval.max_length default)."""


@dataclass
class EvalModel:
    """A model ready for inference, with what is needed to build its random-init control."""

    net: nn.Module
    config: ModelConfig
    name: str
    max_length: int | None = DEFAULT_MAX_LENGTH
    "Tokens per forward window incl. <cls>/<eos>; None = whole sequences (rotary presets)."

    def random_init(self, seed: int = 0) -> EvalModel:
        """The same architecture with fresh random weights (the negative control of probes)."""
        from plmrun.model.registry import build_model

        torch.manual_seed(seed)
        net = build_model(self.config)
        device = next(self.net.parameters()).device
        return EvalModel(net.to(device).eval(), self.config, f"{self.name} (random init)", self.max_length)


def model_max_length(config: ModelConfig, requested: int | None = None, flag: str = "--max-length") -> int | None:
    """Tokens per forward window: `requested`, else the preset's default: DEFAULT_MAX_LENGTH with a position
    limit (esm2), None = whole sequences for rotary presets (speedrun, esmc), which take any length."""
    limit = POSITION_LIMIT.get(config.arch)
    if requested is None:
        return DEFAULT_MAX_LENGTH if limit else None
    check_window(requested, flag)
    if limit is not None and requested > limit:
        raise EvalError(
            f"{flag} {requested}: the model.arch={config.arch} model has a position limit of {limit} "
            f"tokens; use {flag} <= {limit} (longer sequences are then scored in windows)"
        )
    return requested


def load_eval_model(spec: str, *, device: str | torch.device = "cpu", max_length: int | None = None) -> EvalModel:
    """Any source `load_model` reads (a local path or a Hub name), ready for inference on `device`;
    max_length None: the model's own (see model_max_length)."""
    from plmrun.model.loading import load_model

    net, config = load_model(spec, device=device)
    return EvalModel(net, config, spec, model_max_length(config, max_length))


def window_plan(model, max_length: int | None, lengths, token_budget: int) -> tuple[int, int]:
    """(residues per forward window, tokens per batch) for sequences of `lengths` residues.

    The window is max_length - 2, else the EvalModel's (or a bare model's preset default); when that
    is None (rotary presets) the longest sequence, so every sequence goes whole. The batch budget
    grows to one window when the window is longer (a long sequence then runs alone).
    """
    if max_length is None:
        max_length = model.max_length if isinstance(model, EvalModel) else model_max_length(model.cfg)
    width = max(lengths, default=1) if max_length is None else max_length - 2
    return width, max(token_budget, width + 2)


def windows(length: int, width: int) -> list[int]:
    """Start offsets of residue windows covering a sequence: stride width/2, last window flush right."""
    if length <= width:
        return [0]
    stride = max(1, width // 2)
    starts = list(range(0, length - width, stride))
    return starts + [length - width]


@dataclass
class Window:
    """One forward window of a sequence: residues [start, start + len(tokens) - 2) with <cls>/<eos> around them."""

    seq: int
    start: int
    tokens: np.ndarray

    @property
    def residues(self) -> int:
        return len(self.tokens) - 2


def window_batches(ids: list, width: int, token_budget: int) -> Iterator[list[Window]]:
    """The windows of every sequence (`windows`, at most `width` residues each), packed shortest first into
    batches of <= token_budget tokens (`length_batches`), so results do not depend on input order."""
    from plmrun import tokenizer as tok
    from plmrun.data.packing import length_batches

    pieces = [
        Window(i, s, tok.with_specials(x[s : s + width])) for i, x in enumerate(ids) for s in windows(len(x), width)
    ]
    for batch in length_batches(np.array([len(w.tokens) for w in pieces]), token_budget):
        yield [pieces[j] for j in batch]


class WindowAverage:
    """Per-residue (or per-sequence) values averaged over the windows that cover each residue (or sequence).

    `add` returns a sequence's average once its last window is in, and forgets its sums, so only the
    sequences in flight hold per-residue state.
    """

    def __init__(self, lengths: list[int], width: int, per_residue: bool):
        self.lengths, self.per_residue = list(lengths), per_residue
        self.left = [len(windows(n, width)) for n in self.lengths]
        self.sums: list = [None] * len(self.lengths)
        self.counts: list = [None] * len(self.lengths)

    def add(self, w: Window, values: np.ndarray) -> np.ndarray | None:
        """Add one window's values: [residues, D] rows per residue, or one [D] vector per window."""
        i = w.seq
        if self.sums[i] is None:
            rows = self.lengths[i] if self.per_residue else 1
            self.sums[i] = np.zeros((rows, values.shape[-1]), np.float64)
            self.counts[i] = np.zeros((rows, 1), np.float64)
        if self.per_residue:
            self.sums[i][w.start : w.start + w.residues] += values
            self.counts[i][w.start : w.start + w.residues] += 1
        else:
            self.sums[i][0] += values
            self.counts[i][0] += 1
        self.left[i] -= 1
        if self.left[i]:
            return None
        mean = self.sums[i] / self.counts[i]
        self.sums[i] = self.counts[i] = None
        return mean if self.per_residue else mean[0]
