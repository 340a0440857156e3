"""The trainer: end to end on the bundled corpus, loss normalisation, exact resume, run directories."""

import json

import numpy as np
import pytest
import torch

from plmrun.config import build_config
from plmrun.model.registry import build_model
from plmrun.train.trainer import forward_backward

from helpers import TINY, masked_micro_batches, random_sequences
from helpers import run_cli as _plmrun


def test_micro_batch_split_invariance():
    """1×8 vs 4×2 accumulation (same sequences) give the same gradient and loss (fp32)."""
    src = random_sequences(16)
    cfg = build_config(None, ["--model.hidden_size=32", "--model.num_layers=2", "--model.num_heads=2"]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    splits = {"8x2": [list(range(i, i + 2)) for i in range(0, 16, 2)], "2x8": [list(range(0, 8)), list(range(8, 16))]}
    grads, losses = {}, {}
    for name, groups in splits.items():
        micro = masked_micro_batches(src, groups, budget=1024)
        norm = sum(mb.normalizer for mb in micro)
        model.zero_grad()
        loss = forward_backward(model, micro, global_norm=norm, world_size=1, device=torch.device("cpu"))
        losses[name] = float(loss) / norm
        grads[name] = [p.grad.clone() for p in model.parameters()]
    assert losses["8x2"] == pytest.approx(losses["2x8"], rel=1e-6)
    for a, b in zip(grads["8x2"], grads["2x8"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # a mean of per-micro-batch means (the seed's bug) would differ
    per_mb = [
        float(forward_backward(model, [mb], global_norm=mb.normalizer, world_size=1, device=torch.device("cpu")))
        for mb in masked_micro_batches(src, splits["8x2"], 1024)
    ]
    assert abs(np.mean(per_mb) - losses["8x2"]) > 1e-4


def _unigram_cross_entropy(dataset, split, eval_cfg, subset):
    """Val loss of the best context-free guess: every target predicted by the residue frequencies of
    the train split, scored by the real eval protocol on the very targets the model is scored on."""
    from plmrun.data.shards import open_dataset
    from plmrun.eval.mlm import evaluate
    from plmrun.model.layers import ModelOutput
    from plmrun.tokenizer import VOCAB

    train = open_dataset(dataset, "train")
    counts = np.bincount(np.concatenate([train.residues(i) for i in range(len(train))]), minlength=len(VOCAB))
    log_p = torch.log(torch.tensor(counts / counts.sum(), dtype=torch.float32).clamp_min(1e-12))

    class Unigram(torch.nn.Module):
        def forward(self, tokens, positions, cu_seqlens, max_seqlen, logits_index=None):
            return ModelOutput(logits=log_p.expand(len(logits_index), -1))

    return evaluate(Unigram(), open_dataset(dataset, split), eval_cfg, subset=subset)["loss"]


@pytest.mark.slow
def test_training_learns_more_than_residue_frequencies(tmp_path):
    """On sequences whose residues are given by their context (each one letter repeated), a short run
    must get below the unigram cross-entropy, which no context-free model can beat."""
    from plmrun.data.prepare import prepare

    rng = np.random.default_rng(0)
    for split, n in (("train", 400), ("valid", 40)):
        (tmp_path / f"{split}.fa").write_text(
            "".join(
                f">{split}{i}\n{rng.choice(list('ACDEFGHIKLMNPQRSTVWY')) * int(rng.integers(20, 60))}\n"
                for i in range(n)
            )
        )
    prepare(tmp_path / "train.fa", tmp_path / "ds", valid=tmp_path / "valid.fa", progress=False)
    args = [
        *TINY,
        f"--data.dataset={tmp_path / 'ds'}",
        "--data.token_budget=8192",
        "--data.max_length=64",
        "--train.max_steps=15",
        "--train.eval_every=15",
        "--optim.optimizer=adamw",
        "--optim.lr=0.01",
        "--optim.schedule=constant",
    ]
    _plmrun(["train", *args, "--logging.name=learn"], tmp_path)
    summary = json.loads((tmp_path / "runs" / "learn" / "summary.json").read_text())
    cfg = build_config(None, args)
    unigram = _unigram_cross_entropy(tmp_path / "ds", "valid", cfg.eval, cfg.eval.subset)
    assert summary["final_val"]["loss"] < unigram, (summary["final_val"]["loss"], unigram)
    assert summary["worse_than_unigram"] is False and summary["gain_over_unigram"] > 0


@pytest.mark.slow
def test_train_cli_end_to_end(tmp_path):
    # non-default eval settings: `plmrun eval RUN` must use them (the run's own protocol), and a target
    # the first eval reaches (10) next to one no eval reaches (0.1) for the time-to-target report
    eval_args = [
        "--eval.mask_rate=0.25",
        "--eval.max_length=100",
        "--eval.seed=99",
        "--train.report_at_val_losses=[10.0,0.1]",
    ]
    proc = _plmrun(["train", *TINY, *eval_args, "--logging.name=e2e"], tmp_path)
    run = tmp_path / "runs" / "e2e"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens"] > 0 and summary["tok_per_s"] > 0
    assert 0 < summary["mfu"] < 1
    for f in (
        "config.yaml",
        "environment.json",
        "metrics.jsonl",
        "model/model.safetensors",
        "model/config.json",
        "plots/loss_vs_tokens.png",
        "plots/loss_vs_time.png",
    ):
        assert (run / f).is_file(), f
    env = json.loads((run / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["data"]["train_fingerprint"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
    assert set(summary["time_to_target"]) == {"10.0"} and summary["time_to_target"]["10.0"]["step"] == 3
    assert "time-to-target 10.0:" in proc.stdout and "time-to-target 0.1" not in proc.stdout
    # 6 steps of a tiny model do not beat residue frequencies: the summary says so (line and summary.json)
    assert summary["worse_than_unigram"] is True and summary["gain_over_unigram"] < 0
    assert "warning: the final val loss" in proc.stdout and "worse than the unigram baseline" in proc.stdout
    # the run directory is never silently reused with another config
    bad = _plmrun(["train", *TINY, "--logging.name=e2e", "--train.seed=1"], tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "already finished" in bad.stderr
    # the saved model evaluates under the run's own protocol from the CLI: the same numbers as its last eval
    final = [r for r in records if r["kind"] == "eval"][-1]
    _plmrun(["eval", str(run), "--split", "valid", "--subset", "16", "--out", "m.json"], tmp_path)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert (metrics["mask_rate"], metrics["max_length"], metrics["eval_seed"]) == (0.25, 100, 99)
    assert metrics["loss"] == pytest.approx(final["val_loss"], abs=1e-5)
    assert metrics["accuracy"] == pytest.approx(final["val_accuracy"], abs=1e-6)
    # flags still override the run's settings
    _plmrun(["eval", str(run), "--subset", "16", "--mask-rate", "0.15", "--out", "o.json"], tmp_path)
    assert json.loads((tmp_path / "o.json").read_text())["mask_rate"] == 0.15


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra", [[], ["--data.max_length_schedule=[[0, 64], [2, 256]]"]], ids=["plain", "crop_schedule"]
)
def test_sigterm_checkpoint_and_resume_is_bitwise_identical(tmp_path, extra):
    """Also across a crop-length switch (step 2) before the interruption (step 3)."""
    args = [*TINY, "--train.checkpoint_every=2", *extra]
    _plmrun(["train", *args, "--logging.name=straight"], tmp_path)
    # SIGTERM after step 3: checkpoint saved at the end of the step, exit 143 (stopped, not finished)
    term = _plmrun(
        ["train", *args, "--logging.name=resumed"], tmp_path, env_extra={"PLMRUN_FAULT": "term@3"}, check=False
    )
    run = tmp_path / "runs" / "resumed"
    assert term.returncode == 143, term.stderr[-2000:]
    assert (
        "stopped at step 3, checkpoint saved at runs/resumed/checkpoints/step_00000003, resume with "
        "`plmrun train --resume runs/resumed`"
    ) in term.stderr
    assert not (run / "summary.json").exists()
    assert (run / "checkpoints" / "step_00000003" / "train_state.json").is_file()
    _plmrun(["train", "--resume", str(run)], tmp_path)
    a = [json.loads(x) for x in (tmp_path / "runs" / "straight" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rs: [(r["kind"], r["step"], r.get("loss"), r.get("val_loss"), r.get("tokens")) for r in rs]
    assert strip(a) == strip(b)
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "runs" / "straight" / "model" / "model.safetensors")
    wb = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_directory_is_never_silently_reused(tmp_path):
    from plmrun.train.rundir import RunDirError, prepare_run_dir

    cfg = build_config(None, [f"--logging.run_root={tmp_path}"])
    path, resumed = prepare_run_dir(cfg, "r", resume=False)
    assert not resumed and (path / "config.yaml").is_file()
    assert prepare_run_dir(cfg, "r", resume=False) == (path, True)  # same config, unfinished: automatic resume
    other = build_config(None, [f"--logging.run_root={tmp_path}", "--train.seed=9"])
    with pytest.raises(RunDirError, match="different config"):
        prepare_run_dir(other, "r", resume=False)
    with pytest.raises(RunDirError, match="no such run directory"):
        prepare_run_dir(cfg, "missing", resume=True)


def test_half_written_checkpoint_is_ignored(tmp_path):
    from plmrun.checkpoint import latest_checkpoint

    root = tmp_path / "checkpoints"
    (root / "step_00000002").mkdir(parents=True)
    (root / "step_00000002" / "train_state.json").write_text("{}")
    (root / ".tmp-step_00000004").mkdir()
    (root / "step_00000006").mkdir()  # renamed without its state file: never complete
    assert latest_checkpoint(root).name == "step_00000002"


def test_bad_inputs_give_one_line_errors(tmp_path):
    proc = _plmrun(["train", "--model.num_heads=3"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "divisible" in proc.stderr
    proc = _plmrun(["train", "--data.dataset=/nonexistent/dir", *TINY], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    proc = _plmrun(["eval", str(tmp_path / "nothing")], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error:")


def test_compile_matches_eager_keeps_parameter_names_and_static_graphs():
    """train.compile: per-block compile in place (state-dict keys unchanged, so checkpoints and exports
    do not care), the same loss and gradients as eager, and no recompiles when only the packing changes."""
    import copy

    from torch._dynamo.utils import counters

    from plmrun.train.parallelize import DistEnv, parallelize

    cfg = build_config(
        None,
        [
            "--model.hidden_size=32",
            "--model.num_layers=4",
            "--model.num_heads=2",
            "--train.compile=true",
            "--train.precision=fp32",
        ],
    )
    torch.manual_seed(0)
    eager = build_model(cfg.model)
    with torch.no_grad():
        for p in eager.parameters():
            p.normal_(0, 0.1)
    compiled = parallelize(copy.deepcopy(eager), cfg, DistEnv(1, 0, 0, torch.device("cpu")))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    src = random_sequences(24)
    results = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        for j, groups in enumerate(([list(range(0, 6))], [list(range(6, 14))], [list(range(14, 24))])):
            if name == "compiled" and j == 1:
                frames = counters["stats"]["unique_graphs"]
            micro = masked_micro_batches(src, groups, budget=1024)
            model.zero_grad()
            loss = forward_backward(
                model, micro, global_norm=micro[0].normalizer, world_size=1, device=torch.device("cpu")
            )
            results[name, j] = (float(loss), [p.grad.clone() for p in model.parameters()])
    assert counters["stats"]["unique_graphs"] == frames, "a new packing recompiled the blocks"
    for j in range(3):
        assert results["compiled", j][0] == pytest.approx(results["eager", j][0], rel=1e-5)
        for a, b in zip(results["compiled", j][1], results["eager", j][1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_precision_auto_is_bf16_only_where_bf16_matmuls_are_native(monkeypatch):
    """An AVX2-only CPU emulates bf16 matmuls (~70× slower than fp32): auto must pick fp32 there."""
    from plmrun.train import parallelize as P

    cpu = torch.device("cpu")
    cfg = build_config(None, [])
    assert cfg.train.precision == "auto"
    for native, expect in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(P.torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert P.native_bf16(cpu) is native
        assert P.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
        assert P.autocast_dtype(cfg, cpu) is expect
        for explicit, dtype in (("fp32", None), ("bf16", torch.bfloat16)):  # explicit choices are kept
            assert P.resolve_precision(explicit, cpu) == explicit
            assert P.autocast_dtype(build_config(None, [f"--train.precision={explicit}"]), cpu) is dtype


@pytest.mark.slow
def test_max_time_stops_evaluates_checkpoints_and_tests(tmp_path, monkeypatch):
    """train.max_time=3.5 on a clock that ticks 1 s per step: the run stops after step 4 of 6, evaluates
    that step, checkpoints it, runs the final full-valid and test-split evals and says stopped=max_time."""
    import itertools

    from plmrun.train import stopping, trainer

    ticks = itertools.count()
    monkeypatch.setattr(stopping, "clock", lambda: float(next(ticks)))
    monkeypatch.setenv("PLMRUN_CACHE", str(tmp_path.parent / "plmrun-cache"))
    cfg = build_config(
        None,
        [
            *TINY,
            "--train.max_time=3.5",
            "--eval.final_full=true",
            "--eval.final_test=true",
            f"--logging.run_root={tmp_path / 'runs'}",
            "--logging.name=timed",
        ],
    )
    summary = trainer.train(cfg)
    run = tmp_path / "runs" / "timed"
    assert summary["stopped"] == "max_time" and summary["steps"] == 4
    assert json.loads((run / "summary.json").read_text())["stopped"] == "max_time"
    assert (run / "checkpoints" / "step_00000004").is_dir()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval" and not r.get("final")] == [3, 4]
    test = [r for r in records if r.get("split") == "test"]
    assert len(test) == 1 and test[0]["test_loss"] == summary["final_test"]["loss"]
    assert summary["final_full_val"]["loss"] != summary["final_test"]["loss"] and summary["final_test"]["tokens"] > 0


def test_dense_eval_due_only_near_an_unreached_target():
    from plmrun.train.evaluator import dense_eval_due

    cfg = build_config(
        None,
        [
            "--train.eval_every=40",
            "--train.dense_eval_every=10",
            "--train.dense_eval_margin=0.01",
            "--train.report_at_val_losses=[2.85]",
            "--train.stop_at_val_loss=2.84",
        ],
    )
    due = lambda step, best: dense_eval_due(cfg, step, best)
    assert [due(s, 2.855) for s in (10, 15, 20)] == [True, False, True]  # within 0.01 above 2.85
    assert [due(10, b) for b in (None, 2.861, 2.8495, 2.845, 2.8395)] == [False, False, True, True, False]
    off = build_config(None, ["--train.report_at_val_losses=[2.85]"])
    assert not dense_eval_due(off, 10, 2.851)


@pytest.mark.slow
def test_dense_evals_near_a_target_and_resume_keeps_them(tmp_path):
    """Once the best val loss is within the margin of an unreached target the run evaluates every
    dense_eval_every steps; SIGTERM after step 5 and a resume give the same eval steps and losses."""
    dense = [
        *TINY,
        "--train.max_steps=10",
        "--train.eval_every=4",
        "--train.dense_eval_every=2",
        "--train.dense_eval_margin=5",
        "--train.report_at_val_losses=[0.5]",
    ]
    _plmrun(["train", *dense, "--logging.name=whole"], tmp_path)
    evals = lambda name: [
        (r["step"], r["val_loss"])
        for r in map(json.loads, (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "eval" and not r.get("final")
    ]
    assert [s for s, _ in evals("whole")] == [4, 6, 8, 10]  # 2 is before the first eval: no best val loss yet
    proc = _plmrun(["train", *dense, "--logging.name=cut"], tmp_path, env_extra={"PLMRUN_FAULT": "term@5"}, check=False)
    assert proc.returncode == 143, proc.stderr[-2000:]
    _plmrun(["train", "--resume", str(tmp_path / "runs" / "cut")], tmp_path)
    assert evals("cut") == evals("whole")


def test_final_test_needs_a_test_split(tmp_path):
    proc = _plmrun(["train", *TINY, "--eval.final_test=true", "--data.test_split=holdout"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "no 'holdout' split for eval.final_test (splits: test, train, valid)" in proc.stderr
    assert not list((tmp_path / "runs").glob("*/metrics.jsonl"))  # refused before training


def test_dataset_from_one_fasta_says_how_to_get_a_valid_split(tmp_path, capsys):
    from plmrun.cli import main

    fasta = tmp_path / "one.fasta"
    fasta.write_text(">a\nMKTAYIAKQRQISFVKSHFSRQ\n>b\nMSEQNNTEMTFQIQRIYTKDIS\n")
    ds = tmp_path / "ds"
    assert main(["data", "prepare", str(fasta), "--out", str(ds), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", *TINY, f"--data.dataset={ds}", f"--logging.run_root={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {ds}: no 'valid' split for data.valid_split (splits: train); make one with "
        f"`plmrun data split FILE --out DIR` (homology split, then prepare its train/valid FASTA) or "
        f"`plmrun data prepare TRAIN --valid VALID --out {ds} --overwrite`, or set "
        f"--data.valid_split=NAME to an existing split\n"
    )
    assert not (tmp_path / "runs").exists()  # refused before a run directory exists


@pytest.mark.slow
def test_push_to_hub_at_the_end_of_training(tmp_path, monkeypatch):
    """--push-to-hub: no token stops before a run directory exists; offline, the run still finishes (model,
    checkpoint, summary) with one warning line; with the Hub's upload recorded, the exported folder is sent."""
    proc = _plmrun(
        ["train", *TINY, "--push-to-hub", "someone/model"],
        tmp_path,
        check=False,
        env_extra={"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": ""},
    )
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: set HF_TOKEN in the environment to push to the Hub (it is never read from files or flags)"
    )
    assert not (tmp_path / "runs").exists()
    secret = "hf_SECRETTOKEN1234567890"
    proc = _plmrun(
        ["train", *TINY, "--push-to-hub", "someone/model", "--logging.name=offline"],
        tmp_path,
        env_extra={"HF_TOKEN": secret, "HF_HUB_OFFLINE": "1"},
    )
    run = tmp_path / "runs" / "offline"
    warning = [line for line in proc.stderr.splitlines() if "someone/model" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: upload to someone/model failed:")
    assert secret not in proc.stdout + proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["hub"]["error"].startswith("upload to someone/model failed")
    assert (run / "checkpoints" / "step_00000006").is_dir() and (run / "hf" / "model.safetensors").is_file()

    import huggingface_hub

    from plmrun.train.trainer import train

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo, **kw: calls.append(("create", repo)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("PLMRUN_CACHE", str(tmp_path.parent / "plmrun-cache"))
    summary = train(
        build_config(
            None,
            [
                *TINY,
                "--logging.push_to_hub=someone/model",
                "--train.max_steps=1",
                "--train.eval_every=1",
                f"--logging.run_root={tmp_path / 'runs'}",
                "--logging.name=pushed",
            ],
        )
    )
    hf = tmp_path / "runs" / "pushed" / "hf"
    assert calls == [
        ("create", "someone/model"),
        ("upload", {"folder_path": str(hf), "repo_id": "someone/model", "commit_message": "plmrun export"}),
    ]
    assert (hf / "MANIFEST.json").is_file() and summary["hub"] == {
        "repo": "someone/model",
        "url": "https://huggingface.co/someone/model",
    }
    assert json.loads((tmp_path / "runs" / "pushed" / "summary.json").read_text())["hub"] == summary["hub"]
