"""Faults of a training run: divergence, endless spike skipping, restarts and reruns that must continue
their own run, a failed early run, --resume on runs it cannot continue, and a run that is still alive.

Every run is the tiny model of helpers.TINY with grad_accum 2, so one process equals 2 torchrun ranks.
"""

import json
import re
from pathlib import Path

import pytest

from plmrun.cli import main
from plmrun.config import ConfigError, build_config
from plmrun.train.rundir import RunDirError, RunLock, prepare_run_dir
from plmrun.train.trainer import TrainingError, train

from helpers import TINY, run_torchrun
from helpers import series as _series
from helpers import weights as _weights

pytestmark = pytest.mark.slow  # every test shares a module run (`work`) or trains

REF = [*TINY, "--train.grad_accum=2"]
# embeddings, head and scalars at lr 1000: the loss leaves ln 33 after step 1 and never comes back
DIVERGING = ["--optim.lr_hidden=1e6", "--optim.lr_embed=1e3", "--optim.lr_head=1e3", "--optim.lr_scalar=1e3"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A shared directory (and data cache) with one uninterrupted reference run, checkpoint_every=0."""
    tmp = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLMRUN_CACHE", str(tmp / "cache"))
        mp.chdir(tmp)
        train(build_config(None, [*REF, "--logging.run_root=ref", "--logging.name=straight"]))
    return tmp


@pytest.fixture
def here(work, monkeypatch):
    monkeypatch.setenv("PLMRUN_CACHE", str(work / "cache"))
    monkeypatch.chdir(work)
    monkeypatch.delenv("PLMRUN_FAULT", raising=False)
    return work


def _cfg(root, *extra):
    return build_config(None, [*REF, f"--logging.run_root={root}", *extra])


def _runs(root):
    return sorted(p.name for p in (root).iterdir() if p.is_dir())


def test_diverging_run_stops_with_step_loss_and_learning_rates(here, capsys):
    """lr 1000: loss ~15 from step 2 on. Old code: trains on to val ~15 and exits 0 with a summary."""
    code = main(
        ["train", *REF, *DIVERGING, "--train.divergence_steps=3", "--logging.run_root=div", "--logging.name=div"]
    )
    *warnings, err = capsys.readouterr().err.splitlines()  # the spike warnings (loss_spike=warn), then one line
    assert code == 2 and all(w.startswith("warning: step") for w in warnings), err
    assert re.match(
        r"error: step 4: training diverged: train loss \d+\.\d+ above 6\.99 \(2 × ln 33, uniform guessing\)"
        r" for 3 steps in a row; the learning rate is likely too high \(optim.lr_hidden=1e\+06, lr_embed=1000,",
        err,
    ), err
    assert "train.divergence_factor=0 turns this check off" in err and "no checkpoint was saved yet" in err
    run = here / "div" / "div"
    assert not (run / "summary.json").exists()
    losses = [r[3] for r in _series(run) if r[0] == "train"]
    assert len(losses) == 3 and losses[0] < 7 < min(losses[1:])  # step 4 stopped before its line
    # train.divergence_factor=0: the check is off and the run ends as before
    summary = train(_cfg("div", *DIVERGING, "--train.divergence_factor=0", "--logging.name=unchecked"))
    assert summary["steps"] == 6 and summary["final_val"]["loss"] > 7


def test_eval_loss_above_unigram_stops_the_run_naming_the_learning_rates(here, capsys):
    """Muon at lr_hidden=1e6: the train loss stays near ln 33, below the divergence_factor threshold, and the val
    loss ~0.58 nats above the unigram baseline. Old code: exit 0 with a finished-looking summary."""
    muon = [*TINY, "--optim.lr_hidden=1e6", "--train.max_steps=16", "--train.eval_every=4", "--logging.run_root=muon"]
    code = main(["train", *muon, "--logging.name=stopped"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and re.match(
        r"error: step 12: training diverged: val loss 3\.\d+ is 0\.\d\d nats above the unigram baseline 2\.\d+ "
        r"\(train.divergence_margin=0.25\); the learning rate is likely too high \(optim.lr_hidden=1e\+06, lr_embed=",
        err,
    ), err
    assert "train.divergence_margin=0 turns this check off" in err
    run = here / "muon" / "stopped"
    assert not (run / "summary.json").exists()
    assert [r[1] for r in _series(run) if r[0] == "eval"] == [4, 8, 12]  # evals before step 10 are not judged
    # nor is the last step's: that run is over (the spike test's run ends 4.8 nats above unigram, with a warning)
    # margin 0: the run finishes, and its summary says it is worse than the unigram baseline
    summary = train(build_config(None, [*muon, "--train.divergence_margin=0", "--logging.name=finished"]))
    assert summary["steps"] == 16 and summary["worse_than_unigram"] is True and summary["gain_over_unigram"] < -0.5
    saved = json.loads((here / "muon" / "finished" / "summary.json").read_text())
    assert saved["worse_than_unigram"] is True
    assert "warning: the final val loss" in capsys.readouterr().out


def test_a_spike_that_comes_back_down_does_not_stop_the_run(here):
    """lr 10 (one process, no accumulation): the loss jumps to ~36 at step 2 and is back below 7 by step 5."""
    lr = [
        "--optim.lr_embed=10",
        "--optim.lr_head=10",
        "--optim.lr_scalar=10",
        "--train.max_steps=12",
        "--train.eval_every=0",
        "--logging.name=spike",
    ]
    summary = train(build_config(None, [*TINY, "--logging.run_root=spike", *lr]))
    losses = [r[3] for r in _series(here / "spike" / "spike") if r[0] == "train"]
    assert summary["steps"] == 12 and max(losses) > 14 and losses[-1] < 4
    assert summary["worse_than_unigram"] is True  # its one eval, at the last step, is not judged, but flagged


def test_skip_stops_after_max_skips_in_a_row(here):
    """A level shift is not a spike: old code skipped every later update (5 of 6 here) and finished."""
    spiky = [
        "--optim.lr_embed=0.5",
        "--optim.lr_head=0.5",
        "--optim.lr_scalar=0.5",
        "--optim.schedule=constant",
        "--train.loss_spike_factor=1.2",
        "--train.loss_spike_window=2",
        "--train.eval_every=0",
        "--train.loss_spike=skip",
        "--train.loss_spike_max_skips=3",
        "--logging.name=skip",
    ]
    with pytest.raises(
        TrainingError,
        match=r"^step 4: loss spike .*: 3 updates in a row skipped \(train.loss_spike_"
        r"max_skips=3\), so the loss has shifted, not spiked; lower the learning "
        r"rate \(optim.lr_\*\)",
    ):
        train(_cfg("skip", *spiky))


def test_new_keys_are_validated():
    for key, bad, msg in (
        ("loss_spike_max_skips", "0", "must be >= 1"),
        ("divergence_steps", "0", "must be >= 1"),
        ("divergence_factor", "0.5", "must be 0 (off) or > 1"),
        ("divergence_margin", "-0.1", "must be >= 0 nats (0 = off)"),
    ):
        with pytest.raises(ConfigError, match=re.escape(f"train.{key} {msg}")):
            build_config(None, [f"--train.{key}={bad}"])


def test_rerun_continues_the_unfinished_run_with_the_same_config(here, monkeypatch, capsys):
    """SIGTERM at step 3, then the same command again (no --logging.name): it continues that run, bit for bit.
    Old code: a second timestamped run from step 0."""
    monkeypatch.setenv("PLMRUN_FAULT", "term@3")
    stopped = train(_cfg("again"))
    assert stopped["stopped"] == "signal 15" and stopped["exit_code"] == 143
    monkeypatch.delenv("PLMRUN_FAULT")
    summary = train(_cfg("again"))
    out = capsys.readouterr().out
    (name,) = _runs(here / "again")
    assert (
        f"continuing unfinished run again/{name} (same config) from step 3; pass --logging.name NEW to start a "
        "separate run"
    ) in out and "resumed at step 3" in out
    assert summary["steps"] == 6 and _series(here / "again" / name) == _series(here / "ref" / "straight")


def test_rerun_from_another_init_source_is_a_separate_run(here, monkeypatch):
    """--init-from-hf is part of a run's identity: an unfinished random-init run is not continued by the same
    config started from a model folder (old code: the weights of the folder were silently ignored), and the
    random-init rerun still continues its own run."""
    source = here / "ref" / "straight" / "model"
    monkeypatch.setenv("PLMRUN_FAULT", "term@2")
    train(_cfg("init"))
    monkeypatch.delenv("PLMRUN_FAULT")
    (plain,) = _runs(here / "init")
    summary = train(_cfg("init"), init_from_hf=str(source))
    assert summary["steps"] == 6 and summary["run_dir"] != str(Path("init") / plain)
    started = next(n for n in _runs(here / "init") if n != plain)
    assert (here / "init" / started / "init_from.txt").read_text().strip() == str(source.resolve())
    assert not (here / "init" / plain / "summary.json").exists()
    again = train(_cfg("init"))
    assert again["run_dir"] == str(Path("init") / plain) and again["steps"] == 6


def test_crash_before_the_first_checkpoint_continues_in_the_same_dir(here, monkeypatch, capsys):
    """NaN at step 2 with checkpoint_every=0: the message names no checkpoint folder (old: 'kept in
    RUN/checkpoints', which did not exist); the rerun continues that directory from step 0, no duplicate lines."""
    monkeypatch.setenv("PLMRUN_FAULT", "nan@1")
    with pytest.raises(TrainingError) as e:
        train(_cfg("early"))
    (name,) = _runs(here / "early")
    assert str(e.value).startswith("step 2: non-finite loss from rank 0")
    assert str(e.value).endswith(
        "no checkpoint was saved yet (train.checkpoint_every=0), so a rerun starts from step 0"
    )
    assert not (here / "early" / name / "checkpoints").exists()
    monkeypatch.delenv("PLMRUN_FAULT")
    train(_cfg("early"))
    assert f"continuing unfinished run early/{name} (same config) from step 0" in capsys.readouterr().out
    assert _runs(here / "early") == [name]
    assert _series(here / "early" / name) == _series(here / "ref" / "straight")


def test_named_run_that_died_early_is_replaced_by_another_config(here, monkeypatch, capsys):
    """Old code: 'exists with a different config' forever, for a run that never saved anything."""
    monkeypatch.setenv("PLMRUN_FAULT", "nan@1")
    with pytest.raises(TrainingError):
        train(_cfg("named", "--logging.name=exp", "--train.max_steps=3"))
    monkeypatch.delenv("PLMRUN_FAULT")
    summary = train(_cfg("named", "--logging.name=exp", "--train.max_steps=3", "--train.seed=1"))
    out = capsys.readouterr().out
    assert (
        "replacing named/exp: it has another config or --init-from-hf source and stopped before its first checkpoint"
    ) in out
    assert summary["steps"] == 3 and "seed: 1" in (here / "named" / "exp" / "config.yaml").read_text()
    # a finished run is never replaced
    with pytest.raises(RunDirError, match="already finished"):
        train(_cfg("named", "--logging.name=exp", "--train.max_steps=3"))


def test_last_step_is_checkpointed_with_checkpoint_every_0(here):
    """The option text promises 'only at the end and on SIGTERM'; old code saved nothing at the end."""
    ckpts = here / "ref" / "straight" / "checkpoints"
    assert [p.name for p in ckpts.glob("step_*")] == ["step_00000006"]


def test_resume_refuses_a_finished_run_and_one_without_checkpoint(here, capsys):
    """Old code: both retrained from step 0, exit 0, appending metrics and rewriting summary.json."""
    finished = here / "ref" / "straight"
    before = (finished / "metrics.jsonl").read_text()
    assert main(["train", "--resume", str(finished)]) == 2
    assert capsys.readouterr().err == f"error: {finished} finished at step 6 (summary.json); nothing to resume\n"
    assert (finished / "metrics.jsonl").read_text() == before
    fresh, _ = prepare_run_dir(_cfg(here / "nockpt"), "fresh", resume=False)  # what a run leaves before step 1
    assert main(["train", "--resume", str(fresh)]) == 2
    assert capsys.readouterr().err == (
        f"error: {fresh} has no checkpoint yet; rerun the command that started it "
        "without --resume to continue it (from step 0)\n"
    )
    assert not (fresh / "metrics.jsonl").exists()


def test_a_finished_run_is_extended_to_more_steps(here, capsys):
    """--resume RUN --train.max_steps=9 continues a finished 6-step run from its step-6 checkpoint, records the
    change, and follows the LR schedule over the new max_steps. With a constant schedule the extended run is
    the 9-step run, bit for bit. Old code: every override of --resume refused."""
    flat = [*TINY, "--optim.schedule=constant", "--logging.run_root=ext"]
    train(build_config(None, [*flat, "--train.max_steps=9", "--logging.name=nine"]))
    train(build_config(None, [*flat, "--logging.name=six"]))
    six = here / "ext" / "six"
    assert main(["train", "--resume", str(six), "--train.max_steps=9"]) == 0
    assert _series(six) == _series(here / "ext" / "nine")
    assert all((a == b).all() for a, b in zip(_weights(six).values(), _weights(here / "ext" / "nine").values()))
    assert json.loads((six / "summary.json").read_text())["steps"] == 9
    assert json.loads((six / "summary.step_00000006.json").read_text())["steps"] == 6
    history = [json.loads(line) for line in (six / "config_history.jsonl").read_text().splitlines()]
    assert [(h["step"], h["changes"]) for h in history] == [(6, {"train.max_steps": [6, 9]})]
    assert build_config(str(six / "config.yaml")).train.max_steps == 9
    # wsd: the extension's LR follows the schedule of a 9-step run from step 6 on (so it rises again)
    from plmrun.optim.schedule import lr_multiplier

    wsd = here / "ext" / "wsd"
    train(build_config(None, [*TINY, "--logging.run_root=ext", "--logging.name=wsd"]))
    assert main(["train", "--resume", str(wsd), "--train.max_steps=9"]) == 0
    lr = [
        r["lr_mult"] for r in map(json.loads, (wsd / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"
    ]
    optim = build_config(None, TINY).optim
    assert lr[:6] == [lr_multiplier(s, optim, 6) for s in range(6)] and lr[5] < 1
    assert lr[6:] == [lr_multiplier(s, optim, 9) for s in range(6, 9)] and lr[6] > lr[5]
    capsys.readouterr()
    # anything but the keys an extension may change is refused, and so is lowering max_steps
    before = (six / "config.yaml").read_text()
    assert main(["train", "--resume", str(six), "--train.max_steps=12", "--train.seed=3"]) == 2
    assert capsys.readouterr().err == (
        "error: --resume: --train.seed would change what the run computes; a resume may "
        "change only train.max_steps, train.max_time, logging.progress (start a new "
        "run for other settings)\n"
    )
    assert main(["train", "--resume", str(six), "--train.max_steps=8"]) == 2
    assert "train.max_steps 8 is below the run's 9; an extension may only raise it" in capsys.readouterr().err
    assert (six / "config.yaml").read_text() == before and len(
        (six / "config_history.jsonl").read_text().splitlines()
    ) == 1


def test_a_run_that_is_still_training_is_neither_continued_nor_reused(here):
    """The lock rank 0 holds while training: a same-config rerun starts its own run; the same name is refused."""
    live, _ = prepare_run_dir(_cfg(here / "live"), "live", resume=False)
    lock = RunLock(live)
    try:
        with pytest.raises(RunDirError, match="another process is training this run right now"):
            train(_cfg(here / "live", "--logging.name=live"))
        summary = train(_cfg(here / "live"))
        assert summary["run_dir"] != str(live) and not (live / "metrics.jsonl").exists()
    finally:
        lock.release()


def test_torchrun_restart_continues_its_own_run(here):
    """torchrun --max-restarts=1, rank 1 SIGKILLed after step 3, no --logging.name: the restart continues the
    first attempt's directory (old code: a second run from step 0) and ends identical to the uninterrupted run."""
    proc = run_torchrun(
        ["train", *TINY, "--train.checkpoint_every=2", "--dist.strategy=ddp", "--logging.run_root=restart"],
        here,
        {"PLMRUN_FAULT": "kill@3:1", "PLMRUN_FAULT_ONCE": str(here / "restart.once")},
        launcher=("--standalone", "--nproc_per_node=2", "--max-restarts=1"),
    )
    (name,) = _runs(here / "restart")
    assert (here / "restart.once").exists()
    assert f"continuing unfinished run restart/{name} (same config) from step 2" in proc.stdout
    assert _series(here / "restart" / name) == _series(here / "ref" / "straight")
    wa, wb = _weights(here / "restart" / name), _weights(here / "ref" / "straight")
    assert all((wa[k] == wb[k]).all() for k in wa)
