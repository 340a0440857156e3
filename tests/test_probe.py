import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from plmrun.cli import main
from plmrun.eval import probe
from plmrun.eval.embed import embed_sequences
from plmrun.eval.inference import load_eval_model
from plmrun.model.config import ModelConfig
from plmrun.model.loading import save_model_dir
from plmrun.model.registry import build_model


def test_secondary_structure_split_by_superfamily_and_3_states():
    import csv
    import io
    import lzma

    task = replace(probe.TASKS["secondary_structure"], max_train=10**6, max_test=10**6)
    data = probe.load_task(task)
    with lzma.open(probe.PROBE_DIR / "scope207_domains_dssp8.tsv.xz", "rt") as f:
        rows = list(csv.DictReader(io.StringIO(f.read()), delimiter="\t"))
    sf = {r["sequence"]: r["sccs"].rsplit(".", 1)[0] for r in rows}
    train_sf, test_sf = {sf[s] for s in data.train_seqs}, {sf[s] for s in data.test_seqs}
    assert train_sf and test_sf and not train_sf & test_sf
    assert len(data.train_seqs) + len(data.test_seqs) == len(rows)
    assert 0.1 < len(data.test_seqs) / len(rows) < 0.3
    dssp = {r["sequence"]: r["dssp8"] for r in rows}
    s = data.train_seqs[0]
    want = ["HHHEECCCCC"["HGIEBLTS-".index(c)] if c in "HGIEBLTS" else "C" for c in dssp[s]]
    assert "".join("HEC"[k] for k in data.train_labels[0]) == "".join(want)


def test_splits_and_caps_are_deterministic():
    loc = probe.load_task(replace(probe.TASKS["localisation"], max_train=50, max_test=20))
    assert len(loc.train_seqs) == 50 and len(loc.test_seqs) == 20 and loc.classes == 13
    assert probe.load_task(replace(probe.TASKS["localisation"], max_train=50, max_test=20)).train_seqs == loc.train_seqs
    sol = probe.load_task(replace(probe.TASKS["solubility"], max_train=10**6, max_test=10**6))
    assert not set(sol.train_seqs) & set(sol.test_seqs) and set(sol.train_labels) == {0, 1}


def test_baselines():
    comp = probe.baseline_features(["AAC", "W"], per_residue=False)
    assert comp.shape == (2, 21) and np.allclose(comp.sum(1), 1)
    onehot = probe.baseline_features(["AXC"], per_residue=True)[0]
    assert onehot.shape == (3, 21) and onehot[1, 20] == 1 and onehot.sum() == 3


def test_probe_scores_signal_and_chance():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=300)
    informative = np.eye(3)[y] + 0.1 * rng.normal(size=(300, 3))
    noise = rng.normal(size=(300, 3))
    task = probe.TASKS["localisation"]
    for head in probe.HEADS:
        assert (
            probe.fit_and_score(task, informative[:200], y[:200], informative[200:], y[200:], [0], head).scores[0]
            > 0.95
        )
    chance = probe.fit_and_score(task, noise[:200], y[:200], noise[200:], y[200:], [0, 1, 2], "logistic")
    assert max(chance.scores) < 0.55
    # per test item: the fraction of seeds that got it right, so its mean is the mean accuracy
    assert chance.correct.shape == (100,) and set(np.unique(chance.correct)) <= {0, 1 / 3, 2 / 3, 1}
    assert chance.correct.mean() == pytest.approx(np.mean(chance.scores))
    a, b = probe.fit_and_score(task, noise[:200], y[:200], noise[200:], y[200:], [0, 1], "logistic").scores
    assert a != b  # seeds train on different subsets


def test_paired_difference_resamples_whole_sequences():
    same = probe.paired_difference(np.array([1.0, 0, 1]), np.array([1.0, 0, 1]))
    assert same == {"diff": 0.0, "ci95": [0.0, 0.0]}
    # per-residue: sequence 0 (3 residues) all better, sequence 1 (1 residue) tied -> 3/4
    d = probe.paired_difference(np.array([1.0, 1, 1, 0]), np.zeros(4), item_sizes=[3, 1])
    assert d["diff"] == 0.75
    # a resample holds either sequence, each whole: only 0, 3/4 (mixed draws) or 1 can occur
    lo, hi = d["ci95"]
    assert lo == 0.0 and hi == 1.0
    # the interval covers the truth for a real effect and excludes 0; noise gives an interval around 0
    rng = np.random.default_rng(0)
    b = (rng.random(2000) < 0.40).astype(float)
    a = np.where(rng.random(2000) < 0.1, 1.0, b)  # a = b plus ~6 points of extra right answers
    d = probe.paired_difference(a, b)
    assert 0 < d["ci95"][0] < d["diff"] < d["ci95"][1] and d["diff"] == pytest.approx((a - b).mean())
    with pytest.raises(ValueError, match="same non-zero number"):
        probe.paired_difference(np.ones(4), np.ones(4), item_sizes=[2, 1])
    noise = probe.paired_difference(rng.permutation(b), b)
    assert noise["ci95"][0] < noise["diff"] < noise["ci95"][1] and noise["ci95"][1] - noise["ci95"][0] < 0.07


