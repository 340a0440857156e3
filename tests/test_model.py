"""Model switches, outputs, parameter kinds, packing invariance, FLOP counting."""

import pytest
import torch

from plmrun.config import load_yaml, resolve_config_path
from plmrun.model.config import ModelConfig
from plmrun.model.layers import window_at
from plmrun.model.registry import attention_pairs, build_model, flops_per_step

TINY = dict(hidden_size=32, num_layers=4, num_heads=2, num_att_tokens=16, attention_backend="cpu")


def batch(lengths=(9, 1, 17, 2, 12), pad=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = [
        torch.cat([torch.tensor([0]), torch.randint(4, 24, (n - 2,), generator=g), torch.tensor([2])])
        if n >= 2
        else torch.tensor([0])
        for n in lengths
    ]
    toks[0][3] = 32  # a <mask>, so token dropout has work
    lens = list(lengths) + ([pad] if pad else [])
    tokens = torch.cat(toks + ([torch.ones(pad, dtype=torch.long)] if pad else []))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])
    return tokens, pos, cu, max(lens)


SWITCHES = {
    "default": {},
    "all_off": dict(unet=False, x0_lambdas=False, value_embeddings=False, qk_norm=False, soft_logit_cap=0.0),
    "no_unet": dict(unet=False),
    "no_x0": dict(x0_lambdas=False),
    "no_value_emb": dict(value_embeddings=False),
    "no_qk_norm": dict(qk_norm=False),
    "attn_soft_cap": dict(attention_soft_cap=8.0),
    "p_attention": dict(p_attention=True),
    "tied": dict(tie_embeddings=True),
    "token_dropout": dict(token_dropout=True),
    "layer_norm": dict(norm="layer"),
    "no_positions": dict(position_encoding="none"),
    "gelu_mlp": dict(mlp_activation="gelu"),
    "window": dict(sliding_window=4),
    "window_schedule": dict(sliding_window=8, sliding_window_start=2, window_warmup_steps=10),
    "odd_layers": dict(num_layers=5, expansion_ratio=8 / 3),
    "naive_backend": dict(attention_backend="naive"),
    "dense_backend": dict(attention_backend="sdpa_dense"),
    "esm2": dict(
        arch="esm2",
        unet=False,
        x0_lambdas=False,
        value_embeddings=False,
        qk_norm=False,
        soft_logit_cap=0.0,
        token_dropout=True,
    ),
    "esmc": dict(
        arch="esmc", unet=False, x0_lambdas=False, value_embeddings=False, soft_logit_cap=0.0, expansion_ratio=8 / 3
    ),
    "esmc_no_qk_norm": dict(
        arch="esmc",
        unet=False,
        x0_lambdas=False,
        value_embeddings=False,
        soft_logit_cap=0.0,
        qk_norm=False,
        num_layers=5,
    ),
}


def cfg_with(**kw):
    return ModelConfig(**{**TINY, **kw})


@pytest.mark.parametrize("name", list(SWITCHES))
def test_switch_forward_backward(name):
    torch.manual_seed(0)
    model = build_model(cfg_with(**SWITCHES[name]))
    tokens, pos, cu, m = batch()
    out = model(tokens, pos, cu, m, output_hidden_states=True, step=3)
    assert out.logits.shape == (len(tokens), 33) and out.logits.dtype == torch.float32
    assert len(out.hidden_states) == model.cfg.num_layers + 2
    assert all(h.shape == (len(tokens), 32) for h in out.hidden_states)
    cap = model.cfg.soft_logit_cap
    if cap:
        assert out.logits.abs().max() <= cap
    loss = torch.nn.functional.cross_entropy(out.logits, tokens)
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [
        n for n, g in grads.items() if g is None
    ]
    # zero-init output projections: some hidden matrix must receive gradient already at step 0
    assert any(g.abs().sum() > 0 for n, g in grads.items() if model.parameter_kinds()[n] == "hidden")


