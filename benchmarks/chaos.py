"""Kill anywhere, lose nothing: SIGKILL a tiny training run at random moments and resume it each time.

    python benchmarks/chaos.py [--kills 20] [--seed 0] [--steps 160] [--checkpoint-every 4]
        [--timeout 1200] [--out benchmarks/results/chaos] [--workdir DIR]

First an uninterrupted reference run, then the same config killed (SIGKILL, nothing to catch) N times
and restarted each time with `plmrun train --resume RUN` (or, killed before its first checkpoint, with
the original command, which continues the same run directory). Each kill lands at one of:

- `startup`: a random moment between launch and the first step (imports, data, checkpoint loading);
- `step`: a random moment after a random training step ahead of the last checkpoint;
- `in-save`: the moment a checkpoint's `.tmp-step_*` folder appears (polled from outside: DCP shards
  half written), or a random 0-5 ms later;
- `killsave`: plmrun's own PLMRUN_FAULT=killsave@STEP hook (shards written, rename not done);
- `final`: the moment the final model/ folder appears after the last step, or a random 0-50 ms later
  (model save, summary, plots); a run killed after its summary.json is finished and is not restarted.

After every kill the metric lines the run has written so far must be a prefix of the reference's, and
the restart must not fail; at the end the final weights (model/model.safetensors) and the whole
metrics.jsonl series (every field except timings: *_s, tok_per_s, mfu) must be bitwise equal to the
reference's. Writes OUT.json (every kill) and OUT.md (the table), and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import RESULTS, write_report  # noqa: E402

KINDS = ("step", "in-save", "killsave", "startup", "step", "in-save")  # cycled, then shuffled; `final` is last
POLL_S = 0.0005
TIMING_KEYS = ("tok_per_s", "mfu")  # and every key ending in _s: wall-clock, not part of the series


def train_args(steps: int, checkpoint_every: int) -> list[str]:
    """The tiny run of tests/test_train.py's TINY, longer and checkpointing often."""
    return [
        "--model.hidden_size=32",
        "--model.num_layers=2",
        "--model.num_heads=2",
        "--data.token_budget=512",
        "--data.max_length=128",
        f"--train.max_steps={steps}",
        f"--train.eval_every={max(1, steps // 8)}",
        "--eval.subset=16",
        "--eval.token_budget=2048",
        "--eval.final_full=false",
        "--train.precision=fp32",
        "--logging.progress=false",
        "--train.log_every=1",
        "--train.threads=1",
        "--masking.mask_rate=0.15",
        "--masking.mask_token_frac=0.8",
        "--masking.random_token_frac=0.1",
        f"--train.checkpoint_every={checkpoint_every}",
    ]


