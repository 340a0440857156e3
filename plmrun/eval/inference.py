"""Models for inference commands (embed, probe, zeroshot): one packed forward for every source.

plmrun checkpoints/runs are loaded by `plmrun.model.loading.load_model`; Hugging Face ESM models
(`EsmForMaskedLM` folders or hub names) run through `transformers` itself behind `HFEsmAdapter`,
which takes the packed batch of the PLM contract, pads it internally and packs the outputs back,
so every caller sees `forward(tokens, positions, cu_seqlens, max_seqlen, *, logits_index=None,
output_hidden_states=False) -> .logits [T|n, 33], .hidden_states (tuple of [T, D])`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from plmrun import tokenizer as tok
from plmrun.model.layers import ModelOutput

DEFAULT_MAX_LENGTH = 1024
"Tokens per forward window incl. <cls>/<eos> (the ESM-2 crop and eval.max_length default)."


class HFEsmAdapter(nn.Module):
    """`transformers.EsmForMaskedLM` behind the packed PLM forward (the reference implementation)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, tokens, positions, cu_seqlens, max_seqlen, *, logits_index=None,
                output_hidden_states=False):
        bounds = cu_seqlens.tolist()
        segs = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a and int(tokens[a]) != tok.PAD]
        T = tokens.shape[0]
        width = max(b - a for a, b in segs)
        ids = torch.full((len(segs), width), tok.PAD, dtype=torch.long, device=tokens.device)
        for i, (a, b) in enumerate(segs):
            ids[i, : b - a] = tokens[a:b]
        out = self.hf(input_ids=ids, attention_mask=(ids != tok.PAD).long(),
                      output_hidden_states=output_hidden_states)

        def repack(x):  # [B, W, F] -> [T, F]; the pad tail (no segment) stays zero
            flat = x.new_zeros(T, x.shape[-1])
            for i, (a, b) in enumerate(segs):
                flat[a:b] = x[i, : b - a]
            return flat

        logits = repack(out.logits.float())
        if logits_index is not None:
            logits = logits[logits_index]
        hidden = tuple(repack(h) for h in out.hidden_states) if output_hidden_states else None
        return ModelOutput(logits, hidden)


@dataclass
class EvalModel:
    """A model ready for inference, with what is needed to build its random-init control."""
    net: nn.Module
    config: Any          # plmrun ModelConfig, or transformers EsmConfig for HF models
    name: str
    max_length: int = DEFAULT_MAX_LENGTH

    def random_init(self, seed: int = 0) -> "EvalModel":
        """The same architecture with fresh random weights (the negative control of probes)."""
        torch.manual_seed(seed)
        if isinstance(self.net, HFEsmAdapter):
            from transformers import EsmForMaskedLM
            net = HFEsmAdapter(EsmForMaskedLM(self.config))
        else:
            from plmrun.model.registry import build_model
            net = build_model(self.config)
        device = next(self.net.parameters()).device
        return EvalModel(net.to(device).eval(), self.config, f"{self.name} (random init)", self.max_length)


def _is_hf_esm_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False
    return data.get("model_type") == "esm" and "auto_map" not in data


def load_eval_model(spec: str, *, device: str | torch.device = "cpu",
                    max_length: int = DEFAULT_MAX_LENGTH) -> EvalModel:
    """A run directory or checkpoint (plmrun), an EsmForMaskedLM folder, or a hub name (HF)."""
    path = Path(spec)
    if _is_hf_esm_folder(path) or (not path.exists() and "/" in spec and not spec.startswith((".", "/"))):
        from transformers import EsmForMaskedLM
        try:
            hf = EsmForMaskedLM.from_pretrained(spec)
        except OSError as e:
            from plmrun.model.loading import ModelLoadError
            raise ModelLoadError(f"{spec}: not a local run, checkpoint or model folder, nor a loadable "
                                 f"Hugging Face model ({str(e).splitlines()[0]})") from None
        net, config = HFEsmAdapter(hf), hf.config
    else:
        from plmrun.model.loading import load_model
        net, config = load_model(spec)
    return EvalModel(net.to(device).eval(), config, spec, max_length)


# ---------------------------------------------------------------- packing
def length_batches(lengths: np.ndarray, token_budget: int) -> list[np.ndarray]:
    """Indices grouped into batches of <= token_budget tokens, shortest first (little attention waste)."""
    order = np.argsort(lengths, kind="stable")
    batches, cur, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if cur and used + n > token_budget:
            batches.append(np.array(cur))
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        batches.append(np.array(cur))
    return batches


def pack(token_arrays: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Token arrays (with specials) back to back -> (tokens, positions, cu_seqlens, max_seqlen)."""
    lens = np.array([len(t) for t in token_arrays], dtype=np.int64)
    tokens = torch.from_numpy(np.concatenate(token_arrays).astype(np.int64))
    cu = np.concatenate([[0], np.cumsum(lens)])
    positions = torch.from_numpy(np.arange(cu[-1]) - np.repeat(cu[:-1], lens))
    return (tokens.to(device), positions.to(device),
            torch.from_numpy(cu.astype(np.int32)).to(device), int(lens.max()))


def windows(length: int, width: int) -> list[int]:
    """Start offsets of residue windows covering a sequence: stride width/2, last window flush right."""
    if length <= width:
        return [0]
    stride = max(1, width // 2)
    starts = list(range(0, length - width, stride))
    return starts + [length - width]
