import csv

import numpy as np
import pytest
import torch
from torch import nn

from plmrun import tokenizer as tok
from plmrun.cli import main
from plmrun.config import ModelConfig
from plmrun.eval import zeroshot as zs
from plmrun.eval.inference import EvalModel
from plmrun.model.layers import ModelOutput
from plmrun.model.loading import save_model_dir
from plmrun.model.registry import build_model

WT = "MKTAYIAKQRQISFVKSHFSRQ"


class SiteTable(nn.Module):
    """A model whose answer is known: at a <mask> the logits are a fixed table over amino acids;
    at any other position it is certain of the token it sees. A scorer that forgets to mask the
    site gets log p(wt) = 0 and log p(mut) = -inf-ish for every variant, and no ranking."""

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.table = nn.Parameter(torch.as_tensor(table, dtype=torch.float32))

    def forward(self, tokens, positions, cu_seqlens, max_seqlen, *, logits_index=None, output_hidden_states=False):
        seen = torch.full((len(tokens), tok.VOCAB_SIZE), -30.0).scatter(1, tokens[:, None], 30.0)
        logits = torch.where((tokens == tok.MASK)[:, None], self.table.expand_as(seen), seen)
        return ModelOutput(logits if logits_index is None else logits[logits_index], None)


def write_dms(path, rows, header=("mutant", "DMS_score")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_parse_mutants():
    assert zs.parse_mutant("A42G") == (zs.Substitution(41, "A", "G"),)
    assert zs.parse_mutant("A42G:L50P", offset=40) == (zs.Substitution(2, "A", "G"), zs.Substitution(10, "L", "P"))
    for bad, msg in (("A42", "cannot parse"), ("A4G:A4C", "same position twice"), ("A42*", "a stop"),
                     ("J42A", "not one of the 20")):
        with pytest.raises(ValueError, match=msg):
            zs.parse_mutant(bad)


def test_known_answer_scores_and_perfect_rank(tmp_path):
    rng = np.random.default_rng(0)
    table = np.full(tok.VOCAB_SIZE, -50.0)
    table[tok.AMINO_ACID_IDS] = rng.normal(size=20)
    logp = torch.log_softmax(torch.tensor(table), 0).numpy()
    vocab = {a: i for i, a in enumerate(tok.VOCAB)}
    rows, expected = [], []
    for k in range(40):
        n = 1 + k % 3
        sites = sorted(rng.choice(len(WT), size=n, replace=False))
        subs = [(WT[i], i + 1, "ACDEFGHIKLMNPQRSTVWY"[rng.integers(20)]) for i in sites]
        expected.append(sum(logp[vocab[m]] - logp[vocab[w]] for w, _, m in subs))
        rows.append([":".join(f"{w}{p}{m}" for w, p, m in subs), 2 * expected[-1] + 1])
    path = write_dms(tmp_path / "dms.csv", rows)
    variants = zs.read_dms(path)
    zs.check_wildtype(variants, WT, path)
    model = EvalModel(SiteTable(table), None, "table", max_length=10)  # windows around each site, too
    scores, rho, n = zs.zeroshot(model, WT, variants, token_budget=30)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert rho == pytest.approx(1.0) and n == 40
    flipped = [zs.Variant(v.line, v.label, v.subs, -v.measured) for v in variants]
    assert zs.zeroshot(model, WT, flipped)[1] == pytest.approx(-1.0)


def test_columns_offset_and_errors_name_the_row(tmp_path):
    path = write_dms(tmp_path / "cols.csv", [["M", 11, "A", 0.5], ["K", 12, "L", ""], ["T", 13, "S", 1.0]],
                     header=("wt", "pos", "mt", "fitness"))
    v = zs.read_dms(path, score_column="fitness", wt_column="wt", pos_column="pos", mut_column="mt", offset=11)
    assert [s.subs[0] for s in v] == [zs.Substitution(0, "M", "A"), zs.Substitution(1, "K", "L"),
                                      zs.Substitution(2, "T", "S")]
    assert np.isnan(v[1].measured) and v[2].line == 4
    zs.check_wildtype(v, WT, path)
    bad = write_dms(tmp_path / "bad.csv", [["M1A", 1.0], ["K2L", 2.0], ["A3G", 3.0]])
    with pytest.raises(ValueError, match=r"bad.csv:4: A3G: the wild type has T at that position, not A"):
        zs.check_wildtype(zs.read_dms(bad), WT, bad)
    far = write_dms(tmp_path / "far.csv", [["M1A", 1.0], ["Q99L", 2.0]])
    with pytest.raises(ValueError, match=r"far.csv:3: Q99L: position outside the wild type"):
        zs.check_wildtype(zs.read_dms(far), WT, far)
    with pytest.raises(ValueError, match=r"junk.csv:3: cannot parse mutant 'M1'"):
        zs.read_dms(write_dms(tmp_path / "junk.csv", [["M1A", 1.0], ["M1", 1.0]]))
    with pytest.raises(ValueError, match="missing column"):
        zs.read_dms(path)


def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2)
    net = build_model(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net, cfg


@torch.no_grad()
def reference_log_probs(net, wt: str, site: int, width: int) -> np.ndarray:
    """One unpacked forward with the window centred on the site, the site masked."""
    start = 0 if len(wt) <= width else min(max(site - width // 2, 0), len(wt) - width)
    t = torch.from_numpy(tok.with_specials(tok.encode(wt[start:start + width])))
    t[1 + site - start] = tok.MASK
    out = net(t, torch.arange(len(t)), torch.tensor([0, len(t)], dtype=torch.int32), len(t))
    return torch.log_softmax(out.logits[1 + site - start], 0).numpy()


@pytest.mark.parametrize("max_length", [1024, 12])
def test_real_model_matches_per_site_forwards(max_length):
    net, cfg = tiny_model()
    model = EvalModel(net, cfg, "tiny", max_length)
    sites = [0, 3, 10, 21]
    got = zs.site_log_probs(model, WT, sites, token_budget=max(40, max_length))
    for i in sites:
        np.testing.assert_allclose(got[i], reference_log_probs(net, WT, i, max_length - 2), atol=1e-5)


def test_cli_end_to_end(tmp_path, capsys):
    net, cfg = tiny_model()
    save_model_dir(tmp_path / "model", net.state_dict(), cfg)
    (tmp_path / "wt.fasta").write_text(">wt\n" + WT + "\n")
    rows = [["M1A", 0.1], ["K2L:T3S", 0.4], ["Q11W", -0.3], ["S17P", 0.2], ["F19Y", 0.0]]
    dms = write_dms(tmp_path / "dms.csv", rows)
    out = tmp_path / "scores.csv"
    assert main(["zeroshot", str(tmp_path / "model"), "--dms", str(dms), "--wildtype", str(tmp_path / "wt.fasta"),
                    "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "Spearman rho =" in printed and "over 5 variants (6 sites scored" in printed
    scored = list(csv.DictReader(open(out)))
    model = EvalModel(net, cfg, "tiny")
    want = zs.score_variants(zs.read_dms(dms), zs.site_log_probs(model, WT, range(len(WT))))
    np.testing.assert_allclose([float(r["score"]) for r in scored], want, atol=1e-5)
    assert main(["zeroshot", str(tmp_path / "model"), "--dms", str(dms), "--wildtype", "MTKAYIAKQRQISFVKSHFSRQ"]) == 2
    assert "dms.csv:3: K2L:T3S: the wild type has T at that position, not K" in capsys.readouterr().err