def test_esm2_refuses_speedrun_switches():
    with pytest.raises(ValueError, match="turn off qk_norm, soft_logit_cap"):
        build_model(cfg_with(arch="esm2", unet=False, x0_lambdas=False, value_embeddings=False))


def test_switches_change_the_parameters():
    names = lambda **kw: set(dict(build_model(cfg_with(**kw)).named_parameters()))  # noqa: E731
    base = names()
    assert any("value_embeds" in n for n in base) and "skip_weights" in base
    assert not any("value_embeds" in n for n in names(value_embeddings=False))
    assert "skip_weights" not in names(unet=False)
    assert not any("x0_lambdas" in n for n in names(x0_lambdas=False))
    assert any("key_tokens" in n for n in names(p_attention=True))
    assert "head.decoder.weight" not in names(tie_embeddings=True)  # shared with embed.weight


def test_logits_index_selects_rows():
    torch.manual_seed(0)
    model = build_model(cfg_with()).eval()
    tokens, pos, cu, m = batch()
    idx = torch.tensor([0, 5, 7, len(tokens) - 1])
    with torch.no_grad():
        full = model(tokens, pos, cu, m).logits
        part = model(tokens, pos, cu, m, logits_index=idx).logits
    torch.testing.assert_close(part, full[idx])


@pytest.mark.parametrize("arch", ["speedrun", "esm2", "esmc"])
def test_parameter_kinds_cover_everything(arch):
    extra = {} if arch == "speedrun" else SWITCHES[arch]
    model = build_model(cfg_with(**extra))
    kinds = model.parameter_kinds()
    params = dict(model.named_parameters())
    assert set(kinds) == set(params)
    for n, k in kinds.items():
        assert (k == "scalar") == (params[n].dim() < 2), n
    assert kinds["embed.weight"] == "embed" and kinds["head.decoder.weight"] == "head"
    assert {"embed", "head", "hidden", "scalar"} == set(kinds.values())
    if arch == "speedrun":
        assert kinds["value_embeds.0.weight"] == "embed" and kinds["blocks.0.attn.q.weight"] == "hidden"
        assert kinds["skip_weights"] == "scalar"


@pytest.mark.parametrize("name", ["default", "esm2", "esmc", "window", "p_attention", "attn_soft_cap"])
def test_packing_invariance(name):
    """A sequence's logits do not depend on what else is packed with it (fp32, 1e-5)."""
    torch.manual_seed(0)
    model = build_model(cfg_with(**{**SWITCHES[name], "token_dropout": name != "esmc"})).eval()  # ESM C has none
    tokens, pos, cu, m = batch(lengths=(9, 1, 17, 2, 12), pad=5)
    with torch.no_grad():
        packed = model(tokens, pos, cu, m).logits
        for s, e in zip(cu.tolist(), cu.tolist()[1:]):
            alone = model(tokens[s:e], pos[s:e], torch.tensor([0, e - s], dtype=torch.int32), e - s).logits
            torch.testing.assert_close(packed[s:e], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["default", "esmc"])
def test_bf16_autocast_on_cpu(name):
    torch.manual_seed(0)
    extra = SWITCHES["esmc"] if name == "esmc" else dict(p_attention=True, attention_soft_cap=8.0)
    model = build_model(cfg_with(**extra))
    tokens, pos, cu, m = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, pos, cu, m)
    assert out.logits.dtype == torch.float32
    out.logits.logsumexp(-1).mean().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        ref = model(tokens, pos, cu, m).logits
    assert (out.logits.detach() - ref).abs().max() < 0.1


def test_window_schedule():
    cfg = ModelConfig(sliding_window=128, sliding_window_start=32, window_warmup_steps=100)
    assert [window_at(cfg, s) for s in (0, 50, 100, 1000, None)] == [32, 80, 128, 128, 128]
    assert window_at(ModelConfig(sliding_window=64), 0) == 64
    assert window_at(ModelConfig(), 5) == 0


