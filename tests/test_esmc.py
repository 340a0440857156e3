"""The esmc preset is numerically EvolutionaryScale's ESM C (`esm.models.esmc.ESMC`), on packed input.

The parity tests compare against tests/assets/esmc_goldens.safetensors, a small random ESM C and its
outputs written by scripts/make_esmc_goldens.py from the real `esm` package (its docstring has the
install recipe: the package cannot be a plmrun extra). With the package installed they also run
against it live, which checks that the goldens are current. Loading errors, config, init and training
need neither.
"""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plmrun.config import ConfigError, build_config
from plmrun.model.config import ModelConfig
from plmrun.model.esmc import ESMC_VOCAB_ROWS, EsmcPLM
from plmrun.model.loading import ModelLoadError, load_esmc_state_dict
from plmrun.model.registry import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import make_esmc_goldens as goldens  # noqa: E402

D, LAYERS, HEADS = goldens.D, goldens.LAYERS, goldens.HEADS
OFF = dict(unet=False, x0_lambdas=False, value_embeddings=False, soft_logit_cap=0.0)
ESMC_FLAGS = [
    "--model.arch=esmc",
    "--model.unet=false",
    "--model.x0_lambdas=false",
    "--model.value_embeddings=false",
    "--model.soft_logit_cap=0",
]
SOURCES = ["goldens", pytest.param("live", marks=pytest.mark.external)]


def esm_package():
    return pytest.importorskip(
        "esm.models.esmc", reason="the esm package (see scripts/make_esmc_goldens.py)", exc_type=ImportError
    )


def esmc_case(source: str, qk_norm: bool = True) -> tuple[dict, ...]:
    """(ESM C state dict, its outputs on goldens.packed_batch()[, each sequence's outputs on its own: with
    qk_norm]), from the goldens file or computed live by the esm package."""
    seqs, *_ = goldens.packed_batch()
    if source == "live":
        esm_package()
        ref = goldens.reference(qk_norm)
        return (ref.state_dict(), goldens.outputs(ref, seqs)) + ((goldens.outputs_alone(ref, seqs),) if qk_norm else ())
    g = load_file(goldens.GOLDENS)
    part = lambda prefix: {k.removeprefix(prefix): v for k, v in g.items() if k.startswith(prefix)}  # noqa: E731
    sd = {k: v.float() for k, v in part("weights.").items()}
    if not qk_norm:
        sd = {k: v for k, v in sd.items() if ".q_ln." not in k and ".k_ln." not in k}
        return sd, part("no_qk_norm.")
    return sd, {k: v for k, v in part("qk_norm.").items() if not k.startswith("alone.")}, part("qk_norm.alone.")


def test_goldens_are_the_batch_and_small():
    seqs, tokens, cu = goldens.packed_batch()
    g = load_file(goldens.GOLDENS)
    assert torch.equal(g["tokens"], tokens) and torch.equal(g["cu_seqlens"], cu)
    assert goldens.GOLDENS.stat().st_size < 1_000_000


def our_config(backend: str = "cpu", qk_norm: bool = True, layers: int = LAYERS, width: int = D) -> ModelConfig:
    return ModelConfig(
        arch="esmc",
        hidden_size=width,
        num_layers=layers,
        num_heads=HEADS,
        expansion_ratio=8 / 3,
        qk_norm=qk_norm,
        attention_backend=backend,
        **OFF,
    )


def packed_batch(seed: int = 1):
    """The goldens' three sequences, then a <pad> tail segment: (seqs, tokens, positions, cu_seqlens, max_len)."""
    seqs, tokens, cu = goldens.packed_batch(seed)
    lens = [len(s) for s in seqs] + [5]
    tokens = torch.cat([tokens, torch.ones(5, dtype=torch.long)])
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lens])
    return seqs, tokens, positions, cu, max(lens)


def assert_matches(out, ref: dict, n: int):
    """Our packed output on the first n tokens == ESM C's (packed valid rows)."""
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # noqa: E731
    close(out.logits[:n], ref["logits"][:, :33])
    hs = out.hidden_states
    assert len(hs) == LAYERS + 2 and sum(k.startswith("hidden.") for k in ref) == LAYERS
    for i, ours in enumerate(hs[1:-1]):  # each block's output
        close(ours[:n], ref[f"hidden.{i}"])
    close(hs[-1][:n], ref["embeddings"])  # after the final norm


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("backend", ["cpu", "naive", "sdpa_dense"])
def test_logits_and_hidden_states_match_esmc(backend, source):
    """fp32, 1e-5: our packed forward vs ESM C on the right-padded batch and on each sequence alone."""
    sd, batch, alone = esmc_case(source)
    ours = build_model(our_config(backend)).eval()
    load_esmc_state_dict(ours, sd)
    seqs, tokens, positions, cu, max_len = packed_batch()
    n = sum(len(s) for s in seqs)
    with torch.no_grad():
        out = ours(tokens, positions, cu, max_len, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[0][:n], sd["embed.weight"][tokens[:n]], rtol=0, atol=0)
    assert_matches(out, batch, n)
    assert_matches(out, alone, n)


