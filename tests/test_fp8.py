"""train.fp8: torchao Float8Linear in the blocks. On a CPU torch 2.13 emulates float8 matmuls
(torch._scaled_mm), so the conversion, the numerics, resume and export are checked here; the speed is
only real on an H100-class GPU (the cuda test and benchmarks/gpu.sh)."""

import copy
import json

import pytest
import torch

from plmrun.config import ConfigError, build_config
from plmrun.model.registry import build_model
from plmrun.train.parallelize import DistEnv, parallelize
from plmrun.train.trainer import forward_backward

from helpers import TINY, assert_identical, masked_micro_batches, random_sequences
from helpers import run_cli as _plmrun

pytest.importorskip("torchao", reason="train.fp8 needs the fp8 extra (in dev)")

CPU = DistEnv(1, 0, 0, torch.device("cpu"))
SHAPE = ["--model.hidden_size=64", "--model.num_layers=2", "--model.num_heads=2", "--train.precision=bf16"]


def _batch(budget=1024):
    """One micro-batch of 16 sequences of 20–89 residues."""
    return masked_micro_batches(random_sequences(16, lengths=(20, 90)), [range(16)], budget)


def _linears(model):
    """(names of the Float8Linear layers, names of the plain nn.Linear layers)."""
    from torchao.float8.float8_linear import Float8Linear

    lin = [(n, type(m)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return [n for n, t in lin if t is Float8Linear], [n for n, t in lin if t is torch.nn.Linear]


@pytest.mark.parametrize("preset", [None, "esm2_8m", "esmc_cpu"])
def test_fp8_converts_the_block_linears_and_keeps_every_parameter_name(preset):
    """Every block linear (Q, K, V, O and the MLP) runs in float8, the head and embeddings do not, and the
    state dict is the bf16 model's key for key: checkpoints and exports do not know about fp8."""
    cfg = build_config(preset, [*SHAPE, "--train.fp8=true"])
    plain = build_model(cfg.model)
    keys = list(plain.state_dict())
    model = parallelize(copy.deepcopy(plain), cfg, CPU)
    fp8, bf16 = _linears(model)
    assert fp8 and all(n.startswith("blocks.") for n in fp8)
    assert not any(n.startswith("blocks.") for n in bf16)  # nothing in the blocks is left out at width 64
    assert list(model.state_dict()) == keys


def test_fp8_leaves_out_layers_whose_dimensions_float8_kernels_cannot_take():
    """Width 40 is not a multiple of 16: nothing could run in float8, which is an error, not a silent bf16 run."""
    cfg = build_config(
        None, ["--model.hidden_size=40", "--model.num_heads=2", "--train.precision=bf16", "--train.fp8=true"]
    )
    with pytest.raises(ConfigError, match="multiple of 16"):
        parallelize(build_model(cfg.model), cfg, CPU)


def test_fp8_loss_and_gradients_follow_bf16():
    """Same weights, same batch: the float8 loss is within 1% of bf16's and every block gradient points
    the same way (cosine > 0.97); per-tensor e4m3/e5m2 rounding, not a different computation."""
    cfg = build_config(None, [*SHAPE, "--train.fp8=true"])
    torch.manual_seed(0)
    ref = build_model(cfg.model)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
    fp8 = parallelize(copy.deepcopy(ref), cfg, CPU)
    micro = _batch()
    out = {}
    for name, model in (("bf16", ref), ("fp8", fp8)):
        loss = forward_backward(
            model, micro, global_norm=micro[0].normalizer, world_size=1, device=CPU.device, amp_dtype=torch.bfloat16
        )
        out[name] = float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert out["fp8"][0] == pytest.approx(out["bf16"][0], rel=0.01)
    assert out["fp8"][0] != out["bf16"][0]  # the float8 path really ran
    for n, g in out["bf16"][1].items():
        if n.startswith("blocks.") and g.norm() > 0:
            cos = torch.nn.functional.cosine_similarity(g.flatten(), out["fp8"][1][n].flatten(), dim=0)
            assert cos > 0.97, (n, float(cos))


def test_fp8_needs_bf16_and_says_how(monkeypatch):
    with pytest.raises(ConfigError, match="train.fp8=true runs the other matmuls in bf16"):
        build_config(None, ["--train.fp8=true", "--train.precision=fp32"])
    # auto on a CPU without native bf16 resolves to fp32: refused when the model is built, naming the fix
    from plmrun.train import parallelize as P

    monkeypatch.setattr(P.torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    cfg = build_config(None, ["--model.hidden_size=64", "--model.num_heads=2", "--train.fp8=true"])
    with pytest.raises(ConfigError, match="train.precision=auto runs fp32 on this cpu"):
        parallelize(build_model(cfg.model), cfg, CPU)


def test_fp8_without_torchao_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torchao.float8", None)
    cfg = build_config(None, [*SHAPE, "--train.fp8=true"])
    with pytest.raises(ConfigError, match=r"needs torchao .*pip install 'plmrun\[fp8\]'"):
        parallelize(build_model(cfg.model), cfg, CPU)


def test_float8_peak_is_a_scaled_matmul_and_the_run_peak_is_the_fastest(monkeypatch, tmp_path):
    from plmrun.train import peak

    assert peak.time_matmul(CPU.device, torch.float8_e4m3fn, seconds=0.01, n=64) > 0
    monkeypatch.setenv("PLMRUN_CACHE", str(tmp_path))
    rates = {torch.bfloat16: 5e11, torch.float8_e4m3fn: 3e10}  # a CPU: float8 emulated, slower than bf16
    monkeypatch.setattr(peak, "time_matmul", lambda device, dtype, seconds=0.4, n=0: rates[dtype])
    best = peak.run_peak(CPU.device, [torch.bfloat16, torch.float8_e4m3fn])
    assert best.flops == 5e11 and best.key.endswith("bfloat16")
    rates[torch.float8_e4m3fn] = 1e12  # an H100: float8 is the faster unit, so it is the denominator
    assert peak.run_peak(CPU.device, [torch.bfloat16, torch.float8_e4m3fn]).flops == 1e12


@pytest.mark.slow
def test_fp8_run_trains_resumes_bitwise_and_exports_a_plain_model(tmp_path):
    """The CLI run: precision reads bf16+fp8, the loss falls, a SIGTERM resume is bitwise the straight run,
    and the export loads into a model with no torchao in it."""
    args = [*TINY, "--model.hidden_size=64", "--train.precision=bf16", "--train.fp8=true", "--train.checkpoint_every=2"]
    straight = _plmrun(["train", *args, "--logging.name=straight"], tmp_path)
    assert "precision bf16+fp8" in straight.stdout
    term = _plmrun(
        ["train", *args, "--logging.name=resumed"], tmp_path, env_extra={"PLMRUN_FAULT": "term@3"}, check=False
    )
    assert term.returncode == 143, term.stderr[-2000:]
    _plmrun(["train", "--resume", str(tmp_path / "runs" / "resumed")], tmp_path)
    assert_identical(tmp_path / "runs" / "straight", tmp_path / "runs" / "resumed")
    summary = json.loads((tmp_path / "runs" / "straight" / "summary.json").read_text())
    assert summary["precision"] == "bf16+fp8"
    losses = [
        json.loads(x)["loss"]
        for x in (tmp_path / "runs" / "straight" / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "train"
    ]
    assert losses[-1] < losses[0]
    _plmrun(["export", str(tmp_path / "runs" / "straight"), "--out", "hf"], tmp_path)
    from plmrun.model.loading import load_model

    model = load_model(str(tmp_path / "hf"))[0]
    assert not any(type(m).__module__.startswith("torchao") for m in model.modules())


@pytest.mark.cuda
def test_fp8_compiled_on_cuda_follows_bf16():
    """On the GPU the float8 kernels are real (H100-class: sm89+); compiled, as benchmarks/gpu.sh runs it."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matmuls need compute capability 8.9 or newer")
    gpu = DistEnv(1, 0, 0, torch.device("cuda"))
    cfg = build_config(
        None,
        [
            "--model.hidden_size=256",
            "--model.num_layers=2",
            "--model.num_heads=4",
            "--train.fp8=true",
            "--train.compile=true",
        ],
    )
    torch.manual_seed(0)
    ref = build_model(cfg.model).cuda()
    fp8 = parallelize(copy.deepcopy(ref), cfg, gpu)
    micro = _batch(budget=2048)
    losses = [
        float(
            forward_backward(
                m, micro, global_norm=micro[0].normalizer, world_size=1, device=gpu.device, amp_dtype=torch.bfloat16
            )
        )
        for m in (ref, fp8)
    ]
    assert losses[1] == pytest.approx(losses[0], rel=0.02)
