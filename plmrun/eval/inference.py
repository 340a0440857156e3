"""Models for inference commands (embed, probe, zeroshot): one packed forward for every source.

Every source (run directory, checkpoint, saved model, export, Hugging Face ESM-2 folder or Hub
name) is loaded by `plmrun.model.loading.load_model` into our own model (ESM-2 folders into the
`esm2` preset, which matches EsmForMaskedLM to fp32 rounding), so `plmrun export` and `plmrun embed`
run the same code on the same folder. Batching and packing of token arrays: `plmrun.data.packing`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plmrun.config import check_window
from plmrun.model.config import POSITION_LIMIT, ModelConfig
from plmrun.eval.errors import EvalError

DEFAULT_MAX_LENGTH = 1024
"Tokens per forward window incl. <cls>/<eos> of presets with a position limit (the ESM-2 crop and eval.max_length default)."


@dataclass
class EvalModel:
    """A model ready for inference, with what is needed to build its random-init control."""
    net: nn.Module
    config: ModelConfig
    name: str
    max_length: int | None = DEFAULT_MAX_LENGTH
    "Tokens per forward window incl. <cls>/<eos>; None = whole sequences (rotary presets)."

    def random_init(self, seed: int = 0) -> "EvalModel":
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
        raise EvalError(f"{flag} {requested}: the model.arch={config.arch} model has a position limit of {limit} "
                        f"tokens; use {flag} <= {limit} (longer sequences are then scored in windows)")
    return requested


def load_eval_model(spec: str, *, device: str | torch.device = "cpu",
                    max_length: int | None = None) -> EvalModel:
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
