"""torchrun end to end on CPU/gloo: DDP and FSDP2 equal one process, crashes resume bit for bit, failures stop loudly.

Every run is the tiny model of helpers.TINY (6 steps); the reference is one process × grad_accum 2, the
distributed runs are 2 processes × grad_accum 1 (the same global batches, see data/loader.py).
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import helpers
from helpers import DIST_ENV, TINY
from helpers import assert_identical as _assert_identical
from helpers import series as _series
from helpers import weights as _weights

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built"),
]

CKPT = ["--train.checkpoint_every=2"]


def _env(tmp, extra=None):
    return dict(os.environ, PLMRUN_CACHE=str(tmp / "cache"), **DIST_ENV, **(extra or {}))


def _run(cmd, tmp, extra=None, check=True, timeout=300):
    return helpers.run(cmd, tmp, {"PLMRUN_CACHE": tmp / "cache", **DIST_ENV, **(extra or {})}, check, timeout)


def _plmrun(args, tmp, extra=None, check=True):
    return _run([sys.executable, "-m", "plmrun.cli", "train", *TINY, *args], tmp, extra, check)


def _torchrun(args, tmp, extra=None, check=True, launcher=("--standalone", "--nproc_per_node=2")):
    return helpers.run_torchrun(
        ["train", *TINY, *args], tmp, {"PLMRUN_CACHE": tmp / "cache", **(extra or {})}, check, launcher
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A shared directory with the reference runs: 1 process × accum 2, and DDP 2 × 1 (both with checkpoints)."""
    tmp = tmp_path_factory.mktemp("dist")
    _plmrun([*CKPT, "--train.grad_accum=2", "--logging.name=single"], tmp)
    _torchrun([*CKPT, "--dist.strategy=ddp", "--logging.name=ddp"], tmp)
    return tmp


def test_ddp_and_fsdp2_match_one_process(work):
    """DDP: bitwise equal. FSDP2 (+ activation checkpointing): |Δloss| ≤ 1e-6, |Δweight| ≤ 5e-6
    (reduce-scatter order)."""
    runs = work / "runs"
    _assert_identical(runs / "single", runs / "ddp")
    _torchrun(["--dist.strategy=fsdp", "--dist.activation_checkpointing=true", "--logging.name=fsdp"], work)
    a, b = _series(runs / "single"), _series(runs / "fsdp")
    assert [x[:3] for x in a] == [x[:3] for x in b]
    assert max(abs(x[3] - y[3]) for x, y in zip(a, b)) <= 1e-6
    wa, wb = _weights(runs / "single"), _weights(runs / "fsdp")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 5e-6
    summary = json.loads((runs / "fsdp" / "summary.json").read_text())
    assert (
        summary["world_size"] == 2
        and summary["tokens"] == json.loads((runs / "single" / "summary.json").read_text())["tokens"]
    )


def test_sigkilled_rank_restarts_and_resumes_bitwise(work):
    """torchrun --max-restarts=1: rank 1 SIGKILLed after step 3, the job restarts from step 2 and ends identical."""
    t0 = time.perf_counter()
    proc = _torchrun(
        [*CKPT, "--dist.strategy=ddp", "--logging.name=killed"],
        work,
        {"PLMRUN_FAULT": "kill@3:1", "PLMRUN_FAULT_ONCE": str(work / "killed.once")},
        launcher=("--standalone", "--nproc_per_node=2", "--max-restarts=1"),
    )
    assert (work / "killed.once").exists() and "resumed at step 2" in proc.stdout
    _assert_identical(work / "runs" / "ddp", work / "runs" / "killed")
    print(f"kill + restart + resume: {time.perf_counter() - t0:.1f} s")


def test_sigterm_saves_and_resumes_on_another_world_size(work):
    """SIGTERM on rank 1 after step 3: every rank saves and exits 143; one process (accum 2) then continues exactly."""
    proc = _torchrun(["--dist.strategy=ddp", "--logging.name=termed"], work, {"PLMRUN_FAULT": "term@3:1"}, check=False)
    run = work / "runs" / "termed"
    assert (
        proc.returncode != 0
        and "stopped at step 3, checkpoint saved at runs/termed/checkpoints/step_00000003" in proc.stderr
    )
    assert not (run / "summary.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003"]
    resumed = _run([sys.executable, "-m", "plmrun.cli", "train", "--resume", str(run)], work)
    assert "grad_accum 2" in resumed.stdout and "resumed at step 3" in resumed.stdout
    _assert_identical(work / "runs" / "single", run)


