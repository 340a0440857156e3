"""`plmrun finetune`: full and LoRA runs on tiny models, exact resume, early stopping, export, bad input."""

import json

import pytest
import torch

from plmrun.cli import main
from plmrun.model.config import ModelConfig
from plmrun.model.loading import load_model, save_model_dir
from plmrun.model.registry import build_model

from helpers import TINY_ESM2

SMALL = [
    "--max-train",
    "24",
    "--max-valid",
    "8",
    "--max-test",
    "12",
    "--max-length",
    "66",
    "--token-budget",
    "512",
    "--probe-seeds",
    "1",
]


def _model(tmp_path, **kw):
    torch.manual_seed(1)
    cfg = ModelConfig(**(kw or dict(hidden_size=32, num_layers=2, num_heads=2)))
    save_model_dir(tmp_path / "model", build_model(cfg).state_dict(), cfg)
    return str(tmp_path / "model")


def _ft(tmp_path, model, *flags, root="runs"):
    return main(["finetune", model, "--device", "cpu", "--run-root", str(tmp_path / root), *SMALL, *flags])


@pytest.mark.slow
def test_full_finetune_reports_beside_the_frozen_probe_and_exports(tmp_path, capsys):
    model = _model(tmp_path)
    out = tmp_path / "report.json"
    assert _ft(tmp_path, model, "--method", "full", "--max-steps", "4", "--eval-every", "2", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    t = report["tasks"]["solubility"]
    assert list(t["rows"]) == ["fine-tuned full", "frozen probe"] and t["n_train"] == 24 and t["n_test"] == 12
    assert f"{'solubility':<20} {'fine-tuned full':<16} accuracy" in printed
    assert f"{'solubility':<20} {'model - frozen probe':<29}" in printed
    d = t["model_minus"]["frozen probe"]
    assert d["diff"] == pytest.approx(t["rows"]["fine-tuned full"]["mean"] - t["rows"]["frozen probe"]["mean"])
    run = tmp_path / "runs" / "solubility-full"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "valid"] == [2, 4]
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    # the exported folder holds the fine-tuned backbone, not the starting one
    tuned, _ = load_model(run / "hf")
    start, _ = load_model(model)
    saved, _ = load_model(run / "model")
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), saved.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), start.state_dict().values()))
    # a finished run is not silently redone
    assert _ft(tmp_path, model, "--method", "full", "--max-steps", "4", "--eval-every", "2") == 2
    assert "already finished" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_merges_into_the_exported_model(tmp_path, capsys):
    pytest.importorskip("peft")
    model = _model(tmp_path)
    assert (
        _ft(tmp_path, model, "--task", "secondary_structure", "--max-steps", "3", "--eval-every", "3", "--lr", "0.05")
        == 0
    )
    assert "fine-tuned lora  Q3 accuracy" in capsys.readouterr().out
    run = tmp_path / "runs" / "secondary_structure-lora"
    tuned, _ = load_model(run / "hf")
    start, _ = load_model(model)
    sd, st = tuned.state_dict(), start.state_dict()
    assert set(sd) == set(st)  # merged: no adapter weights left
    changed = {k for k in sd if not torch.equal(sd[k], st[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("q", "k", "v", "o") for k in changed)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, capsys, method):
    if method == "lora":
        pytest.importorskip("peft")
    model = _model(tmp_path)
    flags = (
        "--method",
        method,
        "--lr",
        "0.01",
        "--max-steps",
        "7",
        "--eval-every",
        "2",
        "--patience",
        "0",
        "--probe-seeds",
        "0",
    )
    assert _ft(tmp_path, model, *flags, root="a") == 0
    monkeypatch.setenv("PLMRUN_FAULT", "term@3")
    assert _ft(tmp_path, model, *flags, root="b") == 143
    assert "rerun the same command to continue" in capsys.readouterr().err
    monkeypatch.delenv("PLMRUN_FAULT")
    assert _ft(tmp_path, model, *flags, "--lr", "0.5", root="b") == 2  # another config: refused, not mixed
    assert f"solubility-{method}: exists with a different config; rerun with that config" in capsys.readouterr().err
    assert _ft(tmp_path, model, *flags, root="b") == 0
    assert f"solubility-{method} from step 3" in capsys.readouterr().err  # the checkpoint saved on SIGTERM
    a, b = tmp_path / "a" / f"solubility-{method}", tmp_path / "b" / f"solubility-{method}"
    for f in ("model/model.safetensors", "task_head.safetensors", "metrics.jsonl"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.mark.slow
def test_early_stopping_on_validation(tmp_path, capsys):
    model = _model(tmp_path)
    assert (
        _ft(
            tmp_path,
            model,
            "--method",
            "full",
            "--max-steps",
            "50",
            "--eval-every",
            "1",
            "--patience",
            "2",
            "--lr",
            "1e-12",
            "--probe-seeds",
            "0",
        )
        == 0
    )
    summary = json.loads((tmp_path / "runs" / "solubility-full" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["best_step"] == 1  # no improvement at steps 2 and 3
    assert "stopping early" in capsys.readouterr().err


def _table(tmp_path, rows, header="sequence,label,split", name="t.csv"):
    path = tmp_path / name
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return str(path)


def _rows(n=40, label=lambda i: str(i % 2)):
    aa = "ACDEFGHIKLMNPQRSTVWY"
    return [
        f"{''.join(aa[(i * 7 + j) % 20] for j in range(10 + i % 9))},{label(i)},"
        f"{'train' if i < 28 else 'valid' if i < 34 else 'test'}"
        for i in range(n)
    ]


@pytest.mark.slow
def test_regression_on_a_table(tmp_path, capsys):
    model = _model(tmp_path)
    table = _table(tmp_path, _rows(label=lambda i: f"{(i % 9) * 0.5:.1f}"))
    assert (
        _ft(
            tmp_path,
            model,
            "--task",
            table,
            "--kind",
            "regression",
            "--method",
            "full",
            "--max-steps",
            "3",
            "--eval-every",
            "3",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "t                    fine-tuned full  spearman" in out and "frozen probe" not in out


@pytest.mark.parametrize(
    "case,flags,message",
    [
        (
            "unknown label",
            ["--task", "LABELS"],
            "line 40: label '7' (test split) is not among the training labels "
            "['0', '1']; fix the row or add training rows with it",
        ),
        (
            "missing column",
            ["--task", "TABLE", "--label-column", "y"],
            "no column 'y' (columns: sequence, label, split); set --label-column to the right one",
        ),
        ("empty split", ["--task", "NOTEST"], "the test split is empty: no row has 'test' in column 'split'"),
        (
            "residue labels",
            ["--task", "TABLE", "--kind", "residue_classification"],
            ": 1 residue labels for a sequence of 1",
        ),
        (
            "too long whole",
            ["--task", "TABLE", "--max-length", "0", "--token-budget", "16"],
            "residues does not fit token_budget 16 whole (max_length 0); raise --token-budget or set --max-length",
        ),
        ("lora targets", ["--lora-targets", "[q, qkv]"], "lora_targets ['qkv'] are not linear layers of"),
        ("unknown key", ["--max-stepz", "3"], "command line: unknown finetune key 'max_stepz'"),
        ("bad value", ["--patience", "-1"], "finetune: patience -1: must be >= 0 (0 = never stop early)"),
        ("bad type", ["--method", "lowrank"], "command line: method: 'lowrank' is not one of 'lora', 'full'"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, case, flags, message):
    model = _model(tmp_path)
    tables = {
        "TABLE": _table(tmp_path, _rows()),
        "LABELS": _table(tmp_path, _rows(label=lambda i: "7" if i == 38 else str(i % 2)), name="l.csv"),
        "NOTEST": _table(tmp_path, [r.replace(",test", ",valid") for r in _rows()], name="n.csv"),
    }
    flags = [tables.get(f, f) for f in flags]
    assert _ft(tmp_path, model, *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()  # refused before anything was written


@pytest.mark.slow
def test_residue_classification_on_a_table(tmp_path, capsys):
    model = _model(tmp_path)
    rows = [r.split(",") for r in _rows()]
    table = _table(
        tmp_path,
        [f"{q},{''.join('HEC'[(k + j) % 3] for j in range(len(q)))},{sp}" for k, (q, _, sp) in enumerate(rows)],
    )
    assert (
        _ft(
            tmp_path,
            model,
            "--task",
            table,
            "--kind",
            "residue_classification",
            "--method",
            "full",
            "--max-steps",
            "2",
            "--eval-every",
            "2",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "fine-tuned full  accuracy" in out and "t                    model - frozen probe" in out


def test_config_file_keys_are_checked(tmp_path, capsys):
    model = _model(tmp_path)
    (tmp_path / "ft.yaml").write_text("method: full\nmax_step: 3\n")
    assert main(["finetune", model, "--config", str(tmp_path / "ft.yaml")]) == 2
    assert f"error: {tmp_path / 'ft.yaml'}: unknown finetune key 'max_step'" in capsys.readouterr().err


def test_lora_without_peft_is_one_line(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    assert _ft(tmp_path, _model(tmp_path)) == 2
    assert (
        "error: finetune: method lora needs peft (pip install 'plmrun[finetune]'), or use --method full"
        in capsys.readouterr().err
    )


def test_esm2_position_limit(tmp_path, capsys):
    model = _model(tmp_path, **TINY_ESM2)
    long = _table(tmp_path, _rows() + ["M" * 1100 + ",1,train"])
    assert (
        _ft(tmp_path, model, "--task", long, "--max-length", "0", "--token-budget", "2048", "--max-train", "100") == 2
    )
    err = capsys.readouterr().err
    assert (
        "a train sequence of 1100 residues is longer than the esm2 preset's position limit (1024 residues + "
        "<cls>/<eos>); set --max-length 1026"
    ) in err and err.count("\n") == 1
    assert _ft(tmp_path, model, "--task", long, "--max-length", "2048", "--token-budget", "4096") == 2
    assert "max_length 2048 exceeds the esm2 preset's position limit of 1026 tokens" in capsys.readouterr().err


def test_max_time_stops_validates_and_reports(tmp_path, monkeypatch, capsys):
    """The trainer's train.max_time, for free: on a clock that ticks 1 s per step, --max-time 2.5 ends the run
    after step 3 of 20 with a validation pass, and the report is written as for a finished run."""
    import itertools

    from plmrun.train import stopping

    ticks = itertools.count()
    monkeypatch.setattr(stopping, "clock", lambda: float(next(ticks)))
    assert (
        _ft(
            tmp_path,
            _model(tmp_path),
            "--method",
            "full",
            "--max-steps",
            "20",
            "--eval-every",
            "10",
            "--probe-seeds",
            "0",
            "--max-time",
            "2.5",
        )
        == 0
    )
    run = tmp_path / "runs" / "solubility-full"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["stopped"] == "max_time"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "valid"] == [3]


def test_two_gloo_ranks_equal_one_rank_with_two_accumulation_steps(tmp_path):
    """torchrun, DDP on gloo: 2 processes × grad_accum 1 train on the same global batches as 1 process × 2, so
    the metrics, the fine-tuned weights and the task head are the same, bit for bit."""
    import os
    import subprocess
    import sys

    model = _model(tmp_path)
    flags = [
        model,
        "--device",
        "cpu",
        *SMALL,
        "--method",
        "full",
        "--lr",
        "0.01",
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--probe-seeds",
        "0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PLMRUN_DIST_TIMEOUT="120")
    launch = {
        "one": [sys.executable, "-m", "plmrun.cli", "finetune", *flags, "--grad-accum", "2"],
        "two": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "plmrun.cli",
            "finetune",
            *flags,
        ],
    }
    for root, cmd in launch.items():
        proc = subprocess.run(
            [*cmd, "--run-root", str(tmp_path / root)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert proc.stdout.count("fine-tuned full") == 1  # the report, printed by rank 0 only
    a, b = tmp_path / "one" / "solubility-full", tmp_path / "two" / "solubility-full"
    for f in ("metrics.jsonl", "model/model.safetensors", "task_head.safetensors"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert json.loads((b / "summary.json").read_text())["steps"] == 4
