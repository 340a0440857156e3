"""benchmarks/: throughput (tiny, end to end), speedrun (tiny, end to end; HF reference lookup; token
cap), step_profile (tiny, end to end), gpu_bench table, and gpu.sh's failure without CUDA."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_bench  # noqa: E402
import long_curve  # noqa: E402
import speedrun  # noqa: E402
import step_profile  # noqa: E402
import throughput  # noqa: E402

TINY = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "data.token_budget=512",
    "data.max_length=256",
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLMRUN_CACHE", str(tmp_path.parent / "plmrun-cache"))


def test_summarize_takes_medians():
    windows = [{"seconds": s, "real_tokens": 100, "padded_tokens": 400, "flops": 1e9} for s in (1.0, 2.0, 4.0)]
    out = throughput.summarize({"windows": windows}, peak_flops=1e9)
    assert out == {"real_tok_per_s": 50.0, "padded_tok_per_s": 200.0, "mfu": 0.5, "padding_frac": 0.75}


def test_recipe_at_shape_is_the_esm2_recipe_at_the_plmrun_shape():
    speed = throughput.plmrun_config(None, ["data.token_budget=2048", "eval.subset=9", "train.precision=fp32"])
    esm = throughput.recipe_at_shape(speed)
    assert (esm.model.arch, esm.model.hidden_size, esm.model.num_layers, esm.model.num_heads) == ("esm2", 320, 6, 20)
    assert esm.model.expansion_ratio == speed.model.expansion_ratio == 4.0 and esm.model.tie_embeddings
    o = esm.optim
    assert (o.optimizer, o.lr, o.betas, o.weight_decay, o.schedule, o.final_lr_ratio) == (
        "adamw",
        4e-4,
        (0.9, 0.98),
        0.01,
        "linear",
        0.1,
    ) and o.warmup > 0
    m = esm.masking
    assert (m.objective, m.mask_rate, m.mask_token_frac, m.random_token_frac) == ("mlm", 0.15, 0.8, 0.1)
    assert (esm.data.token_budget, esm.eval.subset, esm.train.precision) == (2048, 9, "fp32")
    assert throughput.recipe_at_shape(throughput.plmrun_config(None, TINY)).model.num_heads == 2  # 32/20: not ESM


def test_config_default_is_the_default_run_at_its_own_shape():
    from plmrun.config import Config

    default = throughput.plmrun_config("default", ["train.threads=1"])
    assert default.model == Config().model and default.train.threads == 1
    assert (throughput.plmrun_config(None, []).model.hidden_size, default.model.hidden_size) == (
        320,
        Config().model.hidden_size,
    )
    esm = throughput.recipe_at_shape(default)  # width 256: 20 heads do not divide it, so the plmrun heads
    assert (esm.model.hidden_size, esm.model.num_layers, esm.model.num_heads) == (
        default.model.hidden_size,
        default.model.num_layers,
        default.model.num_heads,
    )


def test_throughput_end_to_end(tmp_path, cache):
    out = tmp_path / "tp"
    tiny = TINY + ["data.token_budget=1024", "data.max_length=1024"]  # long crops: HF batches get padding
    assert (
        throughput.main(
            [
                "--precision",
                "fp32",
                "--windows",
                "2",
                "--steps-per-window",
                "1",
                "--warmup",
                "1",
                "--hf-batch",
                "3",
                "--hf-steps-per-window",
                "1",
                "--threads",
                "1",
                "--out",
                str(out),
                *[x for s in tiny for x in ("--set", s)],
            ]
        )
        == 0
    )
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {r["case"]: r for r in report["rows"]}
    assert list(rows) == ["plmrun", "plmrun-esm2", "hf-esm"] and report["peak_flops"]["fp32"] > 0
    for r in rows.values():
        assert len(r["windows"]) == 2 and r["real_tok_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_memory_mb"] > 0
        assert all(w["real_tokens"] <= w["padded_tokens"] for w in r["windows"])
    assert all(w["padded_tokens"] == 1024 for w in rows["plmrun"]["windows"])  # one micro-batch per step
    assert rows["hf-esm"]["padding_frac"] > 0 and rows["plmrun"]["x_hf"] > 0 and rows["hf-esm"]["x_hf"] is None
    # the same architecture; HF also holds its (unused) contact-head regression: layers x heads + 1
    assert rows["hf-esm"]["params"] - rows["plmrun-esm2"]["params"] == 2 * 2 + 1
    md = out.with_suffix(".md").read_text()
    assert "| plmrun | fp32 |" in md and "| hf-esm | fp32 |" in md


def test_throughput_bad_override_is_one_line(capsys):
    assert throughput.main(["--set", "model.hidden_size=33", "--skip-hf"]) == 2
    assert capsys.readouterr().err.startswith("error: model.hidden_size (33)")


def test_hf_reference_is_the_quoted_curve():
    """The quoted peer row against values computed independently of its table: the parameter count of
    EsmForMaskedLM built at the ESM-2 8M shape, the rate from the curve's end, and each target's first
    crossing found by scanning the curve."""
    from transformers import EsmConfig, EsmForMaskedLM

    from plmrun.config import build_config
    from plmrun.eval.export import esm_hf_config

    ref = speedrun.HF_REFERENCE
    hf = EsmForMaskedLM(EsmConfig(**esm_hf_config(build_config("esm2_8m", []).model)))
    assert sum(p.numel() for p in hf.parameters()) == ref["params"]
    seconds, tokens, _ = ref["curve"][-1]
    assert round(tokens / seconds) == ref["tok_per_s"]
    times, toks, losses = zip(*ref["curve"])
    assert list(times) == sorted(times) and list(toks) == sorted(toks)
    for target in (3.6, 3.0, 2.9, 2.75, 2.70, 2.6985):
        first = min(i for i, loss in enumerate(losses) if loss <= target)
        r = speedrun.hf_reference(target)
        assert r["reached"] and (r["time_to_target_s"], r["tokens_to_target"], r["val_loss"]) == (
            times[first],
            toks[first],
            losses[first],
        )
    r = speedrun.hf_reference(min(losses) - 1e-4)
    assert not r["reached"] and "tokens_to_target" not in r


def test_hf_reference_matches_the_raw_log():
    """The quoted curve is the measurement log, point by point (where the reference folder is present)."""
    logs = [root / "shared" / "reference" / "hf_baseline_2026-11-22.log" for root in (BENCH.parent, BENCH.parents[1])]
    log = next((p for p in logs if p.is_file()), None)
    if log is None:
        pytest.skip("shared/reference/hf_baseline_2026-11-22.log: reference measurements not in this checkout")
    lines = log.read_text().splitlines()
    points = [json.loads(x) for x in lines if x.startswith("{")]
    assert [(p["train_s"], p["tokens"], p["val_loss"]) for p in points] == speedrun.HF_REFERENCE["curve"]
    tail = dict(kv.split("=") for kv in lines[-1].split())
    assert int(tail["params"]) == speedrun.HF_REFERENCE["params"]
    assert int(tail["real_tok/s"]) == speedrun.HF_REFERENCE["tok_per_s"]


def _sr_row(case, seed, hits, tokens=1_000_000, secs=500.0, params=7.5e6):
    """A speedrun row: `hits` {target: (tokens, seconds) or None}."""
    return {
        "case": case,
        "seed": seed,
        "params": params,
        "tokens": tokens,
        "train_time_s": secs,
        "tok_per_s": 1.0,
        "best_val_loss": 2.8,
        "stopped": "max_steps",
        "hits": {
            str(float(t)): None
            if h is None
            else {
                "tokens_to_target": h[0],
                "time_to_target_s": h[1],
                "wall_time_s_incl_eval": h[1],
                "val_loss": t,
                "step": 1,
            }
            for t, h in hits.items()
        },
    }


def _sr_report(rows, targets):
    return {
        "targets": targets,
        "hardware": {"gpu": None, "cpu": "c", "threads": 2},
        "date": "d",
        "eval_every": 25,
        "eval_subset": 256,
        "rows": rows,
        "hf_reference": {str(float(t)): speedrun.hf_reference(t) for t in targets},
    }


def test_speedrun_headline_says_more_or_fewer_correctly():
    assert speedrun._ratio(600, 200, "tokens") == "**3.0× fewer tokens**"
    assert speedrun._ratio(200, 700, "tokens") == "**3.5× more tokens**"
    assert speedrun._ratio(50, 100, "training time") == "**2.0× more training time**"
    assert speedrun._ratio(245_386, 245_386, "tokens") == "**the same tokens** (1.00×)"
    assert speedrun._ratio(104, 100, "training time") == "**the same training time** (1.04×)"
    md = speedrun.markdown(
        _sr_report(
            [_sr_row("plmrun", 0, {2.9: (700_000, 140.0)}), _sr_row("plmrun esm2 recipe", 0, {2.9: (200_000, 47.6)})],
            [2.9],
        )
    )
    assert "vs plmrun esm2 recipe: **3.50× more tokens** (one-sided Welch p: ratio > 1 n/a" in md
    assert "**2.94× more training time**" in md


def test_speedrun_ratios_and_welch_p_against_a_hand_computation():
    """Three seeds per arm: geometric-mean ratios and the one-sided Welch p-values of log(theirs) - log(ours)
    > log(factor), checked against Welch's t and Welch-Satterthwaite degrees of freedom written out here."""
    from scipy import stats

    ours = [(300_000, 100.0), (320_000, 110.0), (350_000, 104.0)]
    theirs = [(900_000, 220.0), (700_000, 260.0), (820_000, 200.0)]
    rows_a = [_sr_row("plmrun", i, {2.85: h}) for i, h in enumerate(ours)]
    rows_b = [_sr_row("esm2", i, {2.85: h}) for i, h in enumerate(theirs)]
    c = speedrun.compare(rows_a, rows_b, 2.85)
    for what, k in (("tokens", 0), ("time", 1)):
        la, lb = np.log([h[k] for h in ours]), np.log([h[k] for h in theirs])
        assert c[what]["ratio"] == pytest.approx(np.exp(lb.mean() - la.mean()), rel=1e-12)
        for factor, key in ((1.0, "p_gt_1"), (2.0, "p_gt_2")):
            va, vb = la.var(ddof=1) / 3, lb.var(ddof=1) / 3
            t = (lb.mean() - np.log(factor) - la.mean()) / np.sqrt(va + vb)
            df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
            assert c[what][key] == pytest.approx(stats.t.sf(t, df), rel=1e-9)
    assert c["tokens"]["p_gt_1"] < c["tokens"]["p_gt_2"] < 0.05 and not c["tokens"]["lower_bound"]
    # a baseline run that never reached the target counts with its whole run: a lower bound
    rows_b[1] = _sr_row("esm2", 1, {2.85: None}, tokens=1_600_000, secs=400.0)
    c = speedrun.compare(rows_a, rows_b, 2.85)
    assert c["tokens"]["lower_bound"] and c["tokens"]["not_reached"] == 1
    assert speedrun.arm_values(rows_b, 2.85, "tokens_to_target") == ([900_000.0, 1_600_000.0, 820_000.0], 1)
    md = speedrun.markdown(_sr_report(rows_a + rows_b, [2.85]))
    assert "**≥ " in md and "(≥; 1 not reached)" in md and "| plmrun | 3 |" in md
    # one of ours not reaching it: no ratio at all
    rows_a[0] = _sr_row("plmrun", 0, {2.85: None})
    assert speedrun.compare(rows_a, rows_b, 2.85) is None
    assert "**plmrun did not reach 2.85 in 1 of 3 runs**" in speedrun.markdown(_sr_report(rows_a + rows_b, [2.85]))


