"""CLI end to end on the bundled corpus (prepare -> stats -> cat), error lines, bundled cache,
and `data download` through the real Hugging Face cache code path (offline stand-in)."""

import errno
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plmrun.cli import main
from plmrun.data import corpus
from plmrun.data.shards import open_dataset

from helpers import run_cli

CORPUS = Path(corpus.__file__).resolve().parents[1] / "corpus" / "swissprot2014_small"


def cli(*args, env=None):
    return run_cli(["data", *args], env_extra=env, check=False)


def parse_fasta(text):
    out = []
    for line in text.splitlines():
        if line.startswith(">"):
            out.append([line[1:], ""])
        else:
            out[-1][1] += line.strip()
    return [tuple(r) for r in out]


def test_prepare_stats_cat_round_trip(tmp_path):
    ds = tmp_path / "ds"
    r = cli(
        "prepare",
        CORPUS / "valid.fasta.xz",
        "--test",
        CORPUS / "test.fasta.xz",
        "--out",
        ds,
        "--workers",
        "1",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert "train: 1,452 sequences" in r.stdout and "test: 1,409 sequences" in r.stdout
    r = cli("stats", ds, "--max-length", "512", "--token-budget", "4096", "--png-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "[train] 1,452 sequences, 642,862 residues" in r.stdout and "packed (budget 4,096)" in r.stdout
    assert (tmp_path / "lengths_train.png").read_bytes()[:4] == b"\x89PNG"
    for split, name in (("train", "valid"), ("test", "test")):
        out = tmp_path / f"{split}.fa"
        assert cli("cat", ds, "--split", split, "--out", out).returncode == 0
        original = parse_fasta(lzma.open(CORPUS / f"{name}.fasta.xz", "rt").read())
        assert parse_fasta(out.read_text()) == original
    r = cli("cat", ds, "--split", "test", "--limit", "2", "--width", "0")
    assert r.stdout.count(">") == 2 and len(r.stdout.splitlines()) == 4
    manifest = json.loads((ds / "train" / "manifest.json").read_text())
    assert "prepare" in manifest["command"]


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["prepare", "{tmp}/missing.fa", "--out", "{tmp}/o"], "error: {tmp}/missing.fa: no such file"),
        (["prepare", "{tmp}/empty.fa", "--out", "{tmp}/o"], "error: {tmp}/empty.fa: empty file"),
        (["prepare", "{tmp}/empty.fa", "--out", "{tmp}/full"], "error: {tmp}/full: output directory already exists"),
        (["cat", "{tmp}/full", "--split", "train"], "error: {tmp}/full/train/manifest.json: missing"),
        (["stats", "{tmp}/nothing"], "error: {tmp}/nothing: no prepared splits"),
    ],
)
def test_errors_are_one_line(tmp_path, args, pattern, capsys):
    (tmp_path / "empty.fa").write_text("")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["data", *(a.format(tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(pattern.format(tmp=tmp_path)) and err.count("\n") == 1


def test_bundled_cache_concurrent_and_reused(tmp_path):
    code = "from plmrun.data.corpus import bundled_dataset_dir; print(bundled_dataset_dir())"
    env = {**os.environ, "PLMRUN_CACHE": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    dirs = {p.communicate()[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(dirs) == 1
    path = Path(dirs.pop())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary leftovers
    assert path.name == f"swissprot2014_small-{corpus.corpus_fingerprint()}"
    mtime = (path / "train" / "manifest.json").stat().st_mtime_ns
    assert corpus.bundled_dataset_dir(tmp_path) == path
    assert (path / "train" / "manifest.json").stat().st_mtime_ns == mtime
    assert len(open_dataset(path, "train")) == 60000
    assert len(open_dataset(path, "valid")) == 1452 and len(open_dataset(path, "test")) == 1409


def fake_hub_cache(root: Path, repo: str, files: dict) -> None:
    """The Hugging Face cache layout hf_hub_download reads when HF_HUB_OFFLINE=1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = root / f"datasets--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    for name, seqs in files.items():
        path = base / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"sequence": seqs}), path)


def test_download_through_hub_cache(tmp_path):
    pytest.importorskip("huggingface_hub")
    hub = tmp_path / "hub"
    fake_hub_cache(
        hub,
        "Synthyra/omg_prot50",
        {
            "data/train-00000-of-00003.parquet": ["MKV", "LAGW"],
            "data/train-00001-of-00003.parquet": ["MMMM"],
            "data/train-00002-of-00003.parquet": ["WWW"],
            "data/valid-00000-of-00001.parquet": ["ACDE"],
            "data/test-00000-of-00001.parquet": ["KKK"],
        },
    )
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    r = cli(
        "download",
        "omg_prot50",
        "--out",
        tmp_path / "ds",
        "--num-chunks",
        "2",
        "--workers",
        "1",
        "--no-progress",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    train = open_dataset(tmp_path / "ds", "train")
    assert len(train) == 3 and train.lengths.tolist() == [3, 4, 4]
    assert len(open_dataset(tmp_path / "ds", "valid")) == 1
    r = cli("download", "og_prot90", "--out", tmp_path / "ds2", env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: cannot get Synthyra/og_prot90 from the Hugging Face Hub")
    assert "Traceback" not in r.stderr
    r = cli(
        "download",
        "uniref50",
        "--out",
        tmp_path / "ds3",
        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
    )
    assert r.returncode == 2 and "cannot get Synthyra/uniref50" in r.stderr, r.stderr
    r = cli("download", "nothing", "--out", tmp_path / "ds4")
    assert r.returncode == 2 and "unknown dataset 'nothing'" in r.stderr


@pytest.fixture
def bundled_ready(capsys):
    """The bundled corpus prepared beforehand, so stderr holds only the command's own line (on a fresh
    machine the first use prints the preparation's progress)."""
    from plmrun.data.corpus import resolve_dataset

    resolve_dataset("bundled")
    capsys.readouterr()


@pytest.mark.parametrize(
    "case,message",
    [
        ("full", "error: /dev/full: no space left on the device holding it; free space there or choose another --out"),
        (
            "missing",
            "error: {tmp}/no/x.fa: no such file or directory; check the path (and that its parent folder exists)",
        ),
        ("notdir", "error: {tmp}/f/x.fa: a part of the path is a file, not a directory; check the path"),
        ("isdir", "error: {tmp}: is a directory, a file was expected; give a file path"),
    ],
)
def test_real_os_errors_name_the_file_and_the_fix(tmp_path, case, message, capsys, bundled_ready):
    """Real failures, no injection: /dev/full fails every write with ENOSPC."""
    (tmp_path / "f").write_text("x")
    out = {
        "full": "/dev/full",
        "missing": tmp_path / "no" / "x.fa",
        "notdir": tmp_path / "f" / "x.fa",
        "isdir": tmp_path,
    }[case]
    assert main(["data", "cat", "bundled", "--split", "valid", "--out", str(out)]) == 2
    assert capsys.readouterr().err == message.format(tmp=tmp_path) + "\n"


@pytest.mark.parametrize(
    "code,hint",
    [
        (errno.EACCES, "permission denied; fix its permissions or choose another path"),
        (errno.EPERM, "operation not permitted; fix its permissions or choose another path"),
        (errno.EROFS, "read-only file system; choose a path on a writable file system"),
        (errno.ENOSPC, "no space left on the device holding it; free space there or choose another --out"),
        (errno.EIO, "Input/output error"),
    ],
)
def test_injected_os_errors_name_the_file_and_the_fix(tmp_path, code, hint, monkeypatch, capsys, bundled_ready):
    """Errors root cannot trigger for real (permissions, read-only mounts) are injected at the open."""

    def refuse(path, *a, **k):
        raise OSError(code, os.strerror(code), str(path))

    import plmrun.data.cli

    monkeypatch.setattr(plmrun.data.cli, "open", refuse, raising=False)
    out = tmp_path / "x.fa"
    assert main(["data", "cat", "bundled", "--split", "valid", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out}: {hint}\n"
