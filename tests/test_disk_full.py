"""A real full disk, not an injected OSError: a small tmpfs is mounted and filled, then `data prepare`,
a checkpoint save, an export and an eval's cache write each run out of space. Each must end with one
`error:` line (exit 2, no traceback) and leave the previous state as it was.

Mounting needs root (CI runs as root); elsewhere these tests skip.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from plmrun.cli import main

AA = list("ACDEFGHIKLMNPQRSTVWY")
TINY = [
    "--model.hidden_size=32",
    "--model.num_layers=2",
    "--model.num_heads=2",
    "--data.token_budget=512",
    "--data.max_length=128",
    "--train.max_steps=6",
    "--eval.subset=16",
    "--train.eval_every=3",
    "--eval.token_budget=2048",
    "--eval.final_full=false",
    "--train.precision=fp32",
    "--logging.progress=false",
    "--train.threads=1",
]


@pytest.fixture
def disk(tmp_path):
    """A 16 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt, leave: int) -> None:
    """Take all but about `leave` bytes of the file system's free space (real blocks, not a sparse file)."""
    st = os.statvfs(mnt)
    n = st.f_bavail * st.f_frsize - leave
    with open(mnt / ".filler", "wb") as f:
        while n > 0:
            n -= f.write(b"\0" * min(n, 1 << 20))


def _fasta(path, n, seed):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(f">r{i}\n" + "".join(rng.choice(AA, size=int(rng.integers(50, 400)))) + "\n")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tiny_model(folder):
    from plmrun.config import build_config
    from plmrun.model.loading import save_model_dir
    from plmrun.model.registry import build_model

    cfg = build_config(None, TINY).model
    torch.manual_seed(0)
    save_model_dir(folder, build_model(cfg).state_dict(), cfg)
    return folder


def test_data_prepare_on_a_full_disk_keeps_the_old_dataset(disk, tmp_path, capsys):
    _fasta(tmp_path / "small.fa", 20, 0)
    _fasta(tmp_path / "big.fa", 4000, 1)  # ~900 KB of residues
    out = disk / "ds"
    assert main(["data", "prepare", str(tmp_path / "small.fa"), "--out", str(out), "--no-progress"]) == 0
    before = _tree(out)
    _fill(disk, 200 << 10)
    capsys.readouterr()
    assert main(["data", "prepare", str(tmp_path / "big.fa"), "--out", str(out), "--overwrite", "--no-progress"]) == 2
    assert _one_line(capsys) == (
        f"error: {out}: no space left on the device holding it; free space there or choose another --out\n"
    )
    assert _tree(out) == before
    assert sorted(p.name for p in disk.iterdir()) == [".filler", "ds"]


def test_checkpoint_save_on_a_full_disk_keeps_the_previous_checkpoint(disk, tmp_path, monkeypatch, capsys):
    """Stopped after its step-2 checkpoint, the run resumes on a full disk: the step-4 save fails
    inside torch's zip writer (RuntimeError, no errno) and is still one disk-full line."""
    from plmrun.checkpoint import read_train_state

    monkeypatch.setenv("PLMRUN_CACHE", str(tmp_path.parent / "plmrun-cache"))
    monkeypatch.chdir(disk)
    monkeypatch.setenv("PLMRUN_FAULT", "term@2")
    args = [*TINY, "--train.checkpoint_every=2", "--logging.name=full"]
    assert main(["train", *args]) != 0
    monkeypatch.delenv("PLMRUN_FAULT")
    run = disk / "runs" / "full"
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002"]
    before = _tree(ckpts)
    _fill(disk, 48 << 10)  # room for log lines, not for a checkpoint
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = _one_line(capsys)
    assert "no space left on device while saving the step-4 checkpoint" in err
    assert f"the last complete checkpoint {ckpts / 'step_00000002'} is kept" in err
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002"]
    assert _tree(ckpts) == before and read_train_state(ckpts / "step_00000002")["step"] == 2


