"""Pieces every architecture shares: the PLM base (outputs, parameter kinds, build-then-initialise, its
state-dict adapter), norms, rotary, soft-caps and ESM token dropout on packed input."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .vocab import MASK, VOCAB_SIZE

ESM_MASK_RATIO_TRAIN = 0.15 * 0.8  # hard-coded in ESM-2 (and HF EsmEmbeddings) token dropout


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [T or len(logits_index), 33] fp32
    hidden_states: tuple[torch.Tensor, ...] | None = None


class StateDictAdapter:
    """One architecture's bridge to another library's weights of the same network (`PLM.adapter`).

    `load` copies that library's state dict into our model, raising ValueError (one line) that names the
    first missing, unknown or mis-shaped weight; `export` gives our weights in its names and shapes.
    """

    source = ""
    "The other library's model, for messages."

    def load(self, model: PLM, sd: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def export(self, model: PLM) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class PLM(nn.Module):
    """Base of every model: `forward(tokens, positions, cu_seqlens, max_seqlen, ...)`.

    Subclasses name their embedding and head parameters so optimizers can group parameters by
    role without knowing the architecture.
    """

    embed_prefixes: tuple[str, ...] = ()
    head_prefixes: tuple[str, ...] = ()
    blocks: nn.ModuleList  # the repeated transformer blocks: the FSDP2 / activation-checkpointing unit
    adapter: StateDictAdapter | None = None
    "Reads and writes another library's weights of this architecture (None: only ours)."

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg

    def init_weights(self) -> None:
        """Give every parameter and buffer its starting value, in place (subclasses: the one init)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def built_on_meta(self):
        """Constructor body: modules made inside are structure only (meta device); on leaving, they are
        allocated on the default device and given their values by init_weights() (see materialize)."""
        device = torch.get_default_device()
        with torch.device("meta"):
            yield
        if device.type != "meta":
            self.materialize(device)

    def materialize(self, device) -> None:
        """Allocate a meta-built (possibly FSDP2-sharded) model's storage on `device`, then init_weights().

        Constructors build on the meta device and call this, so a model built normally and one built on
        meta, sharded and materialised later are initialised by the same code. `to_empty` replaces plain
        parameters one module at a time, which unties a tied decoder; the ties are restored first
        (FSDP2's DTensors are swapped in place and stay tied).
        """
        first, aliases = {}, []
        for module in self.modules():
            for attr, p in module._parameters.items():
                if p is None:
                    continue
                if id(p) in first:
                    aliases.append((module, attr, *first[id(p)]))
                else:
                    first[id(p)] = (module, attr)
        self.to_empty(device=device)
        for module, attr, src, src_attr in aliases:
            if module._parameters[attr] is not src._parameters[src_attr]:
                module._parameters[attr] = src._parameters[src_attr]
        with torch.no_grad():
            self.init_weights()

    def use_compiled_cpu_attention(self, enabled: bool = True) -> None:
        """Run this model's cpu-backend attention buckets through the torch.compile'd kernel
        (train.compile on CPU; see attention.packed_attention). A property of this model only."""
        for module in self.modules():
            if "compiled_cpu_kernel" in vars(module):
                module.compiled_cpu_kernel = enabled

    def parameter_kinds(self) -> dict[str, str]:
        """name -> 'embed' | 'head' | 'hidden' | 'scalar' for every (deduplicated) parameter.

        scalar: anything with < 2 dims (norm weights, biases, lambdas); embed: token and value
        embedding tables (a tied decoder is the embedding); head: LM-head matrices; hidden: the
        2-D matrices inside blocks (the ones Muon orthogonalises).
        """
        kinds = {}
        for name, p in self.named_parameters():
            if p.dim() < 2:
                kinds[name] = "scalar"
            elif name.startswith(self.embed_prefixes):
                kinds[name] = "embed"
            elif name.startswith(self.head_prefixes):
                kinds[name] = "head"
            else:
                kinds[name] = "hidden"
        return kinds

    def matmul_params(self) -> int:
        """Parameters that cost 2 FLOPs per token in the forward (all but embedding lookups)."""
        n = sum(
            p.numel()
            for name, p in self.named_parameters()
            if p.dim() >= 2 and not name.startswith(self.embed_prefixes)
        )
        if self.cfg.tie_embeddings:  # the tied decoder is a matmul with the embedding table
            n += VOCAB_SIZE * self.cfg.hidden_size
        return n

    def _head_rows(self, h: torch.Tensor, logits_index) -> torch.Tensor:
        return h if logits_index is None else h.index_select(0, logits_index.to(h.device))


