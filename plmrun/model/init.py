"""Weight initialisation of a model whose storage was allocated after construction.

Large models are built on the meta device (no memory), sharded with FSDP2, materialised with
`to_empty` and only then initialised, so no rank ever holds the full model. The distributions
are the constructors' (speedrun.py, esm2.py): N(0, init_std) matrices and embeddings, zero output
projections / value tokens / biases, the fixed starting values of lambdas and skip weights, unit
LayerNorm weights. Works on plain tensors and on FSDP2's DTensor shards.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import PLM, Rotary

# speedrun parameters that do not start as N(0, std): name suffix -> full starting value
_ZERO_SUFFIXES = ("attn.o.weight", "mlp.down.weight", "mlp.value_tokens", "head.bias")


def _speedrun_start(name: str, p: torch.Tensor):
    if name.endswith(_ZERO_SUFFIXES):
        return 0.0
    if name.endswith("value_lambdas"):
        return torch.tensor([0.5, 0.5])
    if name.endswith("x0_lambdas"):
        return torch.tensor([1.0, 0.0])
    if name.endswith("skip_weights"):
        return 1.0
    return None  # normal


def _esm2_start(name: str, p: torch.Tensor, module: nn.Module):
    if isinstance(module, nn.LayerNorm):
        return 1.0 if name.endswith("weight") else 0.0
    if name.endswith("bias"):
        return 0.0
    return None


def _set(p: torch.Tensor, value) -> None:
    """Fill p (plain or DTensor) with a scalar or with a full tensor value."""
    if not isinstance(value, torch.Tensor):
        p.fill_(value)
        return
    value = value.to(dtype=p.dtype)
    if hasattr(p, "device_mesh"):  # DTensor shard: distribute the full value the same way
        from torch.distributed.tensor import distribute_tensor
        value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
    p.copy_(value.to(p.device) if not hasattr(value, "device_mesh") else value)


def materialize(model: PLM, device) -> None:
    """Allocate a meta-built (possibly FSDP2-sharded) model on `device` and initialise it.

    `to_empty` replaces plain parameters one module at a time, which unties a tied decoder; the
    ties are restored before initialising (FSDP2's DTensors are swapped in place and stay tied).
    """
    first, aliases = {}, []
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is None:
                continue
            if id(p) in first:
                aliases.append((module, attr, *first[id(p)]))
            else:
                first[id(p)] = (module, attr)
    model.to_empty(device=device)
    for module, attr, src, src_attr in aliases:
        if module._parameters[attr] is not src._parameters[src_attr]:
            module._parameters[attr] = src._parameters[src_attr]
    init_weights(model)


@torch.no_grad()
def init_weights(model: PLM) -> None:
    """Initialise every parameter and buffer of `model` in place (after to_empty)."""
    std = model.cfg.init_std
    owners = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), module)
    for name, p in model.named_parameters():  # deduplicated: a tied decoder is the embedding
        name = name.replace("_checkpoint_wrapped_module.", "")
        if model.cfg.arch == "esm2":
            start = _esm2_start(name, p, owners[id(p)])
        else:
            start = _speedrun_start(name, p)
        if start is None:
            p.normal_(0.0, std)
        else:
            _set(p, start)
    for module in model.modules():
        if isinstance(module, Rotary):
            module.reset_buffers()