def test_pipeline_on_a_tiny_model(tmp_path, capsys):
    torch.manual_seed(1)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2)
    save_model_dir(tmp_path / "model", build_model(cfg).state_dict(), cfg)
    out = tmp_path / "results.json"
    assert (
        main(
            [
                "probe",
                str(tmp_path / "model"),
                "--seeds",
                "2",
                "--max-train",
                "24",
                "--max-test",
                "12",
                "--max-length",
                "130",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert set(results["tasks"]) == set(probe.TASKS)
    for name, t in results["tasks"].items():
        labels = ["model", "random init", "one-hot" if name == "secondary_structure" else "aa composition"]
        assert list(t["rows"]) == labels and t["n_train"] == 24 and t["n_test"] == 12
        for label in labels:
            r = t["rows"][label]
            assert len(r["scores"]) == 2 and all(0 <= s <= 1 for s in r["scores"])
            assert f"{name:<20} {label:<16}" in printed
        # model minus each control: the difference of the reported means, with a bootstrap interval
        assert list(t["model_minus"]) == labels[1:]
        for other, d in t["model_minus"].items():
            assert d["diff"] == pytest.approx(t["rows"]["model"]["mean"] - t["rows"][other]["mean"])
            assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
            assert f"{name:<20} {'model - ' + other:<29} {d['diff']:+.4f}" in printed
    assert "Swiss-Prot 2014" in printed


def test_layer_picks_the_probed_hidden_state(tmp_path, capsys):
    torch.manual_seed(2)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2)
    net = build_model(cfg)
    with torch.no_grad():  # non-zero output projections, so each block changes the features
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model_dir(tmp_path / "model", net.state_dict(), cfg)
    model = load_eval_model(str(tmp_path / "model"), device=torch.device("cpu"), max_length=130)
    caps = {"max_train": 10, "max_test": 6}
    by_layer = {
        layer: probe.run_probes(model, ["solubility"], seeds=[0], caps=caps, layer=layer, log=lambda m: None)
        for layer in (0, 1)
    }
    assert by_layer[0]["layer"] == 0 and by_layer[1]["layer"] == 1
    seqs = probe.load_task(replace(probe.TASKS["solubility"], **caps)).test_seqs
    f0, f1 = (probe.model_features(model, seqs, False, 8192, layer) for layer in (0, 1))
    assert not np.allclose(f0, f1)
    np.testing.assert_allclose(f1, embed_sequences(model, seqs, layer=1), rtol=0, atol=0)
    capsys.readouterr()
    assert (
        main(
            [
                "probe",
                str(tmp_path / "model"),
                "--tasks",
                "solubility",
                "--seeds",
                "1",
                "--max-train",
                "4",
                "--max-test",
                "2",
                "--max-length",
                "130",
                "--layer",
                "7",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("error: probe: layer 7 out of range")


def test_best_layer_is_picked_on_held_out_training_rows_not_test(tmp_path):
    torch.manual_seed(3)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2)
    net = build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model_dir(tmp_path / "model", net.state_dict(), cfg)
    model = load_eval_model(str(tmp_path / "model"), device=torch.device("cpu"), max_length=130)
    from plmrun.eval.embed import num_hidden_states

    assert num_hidden_states(model) == 4  # embedding output, 2 blocks, final norm
    task = replace(probe.TASKS["solubility"], max_train=30, max_test=10)
    data = probe.load_task(task)
    # one pass, hidden states side by side, equals the per-layer embeddings
    both = embed_sequences(model, data.test_seqs, layer=(1, 3))
    np.testing.assert_array_equal(
        both, np.concatenate([embed_sequences(model, data.test_seqs, layer=k) for k in (1, 3)], axis=1)
    )
    fit, row = probe.best_layer_scores(task, data, model, [0, 1], "logistic", 8192)
    by = row["by_layer"]
    assert set(by) == {"0", "1", "2", "3"}
    best_val = max(r["validation"] for r in by.values())
    assert by[str(row["layer"])]["validation"] == best_val  # chosen by validation ...
    assert row["mean"] == by[str(row["layer"])]["test"]  # ... and reported on test
    feats = embed_sequences(model, data.train_seqs, layer=row["layer"])
    test = embed_sequences(model, data.test_seqs, layer=row["layer"])
    assert (
        row["scores"]
        == fit.scores
        == probe.fit_and_score(task, feats, data.train_labels, test, data.test_labels, [0, 1], "logistic").scores
    )
    results = probe.run_probes(
        model, ["solubility"], seeds=[0], caps={"max_train": 12, "max_test": 6}, layer="best", log=lambda m: None
    )
    rows = results["tasks"]["solubility"]["rows"]
    assert "layer" in rows["model"] and "layer" in rows["random init"] and "layer" not in rows["aa composition"]
    assert "best hidden state" in probe.format_table(results)
    with pytest.raises(SystemExit):  # argparse: not an integer or 'best'
        main(["probe", str(tmp_path / "model"), "--layer", "middle"])
