"""No file plmrun reads can run code (issue 25): malicious pickles in a real run's checkpoint and in an ESM C folder.

The attacker's files are real: a pickle whose `__reduce__` writes a marker file, put where torch would
unpickle it (DCP's `.metadata`, a non-tensor DCP entry in a `.distcp` shard, an ESM C `.pth`), and the
folder's MANIFEST.json rewritten with plmrun's own `write_manifest` (a checksum is not a signature).
Each test first shows that plain unpickling of the crafted bytes does write the marker, so a pass
means plmrun refused it, not that the payload was inert. Every command that opens a model or a
checkpoint is run and must print one `error:` line, exit 2, and leave no marker.
"""

import io
import os
import pickle
import shutil
import sys

import pytest
import torch
from test_train import TINY, _plmrun

from plmrun.cli import main
from plmrun.errors import ModelLoadError
from plmrun.manifest import MANIFEST, write_manifest
from plmrun.model.loading import load_model
from plmrun.safe_pickle import UnsafePickleError, read_dcp_metadata

WT = "MKTAYIAKQRQISFVKSHFSRQ"


class Payload:
    """Unpickling this runs os.system: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _proves_payload_runs(data: bytes, marker, load=pickle.loads):
    """The crafted bytes do run code when unpickled without an allow-list (else the test could not fail)."""
    load(data)
    assert marker.exists()
    marker.unlink()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run with two checkpoints, trained by the CLI (bundled corpus)."""
    root = tmp_path_factory.mktemp("sec")
    _plmrun(["train", *TINY, "--train.checkpoint_every=3", "--logging.name=victim"], root)
    return root, root / "runs" / "victim"


def _poison_metadata(ckpt, marker):
    """The real .metadata with a Payload inside it (storage_meta.save_id), manifest rewritten to match."""
    with open(ckpt / ".metadata", "rb") as f:
        meta = pickle.load(f)  # our own, freshly written file
    meta.storage_meta.save_id = Payload(marker)
    data = pickle.dumps(meta)
    _proves_payload_runs(data, marker)
    (ckpt / ".metadata").write_bytes(data)
    write_manifest(ckpt)