def test_resume_that_would_change_the_global_batch_is_refused(work, tiny_config):
    """A 1 × 1 checkpoint cannot continue on 2 ranks (2 does not divide 1): refused, one line, nothing trained."""
    from plmrun.train.trainer import train

    with pytest.MonkeyPatch.context() as mp:  # in this process: SIGTERM is caught by the trainer's handler
        mp.setenv("PLMRUN_CACHE", str(work / "cache"))
        mp.setenv("PLMRUN_FAULT", "term@2")
        mp.chdir(work)
        assert train(tiny_config("--logging.name=odd"))["stopped"].startswith("signal")
    proc = _torchrun(["--logging.name=odd"], work, check=False)
    assert proc.returncode != 0
    assert "world_size × grad_accum = 1, which 2 ranks cannot reproduce" in proc.stderr
    assert max(r[1] for r in _series(work / "runs" / "odd")) == 2


def test_kill_during_checkpoint_save_falls_back_to_previous(work):
    """SIGKILL after the step-4 shards are written but before the rename: the rerun resumes from step 2."""
    args = [*CKPT, "--train.grad_accum=2", "--logging.name=savekill"]
    proc = _plmrun(args, work, {"PLMRUN_FAULT": "killsave@4"}, check=False)
    ckpts = work / "runs" / "savekill" / "checkpoints"
    assert proc.returncode == -9 and (ckpts / ".tmp-step_00000004").is_dir()
    assert [p.name for p in ckpts.glob("step_*")] == ["step_00000002"]
    again = _plmrun(args, work)
    assert "resumed at step 2" in again.stdout and not (ckpts / ".tmp-step_00000004").exists()
    _assert_identical(work / "runs" / "single", work / "runs" / "savekill")


def test_nan_stops_naming_step_and_rank(work):
    """Rank 1's weights poisoned after step 2: step 3 stops every rank, naming step 3 and rank 1; checkpoint 2 kept."""
    proc = _torchrun(
        [*CKPT, "--dist.strategy=ddp", "--logging.name=nan"], work, {"PLMRUN_FAULT": "nan@2:1"}, check=False
    )
    assert proc.returncode != 0
    assert "error: step 3: non-finite loss from rank 1" in proc.stderr
    assert [p.name for p in (work / "runs" / "nan" / "checkpoints").glob("step_*")] == ["step_00000002"]


