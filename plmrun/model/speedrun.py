"""The speedrun encoder (after SpeedrunningPLMs / modded-nanogpt), on packed sequences.

x0 = norm(embed(tokens)) [token dropout]. Each block: x = a*x + b*x0 (x0 lambdas), attention
(bias-free Q/K/V/O, QK-norm, RoPE, value embeddings mixed into V, optional tanh score cap and
sliding window), then a ReLU^2 MLP or a Pattention layer; both sublayers pre-norm with a
weightless RMSNorm and zero-initialised output projections. UNet: the first L//2 blocks push
their outputs, the last L//2 pop them (x += w_i * skip) before running. Head: dense -> GELU ->
norm -> decoder (+bias), tanh soft-capped logits. Every feature is a ModelConfig switch, and so are the
seed's fixed choices: the norm (weightless RMSNorm or LayerNorm), the position encoding (RoPE or none)
and the MLP nonlinearity (ReLU^2 or GELU).

Starting values live in the `init_weights` methods only (N(0, init_std) matrices and embeddings,
zero output projections / value tokens / biases, lambdas 0.5/0.5 and 1/0, unit skip weights); the
constructor builds on the meta device and calls them, and so does meta-device init after sharding.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import PackedLayout, packed_attention
from .config import ModelConfig
from .layers import (
    NORMS,
    PLM,
    ModelOutput,
    Rotary,
    apply_rotary,
    compute_dtype,
    fill_,
    fp32_linear,
    init_linear_,
    relu_squared,
    soft_cap,
    token_dropout,
    window_at,
)
from .vocab import VOCAB_SIZE


def _linear(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, has_value_embedding: bool):
        super().__init__()
        D, self.H = cfg.hidden_size, cfg.num_heads
        self.cfg = cfg
        self.compiled_cpu_kernel = False  # set by PLM.use_compiled_cpu_attention
        self.norm = NORMS[cfg.norm]
        self.q, self.k, self.v, self.o = (_linear(D, D) for _ in range(4))
        # v <- l0 * v + l1 * value_embedding, as in modded-nanogpt
        self.value_lambdas = nn.Parameter(torch.empty(2)) if has_value_embedding else None

    def init_weights(self, std: float) -> None:
        for lin in (self.q, self.k, self.v):
            init_linear_(lin, std)
        init_linear_(self.o, std, zero=True)
        if self.value_lambdas is not None:
            fill_(self.value_lambdas, [0.5, 0.5])

    def forward(self, x, cos, sin, ve, layout: PackedLayout, window: int):
        T, D = x.shape
        q, k, v = (f(x).view(T, self.H, D // self.H) for f in (self.q, self.k, self.v))
        if self.cfg.qk_norm:
            q, k = self.norm(q), self.norm(k)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if ve is not None:
            v = self.value_lambdas[0] * v + self.value_lambdas[1] * ve.view_as(v).to(v.dtype)
        o = packed_attention(
            q,
            k,
            v,
            backend=self.cfg.attention_backend,
            compiled_cpu_kernel=self.compiled_cpu_kernel,
            window=window,
            soft_cap=self.cfg.attention_soft_cap,
            layout=layout,
        )
        return self.o(o.reshape(T, D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = round(cfg.hidden_size * cfg.expansion_ratio)
        self.up = _linear(cfg.hidden_size, hidden)
        self.down = _linear(hidden, cfg.hidden_size)
        self.relu2 = cfg.mlp_activation == "relu2"

    def init_weights(self, std: float) -> None:
        init_linear_(self.up, std)
        init_linear_(self.down, std, zero=True)

    def forward(self, x):
        h = self.up(x)
        return self.down(relu_squared(h) if self.relu2 else F.gelu(h))


class Pattention(nn.Module):
    """Tokenformer's Pattention (Wang et al. 2024) in place of the MLP: the token attends to
    num_att_tokens learned key/value parameter tokens. Scores s = x K^T are normalised per
    token to L2 norm sqrt(n) and passed through GELU instead of a softmax (the paper's
    modified softmax, which keeps gradients alive for many tokens); out = GELU(s) V.
    The value tokens are zero-initialised like every other output projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, D = cfg.num_att_tokens, cfg.hidden_size
        self.key_tokens = nn.Parameter(torch.empty(n, D))
        self.value_tokens = nn.Parameter(torch.empty(n, D))
        self.tau = math.sqrt(n)

    def init_weights(self, std: float) -> None:
        self.key_tokens.normal_().mul_(std)  # = randn(n, D) * std, as first written
        self.value_tokens.zero_()

    def forward(self, x):
        s = F.linear(x, self.key_tokens)
        s = s * (self.tau / s.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(s.dtype)
        return F.linear(F.gelu(s), self.value_tokens.t())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, has_value_embedding: bool):
        super().__init__()
        self.attn = SelfAttention(cfg, has_value_embedding)
        self.mlp = Pattention(cfg) if cfg.p_attention else MLP(cfg)
        self.x0_lambdas = nn.Parameter(torch.empty(2)) if cfg.x0_lambdas else None
        self.norm = NORMS[cfg.norm]

    def init_weights(self, std: float) -> None:
        self.attn.init_weights(std)
        self.mlp.init_weights(std)
        if self.x0_lambdas is not None:
            fill_(self.x0_lambdas, [1.0, 0.0])

    def forward(self, x, x0, cos, sin, ve, layout, window):
        if self.x0_lambdas is not None:
            x = self.x0_lambdas[0] * x + self.x0_lambdas[1] * x0
        x = x + self.attn(self.norm(x), cos, sin, ve, layout, window)
        return x + self.mlp(self.norm(x))


