"""Long sequences: rotary presets run whole sequences in embed/zeroshot/eval, esm2 keeps its windows and limit."""

import numpy as np
import pytest
import torch

from plmrun import tokenizer as tok
from plmrun.cli import main
from plmrun.eval.embed import embed_sequences
from plmrun.eval.errors import EvalError
from plmrun.eval.inference import DEFAULT_MAX_LENGTH, load_eval_model
from plmrun.eval.zeroshot import site_log_probs
from plmrun.model.config import ModelConfig
from plmrun.model.loading import save_model_dir
from plmrun.model.registry import build_model

LONG = "".join(np.random.default_rng(0).choice(list("ACDEFGHIKLMNPQRSTVWY"), 1500))


def _saved(tmp_path, **kw) -> str:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, **kw)
    net = build_model(cfg)
    with torch.no_grad():  # the zero-initialised projections would make every block an identity
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model_dir(tmp_path / "m", net.state_dict(), cfg)
    return str(tmp_path / "m")


ESM2 = dict(arch="esm2", unet=False, x0_lambdas=False, value_embeddings=False, qk_norm=False, soft_logit_cap=0.0)


@torch.no_grad()
def _whole_forward(net, x: np.ndarray, **kw):
    t = torch.from_numpy(x.astype(np.int64))
    return net(t, torch.arange(len(t)), torch.tensor([0, len(t)], dtype=torch.int32), len(t), **kw)


@pytest.mark.parametrize(
    "arch",
    [{}, {"arch": "esmc", "unet": False, "x0_lambdas": False, "value_embeddings": False, "soft_logit_cap": 0.0}],
    ids=["speedrun", "esmc"],
)
def test_rotary_models_embed_and_score_long_sequences_whole(tmp_path, arch):
    model = load_eval_model(_saved(tmp_path, **arch))
    assert model.max_length is None  # no window by default
    (emb,) = embed_sequences(model, [LONG], pool="per-residue", token_budget=512)
    ref = _whole_forward(model.net, tok.with_specials(tok.encode(LONG)), output_hidden_states=True).hidden_states[-1]
    np.testing.assert_allclose(emb, ref[1:-1].numpy(), atol=1e-5)
    windowed = embed_sequences(model, [LONG], pool="per-residue", max_length=DEFAULT_MAX_LENGTH)[0]
    assert np.abs(windowed - emb).max() > 1e-3  # the old 1024-token windows differ
    x = tok.with_specials(tok.encode(LONG)).copy()
    x[1 + 1400] = tok.MASK
    ref = torch.log_softmax(_whole_forward(model.net, x).logits[1 + 1400].float(), -1).numpy()
    np.testing.assert_allclose(site_log_probs(model, LONG, [1400], token_budget=512)[1400], ref, atol=1e-5)


def test_esm2_keeps_its_windows_and_refuses_lengths_past_its_position_limit(tmp_path, capsys):
    path = _saved(tmp_path, **ESM2)
    assert load_eval_model(path).max_length == DEFAULT_MAX_LENGTH
    with pytest.raises(EvalError, match="--max-length 2048: the model.arch=esm2 model has a position limit of 1026"):
        load_eval_model(path, max_length=2048)
    fasta = tmp_path / "long.fasta"
    fasta.write_text(f">long\n{LONG}\n")
    assert (
        main(
            [
                "embed",
                path,
                str(fasta),
                "--out",
                str(tmp_path / "e.safetensors"),
                "--max-length",
                "2048",
                "--token-budget",
                "4096",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: --max-length 2048: the model.arch=esm2") and err.count("\n") == 1
    assert main(["eval", path, "--max-length", "2048", "--token-budget", "4096", "--subset", "2"]) == 2
    assert "position limit of 1026" in capsys.readouterr().err
