import numpy as np
import pytest
import torch

from plmrun import tokenizer as tok
from plmrun.cli import main
from plmrun.eval import embed
from plmrun.eval.embed import embed_sequences, read_embeddings
from plmrun.eval.inference import EvalModel, windows
from plmrun.model.config import ModelConfig
from plmrun.model.loading import save_model_dir
from plmrun.model.registry import build_model

SEQS = ["MKTAYIAKQR", "ACDEFGHIKLMNPQRSTVWY", "MK", "LLLLLAAAAGGGSS", "W", "QQQQQPPPPPEEEEE"]


def tiny_plmrun(max_length=64):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2)
    net = build_model(cfg).eval()
    with torch.no_grad():  # the zero-initialised projections would make every block an identity
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return EvalModel(net, cfg, "tiny", max_length)


def tiny_hf(max_length=64):
    """A random EsmForMaskedLM (transformers, the reference) and its weights in our esm2 preset."""
    from transformers import EsmConfig, EsmForMaskedLM

    from plmrun.model.loading import esm_config_to_model_config, load_hf_state_dict

    torch.manual_seed(1)  # not the control's seed
    hf_cfg = EsmConfig(
        vocab_size=33,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        pad_token_id=1,
        mask_token_id=32,
        position_embedding_type="rotary",
        token_dropout=True,
        max_position_embeddings=1026,
        emb_layer_norm_before=False,
    )
    hf = EsmForMaskedLM(hf_cfg).eval()
    cfg = esm_config_to_model_config(hf_cfg.to_dict())
    net = build_model(cfg).eval()
    load_hf_state_dict(net, hf.state_dict())
    return EvalModel(net, cfg, "tiny-hf", max_length), hf


@torch.no_grad()
def single_forward_hidden(model: EvalModel, ids: np.ndarray, hf=None) -> tuple:
    """Reference: one unpacked sequence through the plmrun model or the HF model itself.

    HF's states are embeddings, layers 1..L-1, final: index 1 and -1 mean what ours do."""
    t = torch.from_numpy(tok.with_specials(ids))
    if hf is not None:
        return tuple(h[0].numpy() for h in hf(input_ids=t[None], output_hidden_states=True).hidden_states)
    out = model.net(
        t, torch.arange(len(t)), torch.tensor([0, len(t)], dtype=torch.int32), len(t), output_hidden_states=True
    )
    return tuple(h.numpy() for h in out.hidden_states)


@pytest.mark.parametrize("make", [lambda: (tiny_plmrun(), None), tiny_hf])
def test_pools_match_one_sequence_forwards(make):
    model, hf = make()
    refs = [single_forward_hidden(model, tok.encode(s), hf) for s in SEQS]
    # a small budget forces several length-sorted batches; results must come back in input order
    mean = embed_sequences(model, SEQS, pool="mean", token_budget=model.max_length)
    cls = embed_sequences(model, SEQS, pool="cls", token_budget=model.max_length)
    per = embed_sequences(model, SEQS, pool="per-residue", token_budget=model.max_length)
    first = embed_sequences(model, SEQS, pool="mean", layer=1, token_budget=model.max_length)
    for i, (s, ref) in enumerate(zip(SEQS, refs)):
        assert per[i].shape == (len(s), 32)
        np.testing.assert_allclose(per[i], ref[-1][1:-1], atol=1e-5)
        np.testing.assert_allclose(mean[i], ref[-1][1:-1].mean(0), atol=1e-5)
        np.testing.assert_allclose(cls[i], ref[-1][0], atol=1e-5)
        np.testing.assert_allclose(first[i], ref[1][1:-1].mean(0), atol=1e-5)
    assert not np.allclose(mean[0], mean[1])


def test_long_sequences_average_overlapping_windows():
    model = tiny_plmrun(max_length=10)  # 8 residues per window
    assert windows(20, 8) == [0, 4, 8, 12] and windows(8, 8) == [0] and windows(9, 8) == [0, 1]
    seq = "MKTAYIAKQRQISFVKSHFS"  # 20 residues
    ids = tok.encode(seq)
    acc, cnt, cls = np.zeros((20, 32)), np.zeros((20, 1)), []
    for s in windows(20, 8):
        h = single_forward_hidden(model, ids[s : s + 8])[-1]
        acc[s : s + 8] += h[1:-1]
        cnt[s : s + 8] += 1
        cls.append(h[0])
    per = embed_sequences(model, [seq, "MK"], pool="per-residue", token_budget=30)[0]
    np.testing.assert_allclose(per, acc / cnt, atol=1e-5)
    np.testing.assert_allclose(embed_sequences(model, [seq], pool="mean")[0], (acc / cnt).mean(0), atol=1e-5)
    np.testing.assert_allclose(embed_sequences(model, [seq], pool="cls")[0], np.mean(cls, 0), atol=1e-5)
    # several long sequences, shuffled among short ones, windows spread over many small batches
    # (3 windows each): every pool equals the sequence embedded on its own
    seqs = ["MK", seq[::-1] + seq, "W", seq, seq[3:] + "AAAA", "ACDEFG"]
    for pool in ("mean", "cls", "per-residue"):
        together = embed_sequences(model, seqs, pool=pool, token_budget=30)
        for i, s in enumerate(seqs):
            np.testing.assert_allclose(
                together[i], embed_sequences(model, [s], pool=pool, token_budget=30)[0], atol=1e-5
            )


