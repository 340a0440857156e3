"""Optimizer grouping, schedules, Muon against an SVD reference, exact resume, clipping."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plmrun.config import ConfigError, OptimConfig, validate
from plmrun.optim.build import build_optimizer
from plmrun.optim.clip import clip_gradients
from plmrun.optim.muon import NS_COEFFICIENTS, Muon, newton_schulz, ns_schedule
from plmrun.optim.schedule import lr_multiplier, muon_momentum, steps_of


class Tiny(nn.Module):
    """Every kind of parameter: embedding, hidden matrices (tall and wide), head matrix + bias, scalars."""

    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, 3 * d)
        self.down = nn.Linear(3 * d, d, bias=False)
        self.gain = nn.Parameter(torch.ones(d))
        self.head = nn.Linear(d, vocab)

    def parameter_kinds(self):
        return {
            "embed.weight": "embed",
            "up.weight": "hidden",
            "up.bias": "scalar",
            "down.weight": "hidden",
            "gain": "scalar",
            "head.weight": "head",
            "head.bias": "head",
        }

    def loss(self, x):
        h = self.embed(x)
        h = h + self.down(F.relu(self.up(h)).square())
        return F.cross_entropy(self.head(F.rms_norm(h, (h.shape[-1],)) * self.gain), x)


def _model(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def _cfg(**kw):
    return OptimConfig(**kw)


# ---------------------------------------------------------------- grouping
def test_muon_grouping_lrs_and_decay():
    m = _model()
    cfg = _cfg(
        weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, lr_hidden=0.02, lr_embed=0.05, lr_head=0.008, lr_scalar=0.04
    )
    opt = build_optimizer(m, cfg, max_steps=100)
    muon, adam = opt.optimizers
    assert isinstance(muon, Muon) and isinstance(adam, torch.optim.AdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"hidden", "embed", "head", "head_no_decay", "scalar_no_decay"}
    ids = {n: [id(p) for p in g["params"]] for n, g in groups.items()}
    assert ids["hidden"] == [id(m.up.weight), id(m.down.weight)]
    assert ids["embed"] == [id(m.embed.weight)]
    assert ids["head"] == [id(m.head.weight)] and ids["head_no_decay"] == [id(m.head.bias)]
    assert sorted(ids["scalar_no_decay"]) == sorted([id(m.up.bias), id(m.gain)])
    expect_lr = {"hidden": 0.02, "embed": 0.05, "head": 0.008, "head_no_decay": 0.008, "scalar_no_decay": 0.04}
    assert {n: g["base_lr"] for n, g in groups.items()} == expect_lr
    expect_wd = {"hidden": 0.1, "embed": 0.1, "head": 0.1, "head_no_decay": 0.0, "scalar_no_decay": 0.0}
    assert {n: g["weight_decay"] for n, g in groups.items()} == expect_wd
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6 for g in adam.param_groups)
    assert muon.param_groups[0]["ns_steps"] == cfg.ns_steps
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))


def test_adamw_grouping_is_esm2_recipe():
    m = _model()
    opt = build_optimizer(m, _cfg(optimizer="adamw", lr=4e-4, weight_decay=0.01, betas=(0.9, 0.98)), max_steps=10)
    (adam,) = opt.optimizers
    assert type(adam) is torch.optim.AdamW
    groups = {g["name"]: g for g in opt.param_groups}
    assert {n: (g["base_lr"], g["weight_decay"]) for n, g in groups.items()} == {
        "adamw": (4e-4, 0.01),
        "adamw_no_decay": (4e-4, 0.0),
    }
    assert all(p.ndim >= 2 for p in groups["adamw"]["params"])
    assert all(p.ndim < 2 for p in groups["adamw_no_decay"]["params"])


def test_frozen_parameters_are_left_out():
    m = _model()
    m.gain.requires_grad_(False)
    opt = build_optimizer(m, _cfg(), max_steps=10)
    assert not any(p is m.gain for p in opt.params)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda k: k.pop("gain"), "'gain' has no kind"),
        (lambda k: k.update({"nope.weight": "hidden"}), "'nope.weight', which is not a parameter"),
        (lambda k: k.update({"gain": "vector"}), "kind 'vector'"),
        (lambda k: k.update({"gain": "hidden"}), "'gain' of shape (8,) is 'hidden'"),
    ],
)
def test_bad_parameter_kinds_are_one_line_errors(change, message):
    m = _model()
    kinds = m.parameter_kinds()
    change(kinds)
    m.parameter_kinds = lambda: kinds
    with pytest.raises(ValueError, match=None) as e:
        build_optimizer(m, _cfg(), max_steps=10)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_wrapper_without_parameter_kinds_is_refused():
    with pytest.raises(ValueError, match="no parameter_kinds"):
        build_optimizer(nn.Sequential(_model().up), _cfg(), max_steps=10)


# ---------------------------------------------------------------- schedules
def _mult(step, max_steps=100, **kw):
    return lr_multiplier(step, _cfg(**kw), max_steps)


def test_warmup_in_steps_or_fraction():
    assert steps_of(10, 100) == 10 and steps_of(0.1, 100) == 10 and steps_of(0.0, 100) == 0
    for warmup in (10, 0.1):
        vals = [_mult(s, warmup=warmup, schedule="constant") for s in range(12)]
        assert vals[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
        assert vals[10:] == [1.0, 1.0]
    assert _mult(0, warmup=0, schedule="constant") == 1.0


def test_cosine_schedule():
    kw = dict(schedule="cosine", warmup=10, final_lr_ratio=0.1)
    assert _mult(9, **kw) == 1.0 and _mult(10, **kw) == 1.0
    assert _mult(55, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert _mult(99, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert _mult(100, **kw) == pytest.approx(0.1) and _mult(500, **kw) == pytest.approx(0.1)


def test_wsd_schedule():
    kw = dict(schedule="wsd", warmup=0.1, cooldown=0.4, final_lr_ratio=0.0)
    assert _mult(0, **kw) == pytest.approx(0.1)
    assert _mult(10, **kw) == 1.0 and _mult(59, **kw) == 1.0
    assert _mult(60, **kw) == 1.0 and _mult(80, **kw) == pytest.approx(0.5)
    assert _mult(99, **kw) == pytest.approx(1 / 40) and _mult(100, **kw) == 0.0
    assert _mult(80, schedule="wsd", cooldown=20, final_lr_ratio=0.2) == 1.0
    assert _mult(90, schedule="wsd", cooldown=20, final_lr_ratio=0.2) == pytest.approx(0.6)


def test_linear_schedule_esm2_recipe():
    kw = dict(schedule="linear", warmup=20, final_lr_ratio=0.1)
    assert _mult(19, **kw) == 1.0 and _mult(20, **kw) == 1.0
    assert _mult(60, **kw) == pytest.approx(1 - 0.9 * 0.5)
    assert _mult(100, **kw) == pytest.approx(0.1) and _mult(1000, **kw) == pytest.approx(0.1)


def test_constant_schedule_ignores_final_ratio():
    assert [_mult(s, schedule="constant", final_lr_ratio=0.1) for s in (0, 50, 99, 200)] == [1.0] * 4


def test_muon_momentum_warmup():
    cfg = _cfg(muon_momentum_start=0.85, muon_momentum=0.95, muon_momentum_warmup_steps=300)
    assert muon_momentum(0, cfg) == 0.85
    assert muon_momentum(150, cfg) == pytest.approx(0.90)
    assert muon_momentum(300, cfg) == 0.95 and muon_momentum(10_000, cfg) == 0.95
    assert muon_momentum(0, _cfg(muon_momentum_warmup_steps=0)) == 0.95


def test_set_step_applies_schedule_and_momentum():
    cfg = _cfg(schedule="linear", warmup=4, final_lr_ratio=0.1, muon_momentum_warmup_steps=10)
    opt = build_optimizer(_model(), cfg, max_steps=20)
    for step in (0, 3, 5, 12, 19):
        opt.set_step(step)
        mult = lr_multiplier(step, cfg, 20)
        assert opt.lr_multiplier(step) == mult
        for g in opt.param_groups:
            assert g["lr"] == g["base_lr"] * mult
        assert opt.current_lrs()["hidden"] == cfg.lr_hidden * mult
        assert opt.optimizers[0].param_groups[0]["momentum"] == muon_momentum(step, cfg)
    assert all("momentum" not in g for g in opt.optimizers[1].param_groups)  # Adam groups untouched


# ---------------------------------------------------------------- Muon maths
def _ns_reference(g: torch.Tensor, steps: int) -> torch.Tensor:
    """NS in SVD space (float64): each singular value of g/‖g‖_F goes through the quintic `steps` times."""
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    a, b, c = NS_COEFFICIENTS
    s = s / torch.linalg.matrix_norm(g.double())
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return u @ torch.diag(s) @ vh


@pytest.mark.parametrize("shape", [(16, 16), (24, 8), (8, 24)])
def test_newton_schulz_matches_svd_reference(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(g, 5, torch.float32)
    assert out.dtype == torch.float32 and out.shape == shape
    torch.testing.assert_close(out.double(), _ns_reference(g, 5), atol=2e-5, rtol=0)
    sv = torch.linalg.svdvals(out)
    assert sv.min() > 0.6 and sv.max() < 1.25  # roughly orthogonal, as the coefficients intend
    bf = newton_schulz(g, 5)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float(), out, atol=0.05, rtol=0)


def _pe_reference(g):
    """Polar Express on the singular values in float64 (its 2% safety factor in the normalisation)."""
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    s = s / (torch.linalg.matrix_norm(g.double()) * 1.02)
    for a, b, c in ns_schedule("polar_express", 5):
        s = a * s + b * s**3 + c * s**5
    return u @ torch.diag(s) @ vh


@pytest.mark.parametrize("shape", [(16, 16), (48, 16), (16, 48)])
def test_polar_express_matches_svd_reference_and_is_closer_to_orthogonal(shape):
    """Same cost as 5 quintic steps; on a Gaussian matrix its singular values land in [0.8, 1.2]
    where the quintic's spread over [0.6, 1.25]."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(g, 5, torch.float32, coefficients="polar_express")
    torch.testing.assert_close(out.double(), _pe_reference(g), atol=5e-5, rtol=0)
    sv = torch.linalg.svdvals(out)
    assert sv.min() > 0.8 and sv.max() < 1.2
    quintic = torch.linalg.svdvals(newton_schulz(g, 5, torch.float32))
    assert (sv - 1).abs().max() < (quintic - 1).abs().max()


