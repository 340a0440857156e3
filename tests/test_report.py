import json

import pytest

from plmrun.cli import main
from plmrun.eval import report


def write_run(path, losses, evals, summary=None, partial_tail=False):
    path.mkdir(parents=True)
    lines = []
    for step, loss in enumerate(losses):
        lines.append({"kind": "train", "step": step, "tokens": 1000 * step, "train_time_s": 0.5 * step, "loss": loss})
    for step, val in evals:
        lines.append({"kind": "eval", "step": step, "tokens": 1000 * step, "train_time_s": 0.5 * step,
                      "val_loss": val})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if partial_tail:
        text += '{"kind": "train", "st'
    (path / "metrics.jsonl").write_text(text)
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_report_overlays_runs_and_tabulates(tmp_path, capsys):
    a = write_run(tmp_path / "a" / "run", [3.3, 3.0, 2.9], [(2, 2.95)],
                  {"params": 1234567, "tokens": 3000, "train_time_s": 1.5, "tok_per_s": 2000.0, "mfu": 0.123,
                   "best_val_loss": 2.95, "final_val": {"loss": 2.951, "accuracy": 0.1},
                   "time_to_target": {"2.8": None, "3.0": {"time_s": 1.0, "tokens": 2000}}})
    b = write_run(tmp_path / "b" / "run", [3.3, 3.1], [(1, 3.05)], partial_tail=True)  # still running
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    png = (tmp_path / "out" / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    page = (tmp_path / "out" / "report.html").read_text()
    assert "a/run" in page and "b/run" in page and 'src="loss_curves.png"' in page
    assert "1,234,567" in page and "2.951" in page and "0.123" in page
    assert "3.0: time_s: 1; tokens: 2,000" in page.replace("&#x27;", "'")
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| a/run") or line.startswith("| b/run")]
    assert len(rows) == 2 and rows[1].count("| - ") == len(report.COLUMNS)  # b has no summary.json


def test_run_contents(tmp_path):
    run = report.load_run(write_run(tmp_path / "r", [3.0, 2.0], [(1, 2.5), (2, 2.4)]))
    assert [r["loss"] for r in run.train] == [3.0, 2.0]
    assert [r["val_loss"] for r in run.evals] == [2.5, 2.4]


def test_bad_inputs_name_the_file(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: report: {tmp_path}: no metrics.jsonl (not a run directory)\n"
    r = tmp_path / "bad"
    r.mkdir()
    (r / "metrics.jsonl").write_text('{"kind": "train", "loss": 1.0, "tokens": 1}\nnot json\n{"kind": "eval"}\n')
    assert main(["report", str(r), "--out", str(tmp_path / "o")]) == 2
    assert "metrics.jsonl:2: invalid JSON" in capsys.readouterr().err