@pytest.mark.parametrize("free_kib", [150, 400, 1000])
def test_checkpoint_save_fails_inside_torchs_writer(disk, free_kib):
    """A model whose tensors are large enough for torch's zip writer to hit the full disk itself
    (RuntimeError `[enforce fail at inline_container.cc]`, no errno) at some of these free sizes:
    every one is a CheckpointError line naming the full disk, and the previous checkpoint stays whole."""
    from plmrun import checkpoint as ckpt
    from plmrun.config import build_config
    from plmrun.model.registry import build_model
    from plmrun.optim.build import build_optimizer

    cfg = build_config(None, [*TINY, "--model.hidden_size=128"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opts = build_optimizer(model, cfg.optim, cfg.train.max_steps, ns_dtype=torch.float32)
    for p in model.parameters():
        p.grad = torch.randn(p.shape)
    opts.step()
    state = {"step": 2}
    parts = {
        "model": ckpt.ModelState(model),
        "optimizers": opts,
        "trainer": ckpt.DictState(state),
        "rng": ckpt.RNGState(),
    }
    root = disk / "checkpoints"
    ckpt.save_checkpoint(root, 2, parts, keep_latest_k=3)
    before = _tree(root)
    _fill(disk, free_kib << 10)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.save_checkpoint(root, 4, parts, keep_latest_k=3)
    msg = str(info.value)
    assert "\n" not in msg and "no space left on device while saving the step-4 checkpoint" in msg
    assert f"the last complete checkpoint {root / 'step_00000002'} is kept" in msg
    assert _tree(root) == before


def test_export_on_a_full_disk_keeps_the_old_export(disk, tmp_path, capsys):
    """The weights are the big write: safetensors reports ENOSPC as its own error type."""
    model = _tiny_model(tmp_path / "model")
    out = disk / "export"
    assert main(["export", str(model), "--out", str(out)]) == 0
    before = _tree(out)
    _fill(disk, (model / "model.safetensors").stat().st_size // 2 + (64 << 10))
    capsys.readouterr()
    assert main(["export", str(model), "--out", str(out), "--overwrite"]) == 2
    assert _one_line(capsys) == (
        f"error: {out}: no space left on the device holding it; free space there or choose another --out\n"
    )
    assert _tree(out) == before
    assert sorted(p.name for p in disk.iterdir()) == [".filler", "export"]


def test_eval_cache_on_a_full_disk_names_plmrun_cache(disk, tmp_path, monkeypatch, capsys):
    model = _tiny_model(tmp_path / "model")
    _fasta(tmp_path / "small.fa", 20, 0)
    _fasta(tmp_path / "big.fa", 4000, 1)
    monkeypatch.setenv("PLMRUN_CACHE", str(disk / "cache"))
    assert main(["eval", str(model), "--dataset", str(tmp_path / "small.fa"), "--device", "cpu"]) == 0
    files = disk / "cache" / "files"
    before = _tree(files)
    _fill(disk, 200 << 10)
    capsys.readouterr()
    assert main(["eval", str(model), "--dataset", str(tmp_path / "big.fa"), "--device", "cpu"]) == 2
    err = _one_line(capsys)
    assert (
        err.startswith(f"error: {files}/big.fa-")
        and "no space left on the device holding the plmrun cache "
        "(PLMRUN_CACHE); free space there or set PLMRUN_CACHE to a folder on another disk"
        in err
    )
    assert _tree(files) == before


def test_library_writers_on_a_full_disk_raise_enospc_and_leave_no_temp(disk):
    """torch.save and safetensors inside atomic_path: the OSError(ENOSPC) behind their own error types."""
    import errno

    from safetensors.torch import save_file

    from plmrun.atomic import atomic_path

    (disk / "old.pt").write_bytes(b"old")
    _fill(disk, 16 << 10)
    big = {"a": torch.zeros(100_000)}
    for write in (lambda p: torch.save(big, p), lambda p: save_file(big, str(p))):
        with pytest.raises(OSError) as info:
            with atomic_path(disk / "old.pt") as tmp:
                write(tmp)
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(disk / "old.pt")
        assert (disk / "old.pt").read_bytes() == b"old"
        assert sorted(p.name for p in disk.iterdir()) == [".filler", "old.pt"]
