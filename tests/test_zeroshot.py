import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from plmrun import tokenizer as tok
from plmrun.cli import main
from plmrun.eval import zeroshot as zs
from plmrun.eval.inference import EvalModel
from plmrun.model.config import ModelConfig
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
    for bad, msg in (
        ("A42", "cannot parse"),
        ("A4G:A4C", "same position twice"),
        ("A42*", "a stop"),
        ("J42A", "not one of the 20"),
    ):
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
    path = write_dms(
        tmp_path / "cols.csv",
        [["M", 11, "A", 0.5], ["K", 12, "L", ""], ["T", 13, "S", 1.0]],
        header=("wt", "pos", "mt", "fitness"),
    )
    v = zs.read_dms(path, score_column="fitness", wt_column="wt", pos_column="pos", mut_column="mt", offset=11)
    assert [s.subs[0] for s in v] == [
        zs.Substitution(0, "M", "A"),
        zs.Substitution(1, "K", "L"),
        zs.Substitution(2, "T", "S"),
    ]
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
    with pytest.raises(
        ValueError,
        match=r"--mutant-column 'mutant': no such column; columns: wt, pos, mt, fitness; "
        r"no column looks like mutations .*; for one-letter columns pass --wt-column, --pos-column "
        r"and --mut-column \(letter columns: wt, mt; integer columns: pos\)",
    ):
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
    t = torch.from_numpy(tok.with_specials(tok.encode(wt[start : start + width])))
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
    assert (
        main(
            [
                "zeroshot",
                str(tmp_path / "model"),
                "--dms",
                str(dms),
                "--wildtype",
                str(tmp_path / "wt.fasta"),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "Spearman rho =" in printed and "over 5 variants (6 sites scored" in printed
    scored = list(csv.DictReader(open(out)))
    model = EvalModel(net, cfg, "tiny")
    want = zs.score_variants(zs.read_dms(dms), zs.site_log_probs(model, WT, range(len(WT))))
    np.testing.assert_allclose([float(r["score"]) for r in scored], want, atol=1e-5)
    assert main(["zeroshot", str(tmp_path / "model"), "--dms", str(dms), "--wildtype", "MTKAYIAKQRQISFVKSHFSRQ"]) == 2
    assert "dms.csv:3: K2L:T3S: the wild type has T at that position, not K" in capsys.readouterr().err


# ---------------------------------------------------------------- real-scan tables (issue 15)
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny saved model and the wild type as FASTA, for CLI runs."""
    root = tmp_path_factory.mktemp("zs")
    net, cfg = tiny_model()
    save_model_dir(root / "model", net.state_dict(), cfg)
    (root / "wt.fasta").write_text(">wt\n" + WT + "\n")
    return root, net, cfg


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def known_table():
    table = np.full(tok.VOCAB_SIZE, -50.0)
    table[tok.AMINO_ACID_IDS] = np.random.default_rng(1).normal(size=20)
    return table


# ProteinGym style: one-letter mutants, ':'-joined multi-mutants, plus the rows a raw scan also has.
PROTEINGYM_ROWS = [
    ["M1A", 0.1],
    ["K2L:T3S", 0.4],
    ["Q11W", -0.3],
    ["S17P;F19Y", 0.2],
    ["F19Y", 0.0],
    ["K2*", -1.0],
    ["Q11*", -1.2],
    ["R10X", 0.5],
    ["K2K", 0.0],
    ["K2-", -2.0],
    ["T3del", -2.1],
    ["T3insA", -1.5],
    ["M1A:K2*", -1.1],
    ["*23Q", 0.0],
    ["", 0.3],
]


def test_raw_scan_rows_skipped_with_counts_or_refused_by_strict(tmp_path, saved, capsys):
    path = write_dms(tmp_path / "scan.csv", PROTEINGYM_ROWS)
    v = zs.read_dms(path)
    assert [x.label for x in v] == ["M1A", "K2L:T3S", "Q11W", "S17P;F19Y", "F19Y"]
    assert v[3].subs == (zs.Substitution(16, "S", "P"), zs.Substitution(18, "F", "Y"))
    assert v.skipped == {
        "deletion": 2,
        "insertion": 1,
        "stop_loss": 1,
        "stop": 3,
        "nonstandard": 1,
        "synonymous": 1,
        "unknown": 1,
    }
    root, _, _ = saved
    summary = tmp_path / "summary.json"
    code, out, _ = run_cli(
        capsys,
        "zeroshot",
        str(root / "model"),
        "--dms",
        str(path),
        "--wildtype",
        str(root / "wt.fasta"),
        "--device",
        "cpu",
        "--json",
        str(summary),
    )
    assert code == 0
    assert (
        "skipped: 2 deletions, 1 insertion, 1 wild-type stop, 3 stops, 1 non-standard residue, 1 synonymous, "
        "1 without a protein change"
    ) in out
    assert json.loads(summary.read_text())["skipped"] == v.skipped
    assert json.loads(summary.read_text())["n_variants"] == 5
    code, _, err = run_cli(
        capsys,
        "zeroshot",
        str(root / "model"),
        "--dms",
        str(path),
        "--wildtype",
        str(root / "wt.fasta"),
        "--device",
        "cpu",
        "--strict",
    )
    assert code == 2 and f"{path}:7: 'K2*' is a stop (nonsense); zero-shot scores substitutions only" in err
    assert "drop --strict" in err


MAVEDB_HEADER = ("accession", "hgvs_nt", "hgvs_splice", "hgvs_pro", "score", "sd")
MAVEDB_ROWS = [  # hgvs_pro as MaveDB writes it (three-letter codes), with what it means in one-letter code
    ("p.Met1Ala", "M1A"),
    ("p.[Lys2Leu;Thr3Ser]", "K2L:T3S"),
    ("p.(Gln11Trp)", "Q11W"),
    ("p.Ser17Pro", "S17P"),
    ("p.[Phe19Tyr;Ser20=]", "F19Y"),
    ("p.=", None),
    ("p.[=]", None),
    ("_wt", None),
    ("p.Lys2=", None),
    ("p.Gln11Ter", None),
    ("p.Gln11*", None),
    ("p.Lys2del", None),
    ("p.Lys2_Thr3del", None),
    ("p.Lys2_Thr3insAla", None),
    ("p.Thr3dup", None),
    ("p.Lys2delinsAlaGly", None),
    ("p.Phe19SerfsTer4", None),
    ("p.Ter23Gln", None),
    ("p.Ter23GlnextTer5", None),
    ("NA", None),
    ("p.Met1?", None),
    ("p.Arg10Xaa", None),
]


def test_mavedb_hgvs_protein_notation(tmp_path):
    rows = [[f"urn:mavedb:0001-a-1#{k}", "NA", "NA", h, 0.1 * k, 0.01] for k, (h, _) in enumerate(MAVEDB_ROWS)]
    path = write_dms(tmp_path / "mavedb.csv", rows, header=MAVEDB_HEADER)
    v = zs.read_dms(path, mutant_column="hgvs_pro", score_column="score")
    one_letter = [o for _, o in MAVEDB_ROWS if o]
    assert [tuple(s for s in x.subs) for x in v] == [zs.parse_mutant(o) for o in one_letter]
    assert v.skipped == {
        "deletion": 2,
        "insertion": 3,
        "frameshift": 1,
        "stop_loss": 2,
        "stop": 2,
        "nonstandard": 1,
        "synonymous": 4,
        "unknown": 2,
    }
    model = EvalModel(SiteTable(known_table()), None, "table")
    lp = zs.site_log_probs(model, WT, range(len(WT)))
    want = zs.score_variants(zs.read_dms(write_dms(tmp_path / "pg.csv", [[o, 0] for o in one_letter])), lp)
    np.testing.assert_allclose(zs.score_variants(v, lp), want)
    with pytest.raises(
        ValueError,
        match=r"mavedb.csv: --mutant-column 'mutant': no such column; columns: accession, "
        r"hgvs_nt, hgvs_splice, hgvs_pro, score, sd; mutation-like: hgvs_pro \(pass --mutant-column hgvs_pro\)",
    ):
        zs.read_dms(path, score_column="score")
    with pytest.raises(
        ValueError,
        match=r"--score-column 'DMS_score': no such column; .*numeric: score, sd "
        r"\(pass --score-column NAME\)",
    ):
        zs.read_dms(path, mutant_column="hgvs_pro")


# TEM-1 beta-lactamase (UniProt P62593, 286 residues) in Ambler numbering: 3..290 without 239 and 253.
TEM1 = (
    "MSIQHFRVALIPFFAAFCLPVFAHPETLVKVKDAEDQLGARVGYIELDLNSGKILESFRPEERFPMMSTFKVLLCGAVLSRVDAGQEQLGRRIHYSQND"
    "LVEYSPVTEKHLTDGMTVRELCSAAITMSDNTAANLLLTTIGGPKELTAFLHNMGDHVTRLDRWEPELNEAIPNDERDTTMPAAMATTLRKLLTGELLTL"
    "ASRQQLIDWMEADKVAGPLLRSALPAGWFIADKSGAGERGSRGIIAALGPDGKPSRIVVIYTTGSQATMDERNRQIAEIGASLIKHW"
)
AMBLER = [n for n in range(3, 292) if n not in (239, 253)][: len(TEM1)]


def test_position_map_for_ambler_numbering_and_insertion_codes(tmp_path, saved, capsys):
    ambler = tmp_path / "tem1_ambler.tsv"
    ambler.write_text("ambler\tresidue\n" + "".join(f"{a}\t{i}\n" for i, a in enumerate(AMBLER, 1)))
    pmap = zs.read_position_map(ambler)
    assert AMBLER[-1] == 290 and {TEM1[pmap[str(a)] - 1] for a in (70, 166)} == {"S", "E"}  # Ser70, Glu166
    # well-known TEM-1 substitutions in Ambler numbering: both sides of the 239 and 253 gaps
    rows = [
        ["S70G", -3.0],
        ["E104K", 0.5],
        ["M182T", 0.4],
        ["G238S", 0.8],
        ["E240K", 0.6],
        ["R244S", 0.1],
        ["N276D", 0.2],
        ["K234R", -1.0],
        ["T265M", 0.0],
    ]
    dms = write_dms(tmp_path / "tem1.csv", rows)
    v = zs.read_dms(dms, position_map=pmap)
    zs.check_wildtype(v, TEM1, dms)
    assert [(s.index, s.site) for x in v[3:5] for s in x.subs] == [(235, "238"), (236, "240")]
    with pytest.raises(
        ValueError,
        match=r"tem1.csv:6: E240K: the wild type has R at that position, not E \(site "
        r"240 -> residue 238 with --offset 3\); 4 of 9 rows disagree; the rows fit up to site 238 and "
        r"none after: numbering with gaps \(e.g. Ambler\) needs --position-map FILE",
    ):
        zs.check_wildtype(zs.read_dms(dms, offset=3), TEM1, dms, offset=3)  # 239 is skipped: no offset fits
    (tmp_path / "tem1.fasta").write_text(">tem1\n" + TEM1 + "\n")
    root, _, _ = saved
    code, out, _ = run_cli(
        capsys,
        "zeroshot",
        str(root / "model"),
        "--dms",
        str(dms),
        "--wildtype",
        str(tmp_path / "tem1.fasta"),
        "--position-map",
        str(ambler),
        "--device",
        "cpu",
    )
    assert code == 0 and "over 9 variants (9 sites scored" in out
    with pytest.raises(ValueError, match=r"gap.csv:3: site 239 is not in the --position-map file \(286 sites\)"):
        zs.read_dms(write_dms(tmp_path / "gap.csv", [["G238S", 1.0], ["A239V", 0.0]]), position_map=pmap)
    # insertion codes (Kabat-style 10, 10A, 11): 10A is residue 11 of the wild type
    kabat = {**{str(i): i for i in range(1, 11)}, "10A": 11, **{str(i): i + 1 for i in range(11, 22)}}
    ins = write_dms(tmp_path / "ins.csv", [["Q10AW", 1.0], ["I11S", 0.5], ["R10P", 0.2]])
    v = zs.read_dms(ins, position_map=kabat)
    assert [s for x in v for s in x.subs] == [
        zs.Substitution(10, "Q", "W"),
        zs.Substitution(11, "I", "S"),
        zs.Substitution(9, "R", "P"),
    ]
    zs.check_wildtype(v, WT, ins)
    with pytest.raises(ValueError, match=r"ins.csv:2: site 10A has an insertion code: give --position-map FILE"):
        zs.read_dms(ins)


def test_offset_hint_names_the_offset_that_fits(tmp_path):
    rows = [[f"{WT[i]}{i + 101}W", float(i)] for i in range(0, 20, 2)]  # numbered from 101
    path = write_dms(tmp_path / "shifted.csv", rows)
    with pytest.raises(
        ValueError,
        match=r"shifted.csv:2: M101W: position outside the wild type \(site 101 -> "
        r"residue 101 with --offset 1, length 22\); 10 of 10 rows disagree; --offset 101 matches 10 "
        r"of 10 substitutions",
    ):
        zs.check_wildtype(zs.read_dms(path), WT, path, offset=1)
    zs.check_wildtype(zs.read_dms(path, offset=101), WT, path, offset=101)


def test_mutant_and_score_columns_must_hold_mutations_and_numbers(tmp_path, saved, capsys):
    root, _, _ = saved
    letters = write_dms(
        tmp_path / "letters.csv",
        [["M", 1, "A", 0.1], ["K", 2, "L", 0.4], ["Q", 11, "W", -0.3]],
        header=("wt", "pos", "mutant", "DMS_score"),
    )
    code, _, err = run_cli(capsys, "zeroshot", str(root / "model"), "--dms", str(letters), "--wildtype", WT)
    assert code == 2 and err.strip() == (
        f"error: zeroshot: {letters}: --mutant-column 'mutant' holds 'A', 'L', 'W', not mutations like A42G or "
        "p.Ala42Gly; columns: wt, pos, mutant, DMS_score; no column looks like mutations (A42G, A42G:L50P, "
        "p.Ala42Gly); for one-letter columns pass --wt-column, --pos-column and --mut-column (letter columns: wt, "
        "mutant; integer columns: pos)"
    )
    v = zs.read_dms(letters, wt_column="wt", pos_column="pos", mut_column="mutant")
    assert [x.label for x in v] == ["M1A", "K2L", "Q11W"]
    words = write_dms(
        tmp_path / "words.csv",
        [["M1A", "high", 1.0], ["K2L", "low", 2.0], ["Q11W", "low", 3.0]],
        header=("mutant", "DMS_score", "fitness"),
    )
    with pytest.raises(
        ValueError,
        match=r"--score-column 'DMS_score' holds 'high', 'low', not measured scores "
        r"\(numbers\); columns: mutant, DMS_score, fitness; numeric: fitness",
    ):
        zs.read_dms(words)
    typo = write_dms(tmp_path / "typo.csv", [["M1A", 1.0], ["K2L", "n/a"], ["Q11W", "1,5"]])
    v = zs.read_dms(write_dms(tmp_path / "na.csv", [["M1A", 1.0], ["K2L", "NA"], ["Q11W", ""]]))
    assert np.isnan(v[1].measured) and np.isnan(v[2].measured)
    with pytest.raises(ValueError, match=r"typo.csv:4: DMS_score '1,5' is not a number"):
        zs.read_dms(typo)


def test_bootstrap_interval():
    from plmrun.eval.metrics import bootstrap_interval

    x = np.random.default_rng(0).normal(size=400)
    point, lo, hi = bootstrap_interval(x, np.mean, n=2000, seed=1)
    se = x.std() / np.sqrt(len(x))
    assert point == pytest.approx(x.mean()) and lo < point < hi
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_interval(x, np.mean, n=200, seed=1) == bootstrap_interval(x, np.mean, n=200, seed=1)
    # paired: the same rows of both arrays, so identical arrays differ by exactly 0 in every resample
    assert bootstrap_interval((x, x.copy()), lambda a, b: float(np.mean(a - b)), n=100) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="one non-zero length"):
        bootstrap_interval((x, x[:3]), lambda a, b: 0.0)


def test_random_init_control(tmp_path, saved, capsys):
    root, net, cfg = saved
    dms = write_dms(tmp_path / "dms.csv", PROTEINGYM_ROWS)
    summary = tmp_path / "s.json"
    code, out, _ = run_cli(
        capsys,
        "zeroshot",
        str(root / "model"),
        "--dms",
        str(dms),
        "--wildtype",
        WT,
        "--device",
        "cpu",
        "--random-init-control",
        "--json",
        str(summary),
        "--out",
        str(tmp_path / "scores.csv"),
    )
    assert code == 0
    variants = zs.read_dms(dms)
    model = EvalModel(net, cfg, "tiny")
    _, rho, _ = zs.zeroshot(model, WT, variants)
    c_scores, c_rho, _ = zs.zeroshot(model.random_init(0), WT, variants)
    got = json.loads(summary.read_text())
    assert got["spearman"] == pytest.approx(rho, abs=1e-6)
    assert got["random_init"]["spearman"] == pytest.approx(c_rho, abs=1e-6)
    d = got["random_init"]["model_minus_random_init"]
    assert d["diff"] == pytest.approx(rho - c_rho, abs=1e-6) and d["ci95"][0] <= d["ci95"][1]
    assert (
        f"random init (same architecture, torch seed 0): Spearman rho = {c_rho:.4f}; model - random init = "
        f"{rho - c_rho:+.4f}, 95% CI [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] (paired bootstrap over the 5 "
        "variants, 1000 resamples)"
    ) in out
    scored = list(csv.DictReader(open(tmp_path / "scores.csv")))
    np.testing.assert_allclose([float(r["random_init_score"]) for r in scored], c_scores, atol=1e-5)


def test_embed_random_init_control_writes_a_second_file(tmp_path, saved, capsys):
    from plmrun.eval.embed import embed_sequences, read_embeddings

    root, net, cfg = saved
    fasta = tmp_path / "s.fasta"
    fasta.write_text(">a\nMKTAYIAK\n>b\nQRQISFVKSHF\n")
    out = tmp_path / "emb.safetensors"
    code, printed, _ = run_cli(
        capsys, "embed", str(root / "model"), str(fasta), "--out", str(out), "--device", "cpu", "--random-init-control"
    )
    assert code == 0 and f"wrote {tmp_path / 'emb.random-init.safetensors'} (random-init control" in printed
    control = read_embeddings(tmp_path / "emb.random-init.safetensors")
    want = embed_sequences(EvalModel(net, cfg, "tiny").random_init(0), ["MKTAYIAK", "QRQISFVKSHF"])
    np.testing.assert_allclose(np.stack(list(control.values())), want, atol=1e-5)
    model = read_embeddings(out)
    assert list(model) == ["a", "b"] and not np.allclose(model["a"], control["a"])


@pytest.mark.parametrize(
    "case",
    ["missing", "empty", "header_only", "xlsx", "two_records", "no_wt_file", "map_and_offset", "out_folder", "binary"],
)
def test_zeroshot_argument_errors_are_one_line(tmp_path, saved, capsys, case):
    root, _, _ = saved
    dms = write_dms(tmp_path / "ok.csv", PROTEINGYM_ROWS)
    wt = str(root / "wt.fasta")
    extra = []
    if case == "missing":
        dms, want = tmp_path / "nope.csv", "nope.csv: no such DMS file; check the path"
    elif case == "empty":
        dms = tmp_path / "empty.csv"
        dms.write_text("")
        want = "empty.csv: empty file; expected a header line (e.g. mutant,DMS_score) and one row per variant"
    elif case == "header_only":
        dms = write_dms(tmp_path / "h.csv", [])
        want = "h.csv: a header but no variants (columns: mutant, DMS_score)"
    elif case == "xlsx":
        import zipfile

        dms = tmp_path / "scan.xlsx"
        with zipfile.ZipFile(dms, "w") as z:
            z.writestr("xl/workbook.xml", "<workbook/>")
        want = "scan.xlsx: an Excel workbook or zip archive, not a text table; save the sheet as CSV"
    elif case == "binary":
        dms = tmp_path / "scan.csv"
        dms.write_bytes(b"mutant,DMS_score\n\xff\xfe\x00\x01")
        want = "scan.csv: not a UTF-8 text table; save it as CSV (UTF-8)"
    elif case == "two_records":
        (tmp_path / "two.fasta").write_text(f">wt\n{WT}\n>tag\nMKT\n")
        wt, want = (
            str(tmp_path / "two.fasta"),
            ("two.fasta: expected one wild-type record, found 2 (wt, tag); keep only the scanned protein's record"),
        )
    elif case == "no_wt_file":
        wt, want = str(tmp_path / "wt.fa"), "wt.fa: no such file; give a FASTA file with one record or the sequence"
    elif case == "map_and_offset":
        extra, want = ["--offset", "3", "--position-map", str(dms)], "give --offset or --position-map, not both"
    elif case == "out_folder":
        extra, want = ["--out", str(tmp_path / "no" / "s.csv")], "folder " + str(tmp_path / "no") + " does not exist"
    code, _, err = run_cli(capsys, "zeroshot", str(root / "model"), "--dms", str(dms), "--wildtype", wt, *extra)
    assert code == 2 and err.count("\n") == 1 and want in err


def test_tsv_and_bom_tables_read_like_csv(tmp_path):
    tsv = tmp_path / "scan.csv"  # a TSV saved with a .csv name
    tsv.write_text("mutant\tDMS_score\nM1A\t0.1\nK2L:T3S\t0.4\n")
    bom = tmp_path / "excel.csv"  # Excel's "CSV UTF-8" starts with a byte-order mark
    bom.write_bytes("\ufeffmutant;DMS_score\nM1A;0.1\nK2L:T3S;0.4\n".encode())
    for path in (tsv, bom):
        assert [x.label for x in zs.read_dms(path)] == ["M1A", "K2L:T3S"]


@pytest.mark.parametrize("case", ["table", "out_folder", "layer"])
def test_embed_argument_errors_are_one_line(tmp_path, saved, capsys, case):
    root, _, _ = saved
    fasta = tmp_path / "s.fasta"
    fasta.write_text(">a\nMKTAYIAK\n")
    args, out = [str(fasta)], tmp_path / "e.safetensors"
    if case == "table":
        write_dms(tmp_path / "seqs.csv", [["a", "MKT"]], header=("id", "sequence"))
        args, want = [str(tmp_path / "seqs.csv")], "a table; embed reads FASTA"
    elif case == "out_folder":
        out, want = tmp_path, "is a folder; give a file path such as"
    else:
        args, want = [str(fasta), "--layer", "9"], "--layer 9 out of range: the model has 4 hidden states"
    code, _, err = run_cli(capsys, "embed", str(root / "model"), *args, "--out", str(out), "--device", "cpu")
    assert code == 2 and err.count("\n") == 1 and want in err
    assert not list(tmp_path.glob("*.partial"))  # refused before any work, nothing to clean up


def test_position_map_file_forms(tmp_path):
    (tmp_path / "ws.map").write_text("238 236\n240 237\n100a 5\n")  # whitespace, no header
    assert zs.read_position_map(tmp_path / "ws.map") == {"238": 236, "240": 237, "100A": 5}
    (tmp_path / "bad.map").write_text("site,residue\n1,1\n2,x\n")
    with pytest.raises(ValueError, match=r"bad.map:3: expected two columns, a site label and its 1-based residue"):
        zs.read_position_map(tmp_path / "bad.map")
    (tmp_path / "twice.map").write_text("1,1\n1,2\n")
    with pytest.raises(ValueError, match=r"twice.map:2: site 1 is mapped twice"):
        zs.read_position_map(tmp_path / "twice.map")


@pytest.mark.parametrize(
    "flag,want",
    [
        (
            "--wt-column",
            "--wt-column 'wild': no such column; columns: wt, pos, mt, fitness; one-letter amino-acid columns: wt, mt",
        ),
        ("--pos-column", "--pos-column 'wild': no such column; columns: wt, pos, mt, fitness; integer columns: pos"),
        (
            "--mut-column",
            "--mut-column 'wild': no such column; columns: wt, pos, mt, fitness; one-letter amino-acid columns: wt, mt",
        ),
    ],
)
def test_a_wrong_split_column_names_its_own_flag(tmp_path, saved, capsys, flag, want):
    """Old code: a wrong --pos-column or --wt-column was reported as --mutant-column."""
    root, _, _ = saved
    path = write_dms(
        tmp_path / "cols.csv",
        [["M", 11, "A", 0.5], ["K", 12, "L", 0.1], ["T", 13, "S", 1.0]],
        header=("wt", "pos", "mt", "fitness"),
    )
    cols = {"--wt-column": "wt", "--pos-column": "pos", "--mut-column": "mt", flag: "wild"}
    code, _, err = run_cli(
        capsys,
        "zeroshot",
        str(root / "model"),
        "--dms",
        str(path),
        "--wildtype",
        WT,
        "--score-column",
        "fitness",
        "--offset",
        "11",
        *[x for kv in cols.items() for x in kv],
    )
    assert code == 2 and err.strip() == f"error: zeroshot: {path}: {want}"


def test_a_parquet_scan_reads_like_its_csv(tmp_path):
    """The one table reader (plmrun.data.tables) reads parquet too; before, it was 'not a UTF-8 text table'."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [r for r in PROTEINGYM_ROWS if isinstance(r[1], float)]
    pq.write_table(
        pa.table({"mutant": [m for m, _ in rows], "DMS_score": [s for _, s in rows]}), tmp_path / "scan.parquet"
    )
    got, want = zs.read_dms(tmp_path / "scan.parquet"), zs.read_dms(write_dms(tmp_path / "scan.csv", rows))
    key = lambda vs: [(v.line, v.label, v.subs, v.measured) for v in vs]
    assert key(got) == key(want) and got.skipped == want.skipped and got.skipped