def series(run: Path) -> list[dict]:
    """metrics.jsonl's complete lines without wall-clock fields (a line cut by a kill is not complete)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")[:-1]  # the part after the last newline is unfinished (or empty)
    return [
        {k: v for k, v in json.loads(line).items() if not k.endswith("_s") and k not in TIMING_KEYS}
        for line in lines
        if line.strip()
    ]


def differing_keys(a: list[dict], b: list[dict]) -> dict:
    """{key: lines on which it differs} between two series of the same length."""
    out: dict = {}
    for x, y in zip(a, b):
        for key in set(x) | set(y):
            if x.get(key) != y.get(key):
                out[key] = out.get(key, 0) + 1
    return out


def last_step(run: Path) -> int:
    s = series(run)
    return s[-1]["step"] if s else 0


def checkpoint_step(run: Path) -> int:
    """Step of the newest complete checkpoint (0 without one)."""
    root = run / "checkpoints"
    done = (
        [int(p.name.split("_")[1]) for p in root.glob("step_*") if (p / "train_state.json").is_file()]
        if root.is_dir()
        else []
    )
    return max(done, default=0)


def weights_equal(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    if not (a.is_file() and b.is_file()):
        return False
    wa, wb = load_file(a), load_file(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@dataclass
class Kill:
    n: int
    kind: str
    target: str  # what it waited for: a delay, a step, a checkpoint
    resumed_from: int  # checkpoint step the attempt started from (0: fresh)
    reached_step: int = 0  # last complete metric line's step when killed
    killed: bool = False  # the process died by SIGKILL (not on its own)
    prefix_ok: bool = False  # the metric lines so far are a prefix of the reference's
    restart_ok: bool = False  # the next attempt started from a checkpoint without an error
    seconds: float = 0.0
    note: str = ""


@dataclass
class Chaos:
    workdir: Path
    steps: int
    checkpoint_every: int
    deadline: float
    env: dict = field(default_factory=dict)

    @property
    def args(self) -> list[str]:
        return train_args(self.steps, self.checkpoint_every)

    def launch(self, name: str, resume: bool, extra_env: dict | None = None) -> subprocess.Popen:
        run = self.workdir / "runs" / name
        argv = ["train", "--resume", str(run)] if resume else ["train", *self.args, f"--logging.name={name}"]
        return subprocess.Popen(
            [sys.executable, "-m", "plmrun.cli", *argv],
            cwd=self.workdir,
            env={**self.env, **(extra_env or {})},
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / f"{name}.stderr", "a"),
        )

    def wait(self, proc: subprocess.Popen, until) -> bool:
        """Poll until `until()` holds (True) or the process ends (False)."""
        while proc.poll() is None:
            if time.time() > self.deadline:
                proc.kill()
                raise TimeoutError("chaos: --timeout reached")
            if until():
                return True
            time.sleep(POLL_S)
        return False


def reference(chaos: Chaos) -> dict:
    """The uninterrupted run, with how long its phases took (to place `startup` and `final` kills)."""
    t0 = time.time()
    proc = chaos.launch("reference", resume=False)
    run = chaos.workdir / "runs" / "reference"
    chaos.wait(proc, lambda: last_step(run) >= 1)
    t_first = time.time() - t0
    chaos.wait(proc, lambda: last_step(run) >= chaos.steps)
    t_last = time.time() - t0
    if proc.wait() != 0:
        raise RuntimeError(f"the reference run failed: {(chaos.workdir / 'reference.stderr').read_text()[-2000:]}")
    return {"startup_s": t_first, "last_step_s": t_last, "total_s": time.time() - t0}


def schedule(kills: int, rng: random.Random) -> list[str]:
    kinds = [KINDS[k % len(KINDS)] for k in range(kills - (kills >= 5))]
    rng.shuffle(kinds)
    return kinds + (["final"] if kills >= 5 else [])


def chaos_run(chaos: Chaos, kills: int, seed: int, ref: dict) -> tuple[list[Kill], dict]:
    rng = random.Random(seed)
    run = chaos.workdir / "runs" / "chaos"
    want = series(chaos.workdir / "runs" / "reference")
    done: list[Kill] = []
    ce = chaos.checkpoint_every
    for n, kind in enumerate(schedule(kills, rng), 1):
        start = checkpoint_step(run)
        left = kills - n + 1
        # a step ahead of the checkpoint, spread so the kills cover the run
        span = max(1, 2 * (chaos.steps - start) // (left + 1))
        step = min(chaos.steps, start + rng.randint(1, span))
        ckpt = min(chaos.steps // ce * ce, ((step + ce - 1) // ce) * ce)
        extra = {}
        if kind == "killsave":
            if ckpt <= start:
                kind, step = "step", min(chaos.steps, start + 1)
            else:
                extra = {"PLMRUN_FAULT": f"killsave@{ckpt}"}
        if kind == "in-save" and ckpt <= start:
            kind = "step"
        t0 = time.time()
        proc = chaos.launch("chaos", resume=start > 0, extra_env=extra)
        k = Kill(n, kind, "", start)
        if kind == "startup":
            # the reference's start-up time, measured on one load, says nothing of this launch's: the kill
            # lands `delay` after launch or at the first new step logged, whichever comes first
            delay = rng.uniform(0, ref["startup_s"])
            k.target = f"{delay:.2f} s after launch (or at its first step)"
            chaos.wait(
                proc, lambda t0=t0, delay=delay, start=start: time.time() - t0 >= delay or last_step(run) > start
            )
        elif kind == "step":
            delay = rng.uniform(0, 0.02)
            k.target = f"{delay * 1e3:.0f} ms after step {step}"
            if chaos.wait(proc, lambda step=step: last_step(run) >= step):
                time.sleep(delay)
        elif kind == "in-save":
            late = rng.choice([0.0, rng.uniform(0, 0.005)])
            tmp = run / "checkpoints" / f".tmp-step_{ckpt:08d}"
            k.target = f"{late * 1e3:.1f} ms after {tmp.name} appears"
            seen = chaos.wait(proc, lambda tmp=tmp, ckpt=ckpt: tmp.exists() or last_step(run) > ckpt)
            if seen and not tmp.exists() and not (run / "checkpoints" / f"step_{ckpt:08d}").exists():
                k.note = "save not seen (polling missed it): killed after it"
            elif seen and not tmp.exists():
                k.note = "save finished before the poll saw it: killed after it"
            if seen:
                time.sleep(late)
        elif kind == "killsave":  # the process kills itself inside the save
            k.target = f"PLMRUN_FAULT=killsave@{ckpt}"
            chaos.wait(proc, lambda: False)
        elif kind == "final":  # inside the final model save, or just after it (summary, plots)
            delay = rng.choice([0.0, rng.uniform(0, 0.05)])
            k.target = f"{delay * 1e3:.0f} ms after model/ appears (after step {chaos.steps})"
            if chaos.wait(proc, lambda: last_step(run) >= chaos.steps and (run / "model").exists()):
                time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        rc = proc.wait()
        k.seconds = round(time.time() - t0, 3)
        k.killed = rc == -signal.SIGKILL
        got = series(run)
        k.reached_step = got[-1]["step"] if got else 0
        k.prefix_ok = got == want[: len(got)]
        if done:  # this attempt is the restart after the previous kill
            done[-1].restart_ok = k.killed or rc == 0
        if not k.killed:
            k.note = (k.note + "; " if k.note else "") + f"exited {rc} before the kill"
        done.append(k)
        if not k.killed:  # finished (nothing left to kill) or failed on its own
            break
        if (run / "summary.json").is_file():  # killed after the run finished (plots, exit): nothing to resume
            k.note = (k.note + "; " if k.note else "") + "after summary.json: the run had finished"
            break
    t0 = time.time()
    if done[-1].killed and not (run / "summary.json").is_file():  # the last attempt, not killed
        proc = chaos.launch("chaos", resume=checkpoint_step(run) > 0)
        chaos.wait(proc, lambda: False)
        rc = proc.wait()
        done[-1].restart_ok = rc == 0
    elif done[-1].killed:
        rc = 0
        done[-1].restart_ok = True  # nothing to restart
    else:  # the run already ended on its own
        rc = 0 if done[-1].note.endswith("exited 0 before the kill") else 1
    stderr = (chaos.workdir / "chaos.stderr").read_text()
    final = {
        "returncode": rc,
        "seconds": round(time.time() - t0, 3),
        "weights_equal": weights_equal(
            chaos.workdir / "runs" / "reference" / "model" / "model.safetensors", run / "model" / "model.safetensors"
        ),
        "series_equal": series(run) == want,
        "series_lines": len(want),
        "keys_differ": differing_keys(series(run), want),
        "stderr_tail": stderr[-1500:] if rc != 0 else "",
    }
    return done, final


def format_table(report: dict) -> str:
    lines = [
        f"# Chaos test: {report['kills_passed']} of {report['kills_requested']} kills passed; final weights "
        f"{'bitwise equal' if report['final']['weights_equal'] else 'DIFFER'}, loss series "
        f"{'bitwise equal' if report['final']['series_equal'] else 'DIFFERS'} "
        f"({report['final']['series_lines']} metric lines)",
        "",
        f"`{report['command']}` on {report['hardware']['cpu']} ({report['hardware']['cpu_isa']}), "
        f"torch {report['hardware']['torch']}, {report['date']}; {report['steps']} steps, a checkpoint "
        f"every {report['checkpoint_every']}; reference run {report['reference']['total_s']:.1f} s, "
        f"chaos {report['total_s']:.0f} s.",
        "",
        "Compared: every metrics.jsonl field but wall-clock ones"
        + "".join(f"; {k} differs on {n} lines" for k, n in report["final"]["keys_differ"].items())
        + ".",
        "",
        "| # | kind | killed at | from ckpt | last step logged | SIGKILL | prefix equal | restart ok | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in report["kills"]:
        yn = lambda b: "yes" if b else "**no**"
        lines.append(
            f"| {k['n']} | {k['kind']} | {k['target']} | {k['resumed_from']} | {k['reached_step']} | "
            f"{yn(k['killed'])} | {yn(k['prefix_ok'])} | {yn(k['restart_ok'])} | {k['note']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill schedule (not of training)")
    ap.add_argument("--steps", type=int, default=160, help="train.max_steps of the tiny run")
    ap.add_argument("--checkpoint-every", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=1200, help="seconds for everything; then it stops")
    ap.add_argument("--workdir", help="keep the runs here (default: a temporary folder, removed after)")
    ap.add_argument("--out", default=str(RESULTS / "chaos"), help="writes OUT.json and OUT.md")
    a = ap.parse_args(argv)
    if a.kills < 1 or a.steps < 2 * a.checkpoint_every or a.checkpoint_every < 1:
        ap.error("need --kills >= 1, --checkpoint-every >= 1 and --steps >= 2 * --checkpoint-every")
    from plmrun.experiments.record import hardware_info

    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="plmrun-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("reference", "chaos"):
        shutil.rmtree(workdir / "runs" / name, ignore_errors=True)
        (workdir / f"{name}.stderr").unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.setdefault("PLMRUN_CACHE", str(workdir / "cache"))
    env.pop("PLMRUN_FAULT", None)
    t0 = time.time()
    chaos = Chaos(workdir, a.steps, a.checkpoint_every, t0 + a.timeout, env)
    ref = reference(chaos)
    kills, final = chaos_run(chaos, a.kills, a.seed, ref)
    ok = final["returncode"] == 0 and final["weights_equal"] and final["series_equal"]
    passed = sum(k.killed and k.prefix_ok and k.restart_ok for k in kills) if ok else 0
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/chaos.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "hardware": hardware_info(),
        "kills_requested": a.kills,
        "kills_done": len(kills),
        "kills_passed": passed,
        "passed": ok and passed == a.kills,
        "seed": a.seed,
        "steps": a.steps,
        "checkpoint_every": a.checkpoint_every,
        "train_args": train_args(a.steps, a.checkpoint_every),
        "reference": {k: round(v, 3) for k, v in ref.items()},
        "final": final,
        "kills": [asdict(k) for k in kills],
        "total_s": round(time.time() - t0, 1),
    }
    write_report(a.out, report, format_table(report))
    if not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
