"""Export round trips: plmrun model -> Hugging Face folder -> transformers, equal logits at every layer."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from plmrun.config import config_from_dict
from plmrun.eval.export import ExportError, export, push_to_hub
from plmrun.model.loading import load_model, save_model_dir
from plmrun.model.registry import build_model

from helpers import TINY_ESM2

transformers = pytest.importorskip("transformers")

SPEEDRUN = dict(
    arch="speedrun",
    hidden_size=32,
    num_layers=4,
    num_heads=2,
    expansion_ratio=2.0,
    attention_soft_cap=30.0,
    soft_logit_cap=20.0,
)


def _saved_model(tmp_path, kw):
    cfg = config_from_dict({"model": kw}).model
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # zero-initialised projections would hide errors: randomise everything
        for p in model.parameters():
            p.normal_(0, 0.2)
    save_model_dir(tmp_path / "model", model.state_dict(), cfg)
    return model.eval(), cfg


def _batch():
    g = torch.Generator().manual_seed(1)
    lens = [7, 12, 5]
    ids = torch.full((3, 12), 1, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, 0], ids[i, n - 1] = 0, 2
        ids[i, 1 : n - 1] = torch.randint(4, 24, (n - 2,), generator=g)
    ids[0, 3] = 32  # a <mask>, so token dropout is exercised
    return ids, (ids != 1).long(), lens


def _ours_padded(model, ids, lens):
    """plmrun's packed forward, per layer, reshaped to the padded layout."""
    toks = torch.cat([ids[i, :n] for i, n in enumerate(lens)])
    pos = torch.cat([torch.arange(n) for n in lens])
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    with torch.no_grad():
        out = model(toks, pos, cu, max(lens), output_hidden_states=True)
    return out, cu


def _compare(out, cu, lens, logits, hidden):
    for i, n in enumerate(lens):
        a, b = int(cu[i]), int(cu[i + 1])
        torch.testing.assert_close(logits[i, :n], out.logits[a:b], atol=1e-5, rtol=1e-5)
        assert len(hidden) == len(out.hidden_states)
        for h_hf, h_ours in zip(hidden, out.hidden_states):
            torch.testing.assert_close(h_hf[i, :n], h_ours[a:b], atol=1e-5, rtol=1e-5)