class LMHead(nn.Module):
    def __init__(self, cfg: ModelConfig, tied: nn.Parameter | None):
        super().__init__()
        D = cfg.hidden_size
        self.dense = _linear(D, D)
        self.decoder = _linear(D, VOCAB_SIZE)
        if tied is not None:
            self.decoder.weight = tied
        self.bias = nn.Parameter(torch.empty(VOCAB_SIZE))
        self.cap = cfg.soft_logit_cap
        self.norm = NORMS[cfg.norm]

    def init_weights(self, std: float, *, tied: bool) -> None:
        init_linear_(self.dense, std)
        init_linear_(self.decoder, std, scratch=tied)  # tied: the decoder is the embedding, drawn already
        self.bias.zero_()

    def forward(self, h):
        x = self.norm(F.gelu(self.dense(h)))
        return soft_cap(fp32_linear(x, self.decoder.weight, self.bias), self.cap)


def dropped_row(x: torch.Tensor) -> torch.Tensor:
    """What token dropout makes of a <mask> row here: +1, -1, +1, ... (fixed, unit RMS, zero mean).

    Not ESM-2's zero row: a weightless norm has no direction for a zero row and its gradient there is
    1/sqrt(eps) (~2900 in fp32). With the output projections starting at zero, a zero row stays zero
    up to the head, so every masked position's loss gradient passed several such norms on its way into
    the attention output projections, and the first steps' gradients exploded. This row carries no token
    identity either, and every norm maps it to itself.
    """
    row = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    row[1::2] = -1
    return row


def value_embedding_table(layer: int, num_layers: int) -> int | None:
    """num_layers//2 tables mirrored over depth: layer i and layer L-1-i share table i."""
    i = min(layer, num_layers - 1 - layer)
    return i if i < num_layers // 2 else None


class SpeedrunPLM(PLM):
    embed_prefixes = ("embed.", "value_embeds.")
    head_prefixes = ("head.",)

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        D, L = cfg.hidden_size, cfg.num_layers
        with self.built_on_meta():  # structure only: init_weights gives every starting value
            self.embed = nn.Embedding(VOCAB_SIZE, D)
            n_ve = L // 2 if cfg.value_embeddings else 0
            self.value_embeds = nn.ModuleList(nn.Embedding(VOCAB_SIZE, D) for _ in range(n_ve))
            self.blocks = nn.ModuleList(
                Block(cfg, cfg.value_embeddings and value_embedding_table(i, L) is not None) for i in range(L)
            )
            self.skip_weights = nn.Parameter(torch.empty(L // 2)) if cfg.unet else None
            self.rotary = Rotary(D // cfg.num_heads, cfg.rope_base) if cfg.position_encoding == "rope" else None
            self.head = LMHead(cfg, self.embed.weight if cfg.tie_embeddings else None)
        self.norm = NORMS[cfg.norm]

    def init_weights(self) -> None:
        """Every starting value, drawn in the order the constructors of earlier versions drew them
        (PyTorch's default draws included, see init_linear_), so a seeded build is bitwise unchanged."""
        std = self.cfg.init_std
        self.embed.reset_parameters()
        self.embed.weight.normal_(0.0, std)
        for e in self.value_embeds:
            e.reset_parameters()
        for e in self.value_embeds:
            e.weight.normal_(0.0, std)
        for block in self.blocks:
            block.init_weights(std)
        if self.skip_weights is not None:
            self.skip_weights.fill_(1.0)
        self.head.init_weights(std, tied=self.cfg.tie_embeddings)
        if self.rotary is not None:
            self.rotary.reset_buffers()

    def forward(
        self, tokens, positions, cu_seqlens, max_seqlen, *, logits_index=None, output_hidden_states=False, step=None
    ) -> ModelOutput:
        cfg, L = self.cfg, self.cfg.num_layers
        layout = PackedLayout(cu_seqlens, max_seqlen)
        window = window_at(cfg, step)
        x = self.norm(self.embed(tokens))
        if cfg.token_dropout:  # after the norm: a weightless RMSNorm would undo the rescaling
            x = token_dropout(x, tokens, layout, dropped=dropped_row(x))
        x0 = x
        cos, sin = self.rotary(positions, compute_dtype(x)) if self.rotary is not None else (None, None)
        ves = [e(tokens) for e in self.value_embeds]
        hidden = [x] if output_hidden_states else None
        skips = []
        for i, block in enumerate(self.blocks):
            if cfg.unet and i >= L - L // 2 and skips:
                x = x + self.skip_weights[i - (L - L // 2)] * skips.pop()
            t = value_embedding_table(i, L) if ves else None
            x = block(x, x0, cos, sin, None if t is None else ves[t], layout, window)
            if cfg.unet and i < L // 2:
                skips.append(x)
            if hidden is not None:
                hidden.append(x)
        h = self.norm(x)
        if hidden is not None:
            hidden.append(h)
        logits = self.head(self._head_rows(h, logits_index))
        return ModelOutput(logits=logits, hidden_states=tuple(hidden) if hidden is not None else None)