def test_truncated_or_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="exactly 5 steps"):
        Muon([nn.Parameter(torch.zeros(3, 3))], lr=0.1, ns_steps=4, ns_coefficients="polar_express")
    with pytest.raises(ValueError, match="expected one of quintic, polar_express"):
        ns_schedule("cubic", 5)
    cfg = copy.deepcopy(_full_config())
    cfg.optim.ns_coefficients, cfg.optim.ns_steps = "polar_express", 3
    with pytest.raises(ConfigError, match="optim.ns_steps=5"):
        validate(cfg)


def _full_config():
    from plmrun.config import Config

    return Config()


@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
@pytest.mark.parametrize("shape", [(7, 5), (24, 8), (8, 24), (16, 16)])
def test_batched_newton_schulz_equals_one_call_per_matrix(shape, coefficients):
    """A stack [k, rows, cols] is orthogonalised matrix by matrix (own norm each), to fp32 rounding
    (NS amplifies it to ~2e-6 here; on CPU bitwise for the default model's shapes)."""
    gs = (
        torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))
        * torch.tensor([1.0, 30.0, 1e-3])[:, None, None]
    )
    batched = newton_schulz(gs, 5, torch.float32, coefficients=coefficients)
    for g, b in zip(gs, batched):
        torch.testing.assert_close(b, newton_schulz(g, 5, torch.float32, coefficients=coefficients), atol=1e-5, rtol=0)


