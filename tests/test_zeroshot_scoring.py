"""zeroshot scoring and reporting (issue 25): duplicate variants refused or averaged with a count,
unmeasured variants counted in `skipped`, and the site-independent (unigram) baseline's rho."""

import csv
import json

import numpy as np
import pytest
import torch

from plmrun import tokenizer as tok
from plmrun.cli import main
from plmrun.config import ModelConfig
from plmrun.eval import zeroshot as zs
from plmrun.eval.metrics import unigram_log_probs
from plmrun.eval.mlm import write_unigram
from plmrun.model.loading import save_model_dir
from plmrun.model.registry import build_model

WT = "MKTAYIAKQRQISFVKSHFSRQ"
AA = "ACDEFGHIKLMNPQRSTVWY"


def write_dms(path, rows, header=("mutant", "DMS_score")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def singles(n, seed=0):
    """n distinct single substitutions of WT with random measured scores."""
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    while len(out) < n:
        i, m = int(rng.integers(len(WT))), AA[rng.integers(20)]
        if m != WT[i] and (i, m) not in seen:
            seen.add((i, m))
            out.append([f"{WT[i]}{i + 1}{m}", float(rng.normal())])
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("zss")
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2)
    save_model_dir(root / "model", build_model(cfg).state_dict(), cfg)
    return root / "model"


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_duplicates_are_refused_naming_lines_and_count(tmp_path, model_dir, capsys):
    rows = singles(20)
    # the repro: 19 repeats with negated scores; one in another notation and one multi-mutant in
    # another order, which are the same variants
    repeats = [[m, -s] for m, s in rows[:19]]
    three = {one: name for name, one in zs.THREE_LETTER.items()}
    m = rows[0][0]
    repeats[0][0] = f"p.{three[m[0]]}{m[1:-1]}{three[m[-1]]}"  # p.Lys2Leu for K2L
    path = write_dms(tmp_path / "dup.csv", rows + repeats + [["K2L:T3S", 0.5], ["T3S:K2L", 0.7]])
    variants = zs.read_dms(path)
    with pytest.raises(
        ValueError,
        match=r"dup\.csv: 20 variants occur more than once \(20 extra rows\), e\.g\. "
        rf"{rows[0][0]} on lines 2, 22; .*--average-duplicates",
    ):
        zs.merge_duplicates(variants, path, average=False)
    code, _, err = run_cli(capsys, "zeroshot", str(model_dir), "--dms", str(path), "--wildtype", WT, "--device", "cpu")
    assert code == 2 and "20 variants occur more than once (20 extra rows)" in err and err.count("\n") == 1


def test_average_duplicates_scores_each_variant_once_with_a_count(tmp_path, model_dir, capsys):
    rows = singles(20, seed=1)
    repeats = [[m, -s] for m, s in rows[:19]] + [[rows[19][0], "NA"], [rows[19][0], 2 * rows[19][1]]]
    path = write_dms(tmp_path / "dup.csv", rows + repeats)
    merged, counts = zs.merge_duplicates(zs.read_dms(path), path, average=True)
    assert counts == {"variants": 20, "rows": 21} and len(merged) == 20
    assert [v.line for v in merged] == list(range(2, 22))
    want = [0.0] * 19 + [1.5 * rows[19][1]]  # x and -x average to 0; NA does not count in the mean
    np.testing.assert_allclose([v.measured for v in merged], want, atol=1e-12)
    summary = tmp_path / "s.json"
    code, out, _ = run_cli(
        capsys,
        "zeroshot",
        str(model_dir),
        "--dms",
        str(path),
        "--wildtype",
        WT,
        "--device",
        "cpu",
        "--average-duplicates",
        "--json",
        str(summary),
    )
    assert code == 0
    assert "over 20 variants" in out and "duplicates: 21 repeated rows averaged into 20 variants" in out
    got = json.loads(summary.read_text())
    assert got["duplicates"] == {"variants": 20, "rows": 21, "policy": "averaged"} and got["n_variants"] == 20
    # no duplicates: the same table as before, nothing merged
    same, counts = zs.merge_duplicates(zs.read_dms(write_dms(tmp_path / "u.csv", rows)), path, average=False)
    assert counts == {"variants": 0, "rows": 0} and len(same) == 20


