"""Plain helpers the test files share: the tiny run's flags, a CLI runner, a torchrun runner, run comparisons.

Test files import these (`from helpers import TINY, run_cli`) instead of importing each other; conftest.py
wraps the common ones as fixtures. tests/ is on sys.path because pytest puts a test file's folder there
(the folder has no __init__.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

# The tiny run every end-to-end test uses. Its masking is pinned (ESM-2's 15%, 80/10/10) so that the
# measured tolerances (FSDP2 vs one process) do not move when the default recipe is retuned.
TINY = [
    "--model.hidden_size=32",
    "--model.num_layers=2",
    "--model.num_heads=2",
    "--data.token_budget=512",
    "--data.max_length=128",
    "--train.max_steps=6",
    "--train.eval_every=3",
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
]

# A tiny esm2-architecture model (ModelConfig keywords): the HF-convertible counterpart of the tiny run.
TINY_ESM2 = dict(
    arch="esm2",
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    unet=False,
    x0_lambdas=False,
    value_embeddings=False,
    qk_norm=False,
    soft_logit_cap=0.0,
    token_dropout=True,
)


def random_sequences(n=12, seed=0, lengths=(5, 60)):
    """`n` random residue-token sequences with lengths drawn from [lengths[0], lengths[1])."""
    from plmrun.data.shards import InMemorySequences

    rng = np.random.default_rng(seed)
    return InMemorySequences([rng.integers(4, 24, size=int(rng.integers(*lengths))).astype(np.uint8) for _ in range(n)])


def masked_micro_batches(src, groups, budget):
    """The same sequences packed into len(groups) micro-batches, masked identically (fixed per sequence)."""
    from plmrun.data.masking import eval_masks
    from plmrun.data.packing import pack

    out = []
    for g in groups:
        idx = np.array(g)
        p = pack(src, idx, np.zeros(len(idx), dtype=np.int64), token_budget=budget, max_length=128)
        out.append(eval_masks(p, eval_seed=7, mask_rate=0.3))
    return out


# torchrun on CPU/gloo: one thread per rank (the CI machine has 2 cores), and a collective that hangs
# fails within a minute instead of the default half hour.
DIST_ENV = {"OMP_NUM_THREADS": "1", "PLMRUN_DIST_TIMEOUT": "60"}


def run(cmd, cwd=None, env_extra=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    """Run `cmd` with this environment plus `env_extra` (a None value removes a variable) and stdin closed,
    so nothing can wait for a terminal. With `check`, a non-zero exit fails the test showing the output tails."""
    env = dict(os.environ)
    for key, value in (env_extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def run_cli(args, cwd=None, env_extra=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    """`plmrun ARGS` in a fresh interpreter, as a user runs it (exit code, stdout and stderr as printed)."""
    return run([sys.executable, "-m", "plmrun.cli", *args], cwd, env_extra, check, timeout)


def run_torchrun(
    args, cwd=None, env_extra=None, check=True, launcher=("--standalone", "--nproc_per_node=2"), timeout=300
) -> subprocess.CompletedProcess:
    """`torchrun LAUNCHER -m plmrun.cli ARGS` (2 local ranks by default) with DIST_ENV."""
    return run(
        [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "plmrun.cli", *args],
        cwd,
        {**DIST_ENV, **(env_extra or {})},
        check,
        timeout,
    )


def series(run_dir: Path) -> list:
    """A run's metrics as (kind, step, tokens, loss or val_loss) rows: two runs are equal when these are."""
    rs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], r.get("tokens"), r.get("loss", r.get("val_loss"))) for r in rs]


def weights(run_dir: Path) -> dict:
    """The final weights a run saved."""
    return load_file(Path(run_dir) / "model" / "model.safetensors")


def assert_identical(a: Path, b: Path) -> None:
    """Two runs are bitwise the same: every metric row and every final weight."""
    assert series(a) == series(b)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
