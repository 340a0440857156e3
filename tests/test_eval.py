"""The one eval protocol: metrics equal sklearn's, results do not depend on batch size, world size or model wrapper."""

import numpy as np
import pytest
import torch

from plmrun.config import EvalConfig, config_from_dict
from plmrun.data.shards import InMemorySequences
from plmrun.eval.metrics import MetricSums, compute_metrics
from plmrun.eval.mlm import accumulate, eval_batches, evaluate
from plmrun.model.registry import build_model


def test_metrics_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(4, 24, 500)
    pred = np.where(rng.random(500) < 0.4, y, rng.integers(4, 24, 500))
    logits = torch.full((500, 33), -5.0)
    logits[torch.arange(500), torch.from_numpy(pred)] = 5.0
    s = MetricSums.zeros()
    s.add(logits, torch.from_numpy(y), torch.ones(500), 500)
    m = s.compute()
    ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).item()
    assert m["loss"] == pytest.approx(ce, rel=1e-6)
    assert m["accuracy"] == pytest.approx(metrics.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(metrics.precision_score(y, pred, average="weighted", zero_division=0))
    assert m["recall"] == pytest.approx(metrics.recall_score(y, pred, average="weighted", zero_division=0))
    assert m["f1"] == pytest.approx(metrics.f1_score(y, pred, average="weighted", zero_division=0))
    assert m["mcc"] == pytest.approx(metrics.matthews_corrcoef(y, pred))
    assert compute_metrics(0.0, 0.0, torch.zeros(33, 33, dtype=torch.long))["tokens"] == 0


def _setup():
    rng = np.random.default_rng(1)
    lengths = [int(x) for x in rng.integers(5, 1400, 40)]  # some longer than 1022: one fixed crop window
    src = InMemorySequences([rng.integers(4, 24, n).astype(np.uint8) for n in lengths])
    cfg = config_from_dict({"model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2}}).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return src, model


def test_eval_invariant_to_batch_size_and_world_size():
    src, model = _setup()
    cfg = EvalConfig()
    reference = evaluate(model, src, cfg, token_budget=1024)
    for budget in (2048, 8192, 30000):
        got = evaluate(model, src, cfg, token_budget=budget)
        for k, v in reference.items():
            assert got[k] == pytest.approx(v, abs=1e-6), (budget, k)
    for world in (2, 3):  # each rank's share summed, as the all-reduce does
        total = MetricSums.zeros()
        for rank in range(world):
            part = accumulate(
                model, list(eval_batches(src, cfg, token_budget=4096, world_size=world, rank=rank)), torch.device("cpu")
            )
            total.loss_sum += part.loss_sum
            total.normalizer += part.normalizer
            total.confusion += part.confusion
        got = total.compute()
        for k, v in reference.items():
            assert got[k] == pytest.approx(v, abs=1e-6), (world, k)
    # masks are fixed: the same call twice gives the same numbers; another seed gives others
    assert evaluate(model, src, cfg, token_budget=4096) == pytest.approx(reference, abs=1e-6)
    other = EvalConfig(seed=99)
    assert evaluate(model, src, other, token_budget=4096)["loss"] != pytest.approx(reference["loss"], abs=1e-6)


def test_hf_esm_and_esm2_preset_score_identically(tmp_path):
    transformers = pytest.importorskip("transformers")
    from plmrun.eval.inference import load_eval_model
    from plmrun.model.loading import load_hf_state_dict

    hf_cfg = transformers.EsmConfig(
        vocab_size=33,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        position_embedding_type="rotary",
        token_dropout=True,
        mask_token_id=32,
        pad_token_id=1,
        max_position_embeddings=1026,
        layer_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    hf = transformers.EsmForMaskedLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "esm")
    src, _ = _setup()
    cfg = EvalConfig()
    via_hf = evaluate(load_eval_model(str(tmp_path / "esm")).net, src, cfg, subset=12)
    ours = build_model(
        config_from_dict(
            {
                "model": {
                    "arch": "esm2",
                    "hidden_size": 32,
                    "num_layers": 2,
                    "num_heads": 4,
                    "expansion_ratio": 2.0,
                    "unet": False,
                    "x0_lambdas": False,
                    "value_embeddings": False,
                    "qk_norm": False,
                    "soft_logit_cap": 0.0,
                    "token_dropout": True,
                }
            }
        ).model
    ).eval()
    load_hf_state_dict(ours, hf.state_dict())
    via_ours = evaluate(ours, src, cfg, subset=12)
    for k, v in via_ours.items():
        assert via_hf[k] == pytest.approx(v, abs=1e-5), k


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--token-budget", "1000"],
            "error: --token-budget 1000 is below the eval window of 1024 tokens (--max-length): "
            "use --token-budget >= 1024 (results do not depend on it) or a smaller --max-length",
        ),
        (["--max-length", "2"], "error: --max-length 2: must be >= 3 (<cls>, a residue, <eos>)"),
        (["--mask-rate", "1.5"], "error: --mask-rate 1.5: must be in (0, 1), e.g. 0.15 (the ESM-2 protocol)"),
        (["--subset", "-1"], "error: --subset -1: must be >= 0 (0 = the whole split)"),
    ],
)
def test_eval_flag_out_of_range_is_one_line(tmp_path, capsys, flags, message):
    """Old code: `--token-budget 1000` ended in a ValueError traceback from the loader."""
    from plmrun.cli import main
    from plmrun.model.loading import save_model_dir

    cfg = config_from_dict({"model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2}}).model
    save_model_dir(tmp_path / "m", build_model(cfg).state_dict(), cfg)
    assert main(["eval", str(tmp_path / "m"), "--device", "cpu", *flags]) == 2
    assert capsys.readouterr().err == message + "\n"


# ------------------------------------------------------------------ plmrun eval on real files (issue 15)
import json  # noqa: E402


def _saved_model(path, perturb: bool = True):
    """A tiny model folder (no run): weights perturbed away from the seed-0 init unless perturb=False."""
    from plmrun.model.loading import save_model_dir

    cfg = config_from_dict({"model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2}}).model
    torch.manual_seed(0)
    model = build_model(cfg)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    save_model_dir(path, model.state_dict(), cfg)
    return path


def _fasta(path, n=12, seed=0):
    rng = np.random.default_rng(seed)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    path.write_text("".join(f">s{i}\n{''.join(rng.choice(letters, int(rng.integers(20, 90))))}\n" for i in range(n)))
    return path


def _eval_json(tmp_path, args, capsys=None) -> dict:
    from plmrun.cli import main

    out = tmp_path / "metrics.json"
    assert main(["eval", *args, "--device", "cpu", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_eval_lone_fasta_is_prepared_once_by_content_and_evaluated_whole(tmp_path, monkeypatch):
    """Old code: `--dataset x.fasta` was taken as a dataset directory and failed."""
    import gzip

    monkeypatch.setenv("PLMRUN_CACHE", str(tmp_path / "cache"))
    model = str(_saved_model(tmp_path / "m"))
    fasta = _fasta(tmp_path / "seqs.fasta")
    first = _eval_json(tmp_path, [model, "--dataset", str(fasta)])
    assert first["split"] == "all" and first["tokens"] > 0
    cached = sorted((tmp_path / "cache" / "files").iterdir())
    assert len(cached) == 1
    manifest = (cached[0] / "train" / "manifest.json").read_text()
    assert _eval_json(tmp_path, [model, "--dataset", str(fasta)]) == first  # reused, not re-prepared
    assert (cached[0] / "train" / "manifest.json").read_text() == manifest
    assert len(list((tmp_path / "cache" / "files").iterdir())) == 1
    gz = tmp_path / "seqs.fasta.gz"
    gz.write_bytes(gzip.compress(fasta.read_bytes()))
    assert _eval_json(tmp_path, [model, "--dataset", str(gz)])["loss"] == pytest.approx(first["loss"], abs=1e-9)
    _fasta(fasta, n=5, seed=1)  # edited: prepared again
    edited = _eval_json(tmp_path, [model, "--dataset", str(fasta)])
    assert edited["tokens"] != first["tokens"] and len(list((tmp_path / "cache" / "files").iterdir())) == 3


def test_eval_csv_file_with_column(tmp_path, monkeypatch):
    monkeypatch.setenv("PLMRUN_CACHE", str(tmp_path / "cache"))
    fasta = _fasta(tmp_path / "seqs.fasta")
    seqs = fasta.read_text().split("\n")[1::2]
    (tmp_path / "seqs.csv").write_text("name,seq\n" + "".join(f"s{i},{s}\n" for i, s in enumerate(seqs)))
    model = str(_saved_model(tmp_path / "m"))
    via_csv = _eval_json(tmp_path, [model, "--dataset", str(tmp_path / "seqs.csv"), "--column", "seq"])
    via_fasta = _eval_json(tmp_path, [model, "--dataset", str(fasta)])
    assert via_csv["loss"] == pytest.approx(via_fasta["loss"], abs=1e-9) and via_csv["tokens"] == via_fasta["tokens"]


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "not_a_dataset",
        "subset",
        "invalid",
        "all_skipped",
        "split_of_file",
        "missing_split",
        "split_dir",
    ],
)
def test_eval_dataset_argument_errors_are_one_line(tmp_path, monkeypatch, capsys, case):
    """Old code: a file or a missing path was read as a dataset directory ('run `plmrun data prepare INPUT
    --out seqs.fasta`', the FASTA as output folder); --subset beyond the split was silently cut."""
    from plmrun.cli import main
    from plmrun.data.prepare import prepare

    monkeypatch.setenv("PLMRUN_CACHE", str(tmp_path / "cache"))
    model = str(_saved_model(tmp_path / "m"))
    fasta = _fasta(tmp_path / "seqs.fasta", n=3)
    (tmp_path / "empty.fasta").write_text("")
    (tmp_path / "bad.fasta").write_text(">a\nMKV1L\n")
    (tmp_path / "notds").mkdir()
    (tmp_path / "notds" / "x.txt").write_text("x")
    if case in ("missing_split", "split_dir"):
        prepare(fasta, tmp_path / "ds", progress=False)
    inputs = (
        "a FASTA/parquet/CSV file, a prepared dataset directory (`plmrun data prepare FILE --out DIR`) or 'bundled'"
    )
    args, message = {
        "missing": (
            ["--dataset", str(tmp_path / "nope.fasta")],
            f"--dataset {tmp_path / 'nope.fasta'}: no such file or directory; give {inputs}",
        ),
        "empty": (
            ["--dataset", str(tmp_path / "empty.fasta")],
            f"{tmp_path / 'empty.fasta'}: empty file (no FASTA records)",
        ),
        "not_a_dataset": (
            ["--dataset", str(tmp_path / "notds")],
            f"--dataset {tmp_path / 'notds'}: a directory but not a prepared dataset (no SPLIT/manifest.json) "
            f"nor a saved Hugging Face dataset; give {inputs}",
        ),
        "subset": (
            ["--dataset", str(fasta), "--subset", "10"],
            f"--subset 10: {fasta} has only 3 sequences; use --subset 3 or 0 (all of them)",
        ),
        "invalid": (
            ["--dataset", str(tmp_path / "bad.fasta")],
            f"{tmp_path / 'bad.fasta'}:2:4: invalid residue '1' in record 'a' "
            "(use --invalid skip or --invalid x to accept such records)",
        ),
        "all_skipped": (
            ["--dataset", str(tmp_path / "bad.fasta"), "--invalid", "skip"],
            f"--dataset {tmp_path / 'bad.fasta'}: no sequences left to evaluate (--invalid skip skipped every "
            "record); use --invalid x to read unknown letters as X",
        ),
        "split_of_file": (
            ["--dataset", str(fasta), "--split", "valid"],
            f"--split valid: {fasta} is one input, evaluated whole (it has no splits); drop --split",
        ),
        "missing_split": (
            ["--dataset", str(tmp_path / "ds")],
            f"--split valid: dataset {tmp_path / 'ds'} has no split 'valid' (it has: train); use --split train",
        ),
        "split_dir": (
            ["--dataset", str(tmp_path / "ds" / "train")],
            f"--dataset {tmp_path / 'ds' / 'train'}: is one split of a prepared dataset; "
            f"use --dataset {tmp_path / 'ds'} --split train",
        ),
    }[case]
    assert main(["eval", model, "--device", "cpu", *args]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def _unigram_reference(counts, source, cfg, subset=0):
    """Unigram CE on the eval targets, computed by scoring a context-free 'model' whose logits are the
    add-one smoothed residue log-frequencies (an independent route through the eval protocol)."""
    from plmrun.model.layers import ModelOutput
    from plmrun.tokenizer import RESIDUE_IDS

    c = np.zeros(33)
    c[RESIDUE_IDS] = np.asarray(counts, dtype=np.float64)[RESIDUE_IDS] + 1
    log_p = torch.full((33,), -1e9, dtype=torch.float64)
    log_p[torch.from_numpy(RESIDUE_IDS)] = torch.log(torch.from_numpy(c[RESIDUE_IDS] / c.sum()))

    class Unigram(torch.nn.Module):
        def forward(self, tokens, positions, cu_seqlens, max_seqlen, logits_index=None):
            return ModelOutput(logits=log_p.expand(len(logits_index), -1))

    return evaluate(Unigram(), source, cfg, subset=subset)["loss"]


def test_unigram_baseline_of_a_model_without_run_uses_the_eval_data(tmp_path, monkeypatch):
    """Old code: no unigram_loss / gain in `plmrun eval` output."""
    from plmrun.data.corpus import file_dataset_dir
    from plmrun.data.shards import open_dataset

    monkeypatch.setenv("PLMRUN_CACHE", str(tmp_path / "cache"))
    fasta = _fasta(tmp_path / "seqs.fasta", n=20)
    got = _eval_json(tmp_path, [str(_saved_model(tmp_path / "m")), "--dataset", str(fasta)])
    src = open_dataset(file_dataset_dir(str(fasta)), "train")
    counts = np.bincount(np.concatenate([src.residues(i) for i in range(len(src))]), minlength=33)
    assert got["unigram_source"] == "eval-data"
    assert got["unigram_loss"] == pytest.approx(_unigram_reference(counts, src, EvalConfig()), abs=1e-6)
    assert got["gain"] == pytest.approx(got["unigram_loss"] - got["loss"], abs=1e-12)


@pytest.mark.slow
def test_trainer_records_training_unigram_and_eval_uses_it(tmp_path, monkeypatch):
    """Old code: runs had no unigram.json, eval records no val_unigram_loss/val_gain."""
    from plmrun.config import build_config
    from plmrun.data.prepare import prepare
    from plmrun.data.shards import open_dataset
    from plmrun.train.trainer import train

    monkeypatch.setenv("PLMRUN_CACHE", str(tmp_path / "cache"))
    prepare(
        _fasta(tmp_path / "train.fa", n=60),
        tmp_path / "ds",
        valid=_fasta(tmp_path / "valid.fa", n=10, seed=3),
        progress=False,
    )
    cfg = build_config(
        None,
        [
            "--model.hidden_size=32",
            "--model.num_layers=2",
            "--model.num_heads=2",
            "--data.token_budget=512",
            "--data.max_length=128",
            "--train.max_steps=2",
            "--train.eval_every=2",
            "--eval.token_budget=2048",
            "--train.precision=fp32",
            "--logging.progress=false",
            "--train.threads=1",
            f"--data.dataset={tmp_path / 'ds'}",
            f"--logging.run_root={tmp_path / 'runs'}",
            "--logging.name=u",
        ],
    )
    summary = train(cfg)
    run = tmp_path / "runs" / "u"
    train_src = open_dataset(tmp_path / "ds", "train")
    counts = np.bincount(np.concatenate([train_src.residues(i) for i in range(len(train_src))]), minlength=33)
    recorded = json.loads((run / "unigram.json").read_text())["counts"]
    assert recorded["L"] == counts[4] and sum(recorded.values()) == counts.sum()
    expected = _unigram_reference(counts, open_dataset(tmp_path / "ds", "valid"), cfg.eval)
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert evals and all(r["val_unigram_loss"] == pytest.approx(expected, abs=1e-6) for r in evals)
    assert all(r["val_gain"] == pytest.approx(r["val_unigram_loss"] - r["val_loss"], abs=1e-12) for r in evals)
    assert summary["final_full_val"]["gain"] == pytest.approx(expected - summary["final_full_val"]["loss"], abs=1e-6)
    got = _eval_json(tmp_path, [str(run), "--dataset", str(tmp_path / "ds")])
    assert got["unigram_source"] == "training-split"
    assert got["unigram_loss"] == pytest.approx(expected, abs=1e-6)
    assert got["loss"] == pytest.approx(summary["final_full_val"]["loss"], abs=1e-6)


def test_random_init_control_with_bootstrap_independent_of_token_budget(tmp_path, monkeypatch, capsys):
    """Old code: --random-init-control did not exist."""
    from plmrun.data.corpus import file_dataset_dir
    from plmrun.data.shards import open_dataset
    from plmrun.eval.inference import load_eval_model

    monkeypatch.setenv("PLMRUN_CACHE", str(tmp_path / "cache"))
    fasta = _fasta(tmp_path / "seqs.fasta", n=30)
    model = str(_saved_model(tmp_path / "m"))
    runs = [
        _eval_json(tmp_path, [model, "--dataset", str(fasta), "--random-init-control", "--token-budget", b])
        for b in ("1024", "2500")
    ]
    assert "model - random init: loss" in capsys.readouterr().out
    a, b = runs
    control = evaluate(
        load_eval_model(model).random_init(0).net, open_dataset(file_dataset_dir(str(fasta)), "train"), EvalConfig()
    )
    assert a["random_init_control"]["loss"] == pytest.approx(control["loss"], abs=1e-6)
    d = a["model_minus_random_init"]["loss"]
    assert d["diff"] == pytest.approx(a["loss"] - control["loss"], abs=1e-6)
    assert d["ci95"][0] <= d["diff"] <= d["ci95"][1] and d["ci95"][0] < d["ci95"][1]
    db = b["model_minus_random_init"]["loss"]
    assert db["diff"] == pytest.approx(d["diff"], abs=1e-6) and db["ci95"] == pytest.approx(d["ci95"], abs=1e-6)