def init_linear_(linear: nn.Linear, std: float, *, zero: bool = False, scratch: bool = False) -> None:
    """PyTorch's default draw for nn.Linear (kaiming-uniform weight, uniform bias), then N(0, std) or
    zeros (biases zero).

    The default draw is overwritten at once; it is kept so the random stream advances exactly as it did
    when every constructor drew it, which keeps seeded runs (and the published numbers) bitwise the same.
    scratch=True draws into a throwaway copy: for a tied decoder, whose weight is the embedding.
    """
    if scratch:
        weight = torch.empty_like(linear.weight)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        weight.normal_(0.0, std)
        return
    linear.reset_parameters()
    if zero:
        linear.weight.zero_()
    else:
        linear.weight.normal_(0.0, std)
    if linear.bias is not None:
        linear.bias.zero_()


def fill_(p: torch.Tensor, values) -> None:
    """Fill p (plain or an FSDP2 DTensor shard) with a scalar or a list of starting values."""
    if not isinstance(values, (list, tuple)):
        p.fill_(values)
        return
    full = torch.tensor(values, dtype=p.dtype)
    if hasattr(p, "device_mesh"):  # DTensor shard: distribute the full value the same way
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(p.device), p.device_mesh, p.placements)
        p.copy_(full)
    else:
        p.copy_(full.to(p.device))


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Weightless RMSNorm over the last dim."""
    return F.rms_norm(x, (x.shape[-1],))


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Weightless LayerNorm over the last dim (RMSNorm of the centred vector)."""
    return F.layer_norm(x, (x.shape[-1],))


NORMS = {"rms": rms_norm, "layer": layer_norm}
"model.norm -> the weightless norm it names."


class _ReLUSquared(torch.autograd.Function):
    """relu(h)**2 with a one-kernel backward (2 * relu(h) * grad), bitwise what autograd gives for
    F.relu(h).square(): 2*r is exact, so one rounding of the product either way, and +0 + (-0) = +0
    matches threshold_backward's zeros. Autograd's version runs five kernels over the MLP width
    (pow(r, 1) copy, *2, *grad, threshold) and saves both h and r; this saves r only."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        r = F.relu(h)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, r, value=2)


def relu_squared(h: torch.Tensor) -> torch.Tensor:
    """Squared ReLU (the speedrun MLP's nonlinearity), fused backward; see _ReLUSquared."""
    return _ReLUSquared.apply(h)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls produce here: the autocast dtype when autocast is on, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The vocabulary projection in fp32 even under autocast: it is cheap (33 outputs) and
    keeps logits and the loss from bf16 rounding."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(x / cap) if cap else x


class Rotary(nn.Module):
    """Rotary embedding, rotate-half layout (as ESM/HF); positions restart at every sequence."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))

    def reset_buffers(self) -> None:
        """Recompute inv_freq (it is not saved: loaders that build on the meta device call this)."""
        self.inv_freq = self._inv_freq().to(self.inv_freq.device if not self.inv_freq.is_meta else "cpu")

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, 1, Dh/2], computed in fp32 and cast once for all layers."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        return freqs.cos()[:, None].to(dtype), freqs.sin()[:, None].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def token_dropout(x: torch.Tensor, tokens: torch.Tensor, layout, dropped: torch.Tensor | None = None) -> torch.Tensor:
    """ESM-2 token dropout: <mask> rows become `dropped` (ESM-2: zero), the other rows are rescaled per
    sequence by (1 - 0.15*0.8) / (1 - its observed <mask> fraction), as if masks were input dropout."""
    is_mask = tokens == MASK
    doc = layout.doc_ids.long()
    cu = layout.cu_seqlens.long()
    lengths = (cu[1:] - cu[:-1]).to(x.dtype if x.is_floating_point() else torch.float)
    n_mask = torch.zeros(len(lengths), dtype=lengths.dtype, device=x.device).index_add_(
        0, doc, is_mask.to(lengths.dtype)
    )
    observed = n_mask / lengths.clamp_min(1)
    scale = (1 - ESM_MASK_RATIO_TRAIN) / (1 - observed).clamp_min(1e-6)
    if dropped is None:
        return x.masked_fill(is_mask[:, None], 0.0) * scale[doc][:, None].to(x.dtype)
    return torch.where(is_mask[:, None], dropped.to(x.dtype), x * scale[doc][:, None].to(x.dtype))


def window_at(cfg: ModelConfig, step: int | None) -> int:
    """Sliding window (0 = full) at a training step: linear from sliding_window_start to
    sliding_window over window_warmup_steps. Fixed at sliding_window when sliding_window_start
    or window_warmup_steps is 0, and for step=None (evaluation)."""
    w, w0, n = cfg.sliding_window, cfg.sliding_window_start, cfg.window_warmup_steps
    if not w or not w0 or not n or step is None or step >= n:
        return w
    return max(1, round(w0 + max(step, 0) / n * (w - w0)))