def test_gram_side_equals_direct_iteration():
    """A tall matrix is iterated transposed (Gram cols×cols); the direct X·Xᵀ (rows×rows) iteration agrees."""
    g = torch.randn(40, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = g / g.norm()
    for a, b, c in ns_schedule("quintic", 5):
        gram = x @ x.T  # 40×40: the expensive side
        x = a * x + (b * gram + c * gram @ gram) @ x
    torch.testing.assert_close(newton_schulz(g.float(), 5, torch.float32).double(), x, atol=2e-5, rtol=0)


def test_build_optimizer_passes_ns_coefficients():
    opt = build_optimizer(_model(), _cfg(ns_coefficients="polar_express"), max_steps=10)
    assert opt.optimizers[0].param_groups[0]["ns_coefficients"] == "polar_express"


def test_muon_steps_match_direct_reference():
    """Two steps (momentum warm-up changes mu), weight decay and the shape factor, fp32."""
    torch.manual_seed(0)
    w_tall, w_wide = torch.randn(12, 4), torch.randn(4, 10)
    grads = [[torch.randn(12, 4), torch.randn(4, 10)] for _ in range(2)]
    params = [nn.Parameter(w_tall.clone()), nn.Parameter(w_wide.clone())]
    opt = Muon(params, lr=0.1, momentum=0.9, weight_decay=0.5, ns_steps=5, ns_dtype=torch.float32)
    ref = [w_tall.double(), w_wide.double()]
    bufs = [torch.zeros_like(r) for r in ref]
    for step, mu in enumerate((0.8, 0.9)):
        opt.param_groups[0]["momentum"] = mu
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads[step]):
            g = g.double()
            bufs[i] = mu * bufs[i] + (1 - mu) * g
            update = (1 - mu) * g + mu * bufs[i]
            rows, cols = ref[i].shape
            ref[i] = ref[i] * (1 - 0.1 * 0.5) - 0.1 * max(1, rows / cols) ** 0.5 * _ns_reference(update, 5)
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach().double(), r, atol=1e-5, rtol=0)
    assert math.sqrt(12 / 4) > 1  # the tall matrix exercises the shape factor