def _poison_bytes_entry(ckpt, marker, fqn="optimizers.param_group_names"):
    """A non-tensor DCP entry (read by torch's planner with weights_only=False) pointed at a torch.save'd Payload,
    appended to the shard; the metadata itself stays clean (only allow-listed classes)."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    meta = FileSystemReader(str(ckpt)).read_metadata()
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    blob = buf.getvalue()
    _proves_payload_runs(blob, marker, lambda b: torch.load(io.BytesIO(b), weights_only=False))
    (info,) = [v for k, v in meta.storage_data.items() if k.fqn == fqn]
    shard = ckpt / info.relative_path
    info.offset, info.length = shard.stat().st_size, len(blob)
    with open(shard, "ab") as f:
        f.write(blob)
    meta.storage_meta = None
    (ckpt / ".metadata").write_bytes(pickle.dumps(meta))
    write_manifest(ckpt)


def _one_line_refusal(code, err, marker, *names):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "refused" in lines[0] and all(n in lines[0] for n in names), lines[0]
    assert not marker.exists(), "the payload ran"


def test_dcp_metadata_allow_list_admits_real_checkpoints(run):
    _, victim = run
    for ckpt in sorted((victim / "checkpoints").glob("step_*")):
        meta = read_dcp_metadata(ckpt)
        assert "model.embed.weight" in meta.state_dict_metadata or any(
            k.startswith("model.") for k in meta.state_dict_metadata
        )


def test_malicious_checkpoint_metadata_runs_nothing_in_any_command(run, tmp_path, capsys):
    _, victim = run
    marker = tmp_path / "PWNED"
    bad_run = tmp_path / "runs" / "bad"
    shutil.copytree(victim, bad_run)
    ckpt = max((bad_run / "checkpoints").glob("step_*"))
    _poison_metadata(ckpt, marker)
    with pytest.raises(UnsafePickleError, match=r"names posix\.system|names nt\.system"):
        read_dcp_metadata(ckpt)
    (tmp_path / "wt.fasta").write_text(">wt\n" + WT + "\n")
    (tmp_path / "dms.csv").write_text("mutant,DMS_score\nM1A,0.1\nK2L,0.4\nQ11W,-0.3\nS17P,0.2\nF19Y,0.0\n")
    c = str(ckpt)
    in_process = {
        "eval": ["eval", c, "--subset", "4", "--device", "cpu"],
        "export": ["export", c, "--out", str(tmp_path / "exp")],
        "embed": ["embed", c, str(tmp_path / "wt.fasta"), "--out", str(tmp_path / "e.safetensors"), "--device", "cpu"],
        "probe": ["probe", c, "--seeds", "1", "--max-train", "24", "--max-test", "12", "--device", "cpu"],
        "zeroshot": [
            "zeroshot",
            c,
            "--dms",
            str(tmp_path / "dms.csv"),
            "--wildtype",
            str(tmp_path / "wt.fasta"),
            "--device",
            "cpu",
        ],
        "finetune": ["finetune", c, "--device", "cpu", "--run-root", str(tmp_path / "ft"), "--max-steps", "2"],
    }
    for argv in in_process.values():
        code = main(argv)
        _one_line_refusal(code, capsys.readouterr().err, marker, str(ckpt / ".metadata"))
    # training commands, as the user runs them (a fresh process each)
    proc = _plmrun(["train", *TINY, "--logging.name=init", f"--init-from-hf={c}"], tmp_path, check=False)
    _one_line_refusal(proc.returncode, proc.stderr, marker, str(ckpt / ".metadata"))
    (bad_run / "summary.json").unlink()  # unfinished: --resume reads the latest checkpoint
    proc = _plmrun(["train", "--resume", str(bad_run)], tmp_path, check=False)
    _one_line_refusal(proc.returncode, proc.stderr, marker, str(ckpt / ".metadata"))


def test_malicious_non_tensor_entry_in_a_shard_runs_nothing_on_resume(run, tmp_path):
    _, victim = run
    marker = tmp_path / "PWNED"
    bad_run = tmp_path / "runs" / "bad"
    shutil.copytree(victim, bad_run)
    (bad_run / "summary.json").unlink()
    ckpt = max((bad_run / "checkpoints").glob("step_*"))
    _poison_bytes_entry(ckpt, marker)
    read_dcp_metadata(ckpt)  # the metadata is clean: the payload is in the shard
    proc = _plmrun(["train", "--resume", str(bad_run)], tmp_path, check=False)
    _one_line_refusal(proc.returncode, proc.stderr, marker, "optimizers.param_group_names")


def test_shard_path_outside_the_checkpoint_is_refused(run, tmp_path):
    _, victim = run
    ckpt = tmp_path / "step_00000006"
    shutil.copytree(max((victim / "checkpoints").glob("step_*")), ckpt)
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    meta = FileSystemReader(str(ckpt)).read_metadata()
    next(iter(meta.storage_data.values())).relative_path = "../../etc/passwd"
    (ckpt / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(UnsafePickleError, match="shard path '../../etc/passwd' that is not a file in"):
        read_dcp_metadata(ckpt)


def test_malicious_esmc_pth_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    folder = tmp_path / "esmc"
    (folder / "data" / "weights").mkdir(parents=True)
    pth = folder / "data" / "weights" / "esmc_300m_2024_12_v0.pth"
    buf = io.BytesIO()
    torch.save({"embed.weight": torch.zeros(64, 64), "hook": Payload(marker)}, buf)
    _proves_payload_runs(buf.getvalue(), marker, lambda b: torch.load(io.BytesIO(b), weights_only=False))
    pth.write_bytes(buf.getvalue())
    with pytest.raises(ModelLoadError, match=rf"{pth}: refused: .*GLOBAL"):
        load_model(folder)
    assert not marker.exists()
    (tmp_path / "s.fa").write_text(">a\nMKT\n")
    code = main(
        ["embed", str(folder), str(tmp_path / "s.fa"), "--out", str(tmp_path / "e.safetensors"), "--device", "cpu"]
    )
    _one_line_refusal(code, capsys.readouterr().err, marker, str(pth))
    code = main(["eval", str(folder), "--subset", "4", "--device", "cpu"])
    _one_line_refusal(code, capsys.readouterr().err, marker, str(pth))


def test_allow_list_refuses_any_other_global_even_a_harmless_one():
    """The allow-list is the only way in: a global outside it is refused even when it is harmless."""
    data = pickle.dumps({"a": sys.version_info[:2], "f": print})
    p = io.BytesIO(data)
    from plmrun import safe_pickle

    with pytest.raises(UnsafePickleError, match="builtins.print"):
        safe_pickle.MetadataUnpickler(p, "x").load()


# ---------------------------------------------------------------- a run's own folders need their manifest
def _flip(path, at=-5):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["model", "export", "checkpoint", "model as hf"])
def test_own_folder_without_manifest_and_a_flipped_byte_is_refused(run, tmp_path, capsys, where):
    """Issue 25's repro: MANIFEST.json deleted and one byte flipped used to load silently."""
    _, victim = run
    bad_run = tmp_path / "runs" / "bad"
    shutil.copytree(victim, bad_run)
    if where == "export":
        from plmrun.eval.export import export

        folder = export(bad_run, tmp_path / "exported")
    elif where == "checkpoint":
        folder = max((bad_run / "checkpoints").glob("step_*"))
    else:
        folder = bad_run / "model"
    (folder / MANIFEST).unlink()
    weights = next(folder.glob("*.distcp")) if where == "checkpoint" else folder / "model.safetensors"
    _flip(weights)
    if where == "model as hf":  # config.json dressed up as a foreign ESM folder: still the run's own model/
        import json

        (folder / "config.json").write_text(json.dumps({"model_type": "esm"}))
    with pytest.raises(Exception, match=f"{folder}: no {MANIFEST}"):
        load_model(folder)
    code = main(["eval", str(bad_run if where == "model" else folder), "--subset", "4", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"no {MANIFEST}" in err, err


# ---------------------------------------------------------------- docs/reliability.md counts truthfully
def test_reliability_counts_match_the_rows():
    """The count line of docs/reliability.md is the rows' count: tried = rows, open = rows without a test,
    and each row's last column says whether its fault was real, a real signal, or injected."""
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "reliability.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| case |")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in rows]
    faults = [c[-1] for c in cells]
    assert set(faults) <= {"real", "real signal", "injected"}, [
        r for r, f in zip(rows, faults) if f not in {"real", "real signal", "injected"}
    ][:3]
    n_open = sum(c[-2] == "—" for c in cells)
    want = (
        f"**Tried: {len(rows)}. Handled: {len(rows) - n_open}. Open: {n_open}.** Faults: "
        f"{faults.count('real')} real, {faults.count('real signal')} real signal, {faults.count('injected')} injected."
    )
    line = next(ln for ln in text.splitlines() if ln.startswith("**Tried:"))
    assert line == want, f"docs/reliability.md: the count line should read\n{want}"
    assert re.search(r"only for\s+injected", text)  # the limit of the injected rows stays stated
