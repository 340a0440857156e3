"""`plmrun record`: per-seed results, Welch t-test, record decisions, the records file and table."""

import dataclasses
import json
import math

import pytest
import torch

from plmrun.cli import main
from plmrun.experiments.record import (
    TRACKS,
    RecordError,
    append_record,
    build_entry,
    hardware_key,
    read_records,
    records_path,
    records_table,
    run_attempt,
    seed_result,
    track_config,
    welch_p_less,
)

TRACK = TRACKS["cpu-2core"]
HW = {"cpu": "Test CPU", "cores": 2, "threads": 2, "gpu": None, "gpus": 0, "torch": "x"}


def fake_summary(seed_time: float | None, tokens: int = 100_000, target: float = 2.7) -> dict:
    """A summary.json as the trainer writes it; time None = the target was never reached."""
    ttt = (
        {}
        if seed_time is None
        else {
            str(target): {
                "step": 50,
                "tokens": tokens,
                "train_time_s": seed_time,
                "wall_time_s_incl_eval": seed_time + 5,
                "val_loss": target - 0.01,
            }
        }
    )
    return {"run_dir": "runs/x", "best_val_loss": 2.69, "time_to_target": ttt, "data": {"valid_fingerprint": "fp"}}


def entry(times, previous=(), hw=HW, tokens=100_000, target=2.7):
    seeds = [seed_result(fake_summary(t, tokens + i, target), i, target) for i, t in enumerate(times)]
    return build_entry(
        track=TRACK,
        config="c.yaml",
        overrides=["--train.max_steps=9"],
        resolved={"x": 1},
        commit="abc",
        hardware=hw,
        params=7_000_000,
        target=target,
        valid_fingerprint="fp",
        seeds=seeds,
        previous=list(previous),
    )


def test_welch_p_matches_the_formula():
    from scipy.stats import t as student_t

    a, b = [50.0, 52.0, 49.0, 51.5], [60.0, 58.0, 63.0]
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    t = (ma - mb) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    assert welch_p_less(a, b) == pytest.approx(student_t.cdf(t, dof), rel=1e-9)
    assert welch_p_less(b, a) == pytest.approx(1 - student_t.cdf(t, dof), rel=1e-9)
    assert welch_p_less([1.0], b) is None


def test_seed_result_reads_time_to_target():
    hit = seed_result(fake_summary(42.0, 1234), 3, 2.7)
    assert hit["reached"] and hit["train_time_s"] == 42.0 and hit["tokens"] == 1234 and hit["seed"] == 3
    assert seed_result(fake_summary(42.0), 0, 2.6)["reached"] is False  # other target: not reached
    assert seed_result(fake_summary(None), 0, 2.7) == {
        "seed": 0,
        "reached": False,
        "run_dir": "runs/x",
        "best_val_loss": 2.69,
    }


def test_record_decisions():
    first = entry([50.0, 52.0, 51.0])
    assert first["new_record"] and first["vs_record"] is None
    assert first["time_to_target_s"]["mean"] == pytest.approx(51.0)
    assert first["time_to_target_s"]["std"] == pytest.approx(1.0)
    assert first["tokens_to_target"]["mean"] == pytest.approx(100_001)
    two_seeds = entry([10.0, 11.0], [first])
    assert not two_seeds["new_record"]  # far faster, but < 3 seeds
    assert two_seeds["vs_record"]["p_value"] < 0.05
    faster = entry([40.0, 41.0, 39.5], [first])
    assert faster["new_record"] and faster["vs_record"]["time_to_target_s"] == pytest.approx(51.0)
    same = entry([50.5, 51.5, 51.0], [first, faster])  # compared with the current record (faster), not first
    assert same["vs_record"]["time_to_target_s"] == pytest.approx(faster["time_to_target_s"]["mean"])
    assert not same["new_record"] and same["vs_record"]["p_value"] > 0.5
    other_hw = entry([70.0, 71.0, 72.0], [first, faster], hw={**HW, "cpu": "Other CPU"})
    assert other_hw["new_record"] and other_hw["vs_record"] is None
    missed = entry([40.0, None, 39.0], [first])
    assert not missed["all_reached"] and not missed["new_record"]
    assert missed["time_to_target_s"] is None and missed["tokens_to_target"] is None
    assert hardware_key(HW, TRACK) == "Test CPU, 2 threads"
    # the same model name on another vector ISA (e.g. Zen 3 vs Zen 4 "AMD EPYC") is other hardware
    assert hardware_key({**HW, "cpu_isa": "AVX2"}, TRACK) == "Test CPU (AVX2), 2 threads"
    other_isa = entry([70.0, 71.0, 72.0], [first, faster], hw={**HW, "cpu_isa": "AVX2"})
    assert other_isa["new_record"] and other_isa["vs_record"] is None
    assert hardware_key({**HW, "gpu": "H100"}, TRACKS["gpu-8xH100"]) == "8x H100"


