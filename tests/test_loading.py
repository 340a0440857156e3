"""The one model loader: every ESM-2 folder layout into our esm2 preset (logits equal transformers'),
plmrun exports and saved models back in (--init-from-hf), and damaged or foreign folders refused
with one line naming the file."""

import json
import os
import subprocess
import sys

import pytest
import torch

from plmrun.checkpoint import CheckpointError
from plmrun.cli import main as cli_main
from plmrun.config import config_from_dict
from plmrun.eval.export import export
from plmrun.eval.inference import load_eval_model
from plmrun.manifest import MANIFEST, write_manifest
from plmrun.model.esm2 import Esm2PLM
from plmrun.model.loading import ModelLoadError, load_hf_weights_into, load_model, save_model_dir
from plmrun.model.registry import build_model

from helpers import TINY_ESM2

transformers = pytest.importorskip("transformers")

ESM2 = {**TINY_ESM2, "expansion_ratio": 2.0, "tie_embeddings": True}


def tiny_hf(seed=0, **kw) -> "transformers.EsmForMaskedLM":
    """A random-init EsmForMaskedLM (hidden 32, 2 layers, 4 heads), EsmConfig's own layer_norm_eps (1e-12)."""
    torch.manual_seed(seed)
    cfg = transformers.EsmConfig(
        vocab_size=33,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        position_embedding_type="rotary",
        token_dropout=True,
        pad_token_id=1,
        mask_token_id=32,
        emb_layer_norm_before=False,
        max_position_embeddings=1026,
        **kw,
    )
    model = transformers.EsmForMaskedLM(cfg).eval()
    with torch.no_grad():  # random biases and norms, so every weight (and its name) is exercised
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    seqs = [
        torch.cat([torch.tensor([0]), torch.randint(4, 24, (n,), generator=g), torch.tensor([2])]) for n in (9, 3, 20)
    ]
    seqs[0][4] = 32  # a <mask>: token dropout is exercised
    return seqs


def assert_logits_match(ours, hf):
    seqs = batch()
    lens = [len(s) for s in seqs]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    with torch.no_grad():
        got = ours(torch.cat(seqs), torch.cat([torch.arange(n) for n in lens]), cu, max(lens)).logits
        for i, s in enumerate(seqs):
            torch.testing.assert_close(got[cu[i] : cu[i + 1]], hf(s[None]).logits[0], rtol=0, atol=1e-5)


# ------------------------------------------------------------------ layouts (Part C)
def saved_by_transformers(hf, d):
    """transformers' own save_pretrained (5.x: LayerNorm .gamma/.beta, inv_freq under `layer.*`, no decoder)."""
    hf.save_pretrained(d)


def pytorch_model_bin(hf, d):
    """A pytorch_model.bin folder with today's state-dict names (transformers 4.x `safe_serialization=False`)."""
    hf.config.save_pretrained(d)
    torch.save(hf.state_dict(), d / "pytorch_model.bin")


def sharded_safetensors(hf, d):
    hf.save_pretrained(d, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 2


def as_the_hub_stores_it(hf, d):
    """facebook/esm2_*: pytorch_model.bin, LayerNorm.gamma/beta, inv_freq per layer, position_ids,
    the contact head, no separate decoder (tied), a 4.x-era config.json."""
    sd = {}
    for k, v in hf.state_dict().items():
        if k == "lm_head.decoder.weight":
            continue
        if k == "esm.rotary_embeddings.inv_freq":
            for i in range(hf.config.num_hidden_layers):
                sd[f"esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"] = v.clone()
            continue
        sd[k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")] = v.clone()
    sd["esm.embeddings.position_ids"] = torch.arange(1026)[None]
    assert any(k.startswith("esm.contact_head.") for k in sd) and any(k.endswith(".gamma") for k in sd)
    torch.save(sd, d / "pytorch_model.bin")
    c = hf.config
    (d / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["EsmForMaskedLM"],
                "attention_probs_dropout_prob": 0.0,
                "classifier_dropout": None,
                "emb_layer_norm_before": False,
                "esmfold_config": None,
                "hidden_act": "gelu",
                "hidden_dropout_prob": 0.0,
                "hidden_size": c.hidden_size,
                "initializer_range": 0.02,
                "intermediate_size": c.intermediate_size,
                "is_folding_model": False,
                "layer_norm_eps": c.layer_norm_eps,
                "mask_token_id": 32,
                "max_position_embeddings": 1026,
                "model_type": "esm",
                "num_attention_heads": c.num_attention_heads,
                "num_hidden_layers": c.num_hidden_layers,
                "pad_token_id": 1,
                "position_embedding_type": "rotary",
                "token_dropout": True,
                "torch_dtype": "float32",
                "transformers_version": "4.25.0.dev0",
                "use_cache": True,
                "vocab_list": None,
                "vocab_size": 33,
            }
        )
    )


