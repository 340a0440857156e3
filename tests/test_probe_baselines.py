"""probe controls (issue 25): an untrained speedrun encoder is context-free, so its random-init control is
the one-hot / composition baseline in another basis (reported as one control); the majority-class row."""

import json
from dataclasses import replace

import numpy as np
import torch

from plmrun import tokenizer as tok
from plmrun.cli import main
from plmrun.config import ModelConfig, build_config
from plmrun.eval import probe
from plmrun.eval.embed import embed_sequences
from plmrun.eval.inference import EvalModel
from plmrun.model.loading import save_model_dir
from plmrun.model.registry import build_model


def untrained(cfg, seed=0, perturb=False):
    torch.manual_seed(seed)
    net = build_model(cfg).eval()
    if perturb:  # non-zero output projections: every block mixes context
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return EvalModel(net, cfg, "tiny", 1024)


def test_untrained_speedrun_features_are_a_lookup_of_the_residue():
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2)
    model = untrained(cfg)
    assert probe.context_free(model) and probe.context_free(model, (0, 1, 2, 3))
    assert not probe.context_free(untrained(cfg, perturb=True))
    assert probe.context_free(untrained(cfg, perturb=True), 0)  # the embedding output, in any model
    for name in ("esm2_8m", "esmc_cpu"):  # their output projections do not start at zero
        other = build_config(name, ["--model.hidden_size=64", "--model.num_layers=2", "--model.num_heads=4"]).model
        assert not probe.context_free(untrained(other))
    # so per residue the control's features are a fixed vector per letter, and mean-pooled they are
    # composition times that table (linear in the baseline's features)
    seqs = ["MKTAYIAKQRQISFVKSHFSRQ", "GGGWWWKKKAAA", "ACDEFGHIKLMNPQRSTVWY"]
    letters = "".join(tok.VOCAB[i] for i in tok.AMINO_ACID_IDS)  # the baseline's column order
    table = embed_sequences(model, [letters], pool="per-residue")[0]
    pooled = embed_sequences(model, seqs)
    comp = probe.baseline_features(seqs, per_residue=False)[:, :20]
    np.testing.assert_allclose(pooled, comp @ table, atol=1e-5)


def test_majority_class_rate():
    m = probe.majority_class([0, 1, 1, 2, 1], [1, 0, 1, 2], per_residue=False)
    assert m == {"class": 1, "rate": 0.5}
    m = probe.majority_class([np.array([2, 2, 0]), np.array([2])], [np.array([0, 2]), np.array([1, 1, 2])], True)
    assert m == {"class": 2, "rate": 0.4}


def test_report_says_the_controls_are_one_and_prints_the_majority_row(tmp_path, capsys):
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2)
    torch.manual_seed(1)
    save_model_dir(tmp_path / "model", build_model(cfg).state_dict(), cfg)
    out = tmp_path / "results.json"
    assert (
        main(
            [
                "probe",
                str(tmp_path / "model"),
                "--tasks",
                "solubility",
                "secondary_structure",
                "--seeds",
                "2",
                "--max-train",
                "16",
                "--max-test",
                "8",
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
    assert results["random_init_context_free"] is True
    for name, base in (("solubility", "aa composition"), ("secondary_structure", "one-hot")):
        t = results["tasks"][name]
        assert t["rows"]["random init"]["same_as"] == base
        assert f"= {base}: one control (see below)" in printed
        data = probe.load_task(replace(probe.TASKS[name], max_train=16, max_test=8))
        want = probe.majority_class(data.train_labels, data.test_labels, name == "secondary_structure")
        assert t["majority_class"] == want
        assert (
            f"{name:<20} {'majority class':<16} {t['metric']:<12} {want['rate']:.4f}" in printed
            and f"(always class {want['class']}, the most frequent in training)" in printed
        )
    assert "one control, not two" in printed
    # a control that mixes context is reported as its own control
    net = untrained(cfg, seed=2, perturb=True).net
    save_model_dir(tmp_path / "mixed", net.state_dict(), cfg)
    model = EvalModel(net, cfg, "mixed", 130)
    res = probe.run_probes(model, ["solubility"], seeds=[0], caps={"max_train": 8, "max_test": 4}, log=lambda m: None)
    assert res["random_init_context_free"] is True  # random_init rebuilds the untrained speedrun model
    esm = build_config("esm2_8m", ["--model.hidden_size=64", "--model.num_layers=2", "--model.num_heads=4"]).model
    res = probe.run_probes(
        untrained(esm), ["solubility"], seeds=[0], caps={"max_train": 8, "max_test": 4}, log=lambda m: None
    )
    assert res["random_init_context_free"] is False
    assert "same_as" not in res["tasks"]["solubility"]["rows"]["random init"]
    assert "one control" not in probe.format_table(res)
