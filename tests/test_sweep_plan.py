"""`plmrun plan` (memory estimate, checked against real tensors) and `plmrun sweep` (experiment runner)."""

import json
import os
import sys

import pytest
import torch

from plmrun.config import build_config, list_shipped_configs
from plmrun.experiments.plan import GB, estimate, parameter_counts, plan_table

from helpers import run_cli

TINY_YAML = """model: {hidden_size: 32, num_layers: 2, num_heads: 2}
data: {token_budget: 512, max_length: 128}
train: {max_steps: 4, eval_every: 0, precision: fp32, threads: 1, log_every: 1, report_at_val_losses: [3.5]}
eval: {subset: 16, token_budget: 2048, final_full: false}
"""


def test_plan_states_equal_the_real_tensors():
    """fp32, one process: params, grads and optimizer states of the estimate are the bytes a real step allocates."""
    for opt in ("muon", "adamw"):
        cfg = build_config(
            None,
            [
                "--model.hidden_size=32",
                "--model.num_layers=2",
                "--model.num_heads=2",
                f"--optim.optimizer={opt}",
                "--model.p_attention=true",
                "--model.num_att_tokens=8",
            ],
        )
        from plmrun.model.registry import build_model
        from plmrun.optim.build import build_optimizer

        model = build_model(cfg.model)
        optimizers = build_optimizer(model, cfg.optim, 10, ns_dtype=torch.float32)
        sum(p.float().square().sum() for p in model.parameters()).backward()
        optimizers.step()
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
        params = list(model.parameters())
        states = [
            v
            for o in optimizers.optimizers
            for s in o.state.values()
            for k, v in s.items()
            if torch.is_tensor(v) and k != "step"
        ]
        est = estimate(cfg, 1, "ddp", bf16=False)
        assert est.params == nbytes(params) and est.grads == nbytes(p.grad for p in params)
        assert est.optimizer == nbytes(states), opt
        assert est.working == 0  # one process, fp32: no buckets, no autocast copies


@pytest.mark.parametrize("name", list_shipped_configs())
def test_plan_on_every_shipped_config(name):
    cfg = build_config(name)
    text = plan_table(cfg, 8, 80, name=name)
    assert "DDP" in text and "FSDP2" in text and "largest token budget" in text
    ddp, fsdp = estimate(cfg, 8, "ddp"), estimate(cfg, 8, "fsdp")
    T = cfg.data.token_budget
    assert fsdp.states < ddp.states and fsdp.params == pytest.approx(ddp.params / 8)
    assert ddp.total(T, True) < ddp.total(T, False)
    for e in (ddp, fsdp):
        for ck in (False, True):
            b = e.largest_budget(80 * GB, ck, 1024)
            if b:  # the largest budget fits, one more step does not
                assert e.total(b, ck) <= 0.9 * 80 * GB < e.total(b + 1024, ck)
    if name == "esm2_15b":
        assert parameter_counts(cfg)["total"] > 14e9
        assert ddp.largest_budget(80 * GB, True, 1024) == 0  # DDP cannot hold 15B with Muon/Adam states
        assert fsdp.largest_budget(80 * GB, True, 1024) >= cfg.data.token_budget


def test_plan_cli(capsys):
    from plmrun.cli import main

    assert main(["plan", "--config", "esm2_3b", "--gpus", "4", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "4 GPU(s) × 80 GB" in out and "checkpointed" in out
    assert main(["plan", "--config", "esm2_3b", "--gpus", "0"]) == 2


def _sweep(args, tmp_path, env_extra=None):
    env = {"OMP_NUM_THREADS": "1", **(env_extra or {}), "WANDB_API_KEY": None}  # None: no W&B key, ever
    return run_cli(["sweep", *args], tmp_path, env, check=False, timeout=300)


@pytest.mark.slow
def test_sweep_runs_valid_experiments_and_reports_the_invalid_one(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "a_base.yaml").write_text(TINY_YAML)
    (exp / "b_seed.yaml").write_text(TINY_YAML + "logging: {name: seed1}\n" + "optim: {lr_hidden: 0.03}\n")
    (exp / "c_bad.yaml").write_text(TINY_YAML.replace("num_heads: 2", "num_heads: 3"))
    proc = _sweep([str(exp), "--run-root", "sw", "--nproc", "1"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    rows = {r["experiment"]: r for r in json.loads((tmp_path / "sw" / "sweep_summary.json").read_text())}
    assert rows["a_base"]["status"] == "ok" and rows["seed1"]["status"] == "ok"
    assert rows["c_bad"]["status"].startswith("invalid:") and "divisible" in rows["c_bad"]["status"]
    for name in ("a_base", "seed1"):
        summary = json.loads((tmp_path / "sw" / name / "summary.json").read_text())
        assert rows[name]["val_loss"] == summary["final_val"]["loss"] and rows[name]["tok_per_s"] > 0
        assert rows[name]["time_to_target"].startswith("3.5 @ ")
    table = proc.stdout[proc.stdout.index("experiment  ") :]
    assert "c_bad" in table and "invalid" in table and "2 of 3 experiments succeeded" in table
    assert rows["a_base"]["val_loss"] != rows["seed1"]["val_loss"]
    # a rerun into the same root does not train the finished experiments again
    again = _sweep([str(exp / "a_base.yaml"), "--run-root", "sw", "--nproc", "1"], tmp_path)
    assert again.returncode == 0 and "finished earlier" in again.stdout


def test_sweep_never_prompts_without_a_terminal(tmp_path):
    """W&B on, no key in the environment, stdin not a terminal: skipped at once with a message, nothing blocks."""
    (tmp_path / "w.yaml").write_text(TINY_YAML + "logging: {wandb: true}\n")
    proc = _sweep([str(tmp_path / "w.yaml"), "--run-root", "sw"], tmp_path, {"WANDB_MODE": "online"})
    assert proc.returncode == 1 and "WANDB_API_KEY is not set" in proc.stdout
    assert not (tmp_path / "sw" / "w").exists()


def test_get_secret(monkeypatch):
    from plmrun.experiments.sweep import get_secret

    monkeypatch.setenv("HF_TOKEN", "abc")
    assert get_secret("HF_TOKEN", "x") == "abc"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    assert get_secret("HF_TOKEN", "x") is None


def test_plan_fits_the_longest_phase_of_a_crop_schedule():
    """A budget that holds 512-token crops but not the schedule's 65,536-token phase does not fit."""
    fits = lambda extra: [
        line
        for line in plan_table(build_config("esmc_300m", ["--data.token_budget=65536", *extra]), 1, 8).splitlines()
        if line.startswith("largest token budget, checkpointed")
    ][0]
    assert "does not fit" not in fits([])
    assert fits(["--data.max_length_schedule=[[0, 512], [10, 65536]]"]).count("does not fit") == 2
