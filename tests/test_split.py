"""split: real mmseqs2 clustering + leakage search on planted fragments (clustering alone leaks)."""

import json
import shutil

import numpy as np
import pytest

from plmrun.data.errors import DataError
from plmrun.data.readers import read_records
from plmrun.data.split import assign, split

AA = list("ACDEFGHIKLMNPQRSTVWY")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    if shutil.which("mmseqs") is None:
        pytest.fail("mmseqs2 is required (apt-get install mmseqs2)")
    d = tmp_path_factory.mktemp("split")
    rng = np.random.default_rng(1)
    parents = ["".join(rng.choice(AA, size=int(rng.integers(150, 260)))) for _ in range(40)]
    with open(d / "in.fa", "w") as f:
        for i, p in enumerate(parents):
            f.write(f">P{i} parent\n{p}\n")
        for i, p in enumerate(parents):  # 100-residue fragments: < 80% coverage, > 30% of parent
            a = int(rng.integers(0, len(p) - 100))
            f.write(f">F{i} fragment of P{i}\n{p[a : a + 100]}\n")
        f.write(f">D0 duplicate\n{parents[0]}\n")
    report = split(d / "in.fa", d / "out", valid_frac=0.25, test_frac=0.25, threads=2)
    out = {
        s: dict((n.split()[0], q) for n, q, _ in read_records(d / "out" / f"{s}.fasta"))
        for s in ("train", "valid", "test")
    }
    return d, report, out


@pytest.mark.external
def test_no_pair_straddles_train_and_eval(result):
    d, report, out = result
    train = set(out["train"])
    held_out = set(out["valid"]) | set(out["test"])
    for i in range(40):
        pair = {f"P{i}", f"F{i}"}
        assert not (pair & train and pair & held_out), pair
    assert not train & held_out and not set(out["valid"]) & set(out["test"])


@pytest.mark.external
def test_clustering_alone_leaked_and_search_dropped(result):
    d, report, out = result
    dropped = {r["name"].split()[0] for r in report["dropped"]}
    assert len(dropped) >= 3  # the search step removed real leaks
    assert all(r["identity"] >= 0.5 and r["query_coverage"] >= 0.3 for r in report["dropped"])
    kept = set().union(*map(set, out.values()))
    assert kept | dropped == {f"{k}{i}" for k in "PF" for i in range(40)}
    assert not kept & dropped
    assert report["exact_duplicates_removed"] == 1
    for s, c in report["splits"].items():
        assert c["assigned"] - c["kept"] == sum(r["split"] == s for r in report["dropped"])
    assert json.loads((d / "out" / "leakage_report.json").read_text()) == report
    assert "dropped as leaks" in (d / "out" / "leakage_report.txt").read_text()


def test_assignment_is_a_pure_hash():
    names = [f"Q{i}" for i in range(4000)]
    a = [assign(n, 0, 0.1, 0.2) for n in names]
    assert a == [assign(n, 0, 0.1, 0.2) for n in names]
    assert abs(a.count("test") / 4000 - 0.2) < 0.03 and abs(a.count("valid") / 4000 - 0.1) < 0.03
    assert a != [assign(n, 1, 0.1, 0.2) for n in names]


@pytest.mark.external
def test_split_bad_input(tmp_path, result):
    d, *_ = result
    with pytest.raises(DataError, match="output directory already exists"):
        split(d / "in.fa", d / "out")
    with pytest.raises(DataError, match="must be >= 0 and sum to less than 1"):
        split(d / "in.fa", tmp_path / "o", valid_frac=0.6, test_frac=0.5)
    with pytest.raises(DataError, match="--cluster-mode 'fast': must be one of auto, cluster, linclust"):
        split(d / "in.fa", tmp_path / "o", cluster_mode="fast")
    with pytest.raises(DataError, match="--leak-sensitivity 0.5: must be in"):
        split(d / "in.fa", tmp_path / "o", leak_sensitivity=0.5)
    with pytest.raises(DataError, match="mmseqs2 not found"):
        split(d / "in.fa", tmp_path / "o", mmseqs="mmseqs-not-installed")
    (tmp_path / "e.fa").write_text("")
    with pytest.raises(DataError, match="e.fa: empty file"):
        split(tmp_path / "e.fa", tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))


@pytest.mark.external
def test_linclust_above_the_threshold_keeps_the_guarantees(result, tmp_path, monkeypatch):
    """auto switches to easy-linclust above LINCLUST_ABOVE unique sequences; the leakage search
    still runs, so no parent/fragment pair straddles train and held-out data."""
    import plmrun.data.split as split_mod

    d, first, _ = result
    assert first["cluster"]["tool"] == "mmseqs easy-cluster"  # 80 unique: below the threshold
    assert set(first["seconds"]) == {"read", "cluster", "leakage_search", "total"}
    monkeypatch.setattr(split_mod, "LINCLUST_ABOVE", 50)
    report = split(d / "in.fa", tmp_path / "o", valid_frac=0.25, test_frac=0.25, threads=2)
    assert report["cluster"]["tool"] == "mmseqs easy-linclust" and report["cluster"]["mode"] == "auto"
    out = {
        s: {n.split()[0] for n, _, _ in read_records(tmp_path / "o" / f"{s}.fasta")} for s in ("train", "valid", "test")
    }
    held_out = out["valid"] | out["test"]
    for i in range(40):
        pair = {f"P{i}", f"F{i}"}
        assert not (pair & out["train"] and pair & held_out), pair
    dropped = {r["name"].split()[0] for r in report["dropped"]}
    assert set().union(*out.values()) | dropped == {f"{k}{i}" for k in "PF" for i in range(40)}
    forced = split(d / "in.fa", tmp_path / "o2", valid_frac=0.25, test_frac=0.25, threads=2, cluster_mode="cluster")
    assert forced["cluster"]["tool"] == "mmseqs easy-cluster"