def test_append_read_and_table(tmp_path):
    path = records_path(tmp_path, "cpu-2core")
    first = entry([50.0, 52.0, 51.0])
    append_record(path, first)
    append_record(path, entry([40.0, None, 39.0], [first]))
    back = read_records(path)
    assert back == json.loads(json.dumps([first, back[1]]))
    table = records_table(back).splitlines()
    assert len(table) == 6 and table[0] == "**target val loss ≤ 2.70**" and table[2].startswith("| date |")
    assert "51.0 ± 1.0" in table[4] and "100,001 ± 1" in table[4] and table[4].rstrip().endswith("✓ |")
    assert "not reached" in table[5] and "✓" not in table[5]
    path.write_text(path.read_text() + "{oops\n")
    with pytest.raises(RecordError, match=r"cpu-2core.jsonl:3: not valid JSON"):
        read_records(path)


def test_track_config_pins_the_track():
    cfg = track_config("debug", ["--eval.subset=7"], TRACK, 2.7, None)
    assert (cfg.data.dataset, cfg.data.valid_split, cfg.eval.subset) == ("bundled", "valid", 256)
    assert cfg.train.stop_at_val_loss == 2.7 and 2.7 in cfg.train.report_at_val_losses
    assert (cfg.train.device, cfg.train.threads) == ("cpu", 2)
    with pytest.raises(RecordError, match="model.hidden_size"):
        track_config("debug", ["--model.hidden_size=33"], TRACK, 2.7, None)


def test_refusals(tmp_path):
    small = dataclasses.replace(TRACK, max_params=1000)
    with pytest.raises(RecordError, match="parameters; track cpu-2core allows < 1,000"):
        run_attempt("debug", [], track=small, seeds=1, target=3.3, records_dir=tmp_path, run_root=tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(RecordError, match="8 process"):
            run_attempt(
                "debug", [], track=TRACKS["gpu-8xH100"], seeds=1, target=2.1, records_dir=tmp_path, run_root=tmp_path
            )


@pytest.mark.slow
def test_end_to_end_one_seed(tmp_path, monkeypatch, capsys):
    """A real (tiny) attempt: debug model, 1 seed, easy target; appended, not a record (1 seed)."""
    monkeypatch.setenv("PLMRUN_CACHE", str(tmp_path.parent / "plmrun-cache"))
    track = dataclasses.replace(TRACK, threads=1, eval_subset=16)
    e = run_attempt(
        "debug",
        ["--train.eval_every=5", "--train.max_steps=40"],
        track=track,
        seeds=1,
        target=3.3,
        records_dir=tmp_path / "records",
        run_root=tmp_path / "runs",
    )
    assert e["all_reached"] and not e["new_record"]
    assert 0 < e["seeds"][0]["tokens"] and 0 < e["seeds"][0]["train_time_s"] < 60
    assert e["seeds"][0]["val_loss"] <= 3.3 and e["params"] > 0 and e["hardware"]["threads"] == 1
    assert read_records(tmp_path / "records" / "cpu-2core.jsonl") == [json.loads(json.dumps(e))]
    assert main(["record", "--table", "--records-dir", str(tmp_path / "records")]) == 0
    assert "| debug `--train.eval_every=5` `--train.max_steps=40` |" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert main(["record", "--records-dir", str(tmp_path)]) == 2
    assert "give a CONFIG" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["record", "debug", "--track", "gpu-8xH100", "--records-dir", str(tmp_path)]) == 2
        assert "error: track gpu-8xH100 runs on 8 process(es)" in capsys.readouterr().err


def test_cpu_track_moved_to_2_85_and_keeps_the_2_90_history(capsys):
    """records/cpu-2core.jsonl keeps the 2.90 entries, each labelled with its target; the table puts the
    current 2.85 target first and labels the old block; a 2.85 attempt is never compared with 2.90 records."""
    from pathlib import Path

    assert TRACK.target == 2.85 and "2.85" in TRACK.description
    repo_records = Path(__file__).resolve().parents[1] / "records"
    old = read_records(records_path(repo_records, "cpu-2core"))
    assert old and all(e["target"] == 2.9 for e in old)
    assert main(["record", "--table", "--records-dir", str(repo_records)]) == 0
    out = capsys.readouterr().out
    assert out.index("**target val loss ≤ 2.85**\n") < out.index("**target val loss ≤ 2.90** (earlier target)")
    assert "no attempts yet" in out.split("2.90")[0]  # nothing at 2.85 yet
    fast_old = entry([5.0, 6.0, 5.5], target=2.9)  # a fast 2.90 record on the same hardware
    new = entry([50.0, 52.0, 51.0], [fast_old], target=2.85)
    assert new["vs_record"] is None and new["new_record"]  # the first complete 2.85 attempt
    table = records_table([fast_old, new], 2.85).split("\n\n")
    assert table[0] == "**target val loss ≤ 2.85**" and "51.0 ± 1.0" in table[1] and "5.5" not in table[1]
    assert table[2] == "**target val loss ≤ 2.90** (earlier target)" and "5.5 ± 0.5" in table[3]
