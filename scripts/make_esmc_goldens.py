"""Write tests/assets/esmc_goldens.safetensors: a small random ESM C and its outputs, computed by the real
`esm` package, so tests/test_esmc.py checks the esmc preset against ESM C without the package installed.

The `esm` package cannot be a plmrun extra: its pins (transformers<4.48.2, torchvision, torchtext) would
replace torch and transformers. Install it beside plmrun without its dependencies, then what its ESMC
imports (never let pip touch torch):

    pip install --no-deps esm==3.2.1.post1 attrs einops zstd cloudpathlib tenacity "biotite>=1" brotli \\
        msgpack msgpack-numpy biopython
    python scripts/make_esmc_goldens.py          # rewrites the goldens (a few hundred kB)
    python -m pytest tests/test_esmc.py          # now also compares against the live package

(esm 3.1.x imports biotite 0.41, built for numpy<2: its ESMC does not import beside numpy 2.)

The model: width 64, 2 heads, 2 layers, ESMC's own init (seed 0) with every 1-D weight perturbed so
each one matters, then rounded to fp16 and back, so the stored weights are exactly the ones used.
Outputs (fp32, packed: the valid rows of a right-padded batch of three sequences) with and without
ESM C's QK LayerNorm, and with it of each sequence on its own: logits over ESM C's 64 rows, each
block's hidden state, the final embeddings.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

GOLDENS = Path(__file__).resolve().parents[1] / "tests" / "assets" / "esmc_goldens.safetensors"
D, HEADS, LAYERS = 64, 2, 2


def packed_batch(seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Three sequences of different lengths (every residue id, some <mask>), their packed tokens and cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n in (12, 40, 25):
        s = torch.cat([torch.tensor([0]), torch.randint(4, 31, (n,), generator=g), torch.tensor([2])])
        masked = (torch.rand(len(s), generator=g) < 0.2) & (s > 3)
        seqs.append(torch.where(masked, torch.full_like(s, 32), s))
    cu = torch.tensor([0] + torch.tensor([len(s) for s in seqs]).cumsum(0).tolist(), dtype=torch.int32)
    return seqs, torch.cat(seqs), cu


def reference(qk_norm: bool = True, seed: int = 0) -> nn.Module:
    """A random ESMC from the esm package (the goldens' weights), with or without its QK LayerNorm."""
    from esm.models.esmc import ESMC
    from esm.tokenization import EsmSequenceTokenizer

    torch.manual_seed(seed)
    kw = {"use_flash_attn": False} if "use_flash_attn" in inspect.signature(ESMC).parameters else {}
    model = ESMC(d_model=D, n_heads=HEADS, n_layers=LAYERS, tokenizer=EsmSequenceTokenizer(), **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            p.copy_(p.half().float())
    if not qk_norm:  # what TransformerStack(qk_layernorm=False) builds
        for block in model.transformer.blocks:
            block.attn.q_ln = block.attn.k_ln = nn.Identity()
    return model


def outputs(model: nn.Module, seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """ESM C's outputs on the right-padded batch of `seqs`, valid rows only (packed like plmrun's input)."""
    padded = torch.ones(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
    valid = padded != 1
    with torch.no_grad():
        out = model(sequence_tokens=padded)
    res = {"logits": out.sequence_logits[valid], "embeddings": out.embeddings[valid]}
    res.update({f"hidden.{i}": h[valid] for i, h in enumerate(out.hidden_states)})
    return {k: v.float().contiguous() for k, v in res.items()}


def outputs_alone(model: nn.Module, seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """ESM C's outputs on each sequence on its own (no padding), concatenated in packed order."""
    each = [outputs(model, [s]) for s in seqs]
    return {k: torch.cat([e[k] for e in each]) for k in each[0]}


def main() -> int:
    import esm
    from safetensors.torch import save_file

    seqs, tokens, cu = packed_batch()
    tensors = {"tokens": tokens, "cu_seqlens": cu}
    # fp16 holds these weights exactly (reference() rounded them): half the bytes
    tensors.update({f"weights.{k}": v.half().contiguous() for k, v in reference().state_dict().items()})
    for tag, qk in (("qk_norm", True), ("no_qk_norm", False)):
        tensors.update({f"{tag}.{k}": v for k, v in outputs(reference(qk), seqs).items()})
    tensors.update({f"qk_norm.alone.{k}": v for k, v in outputs_alone(reference(), seqs).items()})
    GOLDENS.parent.mkdir(parents=True, exist_ok=True)
    tmp = GOLDENS.with_suffix(".tmp")
    save_file(
        tensors,
        str(tmp),
        metadata={"esm": esm.__version__, "torch": torch.__version__, "made_by": "scripts/make_esmc_goldens.py"},
    )
    os.replace(tmp, GOLDENS)
    print(f"wrote {GOLDENS} ({GOLDENS.stat().st_size / 1e3:.0f} kB, esm {esm.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