def test_dead_rank_brings_the_job_down_promptly(work):
    """Rank 1 SIGKILLed after step 2 with no restarts: torchrun ends with an error in seconds, not a timeout."""
    t0 = time.perf_counter()
    proc = _torchrun(["--dist.strategy=ddp", "--logging.name=dead"], work, {"PLMRUN_FAULT": "kill@2:1"}, check=False)
    took = time.perf_counter() - t0
    assert proc.returncode != 0 and "Signal 9" in proc.stderr + proc.stdout
    assert took < 45, f"job took {took:.0f} s to end after a rank died"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_fsdp_meta_init(work):
    """Two torchrun launchers (one process each) meet through c10d rendezvous on 127.0.0.1 and train FSDP2 from meta."""
    port = _free_port()
    cmds = [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            f"--node-rank={r}",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=plmrun-test",
            "-m",
            "plmrun.cli",
            "train",
            *TINY,
            "--dist.strategy=fsdp",
            "--dist.meta_init=true",
            "--logging.name=twonode",
        ]
        for r in (0, 1)
    ]
    procs = [
        subprocess.Popen(c, cwd=work, env=_env(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in cmds
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-3000:] + outs[1][1][-3000:]
    summary = json.loads((work / "runs" / "twonode" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    losses = [x[3] for x in _series(work / "runs" / "twonode") if x[0] == "train"]
    assert losses[-1] < losses[0] < 3.6  # initialised from scratch (meta), and it learns


def test_check_resume_refuses_other_data(tmp_path):
    from plmrun.train.state import TrainingError, check_resume

    data = {"train_fingerprint": "a", "valid_fingerprint": "b"}
    now = {"data": data, "world_x_accum": 2}
    check_resume({"data": dict(data), "world_x_accum": 2}, now, tmp_path)
    with pytest.raises(TrainingError, match="different data"):
        check_resume({"data": {**data, "train_fingerprint": "z"}, "world_x_accum": 2}, now, tmp_path)
    from plmrun.train.trainer import resume_grad_accum

    assert resume_grad_accum({"world_x_accum": 8}, 4, 1, tmp_path) == 2
    assert resume_grad_accum({"world_x_accum": 8}, 8, 1, tmp_path) == 1
    with pytest.raises(TrainingError, match="cannot reproduce"):
        resume_grad_accum({"world_x_accum": 6}, 4, 1, tmp_path)


SPIKY = [
    "--optim.lr_embed=0.5",
    "--optim.lr_head=0.5",
    "--optim.lr_scalar=0.5",
    "--optim.schedule=constant",
    "--train.loss_spike_factor=1.2",
    "--train.loss_spike_window=2",
    "--train.eval_every=0",
]


def test_loss_spike_policies(work, monkeypatch):
    """An LR that makes the loss jump after step 1: warn changes nothing, skip drops the updates, abort stops."""
    from plmrun.config import build_config
    from plmrun.train.trainer import TrainingError, train

    monkeypatch.setenv("PLMRUN_CACHE", str(work / "cache"))
    cfg = lambda *extra: build_config(None, [*TINY, *SPIKY, f"--logging.run_root={work / 'spikes'}", *extra])
    for policy in ("ignore", "warn", "skip"):
        train(cfg(f"--train.loss_spike={policy}", f"--logging.name={policy}"))
    train(cfg("--train.loss_spike=ignore", "--train.max_steps=1", "--logging.name=one"))
    runs = work / "spikes"
    flags = {
        p: [
            r.get("spike")
            for r in map(json.loads, (runs / p / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"
        ]
        for p in ("ignore", "warn", "skip")
    }
    assert flags["ignore"] == [None] * 6 and flags["warn"][:2] == [None, "warn"]
    _assert_identical(runs / "ignore", runs / "warn")  # warn only reports
    assert flags["skip"] == [None] + ["skip"] * 5  # every later step is still worse than step 1
    wa, wb = _weights(runs / "skip"), _weights(runs / "one")  # so the weights are those after step 1
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(TrainingError, match=r"step 2: loss spike .*\(train.loss_spike=abort\)"):
        train(cfg("--train.loss_spike=abort", "--logging.name=abort"))


def test_global_batch_tokens_gives_the_same_run_on_any_world_size(work):
    """train.global_batch_tokens=1024 (2 micro-batches of 512): 2 ranks × 1 and 1 rank × 2 are the same run,
    bitwise, and equal to the explicit grad_accum=2 reference; a size the ranks cannot share is refused."""
    from plmrun.config import ConfigError, build_config
    from plmrun.train.trainer import grad_accum_for

    _torchrun(["--train.global_batch_tokens=1024", "--logging.name=gbt2"], work)
    _plmrun(["--train.global_batch_tokens=1024", "--logging.name=gbt1"], work)
    runs = work / "runs"
    _assert_identical(runs / "gbt1", runs / "gbt2")
    _assert_identical(runs / "single", runs / "gbt2")
    assert json.loads((runs / "gbt2" / "summary.json").read_text())["world_size"] == 2
    cfg = build_config(None, [*TINY, "--train.global_batch_tokens=1536"])
    assert [grad_accum_for(cfg, w) for w in (1, 3)] == [3, 1]
    with pytest.raises(
        ConfigError,
        match=r"^train.global_batch_tokens \(1536\) is 3 micro-batches of "
        r"data.token_budget \(512\), which 2 ranks cannot share evenly",
    ):
        grad_accum_for(cfg, 2)
