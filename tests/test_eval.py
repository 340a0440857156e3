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
            part = accumulate(model, list(eval_batches(src, cfg, token_budget=4096, world_size=world, rank=rank)),
                              torch.device("cpu"))
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
    from plmrun.model.esm2 import load_hf_state_dict
    hf_cfg = transformers.EsmConfig(vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, position_embedding_type="rotary", token_dropout=True,
                                    mask_token_id=32, pad_token_id=1, max_position_embeddings=1026,
                                    layer_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = transformers.EsmForMaskedLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "esm")
    src, _ = _setup()
    cfg = EvalConfig()
    via_hf = evaluate(load_eval_model(str(tmp_path / "esm")).net, src, cfg, subset=12)
    ours = build_model(config_from_dict({"model": {
        "arch": "esm2", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "expansion_ratio": 2.0,
        "unet": False, "x0_lambdas": False, "value_embeddings": False, "qk_norm": False, "soft_logit_cap": 0.0,
        "token_dropout": True}}).model).eval()
    load_hf_state_dict(ours, hf.state_dict())
    via_ours = evaluate(ours, src, cfg, subset=12)
    for k, v in via_ours.items():
        assert via_hf[k] == pytest.approx(v, abs=1e-5), k


@pytest.mark.parametrize("flags,message", [
    (["--token-budget", "1000"], "error: --token-budget 1000 is below the eval window of 1024 tokens (--max-length): "
                                 "use --token-budget >= 1024 (results do not depend on it) or a smaller --max-length"),
    (["--max-length", "2"], "error: --max-length 2: must be >= 3 (<cls>, a residue, <eos>)"),
    (["--mask-rate", "1.5"], "error: --mask-rate 1.5: must be in (0, 1), e.g. 0.15 (the ESM-2 protocol)"),
    (["--subset", "-1"], "error: --subset -1: must be >= 0 (0 = the whole split)"),
])
def test_eval_flag_out_of_range_is_one_line(tmp_path, capsys, flags, message):
    """Old code: `--token-budget 1000` ended in a ValueError traceback from the loader."""
    from plmrun.cli import main
    from plmrun.model.loading import save_model_dir
    cfg = config_from_dict({"model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2}}).model
    save_model_dir(tmp_path / "m", build_model(cfg).state_dict(), cfg)
    assert main(["eval", str(tmp_path / "m"), "--device", "cpu", *flags]) == 2
    assert capsys.readouterr().err == message + "\n"
