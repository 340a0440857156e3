"""Kill anywhere, lose nothing (issue 25): benchmarks/chaos.py with a few kills, so CI stays fast.
The 20-kill run and its result: benchmarks/results/chaos.md."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import chaos  # noqa: E402


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bitwise_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("PLMRUN_CACHE", str(tmp_path.parent / "plmrun-cache"))
    out = tmp_path / "chaos"
    code = chaos.main(
        [
            "--kills",
            "4",
            "--steps",
            "40",
            "--checkpoint-every",
            "2",
            "--timeout",
            "600",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.with_suffix(".json").read_text())
    assert code == 0, out.with_suffix(".md").read_text()
    assert report["kills_done"] == report["kills_passed"] == 4
    assert {k["kind"] for k in report["kills"]} == {"step", "in-save", "killsave", "startup"}
    assert all(k["killed"] and k["prefix_ok"] and k["restart_ok"] for k in report["kills"])
    assert report["final"]["weights_equal"] and report["final"]["series_equal"]
    assert "4 of 4 kills passed" in out.with_suffix(".md").read_text()


def test_series_drops_wall_clock_and_an_unfinished_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"kind": "train", "step": 1, "loss": 3.5, "train_time_s": 0.1, '
        '"tok_per_s": 9.0, "mfu": 0.1, "packing_efficiency": 0.9}\n'
        '{"kind": "train", "step": 2, "lo'
    )
    got = chaos.series(tmp_path)
    assert got == [{"kind": "train", "step": 1, "loss": 3.5, "packing_efficiency": 0.9}]
    assert chaos.differing_keys(got, [{**got[0], "loss": 3.4}]) == {"loss": 1}