def test_muon_without_nesterov_uses_the_buffer():
    g = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    p = nn.Parameter(torch.zeros(6, 6))
    opt = Muon([p], lr=1.0, momentum=0.5, nesterov=False, ns_dtype=torch.float32)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach().double(), -_ns_reference(0.5 * g, 5), atol=1e-5, rtol=0)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D matrices only"):
        Muon([nn.Parameter(torch.zeros(3))], lr=0.1)


# ---------------------------------------------------------------- resume
def _train(model, opt, steps, start, data):
    losses = []
    for s in range(start, start + steps):
        opt.set_step(s)
        loss = model.loss(data[s])
        loss.backward()
        opt.clip_gradients()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_state_dict_round_trip_gives_identical_steps(optimizer):
    cfg = _cfg(
        optimizer=optimizer,
        warmup=2,
        schedule="cosine",
        weight_decay=0.1,
        auto_clip_percentile=50,
        auto_clip_history=3,
        grad_clip=5.0,
        muon_momentum_warmup_steps=4,
    )
    data = torch.randint(0, 11, (8, 32), generator=torch.Generator().manual_seed(0))
    model = _model()
    opt = build_optimizer(model, cfg, max_steps=8)
    _train(model, opt, 4, 0, data)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert len(saved_opt["grad_norm_history"]) == 3
    straight = _train(model, opt, 4, 4, data)

    resumed_model = _model(seed=1)
    resumed_model.load_state_dict(saved_model)
    resumed_opt = build_optimizer(resumed_model, cfg, max_steps=8)
    resumed_opt.load_state_dict(saved_opt)
    assert _train(resumed_model, resumed_opt, 4, 4, data) == straight
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert resumed_opt.grad_norm_history == opt.grad_norm_history


def test_loading_state_of_another_optimizer_is_refused():
    muon = build_optimizer(_model(), _cfg(optimizer="muon"), max_steps=4)
    adamw = build_optimizer(_model(), _cfg(optimizer="adamw"), max_steps=4)
    with pytest.raises(ValueError, match="parameter groups"):
        muon.load_state_dict(adamw.state_dict())


def test_zero_grad_sets_none():
    m = _model()
    opt = build_optimizer(m, _cfg(), max_steps=4)
    m.loss(torch.arange(11)).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())


# ---------------------------------------------------------------- clipping
def _params_with_grads(norms):
    """One parameter per entry, each with a gradient of the given norm."""
    ps = []
    for n in norms:
        p = nn.Parameter(torch.zeros(4))
        p.grad = torch.full((4,), n / 2.0)  # ‖(n/2,)*4‖ = n
        ps.append(p)
    return ps