def test_flops_count():
    lengths = torch.tensor([5, 3, 7])
    assert attention_pairs(lengths, 0) == 25 + 9 + 49
    naive = sum(sum(1 for i in range(L) for j in range(L) if abs(i - j) < 3) for L in lengths.tolist())
    assert attention_pairs(lengths, 3) == naive
    cfg = cfg_with()
    model = build_model(cfg)
    cu = torch.tensor([0, 5, 8, 15], dtype=torch.int32)
    n = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.dim() == 2 and not name.startswith(("embed", "value_embeds"))
    )
    assert flops_per_step(cfg, cu) == 3 * (2 * n * 15 + 4 * 32 * 4 * 83)
    assert flops_per_step(cfg, cu, training=False) * 3 == flops_per_step(cfg, cu)


@pytest.mark.parametrize(
    "name,params",
    [
        ("esm2_8m", 7.5e6),
        ("esm2_35m", 33.5e6),
        ("esm2_150m", 148e6),
        ("esm2_650m", 651e6),
        ("speedrun_133m", 133e6),
        ("esmc_300m", 333e6),
        ("esmc_600m", 575e6),
    ],
)
def test_named_sizes(name, params):
    cfg = load_yaml(resolve_config_path(name)).model
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(cfg).parameters())
    assert abs(n - params) / params < 0.02, n


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["--model.p_attention=true", "--model.tie_embeddings=true", "--model.num_att_tokens=16"],
        [
            "--model.arch=esm2",
            "--model.unet=false",
            "--model.x0_lambdas=false",
            "--model.value_embeddings=false",
            "--model.qk_norm=false",
            "--model.soft_logit_cap=0",
            "--model.tie_embeddings=true",
        ],
        [
            "--model.arch=esmc",
            "--model.unet=false",
            "--model.x0_lambdas=false",
            "--model.value_embeddings=false",
            "--model.soft_logit_cap=0",
        ],
    ],
)
def test_meta_init_is_bitwise_the_constructor(overrides):
    """One init per model: built on meta then materialised == built normally, bit for bit (ties kept)."""
    import torch

    from plmrun.config import build_config
    from plmrun.model.registry import build_model

    cfg = build_config(None, ["--model.hidden_size=64", "--model.num_heads=2", *overrides]).model
    torch.manual_seed(0)
    ref = build_model(cfg)
    with torch.device("meta"):
        meta = build_model(cfg)
    assert all(p.is_meta for p in meta.parameters())
    torch.manual_seed(0)
    meta.materialize("cpu")
    got = meta.state_dict()
    for name, p in ref.state_dict().items():
        assert torch.equal(p, got[name]), name
    assert torch.equal(ref.rotary.inv_freq, meta.rotary.inv_freq)
    assert (meta.head.decoder.weight is meta.embed.weight) == cfg.tie_embeddings


def test_token_dropout_keeps_the_step_one_gradient(tmp_path):
    """Speedrun with token dropout: step-1 grad norm within 2x of the same run without it (a zero <mask>
    row under the weightless norms made it ~2000x)."""
    import json

    from plmrun.config import build_config
    from plmrun.train.trainer import train

    norms = {}
    for td in (False, True):
        cfg = build_config(
            "debug",
            [
                f"--model.token_dropout={td}",
                "--train.max_steps=1",
                "--train.log_every=1",
                "--train.eval_every=0",
                "--eval.subset=2",
                "--eval.final_full=false",
                "--logging.progress=false",
                "--train.threads=1",
                "--train.precision=fp32",
                f"--logging.run_root={tmp_path}",
                f"--logging.name=td_{td}",
            ],
        )
        train(cfg)
        records = [json.loads(line) for line in (tmp_path / f"td_{td}" / "metrics.jsonl").read_text().splitlines()]
        norms[td] = next(r["grad_norm"] for r in records if r["kind"] == "train" and r["step"] == 1)
    assert norms[True] < 2 * norms[False] and norms[False] < 2 * norms[True], norms