@pytest.mark.parametrize("source", SOURCES)
def test_without_qk_norm_matches_esmc(source):
    sd, batch = esmc_case(source, qk_norm=False)
    ours = build_model(our_config(qk_norm=False)).eval()
    load_esmc_state_dict(ours, sd)
    seqs, tokens, positions, cu, max_len = packed_batch()
    with torch.no_grad():
        out = ours(tokens, positions, cu, max_len, output_hidden_states=True)
    assert_matches(out, batch, sum(len(s) for s in seqs))


@pytest.mark.external
def test_goldens_equal_the_live_package():
    """With the esm package installed: the stored goldens are what it computes now."""
    esm_package()
    for qk in (True, False):
        for stored, live in zip(esmc_case("goldens", qk), esmc_case("live", qk)):
            assert stored.keys() == live.keys()
            for k in stored:
                torch.testing.assert_close(stored[k], live[k], rtol=0, atol=1e-6, msg=k)


def test_our_weights_have_esmc_names_and_shapes():
    """The adapter's export has exactly the names and shapes of ESMC's state dict (the goldens' weights)."""
    golden_sd, *_ = esmc_case("goldens")
    torch.manual_seed(3)
    exported = EsmcPLM.adapter.export(build_model(our_config()))
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in golden_sd.items()}


@pytest.mark.external
def test_our_weights_load_into_esmc():
    """The adapter's export loads strictly into the esm package's ESMC; its 64-way softmax is then our 33-way one."""
    esm_package()
    torch.manual_seed(3)
    ours = build_model(our_config()).eval()
    ref_model = goldens.reference()
    ref_model.load_state_dict(EsmcPLM.adapter.export(ours), strict=True)
    seqs, tokens, positions, cu, max_len = packed_batch()
    with torch.no_grad():
        out = ours(tokens, positions, cu, max_len)
        theirs = ref_model(sequence_tokens=seqs[0][None]).sequence_logits[0]
    assert theirs.shape[-1] == ESMC_VOCAB_ROWS
    torch.testing.assert_close(
        out.logits[: len(seqs[0])].log_softmax(-1), theirs.log_softmax(-1)[:, :33], rtol=0, atol=1e-5
    )


# ---------------------------------------------------------------- without the reference package
def test_esmc_state_dict_round_trip_and_bad_checkpoints():
    """Ours -> ESM C layout -> ours is exact; a checkpoint of another shape is refused in one line."""
    torch.manual_seed(0)
    ours = build_model(our_config())
    sd = EsmcPLM.adapter.export(ours)
    assert sd["embed.weight"].shape == (ESMC_VOCAB_ROWS, D)
    assert sd["transformer.blocks.0.attn.layernorm_qkv.1.weight"].shape == (3 * D, D)
    assert sd["transformer.blocks.0.ffn.1.weight"].shape == (2 * 256, D)  # 8/3 * 64 rounded up to 256
    torch.manual_seed(1)
    other = build_model(our_config())
    load_esmc_state_dict(other, sd)
    for name, p in ours.state_dict().items():
        assert torch.equal(p, other.state_dict()[name]), name
    cases = [
        (our_config(layers=LAYERS + 1), rf"lacks 'transformer\.blocks\.{LAYERS}\."),
        (
            our_config(layers=LAYERS - 1),
            rf"weights the esmc preset does not know, e\.g\. 'transformer\.blocks\.{LAYERS - 1}\.",
        ),
        (our_config(width=2 * D), r"shape mismatch"),
        (our_config(qk_norm=False), r"does not know, e\.g\. 'transformer\.blocks\.0\.attn\.q_ln\.weight'"),
    ]
    for cfg, msg in cases:
        with pytest.raises(ModelLoadError, match=msg) as e:
            load_esmc_state_dict(build_model(cfg), sd)
        assert "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="lacks 'transformer.blocks.0.attn.q_ln.weight'"):
        load_esmc_state_dict(ours, EsmcPLM.adapter.export(build_model(our_config(qk_norm=False))))
    with pytest.raises(ModelLoadError, match=r"checkpoint's 'transformer.norm.weight' is a str, not a tensor"):
        load_esmc_state_dict(ours, {**sd, "transformer.norm.weight": "x"})
    with pytest.raises(ModelLoadError, match="needs an esmc-preset model"):
        load_esmc_state_dict(build_model(ModelConfig(hidden_size=D, num_heads=HEADS)), sd)