def _global_norm(ps):
    return math.sqrt(sum(float(p.grad.square().sum()) for p in ps))


def test_grad_clip_global_norm():
    ps = _params_with_grads([3.0, 4.0])
    norm, clip = clip_gradients(ps, _cfg(grad_clip=1.0), [])
    assert norm == pytest.approx(5.0) and clip == 1.0
    assert _global_norm(ps) == pytest.approx(1.0, rel=1e-5)
    ps = _params_with_grads([3.0, 4.0])
    assert clip_gradients(ps, _cfg(grad_clip=10.0), []) == (pytest.approx(5.0), 10.0)
    assert _global_norm(ps) == pytest.approx(5.0)
    history = []
    assert clip_gradients(ps, _cfg(), history) == (pytest.approx(5.0), 0.0) and history == []


def test_auto_clip_percentile_of_recent_norms():
    cfg = _cfg(auto_clip_percentile=50, auto_clip_history=3)
    history = []
    seen = []
    for n in (1.0, 2.0, 10.0, 3.0, 8.0):
        ps = _params_with_grads([n])
        norm, clip = clip_gradients(ps, cfg, history)
        seen = (seen + [n])[-3:]
        assert norm == pytest.approx(n)
        assert history == pytest.approx(seen)
        assert clip == pytest.approx(float(np.percentile(seen, 50)))
        assert _global_norm(ps) == pytest.approx(min(n, clip), rel=1e-5)
    # at step 3 the 10.0 spike was clipped to the median 2.0; grad_clip wins when it is smaller
    ps = _params_with_grads([9.0])
    assert clip_gradients(ps, _cfg(auto_clip_percentile=50, grad_clip=1.0), [9.0, 9.0])[1] == 1.0


def test_non_finite_norm_is_reported_not_recorded():
    ps = _params_with_grads([float("inf")])
    history = [1.0]
    norm, clip = clip_gradients(ps, _cfg(auto_clip_percentile=90, grad_clip=1.0), history)
    assert math.isinf(norm) and clip == 0.0 and history == [1.0]


def test_dcp_optimizer_state_dict_round_trip():
    """The trainer's distributed-checkpoint path: FQN-keyed state of `Optimizers.optimizers` + the history."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    cfg = _cfg(warmup=2, schedule="cosine", weight_decay=0.1, auto_clip_percentile=50, auto_clip_history=3)
    data = torch.randint(0, 11, (8, 32), generator=torch.Generator().manual_seed(0))
    model = _model()
    opt = build_optimizer(model, cfg, max_steps=8)
    _train(model, opt, 4, 0, data)
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt.optimizers))
    saved_model, history = copy.deepcopy(model.state_dict()), list(opt.grad_norm_history)
    assert "up.weight" in saved["state"]
    straight = _train(model, opt, 4, 4, data)
    resumed = _model(seed=1)
    resumed.load_state_dict(saved_model)
    resumed_opt = build_optimizer(resumed, cfg, max_steps=8)
    set_optimizer_state_dict(resumed, resumed_opt.optimizers, saved)
    resumed_opt.grad_norm_history = history
    assert _train(resumed, resumed_opt, 4, 4, data) == straight


# ---------------------------------------------------------------- cheaper orthogonalisation (opt-in)
def _svd_map(g, f):
    """U·diag(f(s))·Vᵀ of g's SVD in float64, with s the singular values of g/‖g‖_F."""
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return u @ torch.diag(f(s / torch.linalg.matrix_norm(g.double()))) @ vh


