"""The esm2 preset is numerically transformers' EsmForMaskedLM (rotary ESM-2), on packed input."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import EsmConfig, EsmForMaskedLM  # noqa: E402

from plmrun.model.config import ModelConfig  # noqa: E402
from plmrun.model.esm2 import Esm2PLM  # noqa: E402
from plmrun.model.loading import ModelLoadError, load_hf_state_dict  # noqa: E402
from plmrun.model.registry import build_model  # noqa: E402

D, LAYERS, HEADS = 64, 3, 4


def hf_model(token_dropout: bool, tie: bool = True, seed: int = 0) -> EsmForMaskedLM:
    torch.manual_seed(seed)
    hc = EsmConfig(
        vocab_size=33,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=4 * D,
        position_embedding_type="rotary",
        token_dropout=token_dropout,
        pad_token_id=1,
        mask_token_id=32,
        emb_layer_norm_before=False,
        max_position_embeddings=1026,
        layer_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    model = EsmForMaskedLM(hc).eval()
    with torch.no_grad():  # random (not default-zero) biases and norms, so every weight is exercised
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def our_config(token_dropout: bool, tie: bool = True, backend: str = "cpu") -> ModelConfig:
    return ModelConfig(
        arch="esm2",
        hidden_size=D,
        num_layers=LAYERS,
        num_heads=HEADS,
        expansion_ratio=4.0,
        unet=False,
        x0_lambdas=False,
        value_embeddings=False,
        qk_norm=False,
        soft_logit_cap=0.0,
        token_dropout=token_dropout,
        tie_embeddings=tie,
        attention_backend=backend,
    )


def packed_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n in (12, 1, 40, 2, 25):
        s = torch.cat([torch.tensor([0]), torch.randint(4, 24, (n,), generator=g), torch.tensor([2])])
        masked = (torch.rand(len(s), generator=g) < 0.25) & (s > 3)
        seqs.append(torch.where(masked, torch.full_like(s, 32), s))
    lens = [len(s) for s in seqs] + [6]  # last segment: <pad> tail
    tokens = torch.cat(seqs + [torch.ones(6, dtype=torch.long)])
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lens])
    return seqs, tokens, positions, cu, max(lens)


@pytest.mark.parametrize("token_dropout", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "naive", "sdpa_dense"])
def test_logits_and_hidden_states_match_hf(token_dropout, backend):
    hf = hf_model(token_dropout)
    ours = build_model(our_config(token_dropout, backend=backend)).eval()
    load_hf_state_dict(ours, hf.state_dict())
    seqs, tokens, positions, cu, max_len = packed_batch()
    assert any((s == 32).any() for s in seqs)  # token dropout has something to do
    with torch.no_grad():
        out = ours(tokens, positions, cu, max_len, output_hidden_states=True)
        assert len(out.hidden_states) == LAYERS + 2
        start = 0
        for s in seqs:  # HF runs each sequence on its own
            ref = hf(s[None], output_hidden_states=True)
            sl = slice(start, start + len(s))
            torch.testing.assert_close(out.logits[sl], ref.logits[0], rtol=0, atol=1e-5)
            # HF: embeddings, layers 1..L-1, then the final (emb_layer_norm_after) output
            ours_hs = out.hidden_states[:LAYERS] + out.hidden_states[-1:]
            assert len(ref.hidden_states) == len(ours_hs)
            for a, b in zip(ours_hs, ref.hidden_states):
                torch.testing.assert_close(a[sl], b[0], rtol=0, atol=1e-5)
            start += len(s)


def test_padded_hf_batch_matches_too():
    """A padded HF batch with attention_mask gives the same logits (token dropout on)."""
    hf = hf_model(True)
    ours = build_model(our_config(True)).eval()
    load_hf_state_dict(ours, hf.state_dict())
    seqs, tokens, positions, cu, max_len = packed_batch(seed=3)
    L = max(len(s) for s in seqs)
    ids = torch.ones(len(seqs), L, dtype=torch.long)
    att = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], att[i, : len(s)] = s, 1
    with torch.no_grad():
        ref = hf(ids, attention_mask=att).logits
        out = ours(tokens, positions, cu, max_len).logits
    torch.testing.assert_close(out[: sum(len(s) for s in seqs)], ref[att.bool()], rtol=0, atol=1e-5)


def test_untied_roundtrip_and_export():
    hf = hf_model(False, tie=False)
    ours = build_model(our_config(False, tie=False)).eval()
    load_hf_state_dict(ours, hf.state_dict())
    exported = Esm2PLM.adapter.export(ours)
    hf2 = EsmForMaskedLM(hf.config).eval()
    missing, unexpected = hf2.load_state_dict(exported, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    seqs, *_ = packed_batch()
    with torch.no_grad():
        torch.testing.assert_close(hf2(seqs[2][None]).logits, hf(seqs[2][None]).logits, rtol=0, atol=1e-6)


def test_bad_checkpoints_are_refused_with_one_line():
    hf = hf_model(False)
    ours = build_model(
        ModelConfig(
            arch="esm2",
            hidden_size=D,
            num_layers=LAYERS + 1,
            num_heads=HEADS,
            unet=False,
            x0_lambdas=False,
            value_embeddings=False,
            qk_norm=False,
            soft_logit_cap=0.0,
        )
    )
    with pytest.raises(ModelLoadError, match="3 encoder layers, the model has 4"):
        load_hf_state_dict(ours, hf.state_dict())
    wide = build_model(ModelConfig(**{**vars(our_config(False)), "hidden_size": 2 * D}))
    with pytest.raises(
        ModelLoadError,
        match=r"shape mismatch for esm.embeddings.word_embeddings.weight: "
        r"weights \(33, 64\), model \(33, 128\)",
    ):
        load_hf_state_dict(wide, hf.state_dict())
    no_head = {k: v for k, v in hf.state_dict().items() if not k.startswith("lm_head.")}
    with pytest.raises(ModelLoadError, match="lacks 5 esm2 weights"):
        load_hf_state_dict(build_model(our_config(False)), no_head)
    with pytest.raises(ValueError, match="turn off soft_logit_cap"):
        build_model(ModelConfig(**{**vars(our_config(False)), "soft_logit_cap": 30.0}))