def test_speedrun_switches_are_refused():
    with pytest.raises(ConfigError, match=r"^model.unet is not part of ESM C; turn it off"):
        build_config(None, ["--model.arch=esmc"])
    with pytest.raises(ConfigError, match=r"^model.token_dropout is not part of ESM C"):
        build_config(None, [*ESMC_FLAGS, "--model.token_dropout=true"])
    with pytest.raises(ValueError, match="turn off unet, x0_lambdas, value_embeddings, soft_logit_cap"):
        EsmcPLM(ModelConfig(arch="esmc"))
    assert build_config(None, ESMC_FLAGS).model.arch == "esmc"


def test_parameter_kinds_cover_every_parameter():
    """Muon gets exactly the blocks' matrices; the embedding, head and 1-D parameters go to Adam groups."""
    model = build_model(our_config())
    kinds = model.parameter_kinds()
    assert set(kinds) == {n for n, _ in model.named_parameters()}
    hidden = {n for n, k in kinds.items() if k == "hidden"}
    assert hidden == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert len(hidden) == 7 * LAYERS  # q k v o gate up down
    assert kinds["embed.weight"] == "embed" and kinds["head.decoder.weight"] == "head"
    assert kinds["head.dense.weight"] == "head" and kinds["head.bias"] == "scalar"


@pytest.mark.slow
def test_train_three_steps_with_muon(tmp_path, monkeypatch):
    from plmrun.train.trainer import train

    monkeypatch.chdir(tmp_path)
    cfg = build_config(
        None,
        [
            *ESMC_FLAGS,
            "--model.hidden_size=32",
            "--model.num_layers=2",
            "--model.num_heads=2",
            "--optim.optimizer=muon",
            "--data.token_budget=512",
            "--data.max_length=128",
            "--train.max_steps=3",
            "--train.eval_every=0",
            "--eval.subset=8",
            "--eval.token_budget=2048",
            "--eval.final_full=false",
            "--train.precision=fp32",
            "--logging.progress=false",
            "--train.threads=1",
            "--logging.name=esmc",
            f"--logging.run_root={tmp_path / 'runs'}",
        ],
    )
    summary = train(cfg)
    assert summary["steps"] == 3
    assert summary["best_val_loss"] is not None and summary["best_val_loss"] < 4.0


