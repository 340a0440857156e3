import json

from plmrun.cli import main
from plmrun.config import build_config
from plmrun.eval import report
from plmrun.train.rundir import config_yaml


def write_run(path, losses, evals, summary=None, partial_tail=False, final=None, overrides=None):
    path.mkdir(parents=True)
    lines = []
    for step, loss in enumerate(losses):
        lines.append({"kind": "train", "step": step, "tokens": 1000 * step, "train_time_s": 0.5 * step, "loss": loss})
    for step, val in evals:
        lines.append({"kind": "eval", "step": step, "tokens": 1000 * step, "train_time_s": 0.5 * step, "val_loss": val})
    if final is not None:  # the trainer's end-of-training full valid split line
        lines.append(
            {
                "kind": "eval",
                "final": True,
                "step": len(losses) - 1,
                "tokens": 1000 * (len(losses) - 1),
                "train_time_s": 0.5 * (len(losses) - 1),
                "val_loss": final,
            }
        )
    if overrides is not None:
        (path / "config.yaml").write_text(config_yaml(build_config(None, overrides)))
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if partial_tail:
        text += '{"kind": "train", "st'
    (path / "metrics.jsonl").write_text(text)
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_report_overlays_runs_and_tabulates(tmp_path, capsys):
    a = write_run(
        tmp_path / "a" / "run",
        [3.3, 3.0, 2.9],
        [(2, 2.95)],
        {
            "params": 1234567,
            "tokens": 3000,
            "train_time_s": 1.5,
            "tok_per_s": 2000.0,
            "mfu": 0.123,
            "best_val_loss": 2.95,
            "final_val": {"loss": 2.951, "accuracy": 0.1},
            "time_to_target": {"2.8": None, "3.0": {"time_s": 1.0, "tokens": 2000}},
        },
    )
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


def _table_cells(table, name):
    head = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    row = next(line for line in table.splitlines() if line.startswith(f"| {name} "))
    return dict(zip(head, [c.strip() for c in row.strip("|").split("|")]))


def test_table_separates_subset_and_full_split_val(tmp_path):
    done = write_run(
        tmp_path / "done",
        [3.3, 3.0],
        [(1, 3.05)],
        final=2.8123,
        summary={"best_val_loss": 3.05, "final_val": {"loss": 3.05}, "final_full_val": {"loss": 2.8123}},
    )
    no_summary = write_run(tmp_path / "nosum", [3.3, 3.0], [(1, 3.1)], final=2.9)  # summary.json not written yet
    no_full = write_run(
        tmp_path / "nofull", [3.3], [(0, 3.2)], summary={"final_val": {"loss": 3.2}, "final_full_val": None}
    )
    runs = [report.load_run(p) for p in (done, no_summary, no_full)]
    table = report.markdown_table(runs)
    assert _table_cells(table, "done")["final val (subset)"] == "3.05"
    assert _table_cells(table, "done")["final val (full split)"] == "2.812"
    assert _table_cells(table, "nosum")["final val (full split)"] == "2.9"
    assert _table_cells(table, "nofull")["final val (full split)"] == "-"
    assert [r["val_loss"] for r in runs[0].evals] == [3.05]  # the full-split point is not on the subset curve


def test_curves_name_their_protocols_on_separate_panels(tmp_path):
    r = write_run(
        tmp_path / "r",
        [3.3, 3.0, 2.9],
        [(1, 3.1), (2, 3.0)],
        final=2.95,
        overrides=[
            "--masking.mask_rate=0.3",
            "--masking.mask_token_frac=0.8",
            "--masking.random_token_frac=0.1",
            "--eval.mask_rate=0.15",
        ],
    )
    fig = report.plot([report.load_run(r)])
    labels = {ax.get_ylabel() for ax in fig.axes}
    assert labels == {"train loss (30% targets, 80/10/10) (nats)", "val loss (15%, all <mask>) (nats)"}
    for ax in fig.axes:  # no panel mixes train and val curves
        lines = [line.get_label() for line in ax.get_lines()]
        assert all("train loss" in t for t in lines) or all("val loss" in t for t in lines), lines
    legends = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert "r: train loss (30% targets, 80/10/10)" in legends
    assert "r: val loss (15%, all <mask>, subset)" in legends
    assert "r: val loss (15%, all <mask>, full split)" in legends
    bare = report.plot([report.load_run(write_run(tmp_path / "bare", [3.0], [(0, 3.1)]))])  # copied without config
    assert "train loss (protocol unknown: no config.yaml) (nats)" in {ax.get_ylabel() for ax in bare.axes}