def _quintic5(s):
    for a, b, c in ns_schedule("quintic", 5):
        s = a * s + b * s**3 + c * s**5
    return s


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (2, 12, 40)])
def test_gram_newton_schulz_matches_svd_and_bounds_distance_to_polar(shape):
    """ns_gram: the same polynomial of the singular values as the direct iteration (fp32 to 2e-5 of the
    SVD reference), so its spectral distance from the exact polar factor U·Vᵀ is the quintic's
    max |p(s) − 1| over the spectrum (< 0.35 on a Gaussian matrix)."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    out = newton_schulz(g, 5, torch.float32, gram=True)
    assert out.shape == g.shape and out.dtype == torch.float32
    for gi, oi in zip(g.reshape(-1, *shape[-2:]), out.reshape(-1, *shape[-2:])):
        torch.testing.assert_close(oi.double(), _svd_map(gi, _quintic5), atol=2e-5, rtol=0)
        polar = _svd_map(gi, torch.ones_like)
        assert torch.linalg.matrix_norm(oi.double() - polar, 2) < 0.35
    assert not torch.equal(out, newton_schulz(g, 5, torch.float32))  # a different computation
    bf = newton_schulz(g, 5, torch.bfloat16, gram=True)
    torch.testing.assert_close(bf.float(), out, atol=0.06, rtol=0)


def test_gram_newton_schulz_leaves_near_square_matrices_to_the_direct_iteration():
    g = torch.randn(16, 24, generator=torch.Generator().manual_seed(5))  # aspect 1.5 < GRAM_MIN_ASPECT
    assert torch.equal(newton_schulz(g, 5, torch.float32, gram=True), newton_schulz(g, 5, torch.float32))


def test_per_head_blocks_are_orthogonalised_on_their_own():
    """ns_blocks=H: each head's row block is NS of that block (SVD reference per block), so each block's
    rows are near-orthonormal (distance to its own polar factor < 0.35), and the update differs from
    the whole-matrix one."""
    g = torch.randn(16, 16, generator=torch.Generator().manual_seed(6))
    p = nn.Parameter(torch.zeros(16, 16))
    opt = Muon([dict(params=[p], ns_blocks=4)], lr=1.0, momentum=0.0, nesterov=False, ns_dtype=torch.float32)
    p.grad = g.clone()
    opt.step()
    o = -p.detach().double()
    for i in range(4):
        block = g[4 * i : 4 * i + 4]
        torch.testing.assert_close(o[4 * i : 4 * i + 4], _svd_map(block, _quintic5), atol=2e-5, rtol=0)
        assert torch.linalg.matrix_norm(o[4 * i : 4 * i + 4] - _svd_map(block, torch.ones_like), 2) < 0.35
    assert not torch.allclose(o, _svd_map(g, _quintic5), atol=1e-2)
    with pytest.raises(ValueError, match="does not divide"):
        Muon([dict(params=[nn.Parameter(torch.zeros(6, 4))], ns_blocks=4)], lr=0.1)


class TinyAttention(nn.Module):
    """A block with an attention module like plmrun's (q/k/v/o Linears, head count H) and an MLP."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.embed = nn.Embedding(11, d)
        self.attn = nn.Module()
        self.attn.H = heads
        self.attn.q, self.attn.k, self.attn.v, self.attn.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.head = nn.Linear(d, 11)

    def parameter_kinds(self):
        kinds = {n: "hidden" for n, _ in self.named_parameters()}
        kinds.update({"embed.weight": "embed", "head.weight": "head", "head.bias": "head"})
        return kinds

    def loss(self, x):
        h = self.embed(x)
        h = h + self.attn.o(self.attn.v(h) * torch.sigmoid(self.attn.q(h) * self.attn.k(h)))
        h = h + self.up(h).view(*h.shape[:-1], 4, -1).relu().mean(-2)
        return F.cross_entropy(self.head(h), x)


def test_build_optimizer_ns_per_head_groups_qkv_by_head():
    torch.manual_seed(0)
    model = TinyAttention()
    opt = build_optimizer(model, _cfg(ns_per_head=True), max_steps=4)
    muon = opt.optimizers[0]
    assert [g["name"] for g in muon.param_groups] == ["hidden", "hidden"]
    assert muon.param_groups[1]["ns_blocks"] == 2
    assert {id(p) for p in muon.param_groups[1]["params"]} == {
        id(model.attn.q.weight),
        id(model.attn.k.weight),
        id(model.attn.v.weight),
    }
    with pytest.raises(ValueError, match="no attention module"):
        build_optimizer(_model(), _cfg(ns_per_head=True), max_steps=4)


