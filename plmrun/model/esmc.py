"""The `esmc` preset: EvolutionaryScale's ESM C (`esm.models.esmc.ESMC`, esm 3.x) computed on packed input.

The math, read from the `esm` package (layers/blocks.py, attention.py, transformer_stack.py,
regression_head.py): embedding (no token dropout, no embedding norm); per block, pre-LN attention
(biased LayerNorm, bias-free Q/K/V/O, QK LayerNorm *without bias over all heads at once* before
rotary, rotate-half RoPE base 10000, scale Dh^-0.5) and a pre-LN SwiGLU MLP (biased LayerNorm,
silu(gate) * up, bias-free, inner width = expansion_ratio * D rounded up to a multiple of 256); both
residual branches divided by sqrt(num_layers / 36); a bias-free final LayerNorm; sequence head
dense -> erf-GELU -> LayerNorm -> decoder, all biased. ESM C fuses Q/K/V into one [3D, D] matrix and
gate/up into one [2F, D] matrix; here they are separate matrices (Muon orthogonalises each): the
adapter `EsmcAdapter` splits them on load and joins them on export. hidden_states: (embedding, each
block's output, final norm), i.e. ESM C's `hidden_states` between our first and last entry and its `embeddings` last.

Vocabulary: ESM C's ids 0..32 are ESM-2's (ours) with one exception, id 31, which is ESM C's chain
break `|` and our unused `<null_1>`; ESM C pads its embedding and head to 64 rows, ids 33..63 are
never produced by its tokenizer. The preset keeps our 33 ids: loading takes the first 33 rows of
the embedding and of the decoder, so logits equal ESM C's logits[..., :33] exactly, and the softmax
runs over the 33 real tokens (ESM C's over 64; the 31 placeholder logits of a trained ESM C are
never targets). Embedding, final norm, head, init (the esm package ships no training init) and forward
are the esm2 preset's (`EsmFamilyPLM`), whose token dropout, tie and sliding window are off here.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import PackedLayout, packed_attention
from .config import ModelConfig
from .esm2 import EsmFamilyPLM
from .layers import PLM, StateDictAdapter, apply_rotary
from .vocab import VOCAB_SIZE


def swiglu_width(cfg: ModelConfig) -> int:
    """ESM C's SwiGLU inner width: expansion_ratio * hidden_size rounded up to a multiple of 256."""
    return int((cfg.expansion_ratio * cfg.hidden_size + 255) // 256 * 256)


def residue_scale(num_layers: int) -> float:
    """ESM C divides every residual branch by sqrt(num_layers / 36)."""
    return math.sqrt(num_layers / 36)


class EsmcBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, self.H = cfg.hidden_size, cfg.num_heads
        self.cfg = cfg
        self.compiled_cpu_kernel = False  # set by PLM.use_compiled_cpu_attention
        self.scale = residue_scale(cfg.num_layers)
        self.attn_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.q_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps, bias=False) if cfg.qk_norm else None
        self.k_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps, bias=False) if cfg.qk_norm else None
        self.mlp_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        F_ = swiglu_width(cfg)
        self.gate, self.up = nn.Linear(D, F_, bias=False), nn.Linear(D, F_, bias=False)
        self.down = nn.Linear(F_, D, bias=False)

    def forward(self, x, cos, sin, layout: PackedLayout, window: int):
        T, D = x.shape
        h = self.attn_norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        if self.q_norm is not None:
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)  # as ESM C: CUDA autocast norms in fp32
        q, k, v = (t.view(T, self.H, D // self.H) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        a = packed_attention(
            q,
            k,
            v,
            backend=self.cfg.attention_backend,
            compiled_cpu_kernel=self.compiled_cpu_kernel,
            window=window,
            layout=layout,
        )
        x = x + self.o(a.reshape(T, D)) / self.scale
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h)) / self.scale


# ------------------------------------------------------------------ ESM C weights
_LAYER_MAP = {  # ours (under blocks.{i}.) -> ESM C (under transformer.blocks.{i}.), plain copies
    "attn_norm.weight": "attn.layernorm_qkv.0.weight",
    "attn_norm.bias": "attn.layernorm_qkv.0.bias",
    "o.weight": "attn.out_proj.weight",
    "q_norm.weight": "attn.q_ln.weight",
    "k_norm.weight": "attn.k_ln.weight",
    "mlp_norm.weight": "ffn.0.weight",
    "mlp_norm.bias": "ffn.0.bias",
    "down.weight": "ffn.3.weight",
}
_FUSED = {
    "attn.layernorm_qkv.1.weight": ("q.weight", "k.weight", "v.weight"),  # ESM C -> ours, split on dim 0
    "ffn.1.weight": ("gate.weight", "up.weight"),
}
_TOP_MAP = {
    "final_norm.weight": "transformer.norm.weight",
    "head.dense.weight": "sequence_head.0.weight",
    "head.dense.bias": "sequence_head.0.bias",
    "head.norm.weight": "sequence_head.2.weight",
    "head.norm.bias": "sequence_head.2.bias",
}
_VOCAB_ROWS = {
    "embed.weight": "embed.weight",
    "head.decoder.weight": "sequence_head.3.weight",
    "head.bias": "sequence_head.3.bias",
}  # ours -> ESM C, first 33 rows