def test_unmeasured_variants_are_counted_in_skipped(tmp_path, model_dir, capsys):
    rows = singles(10, seed=2)
    rows[1][1], rows[4][1], rows[7][1] = "NA", "nan", ""
    path = write_dms(tmp_path / "nan.csv", rows + [["K2*", 0.3]])
    summary = tmp_path / "s.json"
    code, out, _ = run_cli(
        capsys,
        "zeroshot",
        str(model_dir),
        "--dms",
        str(path),
        "--wildtype",
        WT,
        "--device",
        "cpu",
        "--json",
        str(summary),
    )
    assert code == 0
    assert "over 7 variants" in out
    assert "skipped: 1 stop, 3 without a measured score (--strict refuses the rows that are no substitution" in out
    got = json.loads(summary.read_text())
    assert got["skipped"] == {"stop": 1, "unmeasured": 3} and got["n_variants"] == 7 and got["n_rows_scored"] == 10
    # all measured: `skipped: none`, as before
    code, out, _ = run_cli(
        capsys,
        "zeroshot",
        str(model_dir),
        "--dms",
        str(write_dms(tmp_path / "ok.csv", singles(5))),
        "--wildtype",
        WT,
        "--device",
        "cpu",
    )
    assert code == 0 and "skipped: none\n" in out


def test_unigram_scores_known_answer():
    counts = np.zeros(tok.VOCAB_SIZE)
    counts[tok.VOCAB.index("A")], counts[tok.VOCAB.index("K")], counts[tok.VOCAB.index("L")] = 99, 9, 19
    logp = unigram_log_probs(counts).numpy()
    f = lambda a: np.log((counts[tok.VOCAB.index(a)] + 1) / (counts[tok.AMINO_ACID_IDS].sum() + 25))
    assert np.exp(logp[tok.AMINO_ACID_IDS]).sum() < 1  # add-one over the 25 residue letters, X etc. included
    v = zs.Variant(2, "K2L:T3A", zs.parse_mutant("K2L:T3A"), 0.0)
    assert zs.unigram_scores([v], logp)[0] == pytest.approx(f("L") - f("K") + f("A") - f("T"), abs=1e-12)


def test_unigram_baseline_from_the_run_or_the_wild_type(tmp_path, capsys):
    """A model of a run takes RUN/unigram.json (the training split); any other the wild type's frequencies."""
    rows = singles(30, seed=3)
    counts = np.zeros(tok.VOCAB_SIZE, dtype=np.int64)
    counts[tok.AMINO_ACID_IDS] = np.random.default_rng(4).integers(1, 1000, size=20)
    logp = unigram_log_probs(counts).numpy()
    variants = zs.read_dms(write_dms(tmp_path / "tmp.csv", rows))
    for r, s in zip(rows, zs.unigram_scores(variants, logp)):
        r[1] = 3 * s + 1  # measured = the training-split baseline: its rho is exactly 1
    path = write_dms(tmp_path / "dms.csv", rows)
    run = tmp_path / "runs" / "r"
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2)
    save_model_dir(run / "model", build_model(cfg).state_dict(), cfg)
    (run / "config.yaml").write_text("{}\n")
    (run / "metrics.jsonl").write_text("")
    write_unigram(run, counts, "test split")
    summary = tmp_path / "s.json"
    out_csv = tmp_path / "scores.csv"
    code, out, _ = run_cli(
        capsys,
        "zeroshot",
        str(run / "model"),
        "--dms",
        str(path),
        "--wildtype",
        WT,
        "--device",
        "cpu",
        "--json",
        str(summary),
        "--out",
        str(out_csv),
    )
    assert code == 0, out
    got = json.loads(summary.read_text())
    assert got["unigram_source"] == "training-split" and got["unigram_spearman"] == pytest.approx(1.0)
    assert got["model_minus_unigram"]["diff"] == pytest.approx(got["spearman"] - 1.0, abs=1e-9)
    assert (
        f"site-independent baseline (the training split's residue frequencies, {run}/unigram.json): "
        f"Spearman rho = 1.0000; model - baseline = {got['spearman'] - 1:+.4f}, 95% CI ["
    ) in out
    with open(out_csv) as f:
        scored = list(csv.DictReader(f))
    np.testing.assert_allclose(
        [float(r["unigram_score"]) for r in scored], zs.unigram_scores(zs.read_dms(path), logp), atol=1e-6
    )
    # the same weights outside a run: the wild type's own frequencies, said so
    save_model_dir(tmp_path / "alone", build_model(cfg).state_dict(), cfg)
    code, out, _ = run_cli(
        capsys,
        "zeroshot",
        str(tmp_path / "alone"),
        "--dms",
        str(path),
        "--wildtype",
        WT,
        "--device",
        "cpu",
        "--json",
        str(summary),
    )
    assert code == 0
    got = json.loads(summary.read_text())
    wt_logp = unigram_log_probs(np.bincount(tok.encode(WT), minlength=tok.VOCAB_SIZE)).numpy()
    want = zs.spearman(zs.unigram_scores(zs.read_dms(path), wt_logp), np.array([r[1] for r in rows]))[0]
    assert got["unigram_source"] == "eval-data" and got["unigram_spearman"] == pytest.approx(want, abs=1e-12)
    assert "(the wild type's own residue frequencies; the model has no run with unigram.json): Spearman rho" in out