@pytest.mark.parametrize("switch", [dict(norm="layer"), dict(position_encoding="none"), dict(mlp_activation="gelu")])
def test_seed_choices_change_the_output(switch):
    """The seed's fixed choices (RMSNorm, RoPE, ReLU^2) are switches: the same weights give other logits."""

    def logits(**kw):
        torch.manual_seed(0)
        model = build_model(cfg_with(**kw)).eval()
        with torch.no_grad():  # zero-initialised output projections would hide the blocks: randomise everything
            for p in model.parameters():
                p.normal_(0, 0.2)
            return model(*batch()).logits

    base, other = logits(), logits(**switch)
    assert torch.isfinite(other).all() and not torch.allclose(base, other, atol=1e-3)
    if "position_encoding" in switch:  # without positions, a sequence's residues are an unordered set
        torch.manual_seed(0)
        model = build_model(cfg_with(**switch, soft_logit_cap=0.0)).eval()
        tokens = torch.tensor([0, 5, 9, 12, 7, 2])
        perm = torch.tensor([0, 3, 1, 4, 2, 5])
        cu, pos = torch.tensor([0, 6], dtype=torch.int32), torch.arange(6)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
            a, b = model(tokens, pos, cu, 6).logits, model(tokens[perm], pos, cu, 6).logits
        torch.testing.assert_close(a[perm], b, rtol=1e-5, atol=1e-5)


def test_seed_choices_are_validated():
    from plmrun.config import ConfigError, build_config

    esm2 = [
        "--model.arch=esm2",
        "--model.unet=false",
        "--model.x0_lambdas=false",
        "--model.value_embeddings=false",
        "--model.qk_norm=false",
        "--model.soft_logit_cap=0",
    ]
    with pytest.raises(ConfigError, match=r"^model.norm is a speedrun option; leave it at 'rms' with model.arch=esm2"):
        build_config(None, [*esm2, "--model.norm=layer"])
    with pytest.raises(ConfigError, match=r"model.position_encoding: 'alibi' is not one of 'rope', 'none'"):
        build_config(None, ["--model.position_encoding=alibi"])
    with pytest.raises(
        ConfigError, match=r"^model.mlp_activation applies to the MLP, which model.p_attention replaces"
    ):
        build_config(None, ["--model.p_attention=true", "--model.mlp_activation=gelu"])
    with pytest.raises(ValueError, match="turn off mlp_activation"):
        build_model(
            cfg_with(
                arch="esm2",
                unet=False,
                x0_lambdas=False,
                value_embeddings=False,
                qk_norm=False,
                soft_logit_cap=0.0,
                mlp_activation="gelu",
            )
        )
    assert (
        build_config(
            None, ["--model.norm=layer", "--model.position_encoding=none", "--model.mlp_activation=gelu"]
        ).model.norm
        == "layer"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_squared_is_bitwise_autograd(dtype):
    """The fused squared ReLU gives exactly F.relu(h).square()'s output and gradient (sign of zeros included),
    so the default run's loss series is unchanged by it."""
    from plmrun.model.layers import relu_squared

    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 96, generator=g).to(dtype)
    h[::5, ::3] = 0.0
    grad = torch.randn(64, 96, generator=g).to(dtype)
    a, b = h.clone().requires_grad_(), h.clone().requires_grad_()
    ya, yb = torch.nn.functional.relu(a).square(), relu_squared(b)
    ya.backward(grad)
    yb.backward(grad)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(ya.view(bits), yb.view(bits))
    assert torch.equal(a.grad.view(bits), b.grad.view(bits))
    assert torch.signbit(b.grad[h <= 0]).sum() == 0  # +0 where relu is off, as threshold_backward gives