ESMC_VOCAB_ROWS = 64  # ESM C's embedding and head rows (33 tokens, padded)


class EsmcAdapter(StateDictAdapter):
    """The esm package's `ESMC.state_dict()` (its .pth files) <-> the esmc preset."""

    source = "ESMC"

    def export(self, model: PLM) -> dict[str, torch.Tensor]:
        """`model` in ESM C's names and shapes (loads into `ESMC` strictly): fused matrices concatenated, the
        31 placeholder vocabulary rows zero with decoder bias -1e4, so ESM C's 64-way softmax is our 33-way."""
        if not isinstance(model, EsmcPLM):
            raise ValueError(f"ESM C weights need an esmc-preset model, got {type(model).__name__}")
        ours = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out = {key: ours[name] for name, key in _TOP_MAP.items()}
        for name, key in _VOCAB_ROWS.items():
            t = ours[name]
            pad = t.new_full((ESMC_VOCAB_ROWS - VOCAB_SIZE, *t.shape[1:]), -1e4 if name == "head.bias" else 0.0)
            out[key] = torch.cat([t, pad])
        for i in range(len(model.blocks)):
            for name, key in _LAYER_MAP.items():
                if f"blocks.{i}.{name}" in ours:
                    out[f"transformer.blocks.{i}.{key}"] = ours[f"blocks.{i}.{name}"]
            for key, names in _FUSED.items():
                out[f"transformer.blocks.{i}.{key}"] = torch.cat([ours[f"blocks.{i}.{n}"] for n in names])
        return out

    def load(self, model: PLM, sd: dict[str, torch.Tensor]) -> None:
        """Copy ESM C's state dict into `model`: fused matrices split, vocabulary rows cut to our 33."""
        if not isinstance(model, EsmcPLM):
            raise ValueError(f"needs an esmc-preset model, got {type(model).__name__}")
        ours, new, used = model.state_dict(), {}, set()

        def get(key: str) -> torch.Tensor:
            if key not in sd:
                raise ValueError(
                    f"checkpoint lacks {key!r} (model has {len(model.blocks)} layers, "
                    f"model.qk_norm={model.cfg.qk_norm})"
                )
            if not isinstance(sd[key], torch.Tensor):
                raise ValueError(f"checkpoint's {key!r} is a {type(sd[key]).__name__}, not a tensor")
            used.add(key)
            return sd[key]

        for name, key in _TOP_MAP.items():
            new[name] = get(key)
        for name, key in _VOCAB_ROWS.items():
            new[name] = get(key)[:VOCAB_SIZE]
        for i in range(len(model.blocks)):
            for name, key in _LAYER_MAP.items():
                if f"blocks.{i}.{name}" in ours:  # q_norm/k_norm only with model.qk_norm
                    new[f"blocks.{i}.{name}"] = get(f"transformer.blocks.{i}.{key}")
            for key, names in _FUSED.items():
                fused, rows = get(f"transformer.blocks.{i}.{key}"), ours[f"blocks.{i}.{names[0]}"].shape[0]
                if fused.shape[0] == rows * len(names):
                    new.update(zip((f"blocks.{i}.{n}" for n in names), fused.split(rows, dim=0)))
                else:  # the shape check below names it
                    new[f"blocks.{i}.{names[0]}"] = fused
        extra = [k for k in sd if k not in used]
        if extra:
            raise ValueError(
                f"checkpoint has {len(extra)} weights the esmc preset does not know, e.g. {extra[0]!r} "
                f"(different number of layers or model.qk_norm? model has {len(model.blocks)} layers)"
            )
        for name, t in new.items():
            if tuple(t.shape) != tuple(ours[name].shape):
                raise ValueError(
                    f"shape mismatch for {name}: checkpoint {tuple(t.shape)}, model "
                    f"{tuple(ours[name].shape)} (check hidden_size/num_heads/expansion_ratio)"
                )
        model.load_state_dict(new, strict=True)


class EsmcPLM(EsmFamilyPLM):
    block_class = EsmcBlock
    final_norm_bias = False  # ESM C's final norm has no bias; its sequence head is ESM-2's LM head, untied
    described_as = "the ESM C architecture"
    adapter = EsmcAdapter()
