"""The model's configuration and what each architecture allows: `ModelConfig`, position limits and the
per-architecture switch checks (config validation and the model constructors both use them).

Standalone on purpose (no plmrun import): `plmrun export` ships the model package's modules as they are.
The option table in docs is generated from the field docstrings below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ESM2_POSITION_LIMIT = 1026
"Most tokens per sequence (incl. <cls>/<eos>) of the esm2 preset: EsmForMaskedLM's max_position_embeddings."
POSITION_LIMIT = {"esm2": ESM2_POSITION_LIMIT}
"Position limit of each preset that has one; rotary-only presets (speedrun, esmc) take any length."


@dataclass
class ModelConfig:
    arch: Literal["speedrun", "esm2", "esmc"] = "speedrun"
    (
        "Architecture: the speedrun encoder, the Hugging Face EsmForMaskedLM-equivalent preset, or ESM C "
        "(EvolutionaryScale)."
    )
    hidden_size: int = 256
    "Width of the residual stream."
    num_layers: int = 4
    "Number of transformer blocks."
    num_heads: int = 4
    "Attention heads (head dim = hidden_size / num_heads)."
    expansion_ratio: float = 4.0
    (
        "MLP width / hidden_size (ESM-2 uses 4.0; the seed's speedrun 8/3; esmc: SwiGLU width, rounded up to a "
        "multiple of 256, ESM C 8/3)."
    )
    rope_base: float = 10000.0
    "Rotary embedding base."
    unet: bool = True
    "speedrun: UNet skip connections (first half pushes, second half pops, learned weights)."
    x0_lambdas: bool = True
    "speedrun: every block mixes in the embedding output x0 with learned lambdas."
    value_embeddings: bool = True
    "speedrun: extra embedding tables mixed into attention values (mirrored over depth)."
    qk_norm: bool = True
    "speedrun: RMS-normalise queries and keys per head; esmc: ESM C's bias-free LayerNorm of queries and keys."
    soft_logit_cap: float = 32.0
    "tanh cap on output logits (0 = off)."
    attention_soft_cap: float = 0.0
    "tanh cap on attention scores (0 = off; the seed used 64)."
    p_attention: bool = False
    "speedrun: Pattention MLP replacement (learned key/value parameter tokens)."
    num_att_tokens: int = 512
    "Number of parameter tokens per Pattention layer (read only when p_attention)."
    tie_embeddings: bool = False
    "Tie the LM-head decoder to the input embedding."
    token_dropout: bool = False
    (
        "ESM-2 token dropout: zero <mask> embeddings and rescale by the masked fraction (speedrun: a <mask> row "
        "becomes a fixed ±1 row of unit RMS, since a zero row has no direction under its weightless norms)."
    )
    sliding_window: int = 0
    "Final sliding-window size in tokens (0 = full attention within each sequence)."
    sliding_window_start: int = 0
    "Window at step 0, grown linearly to sliding_window over window_warmup_steps (0 = fixed)."
    window_warmup_steps: int = 0
    "Steps over which the sliding window grows from sliding_window_start."
    attention_backend: Literal["auto", "cpu", "flex", "flash", "sdpa_dense", "naive"] = "auto"
    "Packed-attention kernel: auto picks flash/flex on CUDA and the bucketed cpu path elsewhere."
    layer_norm_eps: float = 1e-5
    "esm2, esmc: LayerNorm epsilon."
    init_std: float = 0.02
    "Standard deviation of normal weight initialisation."
    norm: Literal["rms", "layer"] = "rms"
    (
        "speedrun: every norm of the encoder (embedding, pre-norms, QK-norm, final and head norm), weightless: RMSNorm"
        " (rms) or LayerNorm (layer, also centres). esm2/esmc have their own LayerNorms and take only the default."
    )
    position_encoding: Literal["rope", "none"] = "rope"
    (
        "speedrun: rotary position embedding (rope) or none at all (attention then sees an unordered set). esm2/esmc "
        "are rotary and take only the default."
    )
    mlp_activation: Literal["relu2", "gelu"] = "relu2"
    (
        "speedrun: MLP nonlinearity, squared ReLU (relu2) or erf-GELU (gelu); not with p_attention. esm2 (GELU) and "
        "esmc (SwiGLU) take only the default."
    )


ESM2_OFF = (
    "unet",
    "x0_lambdas",
    "value_embeddings",
    "p_attention",
    "qk_norm",
    "soft_logit_cap",
    "attention_soft_cap",
    "sliding_window",
    "sliding_window_start",
)
ESMC_OFF = (
    "unet",
    "x0_lambdas",
    "value_embeddings",
    "p_attention",
    "token_dropout",
    "tie_embeddings",
    "soft_logit_cap",
    "attention_soft_cap",
    "sliding_window",
    "sliding_window_start",
)
ARCH_OFF = {"esm2": ESM2_OFF, "esmc": ESMC_OFF}
"Switches each fixed architecture refuses when on (true or > 0): esm2 is exactly EsmForMaskedLM, esmc ESM C."
SPEEDRUN_CHOICES = ("norm", "position_encoding", "mlp_activation")
"The seed's fixed choices, open on the speedrun architecture; esm2 and esmc take only their defaults."


def arch_conflicts(m: ModelConfig) -> list[str]:
    """The switches that are on (or choices off their default) but are not part of m.arch's fixed architecture."""
    if m.arch not in ARCH_OFF:
        return []
    defaults = ModelConfig()
    return [k for k in ARCH_OFF[m.arch] if getattr(m, k)] + [
        k for k in SPEEDRUN_CHOICES if getattr(m, k) != getattr(defaults, k)
    ]