LAYOUTS = [saved_by_transformers, pytorch_model_bin, sharded_safetensors, as_the_hub_stores_it]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__)
def test_every_esm2_layout_loads_with_transformers_logits(tmp_path, layout):
    hf = tiny_hf()
    layout(hf, tmp_path)
    ours, cfg = load_model(tmp_path)
    assert isinstance(ours, Esm2PLM) and cfg.layer_norm_eps == hf.config.layer_norm_eps == 1e-12
    assert_logits_match(ours, hf)
    # --init-from-hf: the same weights into a model built from a training config
    model = build_model(config_from_dict({"model": {**ESM2, "layer_norm_eps": 1e-12}}).model).eval()
    load_hf_weights_into(model, tmp_path)
    assert_logits_match(model, hf)


def test_layer_norm_eps_comes_from_config_json(tmp_path):
    hf = tiny_hf(layer_norm_eps=1e-5)
    saved_by_transformers(hf, tmp_path)
    ours, cfg = load_model(tmp_path)
    assert cfg.layer_norm_eps == 1e-5
    assert_logits_match(ours, hf)


def test_untied_esm_folder_loads_untied(tmp_path):
    hf = tiny_hf(tie_word_embeddings=False)
    with torch.no_grad():
        hf.lm_head.decoder.weight.normal_()
    saved_by_transformers(hf, tmp_path)
    ours, cfg = load_model(tmp_path)
    assert cfg.tie_embeddings is False
    assert_logits_match(ours, hf)


def test_eval_model_of_an_hf_folder_is_our_esm2_preset(tmp_path):
    hf = tiny_hf()
    saved_by_transformers(hf, tmp_path)
    m = load_eval_model(str(tmp_path))
    assert isinstance(m.net, Esm2PLM) and m.config.arch == "esm2"
    assert_logits_match(m.net, hf)
    assert isinstance(m.random_init(0).net, Esm2PLM)


def _plmrun_model(tmp_path, kw, seed=0):
    cfg = config_from_dict({"model": kw}).model
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    save_model_dir(tmp_path / "model", model.state_dict(), cfg)
    return model.eval(), cfg


def _same_outputs(a, b):
    s = batch()[2]
    args = (s, torch.arange(len(s)), torch.tensor([0, len(s)], dtype=torch.int32), len(s))
    with torch.no_grad():
        torch.testing.assert_close(a(*args).logits, b(*args).logits, rtol=0, atol=1e-6)


SPEEDRUN = dict(arch="speedrun", hidden_size=32, num_layers=2, num_heads=2)


@pytest.mark.parametrize("kw", [ESM2, SPEEDRUN], ids=["esm2", "speedrun"])
def test_init_from_our_export_and_saved_model(tmp_path, kw):
    ref, cfg = _plmrun_model(tmp_path, kw)
    out = export(tmp_path / "model", tmp_path / "hf")
    for source in (out, tmp_path / "model", tmp_path):  # export, saved model, run directory
        torch.manual_seed(5)
        model = build_model(cfg).eval()
        load_hf_weights_into(model, source)
        _same_outputs(model, ref)


def test_init_from_a_folder_of_another_arch_or_size_is_one_line(tmp_path):
    _plmrun_model(tmp_path, SPEEDRUN)
    esm = build_model(config_from_dict({"model": ESM2}).model)
    with pytest.raises(
        ModelLoadError, match="a model.arch=speedrun model, but the training config has model.arch=esm2"
    ):
        load_hf_weights_into(esm, tmp_path / "model")
    saved_by_transformers(tiny_hf(), tmp_path / "hf")
    wide = build_model(config_from_dict({"model": {**ESM2, "hidden_size": 64}}).model)
    with pytest.raises(
        ModelLoadError,
        match=r"model.safetensors: shape mismatch for esm.embeddings.word_embeddings"
        r".weight: weights \(33, 32\), model \(33, 64\)",
    ):
        load_hf_weights_into(wide, tmp_path / "hf")
    deep = build_model(config_from_dict({"model": {**ESM2, "num_layers": 3}}).model)
    with pytest.raises(ModelLoadError, match="2 encoder layers, the model has 3"):
        load_hf_weights_into(deep, tmp_path / "hf")
    wide_sr = build_model(config_from_dict({"model": {**SPEEDRUN, "hidden_size": 64}}).model)
    with pytest.raises(
        ModelLoadError,
        match=r"model.safetensors: \S+ has shape \(\d+, 32\), the model built from "
        r"the training config expects \(\d+, 64\)",
    ):
        load_hf_weights_into(wide_sr, tmp_path / "model")