def test_pooled_embedding_holds_only_sequences_in_flight():
    """Mean pooling pools each sequence as soon as its last window is done: memory is one batch of
    per-residue states, not every sequence's (which, with several layers, ran a 3,000-sequence probe
    out of memory)."""
    import tracemalloc

    model = tiny_plmrun(max_length=512)
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=400)) for _ in range(60)]
    layers = (0, 1, 2, 3)
    tracemalloc.start()
    pooled = embed_sequences(model, seqs, pool="mean", layer=layers, token_budget=2048)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    all_states = 60 * 400 * 32 * len(layers) * 8  # every residue's float64 sums: 24.6 MB
    assert pooled.shape == (60, 32 * len(layers)) and peak < all_states / 4
    per_residue = embed_sequences(model, seqs[:3], pool="per-residue", layer=layers, token_budget=2048)
    np.testing.assert_allclose(pooled[:3], np.stack([r.mean(0) for r in per_residue]), atol=1e-6)


def test_bad_arguments():
    model = tiny_plmrun()
    with pytest.raises(ValueError, match="layer 7 out of range: the model has 4 hidden states"):
        embed_sequences(model, SEQS, layer=7)
    with pytest.raises(ValueError, match="pool must be"):
        embed_sequences(model, SEQS, pool="max")
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        embed_sequences(model, ["MK", ""])


def write_fasta(path, seqs):
    path.write_text("".join(f">seq{i} some description\n{s[:7]}\n{s[7:]}\n" for i, s in enumerate(seqs)))
    return path


def test_cli_resumes_and_keeps_input_order(tmp_path, monkeypatch, capsys):
    model = tiny_plmrun()
    save_model_dir(tmp_path / "model", model.net.state_dict(), model.config)
    fasta = write_fasta(tmp_path / "in.fasta", SEQS)
    out = tmp_path / "emb.safetensors"
    calls = []
    real = embed.embed_sequences

    def counting(model, seqs, **kw):
        calls.append(len(seqs))
        if len(calls) == 2 and kw.get("pool") == "mean" and not (tmp_path / "resumed").exists():
            raise KeyboardInterrupt  # interrupted after the first chunk
        return real(model, seqs, **kw)

    monkeypatch.setattr(embed, "embed_sequences", counting)
    args = [str(tmp_path / "model"), str(fasta), "--out", str(out), "--chunk-size", "4", "--device", "cpu"]
    assert main(["embed", *args]) == 130  # interrupted
    assert not out.exists() and (tmp_path / "emb.safetensors.partial" / "chunk_000000.safetensors").is_file()
    capsys.readouterr()
    assert main(["embed", *args, "--pool", "cls"]) == 2
    assert "unfinished run with different pool" in capsys.readouterr().err
    (tmp_path / "resumed").touch()
    calls.clear()
    assert main(["embed", *args]) == 0
    assert calls == [2]  # only the second chunk was computed
    assert not (tmp_path / "emb.safetensors.partial").exists()
    got = read_embeddings(out)
    assert list(got) == [f"seq{i}" for i in range(len(SEQS))]
    want = real(model, SEQS, pool="mean")
    np.testing.assert_allclose(np.stack(list(got.values())), want, atol=1e-5)

    per_out = tmp_path / "per.safetensors"
    assert main(["embed", *args[:2], "--out", str(per_out), "--pool", "per-residue", "--layer", "0"]) == 0
    per = read_embeddings(per_out)
    assert [v.shape for v in per.values()] == [(len(s), 32) for s in SEQS]


def test_fasta_problems_are_one_line_errors(tmp_path, capsys):
    model_dir = tmp_path / "model"
    m = tiny_plmrun()
    save_model_dir(model_dir, m.net.state_dict(), m.config)
    dup = tmp_path / "dup.fasta"
    dup.write_text(">a\nMK\n>a\nLL\n")
    assert main(["embed", str(model_dir), str(dup), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "duplicate record id 'a'" in capsys.readouterr().err
    bad = tmp_path / "bad.fasta"
    bad.write_text(">a\nMK\n>b\nL1L\n")
    assert main(["embed", str(model_dir), str(bad), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "bad.fasta:4" in capsys.readouterr().err


def test_hf_folder_loads_into_the_esm2_preset_and_random_init_control(tmp_path):
    from plmrun.eval.inference import load_eval_model
    from plmrun.model.esm2 import Esm2PLM

    model, hf = tiny_hf()
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_eval_model(str(tmp_path / "hf"))
    assert isinstance(loaded.net, Esm2PLM) and loaded.config == model.config
    np.testing.assert_allclose(embed_sequences(loaded, SEQS), embed_sequences(model, SEQS), atol=1e-6)
    control = loaded.random_init(0)
    assert isinstance(control.net, Esm2PLM) and control.name.endswith("(random init)")
    assert not np.allclose(embed_sequences(control, SEQS), embed_sequences(loaded, SEQS), atol=1e-3)
    plm = tiny_plmrun()
    plm_control = plm.random_init(0)
    assert type(plm_control.net) is type(plm.net)
    assert plm_control.net.state_dict().keys() == plm.net.state_dict().keys()


def test_embeddings_file_follows_the_umask(tmp_path):
    """safetensors' save_file creates 0600 files; the embeddings (and the saved model) get 0666 & ~umask."""
    import os

    model = tiny_plmrun()
    old = os.umask(0o022)
    try:
        save_model_dir(tmp_path / "model", model.net.state_dict(), model.config)
        fasta = write_fasta(tmp_path / "in.fasta", SEQS)
        out = tmp_path / "emb.safetensors"
        assert main(["embed", str(tmp_path / "model"), str(fasta), "--out", str(out), "--device", "cpu"]) == 0
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    assert oct((tmp_path / "model" / "model.safetensors").stat().st_mode & 0o777) == "0o644"