@pytest.mark.parametrize("option", [dict(ns_gram=True), dict(ns_per_head=True), dict(ns_every=2)])
def test_each_cheaper_option_changes_the_update_and_default_is_unchanged(option):
    data = torch.randint(0, 11, (4, 32), generator=torch.Generator().manual_seed(0))

    def weights(**kw):
        torch.manual_seed(0)
        model = TinyAttention()
        opt = build_optimizer(model, _cfg(**kw), max_steps=4)
        opt.optimizers[0].ns_dtype = torch.float32
        _train(model, opt, 3, 0, data)
        return [p.detach().clone() for p in model.parameters()]

    base = weights()
    assert all(torch.equal(a, b) for a, b in zip(base, weights()))
    assert not all(torch.equal(a, b) for a, b in zip(base, weights(**option)))


def test_ns_every_reuses_the_polar_factor_between_recomputations():
    """ns_every=3: steps 0 and 3 orthogonalise the momentum; steps 1 and 2 apply step 0's factor again."""
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(8, 24, generator=gen) for _ in range(4)]
    p = nn.Parameter(torch.zeros(8, 24))
    opt = Muon([p], lr=1.0, momentum=0.5, nesterov=False, ns_dtype=torch.float32, ns_every=3)
    buf, prev, deltas = torch.zeros(8, 24, dtype=torch.float64), p.detach().clone(), []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        deltas.append((p.detach() - prev).double())
        prev = p.detach().clone()
    for step, g in enumerate(grads):
        buf = 0.5 * buf + 0.5 * g.double()
        if step % 3 == 0:
            polar = _svd_map(buf, _quintic5)
        torch.testing.assert_close(deltas[step], -polar, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="ns_every must be >= 1"):
        Muon([p], lr=0.1, ns_every=0)


def test_ns_every_state_round_trip_gives_identical_steps():
    cfg = _cfg(ns_every=3, ns_gram=True)
    data = torch.randint(0, 11, (8, 32), generator=torch.Generator().manual_seed(0))
    model = _model()
    opt = build_optimizer(model, cfg, max_steps=8)
    _train(model, opt, 4, 0, data)  # stops between two recomputations
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    straight = _train(model, opt, 4, 4, data)
    resumed_model = _model(seed=1)
    resumed_model.load_state_dict(saved_model)
    resumed_opt = build_optimizer(resumed_model, cfg, max_steps=8)
    resumed_opt.load_state_dict(saved_opt)
    assert _train(resumed_model, resumed_opt, 4, 4, data) == straight
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_ns_every_below_one_is_refused_by_validate():
    cfg = copy.deepcopy(_full_config())
    cfg.optim.ns_every = 0
    with pytest.raises(ConfigError, match="optim.ns_every must be >= 1"):
        validate(cfg)


def test_polar_express_3_matches_svd_and_beats_three_quintic_steps():
    """The fitted 3-step schedule: the SVD-space reference to fp32 rounding; on [1e-2, 1] of s/‖G‖_F it lands in
    [0.72, 1.28] (its design bound), where three quintic steps leave s = 1e-2 at 0.40."""
    s = torch.tensor([0.015, 0.03, 0.1, 0.3, 0.6, 1.0], dtype=torch.float64)  # s/‖G‖_F from 0.0124 to 0.83
    g = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(8)))[0][:, :6]
    g = (g * s) @ torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9)))[0]
    out = newton_schulz(g.float(), 3, torch.float32, coefficients="polar_express_3").double()

    def pe3(x):
        for a, b, c in ns_schedule("polar_express_3", 3):
            x = a * x + b * x**3 + c * x**5
        return x

    torch.testing.assert_close(out, _svd_map(g, pe3), atol=2e-5, rtol=0)
    sv = torch.linalg.svdvals(out)
    assert sv.min() > 0.72 and sv.max() < 1.28
    quintic3 = torch.linalg.svdvals(newton_schulz(g.float(), 3, torch.float32))
    assert quintic3.min() < 0.5 and (sv - 1).abs().max() < (quintic3 - 1).abs().max()
    with pytest.raises(ValueError, match="polar_express_3 with exactly 3"):
        ns_schedule("polar_express_3", 5)
    cfg = copy.deepcopy(_full_config())
    cfg.optim.ns_coefficients = "polar_express_3"
    with pytest.raises(ConfigError, match="optim.ns_steps=3"):
        validate(cfg)