@pytest.mark.slow
def test_train_init_from_hf_on_a_transformers_folder(tmp_path, cli):
    """The issue's case: `plmrun train --init-from-hf DIR --config esm2_8m` on a save_pretrained folder."""
    saved_by_transformers(tiny_hf(), tmp_path / "hf")
    args = [
        "train",
        "--config",
        "esm2_8m",
        "--init-from-hf",
        str(tmp_path / "hf"),
        "--model.hidden_size=32",
        "--model.num_layers=2",
        "--model.num_heads=4",
        "--model.expansion_ratio=2.0",
        "--data.token_budget=512",
        "--data.max_length=128",
        "--train.max_steps=1",
        "--train.eval_every=1",
        "--eval.subset=4",
        "--eval.token_budget=1024",
        "--eval.final_full=false",
        "--train.precision=fp32",
        "--logging.progress=false",
        "--train.threads=1",
    ]
    proc = cli(args, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = cli([a.replace("num_layers=2", "num_layers=3") for a in args], check=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr[-3000:]
    assert "2 encoder layers, the model has 3" in bad.stderr


# ------------------------------------------------------------------ Hub names
def _fake_hub_cache(cache, repo, hf):
    """The cache layout huggingface_hub writes (models--ORG--NAME/snapshots/REV, refs/main)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    hf.save_pretrained(snap)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)


def test_hub_name_offline_from_cache_and_not_cached(tmp_path):
    hf = tiny_hf()
    _fake_hub_cache(tmp_path / "cache", "someorg/tiny-esm", hf)
    torch.save(batch()[2], tmp_path / "seq.pt")
    script = (
        f"import torch; from plmrun.model.loading import load_model, ModelLoadError\n"
        f"m, cfg = load_model('someorg/tiny-esm'); s = torch.load({str(tmp_path / 'seq.pt')!r})\n"
        f"out = m(s, torch.arange(len(s)), torch.tensor([0, len(s)], dtype=torch.int32), len(s)).logits\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
        f"try:\n    load_model('facebook/esm2_t6_8M_UR50D')\nexcept ModelLoadError as e:\n    print(e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt"), hf(batch()[2][None]).logits[0], rtol=0, atol=1e-5)
    msg = proc.stdout.strip()
    assert (
        msg.count("\n") == 0
        and msg.startswith(
            "facebook/esm2_t6_8M_UR50D: no such local folder, and it could not be fetched from the Hugging Face Hub"
        )
        and "pass a local" in msg
    )


def test_missing_path_that_is_no_hub_name(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model(tmp_path / "nope")


# ------------------------------------------------------------------ damaged folders (Part B)
def _flip(path, offset):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def _truncate(path, keep=0.5):
    b = path.read_bytes()
    path.write_bytes(b[: int(len(b) * keep)])


def _one_line(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, msg
    return msg


def test_saved_model_has_a_manifest_written_last(tmp_path):
    _plmrun_model(tmp_path, SPEEDRUN)
    files = json.loads((tmp_path / "model" / MANIFEST).read_text())["files"]
    assert sorted(files) == ["config.json", "model.safetensors"]
    load_model(tmp_path / "model")


@pytest.mark.parametrize(
    "damage,expect",
    [
        (lambda f: _truncate(f), "bytes, the manifest says"),
        (lambda f: _flip(f, f.stat().st_size - 3), "contents do not match the checksum"),
    ],
    ids=["truncated", "byte-flipped"],
)
def test_damaged_saved_model_is_caught_by_its_manifest(tmp_path, damage, expect):
    _plmrun_model(tmp_path, SPEEDRUN)
    damage(tmp_path / "model" / "model.safetensors")
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path)
    _one_line(e, str(tmp_path / "model" / "model.safetensors"), expect)


@pytest.mark.parametrize(
    "damage",
    [lambda f: _truncate(f), lambda f: _truncate(f, 0.0001), lambda f: _flip(f, 12)],
    ids=["truncated", "header-only", "header-flipped"],
)
def test_damaged_safetensors_without_manifest_is_one_line(tmp_path, damage):
    saved_by_transformers(tiny_hf(), tmp_path)  # a Hugging Face folder: no manifest
    damage(tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path)
    _one_line(e, str(tmp_path / "model.safetensors"), "unreadable weights", "truncated or damaged")


def test_truncated_pytorch_model_bin_is_one_line(tmp_path):
    pytorch_model_bin(tiny_hf(), tmp_path)
    _truncate(tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path)
    _one_line(e, str(tmp_path / "pytorch_model.bin"), "unreadable weights")


def test_corrupt_config_json_is_one_line(tmp_path):
    saved_by_transformers(tiny_hf(), tmp_path / "hf")
    _truncate(tmp_path / "hf" / "config.json", 0.6)
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path / "hf")
    _one_line(e, str(tmp_path / "hf" / "config.json"), "not valid JSON")
    _plmrun_model(tmp_path, SPEEDRUN)  # a saved model: the manifest sees it first
    _truncate(tmp_path / "model" / "config.json", 0.6)
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path / "model")
    _one_line(e, str(tmp_path / "model" / "config.json"), "the manifest says")
    (tmp_path / "model" / MANIFEST).unlink()  # an older folder without one: the JSON error itself
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path / "model")
    _one_line(e, str(tmp_path / "model" / "config.json"), "not valid JSON")


def test_config_json_of_another_shape_names_the_key_and_both_shapes(tmp_path):
    _plmrun_model(tmp_path, SPEEDRUN)
    cfg_file = tmp_path / "model" / "config.json"
    meta = json.loads(cfg_file.read_text())
    meta["model"]["hidden_size"] = 64
    cfg_file.write_text(json.dumps(meta))
    write_manifest(tmp_path / "model", ["model.safetensors", "config.json"])  # consistent, but wrong
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path / "model")
    _one_line(
        e,
        str(tmp_path / "model" / "model.safetensors"),
        "embed.weight has shape (33, 32)",
        f"the model built from {cfg_file} expects (33, 64)",
    )
    saved_by_transformers(tiny_hf(), tmp_path / "hf")
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf_cfg, "intermediate_size": 128}))
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path / "hf")
    _one_line(e, "shape mismatch for esm.encoder.layer.0.intermediate.dense.weight: weights (64, 32), model (128, 32)")


def test_damaged_export_is_caught_and_the_model_card_may_be_edited(tmp_path):
    _plmrun_model(tmp_path, ESM2)
    out = export(tmp_path / "model", tmp_path / "hf")
    assert "model.safetensors" in json.loads((out / MANIFEST).read_text())["files"]
    (out / "README.md").write_text("# my own card\n")
    load_model(out)
    _flip(out / "model.safetensors", (out / "model.safetensors").stat().st_size - 5)
    with pytest.raises(ModelLoadError) as e:
        load_model(out)
    _one_line(e, str(out / "model.safetensors"), "contents do not match the checksum")


def test_damaged_model_through_the_cli_is_one_error_line(tmp_path, capsys):
    _plmrun_model(tmp_path, SPEEDRUN)
    _truncate(tmp_path / "model" / "model.safetensors")
    assert cli_main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "model.safetensors" in err


def _checkpoint(tmp_path):
    """A run directory with one DCP checkpoint of a tiny model (what the trainer writes, model part)."""
    from dataclasses import asdict

    import torch.distributed.checkpoint as dcp
    import yaml

    cfg = config_from_dict({"model": SPEEDRUN}).model
    model = build_model(cfg)
    ck = tmp_path / "run" / "checkpoints" / "step_1"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ck))
    (ck / "train_state.json").write_text("{}")
    write_manifest(ck)  # as the trainer does, last: a checkpoint without one is refused
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"model": asdict(cfg)}))
    return ck, model


def test_damaged_checkpoint_weights_are_one_line(tmp_path):
    ck, model = _checkpoint(tmp_path)
    loaded, _ = load_model(ck)
    _same_outputs(loaded, model.eval())
    shard = next(ck.glob("*.distcp"))
    _truncate(shard, 0.3)
    write_manifest(ck)  # consistent with the damage (a buggy writer): DCP's own read must still be one line
    with pytest.raises(CheckpointError) as e:
        load_model(ck)
    _one_line(e, str(ck), "reading the checkpoint failed", "PytorchStreamReader failed")


def test_init_from_a_checkpoint(tmp_path):
    ck, model = _checkpoint(tmp_path)
    fresh = build_model(model.cfg).eval()
    load_hf_weights_into(fresh, ck)
    _same_outputs(fresh, model.eval())
    wide = build_model(config_from_dict({"model": {**SPEEDRUN, "hidden_size": 64}}).model)
    with pytest.raises(
        CheckpointError,
        match=r"model.embed.weight has shape \(33, 32\) in the checkpoint, "
        r"\(33, 64\) in this model",
    ):
        load_hf_weights_into(wide, ck)


def test_checkpoint_of_another_config_is_one_line(tmp_path):
    import yaml

    ck, _ = _checkpoint(tmp_path)
    run_cfg = tmp_path / "run" / "config.yaml"
    d = yaml.safe_load(run_cfg.read_text())
    d["model"]["hidden_size"] = 64
    run_cfg.write_text(yaml.safe_dump(d))
    with pytest.raises(CheckpointError) as e:
        load_model(ck)
    _one_line(
        e,
        str(ck),
        "model.embed.weight has shape (33, 32) in the checkpoint, (33, 64) in this model",
        "the checkpoint is from another model config",
    )