def test_esm2_exports_as_native_esm_for_masked_lm(tmp_path):
    model, cfg = _saved_model(tmp_path, TINY_ESM2)
    out_dir = export(tmp_path / "model", tmp_path / "hf")
    hf = transformers.EsmForMaskedLM.from_pretrained(out_dir).eval()
    ids, mask, lens = _batch()
    with torch.no_grad():
        res = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    ours, cu = _ours_padded(model, ids, lens)
    # HF's hidden_states: embeddings, then each layer (the last one after emb_layer_norm_after)
    # ours: embeddings, each layer, then the final norm
    hidden_hf = res.hidden_states[:-1] + (res.hidden_states[-1],)
    assert len(res.hidden_states) == cfg.num_layers + 1
    for i, n in enumerate(lens):
        a, b = int(cu[i]), int(cu[i + 1])
        torch.testing.assert_close(res.logits[i, :n], ours.logits[a:b], atol=1e-5, rtol=1e-5)
        for layer in range(cfg.num_layers):
            torch.testing.assert_close(hidden_hf[layer][i, :n], ours.hidden_states[layer][a:b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden_hf[-1][i, :n], ours.hidden_states[-1][a:b], atol=1e-5, rtol=1e-5)
    tokz = transformers.AutoTokenizer.from_pretrained(out_dir)
    assert tokz("MKV")["input_ids"] == [0, 20, 15, 7, 2]
    # and back: the exported folder loads into plmrun again
    again, cfg2 = load_model(out_dir)
    assert cfg2.arch == "esm2"
    torch.testing.assert_close(_ours_padded(again, ids, lens)[0].logits, ours.logits)


@pytest.mark.parametrize(
    "kw", [SPEEDRUN, dict(SPEEDRUN, norm="layer", position_encoding="none", mlp_activation="gelu", token_dropout=True)]
)
def test_speedrun_loads_with_remote_code_in_a_clean_process_without_plmrun(tmp_path, kw):
    model, cfg = _saved_model(tmp_path, kw)
    out_dir = export(tmp_path / "model", tmp_path / "hf")
    from plmrun.eval.export import MODEL_PACKAGE

    shipped = sorted(p.name for p in out_dir.glob("*.py"))
    assert shipped == sorted(
        [
            "configuration_plmrun.py",
            "modeling_plmrun.py",
            "attention.py",
            "config.py",
            "esm2.py",
            "esmc.py",
            "layers.py",
            "registry.py",
            "speedrun.py",
            "vocab.py",
        ]
    )
    for name in shipped[:]:  # the model package's files as they are, no rewriting
        if (MODEL_PACKAGE / name).is_file():
            assert (out_dir / name).read_bytes() == (MODEL_PACKAGE / name).read_bytes(), name
    ids, mask, lens = _batch()
    torch.save({"ids": ids, "mask": mask}, tmp_path / "batch.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["plmrun"] = None  # plmrun must not be importable: the folder is self-contained
        import torch, transformers
        b = torch.load({str(tmp_path / "batch.pt")!r})
        m = transformers.AutoModelForMaskedLM.from_pretrained({str(out_dir)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            r = m(input_ids=b["ids"], attention_mask=b["mask"], output_hidden_states=True)
        torch.save({{"logits": r.logits, "hidden": r.hidden_states}}, {str(tmp_path / "out.pt")!r})
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = torch.load(tmp_path / "out.pt")
    ours, cu = _ours_padded(model, ids, lens)
    _compare(ours, cu, lens, res["logits"], res["hidden"])
    card = (out_dir / "README.md").read_text()
    assert "trust_remote_code=True" in card


def test_export_refuses_non_empty_output(tmp_path):
    _saved_model(tmp_path, SPEEDRUN)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export(tmp_path / "model", tmp_path / "hf")
    # --overwrite replaces only a folder plmrun made (issue 25): this one holds a user's file, named in the refusal
    with pytest.raises(ExportError, match="keep.txt"):
        export(tmp_path / "model", tmp_path / "hf", overwrite=True)
    assert (tmp_path / "hf" / "keep.txt").read_text() == "x"
    (tmp_path / "hf" / "keep.txt").unlink()
    export(tmp_path / "model", tmp_path / "hf", overwrite=True)
    export(tmp_path / "model", tmp_path / "hf", overwrite=True)  # its own export: replaced
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "plmrun"


def test_push_to_hub_offline_fails_cleanly_and_never_leaks_the_token(tmp_path, monkeypatch, capsys):
    _saved_model(tmp_path, TINY_ESM2)
    out_dir = export(tmp_path / "model", tmp_path / "hf")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(ExportError, match="HF_TOKEN"):
        push_to_hub(out_dir, "someone/model")
    secret = "hf_SECRETTOKEN1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError) as info:
        push_to_hub(out_dir, "someone/model")
    assert secret not in str(info.value)
    assert "\n" not in str(info.value)
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err


@pytest.mark.parametrize("kw", [TINY_ESM2, SPEEDRUN], ids=["esm2", "speedrun"])
def test_exported_files_follow_the_umask(tmp_path, kw):
    old = os.umask(0o022)
    try:
        _saved_model(tmp_path, kw)
        out_dir = export(tmp_path / "model", tmp_path / "hf")
    finally:
        os.umask(old)
    modes = {f.name: oct(f.stat().st_mode & 0o777) for d in (tmp_path / "model", out_dir) for f in d.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes  # safetensors' save_file alone made 0600


def _summary_with_cache_path(folder):
    """summary.json as the trainer writes it: data.dataset is the resolved (local cache) folder."""
    summary = {
        "steps": 10,
        "tokens": 1000,
        "data": {
            "dataset": "/root/.cache/plmrun/swissprot2014_small-191be9c581187484",
            "train_fingerprint": "0123456789abcdef0123456789abcdef",
            "valid_fingerprint": "f" * 32,
            "train_sequences": 5,
            "valid_sequences": 2,
        },
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return summary


def _card_snippet(card, folder):
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert code.count('PATH = "path/to/this/folder"') == 1
    return code.replace('"path/to/this/folder"', repr(str(folder)))


@pytest.mark.parametrize("kw", [TINY_ESM2, SPEEDRUN], ids=["esm2", "speedrun"])
def test_model_card_names_the_dataset_and_its_snippet_runs_unattended(tmp_path, kw):
    import re

    _saved_model(tmp_path, kw)
    summary = _summary_with_cache_path(tmp_path / "model")
    out_dir = export(tmp_path / "model", tmp_path / "hf")
    card = (out_dir / "README.md").read_text()
    assert "swissprot2014_small" in card and summary["data"]["train_fingerprint"] in card
    assert not re.search(r"(^|[\s(`|])/(root|home|tmp|\w)", card, re.M), card  # no absolute path
    assert str(tmp_path) not in card and ".cache" not in card
    script = _card_snippet(card, out_dir) + "\nassert tokenizer('MKV')['input_ids'][0] == 0\nprint('ok')\n"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("kw,limit", [(TINY_ESM2, 1026), (SPEEDRUN, None)], ids=["esm2", "speedrun"])
def test_tokenizer_max_length_matches_the_model(tmp_path, kw, limit, caplog):
    import logging

    _saved_model(tmp_path, kw)
    out_dir = export(tmp_path / "model", tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir, trust_remote_code=True)
    if limit is not None:
        assert tokenizer.model_max_length == limit
        return
    assert tokenizer.model_max_length >= 10**9
    transformers.logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        ids = tokenizer("A" * 2000)["input_ids"]
    assert len(ids) == 2002
    assert "longer than the specified maximum sequence length" not in caplog.text