def test_speedrun_token_cap_schedule_and_not_reached():
    cfg = speedrun.speedrun_config(
        throughput.plmrun_config(None, ["data.token_budget=4096"]),
        targets=[2.7, 2.8],
        eval_every=10,
        max_tokens=10_000,
        threads=1,
        run_root="r",
        name="n",
        seed=3,
        dense_eval_every=5,
        dense_margin=0.01,
    )
    assert (cfg.train.max_steps, cfg.train.stop_at_val_loss, cfg.train.eval_every, cfg.train.seed) == (3, 2.7, 10, 3)
    assert (cfg.train.dense_eval_every, cfg.train.dense_eval_margin) == (5, 0.01) and {2.7, 2.8} <= set(
        cfg.train.report_at_val_losses
    )
    cfg = speedrun.speedrun_config(
        throughput.plmrun_config(None, ["data.token_budget=4096"]),
        targets=[2.7],
        eval_every=10,
        max_tokens=10_000,
        threads=1,
        run_root="r",
        name="n",
        schedule_tokens=4096 * 900,
    )
    assert cfg.train.max_steps == 900  # one schedule of the given tokens, past the config's own max_steps
    summary = {
        "params": 10,
        "steps": 3,
        "tokens": 9000,
        "train_time_s": 1.0,
        "tok_per_s": 9000.0,
        "mfu": 0.1,
        "precision": "bf16",
        "best_val_loss": 2.9,
        "stopped": "max_steps",
        "run_dir": "r/n",
        "time_to_target": {
            "2.8": {"tokens": 1, "train_time_s": 1, "wall_time_s_incl_eval": 1, "val_loss": 2.79, "step": 1}
        },
    }
    row = speedrun.result_row("plmrun", summary, [2.7, 2.8])
    assert row["hits"]["2.7"] is None and row["hits"]["2.8"]["tokens_to_target"] == 1
    md = speedrun.markdown({**_sr_report([row], [2.7]), "rows": [row]})
    assert (
        "**plmrun did not reach 2.7 in 1 of 1 runs** (best 2.9000)" in md
        and "| plmrun | 1 | 0.00M | not reached |" in md
    )


