"""The low-level helpers: collectives (plmrun.dist), atomic writes (plmrun.atomic), the string hash
(plmrun.hashing) and a run's config.yaml from a model path (plmrun.model.loading.run_config_file)."""

import errno
import hashlib
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from plmrun import atomic, dist
from plmrun.hashing import unit_hash
from plmrun.model.loading import run_config_file


# ------------------------------------------------------------------ plmrun.dist
def test_collectives_are_the_identity_in_one_process():
    assert not dist.is_distributed() and dist.get_rank() == 0 and dist.get_world_size() == 1
    t = torch.tensor([3.0, 4.0])
    assert dist.all_reduce_sum(t) is t and t.tolist() == [3.0, 4.0]
    assert dist.max_over_ranks(7) == 7
    assert dist.agree(None) is None and dist.agree("boom") == "boom"
    dist.barrier()


def _two_ranks(rank: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        s = dist.all_reduce_sum(torch.tensor([float(rank + 1)]))
        result = {
            "distributed": dist.is_distributed(),
            "rank": dist.get_rank(),
            "world": dist.get_world_size(),
            "sum": s.item(),
            "max": dist.max_over_ranks(10 * rank + 3),
            "agree": dist.agree("rank 1 failed" if rank == 1 else None),
            "none": dist.agree(None),
        }
        dist.barrier()
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


def test_collectives_over_two_gloo_ranks(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_two_ranks, args=(f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    for rank in (0, 1):
        with open(f"{out}.{rank}") as f:
            r = json.load(f)
        assert r == {
            "distributed": True,
            "rank": rank,
            "world": 2,
            "sum": 3.0,
            "max": 13,
            "agree": "rank 1 failed",
            "none": None,
        }


# ------------------------------------------------------------------ plmrun.atomic
def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_writes_replace_whole_files_and_leave_no_temp(tmp_path):
    path = tmp_path / "a.json"
    atomic.write_json(path, {"x": 1}, indent=1)
    assert path.read_text() == '{\n "x": 1\n}\n'
    atomic.write_text(path, "second")
    atomic.write_bytes(tmp_path / "b.bin", b"\0\1")
    assert path.read_text() == "second" and (tmp_path / "b.bin").read_bytes() == b"\0\1"
    assert _hidden(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(ValueError, match="writer broke"):
        with atomic.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise ValueError("writer broke")
    assert path.read_text() == "old" and _hidden(tmp_path) == []


def test_a_failed_folder_keeps_the_old_folder(tmp_path):
    out = tmp_path / "out"
    with atomic.atomic_dir(out) as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(out) as tmp:
            (tmp / "f").write_text("2")
            raise RuntimeError("x")
    assert (out / "f").read_text() == "1" and _hidden(tmp_path) == []
    with atomic.atomic_dir(out) as tmp:
        (tmp / "g").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["g"] and _hidden(tmp_path) == []


def test_a_dead_writers_temp_is_removed_a_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    host = socket.gethostname()
    dead = tmp_path / f".out.tmp-999999999@{host}-0123abcd"  # no such pid
    live = tmp_path / f".out.tmp-{os.getppid()}@{host}-0123abcd"
    for p in (dead, live):
        p.mkdir()
    assert atomic.remove_stale_siblings(out) == [dead]
    assert _hidden(tmp_path) == [live.name]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_torch_write_errors_become_enospc():
    """/dev/full fails every write with ENOSPC for real: torch's zip writer hides the OSError in a
    RuntimeError; os_error finds it again (safetensors' error: tests/test_disk_full.py, on a tmpfs)."""
    with pytest.raises(RuntimeError) as torch_error:
        torch.save({"a": torch.zeros(1000)}, "/dev/full")
    err = atomic.os_error(torch_error.value, "/where")
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC and err.filename == "/where"
    assert atomic.os_error(RuntimeError("shape mismatch")) is None
    assert atomic.os_error(ValueError("x")) is None
    e = OSError(errno.EROFS, "Read-only file system")
    assert atomic.os_error(e) is e


# ------------------------------------------------------------------ plmrun.hashing
def test_unit_hash_keeps_both_digests_values():
    """Pinned to the formulas it replaced: `data split` (sha256) and probe/finetune splits (blake2b)."""
    for text in ("", "0:UniRef50_A0A000", "superfamily:a.1.1", "valid:MKV" * 50):
        assert (
            unit_hash(text, digest="sha256")
            == int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
        )
        assert unit_hash(text) == int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64
        assert 0.0 <= unit_hash(text) < 1.0
    assert unit_hash("0:rep1", digest="sha256") != unit_hash("0:rep1")
    with pytest.raises(ValueError, match="unknown digest"):
        unit_hash("x", digest="md5")


# ------------------------------------------------------------------ run_config_file
def test_run_config_file_from_run_model_and_checkpoint(tmp_path):
    run = tmp_path / "runs" / "r"
    step = run / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (run / "model").mkdir()
    want = run / "config.yaml"
    assert run_config_file(run) == want
    assert run_config_file(run / "model") == want
    assert run_config_file(step) == want
    copied = tmp_path / "elsewhere" / "step_00000004"  # a checkpoint moved out of its checkpoints/ folder
    copied.mkdir(parents=True)
    (copied / "train_state.json").write_text("{}")
    assert run_config_file(copied) == tmp_path / "config.yaml"
    assert run_config_file(tmp_path / "hf_folder") == tmp_path / "hf_folder" / "config.yaml"