# ---------------------------------------------------------------- an `esm` package weights folder
def esm_package_folder(root, width=128, layers=2, seed=0):
    """A random ESM C in the layout the esm package downloads (data/weights/esmc_300m_2024_12_v0.pth)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch="esmc", hidden_size=width, num_layers=layers, num_heads=width // 64, expansion_ratio=8 / 3, **OFF
    )
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    (root / "data" / "weights").mkdir(parents=True)
    torch.save(EsmcPLM.adapter.export(model), root / "data" / "weights" / "esmc_300m_2024_12_v0.pth")
    return model


def _logits(model, seqs):
    from plmrun import tokenizer as tok
    from plmrun.data.packing import pack_tokens

    tokens, positions, cu, n = pack_tokens([tok.with_specials(tok.encode(s)) for s in seqs], "cpu")
    with torch.no_grad():
        return model(tokens, positions, cu, n).logits


def test_an_esm_package_folder_loads_in_eval_embed_zeroshot_and_export(tmp_path, capsys):
    from plmrun.cli import main
    from plmrun.eval.export import export
    from plmrun.model.loading import load_model

    folder = tmp_path / "esmc-300m-2024-12"
    ref = esm_package_folder(folder)
    seqs = ["MKTAYIAKQRQISFVKSHFSRQ", "ACDEFGHIKLMNPQRSTVWY"]
    loaded, cfg = load_model(folder)
    assert (cfg.arch, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.qk_norm) == ("esmc", 128, 2, 2, True)
    torch.testing.assert_close(_logits(loaded, seqs), _logits(ref, seqs), rtol=0, atol=0)
    assert main(["eval", str(folder), "--subset", "4", "--out", str(tmp_path / "m.json")]) == 0
    (tmp_path / "s.fasta").write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(seqs)))
    assert main(["embed", str(folder), str(tmp_path / "s.fasta"), "--out", str(tmp_path / "e.safetensors")]) == 0
    (tmp_path / "dms.csv").write_text("mutant,DMS_score\nM1A,0.1\nK2E,0.5\nT3W,-0.2\nA4G,0.3\n")
    assert main(["zeroshot", str(folder), "--dms", str(tmp_path / "dms.csv"), "--wildtype", seqs[0]]) == 0
    exported, _ = load_model(export(folder, tmp_path / "export"))
    torch.testing.assert_close(_logits(exported, seqs), _logits(ref, seqs), rtol=0, atol=0)


def test_an_esm_package_folder_of_the_wrong_size_is_one_line(tmp_path, capsys):
    from plmrun.cli import main

    esm_package_folder(tmp_path / "small", width=128)
    assert (
        main(
            [
                "train",
                "--config",
                "esmc_cpu",
                "--init-from-hf",
                str(tmp_path / "small"),
                f"--logging.run_root={tmp_path / 'runs'}",
                "--train.max_steps=1",
                "--logging.progress=false",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert (
        "esmc_300m_2024_12_v0.pth: an ESM C of width 128, 2 layers, MLP width 512, the training config has "
        "width 256, 4 layers, MLP width 768"
    ) in err
    (tmp_path / "junk" / "data" / "weights").mkdir(parents=True)
    torch.save({"foo": torch.zeros(3)}, tmp_path / "junk" / "data" / "weights" / "esmc_600m_2024_12_v0.pth")
    assert main(["eval", str(tmp_path / "junk"), "--subset", "2"]) == 2
    err = capsys.readouterr().err
    assert "esmc_600m_2024_12_v0.pth: not an ESM C state dict" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "sd, expect",
    [
        ({"embed.weight": torch.zeros(64, 128)}, "no 'transformer.blocks.<i>.' weights"),
        (
            {"embed.weight": torch.zeros(64), "transformer.blocks.0.ffn.1.weight": torch.zeros(8, 4)},
            "'embed.weight' has shape (64,), not a matrix",
        ),
        (
            {"embed.weight": torch.zeros(64, 128), "transformer.blocks.0.ffn.0.weight": torch.zeros(128)},
            "'transformer.blocks.0.ffn.1.weight' is missing",
        ),
        (torch.zeros(3), "the file holds a Tensor, not a mapping of weights"),
    ],
)
def test_an_esm_c_pth_of_wrong_shapes_names_the_problem(tmp_path, capsys, sd, expect):
    """A .pth of wrong shapes names the weight and its shape, not a Python internal (issue 25)."""
    from plmrun.cli import main

    (tmp_path / "bad" / "data" / "weights").mkdir(parents=True)
    torch.save(sd, tmp_path / "bad" / "data" / "weights" / "esmc_300m_2024_12_v0.pth")
    assert main(["eval", str(tmp_path / "bad"), "--subset", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"esmc_300m_2024_12_v0.pth: not an ESM C state dict: {expect}" in err, err


@pytest.mark.slow
def test_train_init_from_an_esm_package_folder(tmp_path):
    from plmrun.config import build_config
    from plmrun.train.trainer import train

    ref = esm_package_folder(tmp_path / "w", width=256, layers=4)  # the esmc_cpu shape
    cfg = build_config(
        "esmc_cpu",
        [
            f"--logging.run_root={tmp_path / 'runs'}",
            "--train.max_steps=1",
            "--logging.progress=false",
            "--data.token_budget=512",
            "--data.max_length=128",
            "--eval.subset=4",
            "--eval.final_full=false",
            "--train.threads=1",
            "--optim.lr_hidden=0",
            "--optim.lr_embed=0",
            "--optim.lr_head=0",
            "--optim.lr_scalar=0",
            "--logging.name=init",
        ],
    )
    assert train(cfg, init_from_hf=str(tmp_path / "w")).get("exit_code", 0) == 0
    from plmrun.model.loading import load_model

    trained, _ = load_model(tmp_path / "runs" / "init")
    seqs = ["MKTAYIAKQRQISFVKSHFSRQ"]
    torch.testing.assert_close(_logits(trained, seqs), _logits(ref, seqs), rtol=0, atol=1e-6)  # lr 0: unchanged