@pytest.mark.slow
def test_speedrun_end_to_end(tmp_path, cache):
    out = tmp_path / "sr"
    assert (
        speedrun.main(
            [
                "--config",
                "debug",
                "--set",
                "eval.subset=16",
                "--target",
                "3.3",
                "3.25",
                "--eval-every",
                "4",
                "--dense-eval-every",
                "2",
                "--dense-margin",
                "1",
                "--seeds",
                "2",
                "--threads",
                "1",
                "--baseline-tokens",
                "8192",
                "--run-root",
                str(tmp_path / "runs"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.with_suffix(".json").read_text())
    rows = report["rows"]
    assert [(r["case"], r["seed"]) for r in rows] == [
        ("plmrun (debug)", 0),
        ("plmrun esm2 recipe", 0),
        ("plmrun (debug)", 1),
        ("plmrun esm2 recipe", 1),
    ]
    for row in rows:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert f"seed: {row['seed']}" in (Path(row["run_dir"]) / "config.yaml").read_text()
        for t, hit in row["hits"].items():
            assert hit is None or summary["time_to_target"][t]["tokens"] == hit["tokens_to_target"]
    assert all(r["steps"] <= 8192 // 1024 for r in rows if r["case"] == "plmrun esm2 recipe")
    assert set(report["comparisons"]) == {"plmrun esm2 recipe @ 3.3", "plmrun esm2 recipe @ 3.25"}
    md = out.with_suffix(".md").read_text()
    assert "seeds 0, 1 per arm" in md and "| plmrun (debug) | 2 |" in md
    # what the arms ran is in the result, not only in the command that made it
    assert "plmrun (debug) with `eval.subset=16`." in md and "plmrun esm2 recipe: one schedule of 8,192 tokens." in md


def test_long_curve_ratio_table():
    """Tokens and time to the first eval at or below each level, their ratios, the interpolated
    crossing, and bounds where one arm was already below at its first eval or never got there."""
    pt = lambda tokens, loss: {"step": tokens // 100, "tokens": tokens, "train_time_s": tokens / 1e3, "val_loss": loss}
    ours = [pt(100, 2.905), pt(200, 2.871), pt(300, 2.842), pt(400, 2.829)]
    theirs = [pt(100, 2.915), pt(200, 2.889), pt(300, 2.866), pt(400, 2.851), pt(500, 2.838)]
    for p in theirs:
        p["train_time_s"] *= 0.5  # the recipe's step is twice as fast
    rows = long_curve.ratio_table({long_curve.ARMS[0]: ours, long_curve.ARMS[1]: theirs}, step=0.01)
    assert [(r["val_loss"], r["plmrun_tokens"], r["recipe_tokens"], r["bound"]) for r in rows] == [
        (2.91, 100, 200, "≥"),  # ours below 2.91 already at its first eval
        (2.9, 200, 200, ""),
        (2.89, 200, 200, ""),
        (2.88, 200, 300, ""),
        (2.87, 300, 300, ""),
        (2.86, 300, 400, ""),
        (2.85, 300, 500, ""),
        (2.84, 400, 500, ""),
        (2.83, 400, 500, "≥"),
    ]  # theirs never reached 2.83: more than its whole run
    assert rows[-2]["ratio"] == 1.25 and rows[-2]["time_ratio"] == pytest.approx(0.625)
    assert rows[0]["plmrun_crossing"] == "first" and rows[-1]["recipe_crossing"] == "never"
    assert long_curve.tokens_to(ours, 2.80) is None and long_curve.tokens_to(ours, 2.80, interpolate=True) is None
    # 2.85: ours crosses between 200 (2.871) and 300 (2.842) at 200 + 21/29·100; theirs between 400 and 500
    assert rows[-3]["ratio_interpolated"] == pytest.approx((400 + 1 / 13 * 100) / (200 + 21 / 29 * 100))
    assert long_curve.tokens_to(ours, 2.95, interpolate=True) == 100  # already below at the first eval
    # opposite bounds (ours never there, theirs below at its first eval) are left out, not guessed
    swapped = long_curve.ratio_table(
        {long_curve.ARMS[0]: [pt(100, 2.90), pt(200, 2.89)], long_curve.ARMS[1]: [pt(100, 2.85), pt(200, 2.84)]},
        step=0.01,
    )
    assert [(r["val_loss"], r["bound"]) for r in swapped] == [
        (2.89, "≤"),
        (2.88, "≤"),
        (2.87, "≤"),
        (2.86, "≤"),
        (2.85, "≤"),
        (2.84, "≤"),
    ]  # 2.90: both bounded
    md = long_curve.markdown(
        {
            "curves": {long_curve.ARMS[0]: ours, long_curve.ARMS[1]: theirs},
            "ratios": rows,
            "date": "d",
            "machine": "m",
            "jobs": 1,
            "tokens": 500,
            "eval_every_tokens": 100,
            "eval_subset": 8,
            "summaries": {
                a: {"params": 1e6, "tokens": 500, "best_val_loss": 2.8, "train_time_s": 1.0, "tok_per_s": 1.0}
                for a in long_curve.ARMS
            },
        }
    )
    assert "| 2.910 | ≤ 100 | 200 | ≥ 2.00× |" in md and "| 2.830 | 400 | not reached | ≥ 1.25× |" in md


@pytest.mark.slow
def test_long_curve_end_to_end_and_from_runs(tmp_path, cache):
    out = tmp_path / "lc"
    args = [
        "--tokens",
        "6144",
        "--eval-tokens",
        "2048",
        "--jobs",
        "1",
        "--run-root",
        str(tmp_path / "runs"),
        "--out",
        str(out),
        *[x for s in TINY + ["train.threads=1"] for x in ("--set", s)],
    ]
    assert long_curve.main(args) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["curves"]) == set(long_curve.ARMS) and out.with_suffix(".png").stat().st_size > 0
    for arm, run in report["runs"].items():
        assert [p["step"] for p in report["curves"][arm]] == [4, 8, 12]  # 512-token steps, eval every 4
        assert json.loads((Path(run) / "summary.json").read_text())["steps"] == 12
    assert report["unigram_loss"] > 2.5 and "| plmrun default |" in out.with_suffix(".md").read_text()
    again = tmp_path / "again"
    assert long_curve.main(["--from-runs", *report["runs"].values(), "--out", str(again)]) == 0
    redrawn = json.loads(again.with_suffix(".json").read_text())
    assert redrawn["curves"] == report["curves"] and redrawn["jobs"] == 1  # read from the runs: one after the other
    assert long_curve.main(["--from-runs", str(tmp_path), str(tmp_path), "--out", str(again)]) == 2


def test_gpu_table_scaling():
    base = {
        "config": "speedrun_133m",
        "overrides": [],
        "params": 133e6,
        "token_budget_per_gpu": 65536,
        "mfu": 0.3,
        "peak_memory_mb_max_gpu": 40960,
        "peak_flops_per_gpu": 7e14,
        "precision": "bf16",
        "fp8": False,
        "hardware": {"gpu": "NVIDIA H100", "torch": "2.13"},
    }
    fp8 = {**base, "overrides": ["train.fp8=true"], "fp8": True, "peak_flops_per_gpu": 1.4e15}
    table = gpu_bench.table(
        [
            {**base, "gpus": 1, "real_tok_per_s": 500_000.0},
            {**base, "gpus": 8, "real_tok_per_s": 3_600_000.0},
            {**fp8, "gpus": 1, "real_tok_per_s": 600_000.0},
        ]
    )
    assert "| speedrun_133m | 133.0M | 8 | 65,536 | 3,600,000 | 30.0% | 40.0 | 90% |  |" in table
    assert "| speedrun_133m `train.fp8=true` | 133.0M | 1 | 65,536 | 600,000 | 30.0% | 40.0 |  | 2.17× |" in table
    assert "bf16 runs 700, float8 runs 1,400" in table  # each row's MFU is against its own peak


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without CUDA")
def test_gpu_scripts_fail_clearly_without_cuda(tmp_path):
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")]).returncode == 0
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    if shutil.which("nvidia-smi"):  # a driver without a GPU: hide it so the first check is the one tested
        (tmp_path / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
        (tmp_path / "nvidia-smi").chmod(0o755)
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: nvidia-smi")
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_bench.py")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no CUDA device")


def test_step_profile_end_to_end(tmp_path, cache):
    out = tmp_path / "sp.json"
    assert (
        step_profile.main(
            [
                "--steps",
                "1",
                "--ns-steps",
                "2",
                "1",
                "--threads",
                "1",
                "--precision",
                "fp32",
                "--out",
                str(out),
                *[x for s in TINY for x in ("--set", s)],
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    speed, esm = report["cases"]["plmrun"], report["cases"]["plmrun esm2 recipe"]
    assert (speed["optimizer"], esm["optimizer"]) == ("muon", "adamw")
    assert all(r["fwd_bwd_s"] > 0 and r["optimizer_s"] > 0 for r in (speed, esm))
    assert report["newton_schulz"]["matrices"] == 2 * 6 and set(report["newton_schulz"]["seconds"]) == {"2", "1"}
    assert report["precision"] == "fp32"
    for r in (speed, esm):  # a packed-attention step has matmul, attention and other operator time
        assert set(r["op_seconds"]) == {"matmul", "attention", "other"} and all(v > 0 for v in r["op_seconds"].values())
    with pytest.raises(SystemExit):
        step_profile.main(["--steps", "0"])


def test_step_profile_variants_side_by_side(tmp_path, cache, capsys):
    out = tmp_path / "v.json"
    assert (
        step_profile.main(
            [
                "--steps",
                "1",
                "--threads",
                "1",
                "--precision",
                "fp32",
                "--out",
                str(out),
                "--variants",
                "quintic:5",
                "polar_express:5",
                "quintic:2",
                *[x for s in TINY for x in ("--set", s)],
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert list(report["variants"]) == ["quintic:5", "polar_express:5", "quintic:2"]
    assert report["variants"]["quintic:5"]["step_ratio"] == 1.0
    assert all(0 < r["optimizer_share"] < 1 for r in report["variants"].values())
    errors = report["ns_errors"]  # on real gradients: 2 quintic steps are far from orthogonal, 5 are not
    assert errors["quintic:2"]["max_abs_sv_minus_1"] > errors["quintic:5"]["max_abs_sv_minus_1"]
    assert step_profile.main(["--variants", "quintic", *[x for s in TINY for x in ("--set", s)]]) == 2
    assert "expected coefficients:steps[:fp32|bf16]" in capsys.readouterr().err


def test_step_profile_op_kinds():
    assert [
        step_profile.op_kind(n)
        for n in (
            "aten::mm",
            "aten::addmm",
            "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::mul",
            "aten::copy_",
        )
    ] == ["matmul", "matmul", "attention", "other", "other"]


def test_speedrun_esmc_arm_builds_beside_the_others():
    """The --esmc arm: ESM C blocks at the plmrun arm's shape, trained with the plmrun arm's recipe."""
    from plmrun.model.registry import build_model

    speed = throughput.plmrun_config(None, [])
    arm = speedrun.esmc_at_shape(speed)
    assert arm.model.arch == "esmc" and arm.model.qk_norm
    assert (arm.model.hidden_size, arm.model.num_layers, arm.model.num_heads) == (
        speed.model.hidden_size,
        speed.model.num_layers,
        speed.model.num_heads,
    )
    assert (arm.optim, arm.data, arm.masking, arm.eval) == (speed.optim, speed.data, speed.masking, speed.eval)
    with torch.device("meta"):
        n_esmc = sum(p.numel() for p in build_model(arm.model).parameters())
        n_speed = sum(p.numel() for p in build_model(speed.model).parameters())
    assert abs(n_esmc / n_speed - 1) < 0.5


def test_long_context_end_to_end(tmp_path, cache):
    import long_context

    from plmrun.model.loading import load_model

    out = tmp_path / "lc"
    assert (
        long_context.main(
            [
                "--steps",
                "2",
                "--long-steps",
                "2",
                "--per-bucket",
                "1",
                "--run-root",
                str(tmp_path / "runs"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["case"] for r in report["rows"]] == ["crop 512 (before)", "crop 512 throughout", "crop 512, then 2048"]
    assert all(list(r["buckets"]) == ["<512", "512-1022", "1023-2048", ">2048"] for r in report["rows"])
    assert report["rows"][0]["buckets"][">2048"]["longest"] > 2048  # evaluated whole, not cropped
    # the two runs share their first phase bitwise, so one "before" row stands for both
    runs = sorted((tmp_path / "runs").iterdir())
    a, b = (load_model(r / "checkpoints" / "step_00000002")[0].state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "| crop 512, then 2048 | 4 |" in out.with_suffix(".md").read_text()


def test_every_plmrun_name_a_benchmark_imports_exists():
    """A benchmark is run by hand, not by the suite: a name it imports from plmrun that a refactor removed would
    only fail on the machine that finally runs it (e.g. a GPU borrowed for minutes)."""
    import ast
    import importlib.util

    missing = []
    for path in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("plmrun"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if (
                        not hasattr(module, alias.name)
                        and importlib.util.find_spec(f"{node.module}.{alias.name}") is None
                    ):
                        missing.append(f"{path.name}: {node.module}.{alias.name}")
    assert missing == []
