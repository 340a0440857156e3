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

from plmrun.config import ModelConfig

DEFAULT_MAX_LENGTH = 1024
"Tokens per forward window incl. <cls>/<eos> (the ESM-2 crop and eval.max_length default)."


@dataclass
class EvalModel:
    """A model ready for inference, with what is needed to build its random-init control."""
    net: nn.Module
    config: ModelConfig
    name: str
    max_length: int = DEFAULT_MAX_LENGTH

    def random_init(self, seed: int = 0) -> "EvalModel":
        """The same architecture with fresh random weights (the negative control of probes)."""
        from plmrun.model.registry import build_model
        torch.manual_seed(seed)
        net = build_model(self.config)
        device = next(self.net.parameters()).device
        return EvalModel(net.to(device).eval(), self.config, f"{self.name} (random init)", self.max_length)


def load_eval_model(spec: str, *, device: str | torch.device = "cpu",
                    max_length: int = DEFAULT_MAX_LENGTH) -> EvalModel:
    """Any source `load_model` reads (a local path or a Hub name), ready for inference on `device`."""
    from plmrun.model.loading import load_model
    net, config = load_model(spec, device=device)
    return EvalModel(net, config, spec, max_length)


def windows(length: int, width: int) -> list[int]:
    """Start offsets of residue windows covering a sequence: stride width/2, last window flush right."""
    if length <= width:
        return [0]
    stride = max(1, width // 2)
    starts = list(range(0, length - width, stride))
    return starts + [length - width]
