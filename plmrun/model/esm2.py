"""The `esm2` preset: Hugging Face EsmForMaskedLM (rotary ESM-2) computed on packed input.

Embedding (ESM token dropout when enabled; no embedding LayerNorm, as in ESM-2), pre-LN blocks
with biased LayerNorm/Q/K/V/O/MLP, queries scaled by Dh^-0.5 *before* rotary (ESM's order),
erf-GELU MLP, `emb_layer_norm_after`, head dense -> GELU -> LayerNorm -> decoder + bias.
It matches EsmForMaskedLM to fp32 rounding (tested); speedrun-only switches (qk_norm, caps,
windows, ...) are refused, as in config validation. `EsmFamilyPLM` is the part ESM-2 and ESM C share
(embedding, blocks, final norm, head, HF's init, the forward). Its adapter `HfEsm2Adapter` reads every
Hugging Face layout of EsmForMaskedLM and writes the current one for export.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import PackedLayout, packed_attention
from .config import ModelConfig, arch_conflicts
from .layers import (
    PLM,
    ModelOutput,
    Rotary,
    StateDictAdapter,
    apply_rotary,
    compute_dtype,
    fp32_linear,
    token_dropout,
    window_at,
)
from .vocab import VOCAB_SIZE


class EsmLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, self.H = cfg.hidden_size, cfg.num_heads
        self.cfg = cfg
        self.compiled_cpu_kernel = False  # set by PLM.use_compiled_cpu_attention
        self.attn_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.mlp_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        inner = round(D * cfg.expansion_ratio)
        self.up, self.down = nn.Linear(D, inner), nn.Linear(inner, D)

    def forward(self, x, cos, sin, layout: PackedLayout, window: int):
        T, D = x.shape
        h = self.attn_norm(x)
        q, k, v = (f(h).view(T, self.H, D // self.H) for f in (self.q, self.k, self.v))
        q = q * (D // self.H) ** -0.5
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        a = packed_attention(
            q,
            k,
            v,
            backend=self.cfg.attention_backend,
            compiled_cpu_kernel=self.compiled_cpu_kernel,
            window=window,
            soft_cap=self.cfg.attention_soft_cap,
            scale=1.0,
            layout=layout,
        )
        x = x + self.o(a.reshape(T, D))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class EsmLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden_size
        self.dense = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(D, VOCAB_SIZE, bias=False)
        self.bias = nn.Parameter(torch.empty(VOCAB_SIZE))

    def forward(self, h):
        return fp32_linear(self.norm(F.gelu(self.dense(h))), self.decoder.weight, self.bias)


class EsmFamilyPLM(PLM):
    """ESM-2 and ESM C: embedding [token dropout] -> blocks -> final LayerNorm -> LM head, with Hugging Face's
    init. Subclasses give the block, the final norm's bias and the words for their refusal of switches their
    fixed architecture does not have (model.config.arch_conflicts)."""

    embed_prefixes = ("embed.",)
    head_prefixes = ("head.",)
    block_class: type[nn.Module]
    final_norm_bias = True
    described_as = ""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        on = arch_conflicts(cfg)
        if on:
            raise ValueError(f"model.arch={cfg.arch} is {self.described_as}: turn off {', '.join(on)}")
        D = cfg.hidden_size
        with self.built_on_meta():  # structure only: init_weights gives every starting value
            self.embed = nn.Embedding(VOCAB_SIZE, D)
            self.blocks = nn.ModuleList(self.block_class(cfg) for _ in range(cfg.num_layers))
            self.final_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps, bias=self.final_norm_bias)
            self.rotary = Rotary(D // cfg.num_heads, cfg.rope_base)
            self.head = EsmLMHead(cfg)
            if cfg.tie_embeddings:
                self.head.decoder.weight = self.embed.weight

    def init_weights(self) -> None:
        """HF EsmPreTrainedModel's init: N(0, std) matrices and embeddings, zero biases, unit LayerNorms.

        First PyTorch's default draw of every Linear/Embedding in construction order, overwritten
        at once: the random stream then advances exactly as when the constructors drew them, so a
        seeded build is bitwise what earlier versions built. A tied decoder draws into a throwaway copy.
        """
        std, tied = self.cfg.init_std, self.cfg.tie_embeddings
        drawn = [m for m in self.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
        drawn_ids = {id(m) for m in drawn}
        for m in drawn:
            if tied and m is self.head.decoder:
                nn.init.kaiming_uniform_(torch.empty_like(m.weight), a=math.sqrt(5))
            else:
                m.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif id(m) in drawn_ids:
                (torch.empty_like(m.weight) if tied and m is self.head.decoder else m.weight).normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        self.head.bias.zero_()
        self.rotary.reset_buffers()

    def forward(
        self, tokens, positions, cu_seqlens, max_seqlen, *, logits_index=None, output_hidden_states=False, step=None
    ) -> ModelOutput:
        layout = PackedLayout(cu_seqlens, max_seqlen)
        window = window_at(self.cfg, step)
        x = self.embed(tokens)
        if self.cfg.token_dropout:
            x = token_dropout(x, tokens, layout)
        cos, sin = self.rotary(positions, compute_dtype(x))
        hidden = [x] if output_hidden_states else None
        for block in self.blocks:
            x = block(x, cos, sin, layout, window)
            if hidden is not None:
                hidden.append(x)
        h = self.final_norm(x)
        if hidden is not None:
            hidden.append(h)
        logits = self.head(self._head_rows(h, logits_index))
        return ModelOutput(logits=logits, hidden_states=tuple(hidden) if hidden is not None else None)


# ------------------------------------------------------------------ Hugging Face weights
_LAYER_MAP = {  # ours (under blocks.{i}.) -> HF (under esm.encoder.layer.{i}.)
    "attn_norm": "attention.LayerNorm",
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "mlp_norm": "LayerNorm",
    "up": "intermediate.dense",
    "down": "output.dense",
}
_TOP_MAP = {
    "embed.weight": "esm.embeddings.word_embeddings.weight",
    "final_norm.weight": "esm.encoder.emb_layer_norm_after.weight",
    "final_norm.bias": "esm.encoder.emb_layer_norm_after.bias",
    "head.dense.weight": "lm_head.dense.weight",
    "head.dense.bias": "lm_head.dense.bias",
    "head.norm.weight": "lm_head.layer_norm.weight",
    "head.norm.bias": "lm_head.layer_norm.bias",
    "head.decoder.weight": "lm_head.decoder.weight",
    "head.bias": "lm_head.bias",
}
HF_INV_FREQ = "esm.rotary_embeddings.inv_freq"
# HF buffers and heads that are not part of the masked-LM computation
_HF_IGNORED = ("esm.embeddings.position_ids", "esm.contact_head.", "esm.pooler.")
# older names transformers still reads (and 5.x writes back): LayerNorm.gamma/beta
_HF_LEGACY = ((".LayerNorm.gamma", ".LayerNorm.weight"), (".LayerNorm.beta", ".LayerNorm.bias"))


class HfEsm2Adapter(StateDictAdapter):
    """Hugging Face `EsmForMaskedLM` (rotary ESM-2) <-> the esm2 preset."""

    source = "EsmForMaskedLM"

    @staticmethod
    def key_map(num_layers: int) -> dict[str, str]:
        """Our parameter name -> EsmForMaskedLM's (current transformers naming) for a model of num_layers."""
        m = dict(_TOP_MAP)
        for i in range(num_layers):
            for ours, hf in _LAYER_MAP.items():
                for p in ("weight", "bias"):
                    m[f"blocks.{i}.{ours}.{p}"] = f"esm.encoder.layer.{i}.{hf}.{p}"
        return m

    @staticmethod
    def canonical(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Any EsmForMaskedLM layout under the current names (the ones `key_map` uses).

        Handles the names the Hub's facebook/esm2_* files and transformers 4.x/5.x `save_pretrained`
        use: an `EsmModel` without the `esm.` prefix, LayerNorm `.gamma/.beta`, rotary `inv_freq` stored
        once, per layer or under a `layer.*` pattern; drops position_ids and the contact head.
        """
        out: dict[str, torch.Tensor] = {}
        for k, v in dict(hf_state).items():
            if not k.startswith(("esm.", "lm_head.")):
                k = f"esm.{k}"
            for old, new in _HF_LEGACY:
                if k.endswith(old):
                    k = k[: -len(old)] + new
            if k.endswith("rotary_embeddings.inv_freq"):
                out.setdefault(HF_INV_FREQ, v)
            elif not k.startswith(_HF_IGNORED):
                out[k] = v
        return out

    def export(self, model: PLM) -> dict[str, torch.Tensor]:
        """The EsmForMaskedLM state dict of `model` (load it with strict=False: HF's position_ids buffer
        is not a weight)."""
        if not isinstance(model, Esm2PLM):
            raise ValueError(f"EsmForMaskedLM weights need an esm2-preset model, got {type(model).__name__}")
        cfg = model.cfg
        ours = model.state_dict()
        out = {hf: ours[name].detach().clone() for name, hf in self.key_map(len(model.blocks)).items()}
        out[HF_INV_FREQ] = model.rotary.inv_freq.detach().clone()
        n = cfg.num_layers * cfg.num_heads  # contact head: not trained here, zeros keep strict loading happy
        out["esm.contact_head.regression.weight"] = torch.zeros(1, n)
        out["esm.contact_head.regression.bias"] = torch.zeros(1)
        return out

    def load(self, model: PLM, hf_state: dict[str, torch.Tensor]) -> None:
        """Copy an EsmForMaskedLM state dict (rotary ESM-2, any layout) into `model`."""
        if not isinstance(model, Esm2PLM):
            raise ValueError(f"ESM-2 weights need an esm2-preset model (model.arch=esm2), not {type(model).__name__}")
        hf_state = self.canonical(hf_state)
        if "esm.embeddings.position_embeddings.weight" in hf_state:
            raise ValueError("absolute position embeddings (ESM-1b style); the esm2 preset is rotary only")
        prefix = "esm.encoder.layer."
        ids = {int(k[len(prefix) :].split(".", 1)[0]) for k in hf_state if k.startswith(prefix)}
        n = max(ids) + 1 if ids else 0
        if n != len(model.blocks):
            raise ValueError(
                f"{n} encoder layers, the model has {len(model.blocks)} "
                f"(set model.num_layers={n} or pick the matching config)"
            )
        # tied checkpoints may omit the decoder: it is the word embedding
        hf_state.setdefault("lm_head.decoder.weight", hf_state.get("esm.embeddings.word_embeddings.weight"))
        ours = model.state_dict()
        mapping = self.key_map(len(model.blocks))
        missing = [hf for hf in mapping.values() if hf_state.get(hf) is None]
        if missing:
            raise ValueError(
                f"lacks {len(missing)} esm2 weights, e.g. {missing[0]!r} (an EsmModel without the masked-LM head?)"
            )
        known = set(mapping.values()) | {HF_INV_FREQ}
        extra = [k for k in hf_state if k not in known]
        if extra:
            raise ValueError(f"{len(extra)} weights the esm2 preset does not know, e.g. {extra[0]!r}")
        new = {}
        for name, hf in mapping.items():
            if tuple(ours[name].shape) != tuple(hf_state[hf].shape):
                raise ValueError(
                    f"shape mismatch for {hf}: weights {tuple(hf_state[hf].shape)}, "
                    f"model {tuple(ours[name].shape)} (check hidden_size/num_heads/expansion_ratio)"
                )
            new[name] = hf_state[hf]
        if model.cfg.tie_embeddings and not torch.equal(new["head.decoder.weight"], new["embed.weight"]):
            raise ValueError("untied LM decoder but model.tie_embeddings=true; set it to false")
        model.load_state_dict(new, strict=True)
        inv = hf_state.get(HF_INV_FREQ)
        if inv is not None:  # keep the checkpoint's (possibly fp16-rounded) frequencies for exact parity
            if inv.shape != model.rotary.inv_freq.shape:
                raise ValueError(
                    f"rotary inv_freq has shape {tuple(inv.shape)}, model expects "
                    f"{tuple(model.rotary.inv_freq.shape)} (check hidden_size/num_heads)"
                )
            model.rotary.inv_freq.copy_(inv)


class Esm2PLM(EsmFamilyPLM):
    block_class = EsmLayer
    described_as = "the exact Hugging Face architecture"
    adapter = HfEsm2Adapter()
