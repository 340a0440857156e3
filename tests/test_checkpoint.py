"""Checkpoints: one save/load pair over Stateful parts, exact round trip, and every damage refused in one line.

The parts are the real ones (the tiny model of helpers.TINY, its Optimizers, the trainer's counters,
the RNG); gradients are seeded random tensors so the optimizers carry real Muon/AdamW state without
a data pipeline. Disk full is an OSError(ENOSPC) injected where DCP writes a shard, or where the
manifest is renamed into place.
"""

import errno
import json
import os

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs

from plmrun import checkpoint as ckpt
from plmrun.checkpoint import CheckpointError
from plmrun.config import build_config
from plmrun.manifest import MANIFEST, write_manifest
from plmrun.model.registry import build_model
from plmrun.optim.build import build_optimizer

from helpers import TINY, assert_identical
from helpers import run_cli as _plmrun


def _setup(*overrides, seed=0):
    cfg = build_config(None, [*TINY, "--optim.auto_clip_percentile=50", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    opts = build_optimizer(model, cfg.optim, cfg.train.max_steps, ns_dtype=torch.float32)
    state = {"step": 0, "tokens": 0, "data": {"train_fingerprint": "t"}, "best_val_loss": None}
    return model, opts, state


def _steps(model, opts, state, n):
    """n optimizer steps on seeded random gradients; returns the weights after each step."""
    out = []
    for _ in range(n):
        opts.set_step(state["step"])
        g = torch.Generator().manual_seed(1000 + state["step"])
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opts.clip_gradients()
        opts.step()
        opts.zero_grad()
        state["step"] += 1
        state["tokens"] += 100
        out.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
    return out


def _parts(model, opts, state):
    return {
        "model": ckpt.ModelState(model),
        "optimizers": opts,
        "trainer": ckpt.DictState(state),
        "rng": ckpt.RNGState(),
    }


def _saved(tmp_path, *overrides, steps=2):
    """A checkpoint of the tiny model after `steps` steps; returns its directory."""
    model, opts, state = _setup(*overrides)
    _steps(model, opts, state, steps)
    return ckpt.save_checkpoint(tmp_path / "checkpoints", state["step"], _parts(model, opts, state), keep_latest_k=3)


def _refused(path, *overrides, match):
    model, opts, state = _setup(*overrides, seed=5)
    with pytest.raises(CheckpointError, match=match) as info:
        ckpt.load_checkpoint(path, _parts(model, opts, state))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_round_trip_restores_every_part_bitwise(tmp_path):
    model, opts, state = _setup()
    _steps(model, opts, state, 3)
    path = ckpt.save_checkpoint(tmp_path / "checkpoints", 3, _parts(model, opts, state), keep_latest_k=3)
    history = list(opts.grad_norm_history)
    torch.manual_seed(42)
    rng_after_save = torch.rand(3)
    straight = _steps(model, opts, state, 3)

    model2, opts2, state2 = _setup(seed=7)
    torch.manual_seed(0)
    saved = ckpt.load_checkpoint(path, _parts(model2, opts2, state2))
    assert saved["step"] == state2["step"] == 3 and ckpt.read_train_state(path)["tokens"] == 300
    assert opts2.grad_norm_history == history and len(history) == 3 and opts2.schedule_step == 2
    torch.manual_seed(42)
    assert torch.equal(torch.rand(3), rng_after_save)
    resumed = _steps(model2, opts2, state2, 3)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    # the clip history travels inside the optimizers' DCP state, not by hand in the JSON file
    on_disk = json.loads((path / ckpt.STATE_FILE).read_text())
    assert "grad_norm_history" not in json.dumps(on_disk) and set(on_disk) == {"format", "trainer", "rng"}
    assert (path / MANIFEST).is_file() and not list(path.parent.glob(".tmp-*"))


def test_truncated_distcp_is_refused_naming_the_file(tmp_path):
    path = _saved(tmp_path)
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    msg = _refused(path, match="truncated")
    assert str(shard) in msg and "start a new run" in msg


def test_byte_flipped_shard_is_refused_and_names_the_earlier_checkpoint(tmp_path):
    model, opts, state = _setup()
    root = tmp_path / "checkpoints"
    for _ in range(2):
        _steps(model, opts, state, 2)
        path = ckpt.save_checkpoint(root, state["step"], _parts(model, opts, state), keep_latest_k=3)
    shard = next(path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    msg = _refused(path, match="corrupted")
    assert str(shard) in msg and "resume from step_00000002" in msg


@pytest.mark.parametrize("damage", ["truncated", "not json", "no manifest"])
def test_damaged_train_state_is_refused_naming_the_file(tmp_path, damage):
    path = _saved(tmp_path)
    state_file = path / ckpt.STATE_FILE
    if damage == "truncated":
        state_file.write_text(state_file.read_text()[:50])
        match = f"{state_file}.*(truncated|does not match)"
    elif damage == "not json":  # whole per its manifest, yet not JSON (a foreign or buggy writer)
        state_file.write_text('{"format": 2, "trainer": ')
        write_manifest(path)
        match = f"{state_file}: not valid JSON"
    else:  # a checkpoint from before checksums, or a hand-copied folder without its manifest
        (path / MANIFEST).unlink()
        match = f"no {MANIFEST}"
    with pytest.raises(CheckpointError, match=match):
        ckpt.read_train_state(path)
    _refused(path, match=match)


@pytest.mark.parametrize(
    "other, match",
    [
        ("--model.hidden_size=64", r"model\.\S+ has shape \(\d+, 32\) in the checkpoint, \(\d+, 64\) in this model"),
        ("--model.num_layers=3", r"the checkpoint has no model\.blocks\.2\."),
        ("--model.num_layers=1", r"model\.skip_weights has shape \(1,\) in the checkpoint, \(0,\) in this model"),
    ],
)
def test_checkpoint_of_another_model_config_is_refused_before_loading(tmp_path, other, match):
    path = _saved(tmp_path)
    msg = _refused(path, other, "--model.num_heads=2", match=match)
    assert str(path / ".metadata") in msg and "another model config" in msg


def test_checkpoint_with_weights_this_model_lacks_is_refused_naming_the_first(tmp_path):
    path = _saved(tmp_path, "--model.value_embeddings=true")
    msg = _refused(
        path,
        "--model.value_embeddings=false",
        match=r"the checkpoint has model\.value_embeds\.0\.weight, which this model does not",
    )
    assert str(path / ".metadata") in msg


def test_checkpoint_of_another_optimizer_is_refused_by_its_guard(tmp_path):
    path = _saved(tmp_path, "--optim.optimizer=adamw")
    msg = _refused(path, "--optim.optimizer=muon", match="parameter groups")
    assert "[['adamw', 'adamw_no_decay']]" in msg and "'hidden'" in msg


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_shards_leaves_nothing_partial(tmp_path, monkeypatch):
    model, opts, state = _setup()
    root = tmp_path / "checkpoints"
    _steps(model, opts, state, 2)
    ckpt.save_checkpoint(root, 2, _parts(model, opts, state), keep_latest_k=3)
    _steps(model, opts, state, 2)
    monkeypatch.setattr(dcp_fs, "_write_item", _enospc)
    with pytest.raises(CheckpointError, match="no space left on device while saving the step-4 checkpoint") as info:
        ckpt.save_checkpoint(root, 4, _parts(model, opts, state), keep_latest_k=3)
    msg = str(info.value)
    assert "\n" not in msg and "MiB free" in msg and "step_00000002 is kept" in msg
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]
    monkeypatch.undo()
    fresh = _setup(seed=5)
    ckpt.load_checkpoint(root / "step_00000002", _parts(*fresh))  # the previous one still loads
    assert fresh[2]["step"] == 2


def test_disk_full_while_writing_the_manifest_leaves_nothing_partial(tmp_path, monkeypatch):
    model, opts, state = _setup()
    _steps(model, opts, state, 2)
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(MANIFEST):
            _enospc()
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointError, match="no space left.*no earlier checkpoint exists"):
        ckpt.save_checkpoint(tmp_path / "checkpoints", 2, _parts(model, opts, state), keep_latest_k=3)
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") is None


def test_next_save_removes_leftover_temp_folders(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000004").mkdir(parents=True)  # a save killed (or out of disk) in an earlier run
    (root / ".tmp-step_00000004" / "__0_0.distcp").write_bytes(b"x" * 10)
    path = _saved(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == [path.name]


@pytest.mark.slow
def test_resume_into_another_model_config_is_one_cli_line(tmp_path):
    """A run's config.yaml edited to a wider model after its checkpoint: --resume refuses with one line."""
    args = [*TINY, "--train.checkpoint_every=2", "--logging.name=edited"]
    _plmrun(["train", *args], tmp_path, env_extra={"PLMRUN_FAULT": "term@2"}, check=False)
    run = tmp_path / "runs" / "edited"
    assert (run / "checkpoints" / "step_00000002" / MANIFEST).is_file()
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("hidden_size: 32", "hidden_size: 64"))
    proc = _plmrun(["train", "--resume", str(run)], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {run / 'checkpoints' / 'step_00000002' / '.metadata'}: ")
    assert "in this model (the checkpoint is from another model config" in proc.stderr


@pytest.mark.slow
def test_disk_full_during_training_is_one_cli_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """ENOSPC at the step-4 save of a real run: exit 2, one line, step 2 kept whole, no temp folder left."""
    from plmrun.cli import main

    real = dcp_fs._write_item

    def write_item(*args, **kwargs):
        if (tmp_path / "runs" / "full" / "checkpoints" / "step_00000002").exists():
            _enospc()
        return real(*args, **kwargs)

    monkeypatch.setattr(dcp_fs, "_write_item", write_item)
    monkeypatch.setenv("PLMRUN_CACHE", str(tmp_path.parent / "plmrun-cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "--train.checkpoint_every=2", "--logging.name=full"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "no space left on device" in err
    ckpts = tmp_path / "runs" / "full" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002"]
    assert ckpt.read_train_state(ckpts / "step_00000002")["step"] == 2


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_fsdp2_sharded_checkpoint_resumes_bitwise(tmp_path, torchrun):
    """FSDP2 on 2 ranks: SIGTERM after step 3 saves sharded (DTensor) model and optimizer state; the resumed run
    ends bitwise equal to the uninterrupted one, and the manifest lists every rank's shard."""
    args = ["train", *TINY, "--dist.strategy=fsdp", "--train.checkpoint_every=2"]
    torchrun([*args, "--logging.name=straight"])
    torchrun([*args, "--logging.name=termed"], {"PLMRUN_FAULT": "term@3:1"}, check=False)
    run = tmp_path / "runs" / "termed"
    manifest = json.loads((run / "checkpoints" / "step_00000003" / MANIFEST).read_text())
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", ckpt.STATE_FILE} <= set(manifest["files"])
    torchrun(["train", "--resume", str(run)])
    assert_identical(tmp_path / "runs" / "straight", run)


def test_checkpoint_weights_for_eval_are_verified_too(tmp_path):
    """`plmrun eval/export CHECKPOINT` reads the "model" entry through model/loading.py: a flipped byte is refused."""
    from plmrun.model.loading import load_checkpoint_weights

    path = _saved(tmp_path)
    model, _, _ = _setup(seed=5)
    load_checkpoint_weights(path, model)
    shard = next(path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard}: contents do not match"):
        load_checkpoint_weights(path, model)