def model_config_problems(m: ModelConfig) -> list[str]:
    """Every problem of `m` on its own, as one-line messages naming the key (empty: valid)."""
    out = []
    if not (m.hidden_size > 0 and m.num_layers > 0 and m.num_heads > 0):
        out.append("model: sizes must be positive")
    elif m.hidden_size % m.num_heads:
        out.append(f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads})")
    elif (m.hidden_size // m.num_heads) % 2:
        out.append("model: head dim (hidden_size / num_heads) must be even for RoPE")
    checks = [
        (m.expansion_ratio > 0, "model.expansion_ratio must be > 0"),
        (m.soft_logit_cap >= 0 and m.attention_soft_cap >= 0, "model: soft caps must be >= 0 (0 = off)"),
        (m.sliding_window >= 0 and m.sliding_window_start >= 0, "model: sliding windows must be >= 0"),
        (m.window_warmup_steps >= 0, "model.window_warmup_steps must be >= 0"),
        (
            not (m.window_warmup_steps and not (m.sliding_window and m.sliding_window_start)),
            "model.window_warmup_steps needs model.sliding_window > 0 and model.sliding_window_start > 0",
        ),
        (m.num_att_tokens > 0, "model.num_att_tokens must be > 0"),
        (
            not (m.p_attention and m.mlp_activation != "relu2"),
            "model.mlp_activation applies to the MLP, which model.p_attention replaces; leave it at 'relu2' or turn "
            "p_attention off",
        ),
    ]
    out += [msg for ok, msg in checks if not ok]
    defaults = ModelConfig()
    if m.arch == "esm2":
        for k in ESM2_OFF:
            if getattr(m, k):
                kind = "false" if isinstance(getattr(m, k), bool) else "0"
                out.append(f"model.{k} is a speedrun option; set it to {kind} with model.arch=esm2")
    if m.arch == "esmc":
        out += [
            f"model.{k} is not part of ESM C; turn it off (false or 0) with model.arch=esmc"
            for k in ESMC_OFF
            if getattr(m, k)
        ]
    if m.arch in ARCH_OFF:
        out += [
            f"model.{k} is a speedrun option; leave it at {getattr(defaults, k)!r} with model.arch={m.arch} "
            "(the preset has its own)"
            for k in SPEEDRUN_CHOICES
            if getattr(m, k) != getattr(defaults, k)
        ]
    return out
