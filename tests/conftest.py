"""Shared fixtures: one data cache per session, the tiny config, a CLI runner and a torchrun runner.

The plain functions behind them live in helpers.py (module-scoped fixtures and module constants such as
`REF = [*TINY, ...]` need them without a fixture). Markers (pyproject.toml, --strict-markers):
`slow` end-to-end runs (CI runs them; `-m "not slow"` for a quick pass), `cuda` needs a CUDA GPU,
`external` needs a package or tool beyond the dev extra (`-m "not external"` leaves them out).
"""

import pytest
import torch

import helpers


def pytest_collection_modifyitems(config, items):
    """`cuda` tests skip on a machine without CUDA (one rule instead of a skipif in every file)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def plmrun_cache(tmp_path_factory):
    """PLMRUN_CACHE for the whole session, in-process and in every subprocess: the bundled corpus is
    prepared once, and no test writes to the user's ~/.cache/plmrun. Tests that need a cache of their
    own still set one."""
    path = tmp_path_factory.getbasetemp() / "plmrun-cache"  # the same folder as `tmp_path.parent / "plmrun-cache"`
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLMRUN_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def bundled_corpus(plmrun_cache):
    """The bundled corpus prepared in the session cache, for tests whose output must not include the
    one-time preparation (its progress lines on stderr) when they happen to run first."""
    from plmrun.data.corpus import bundled_dataset_dir

    return bundled_dataset_dir()


@pytest.fixture
def tiny_config():
    """`tiny_config(*overrides)`: the tiny end-to-end run's Config (helpers.TINY plus `--section.key=value`
    overrides), built fresh on each call."""
    from plmrun.config import build_config

    def build(*overrides):
        return build_config(None, [*helpers.TINY, *overrides])

    return build


@pytest.fixture
def cli(tmp_path):
    """`cli(args, env_extra=None, check=True)`: `plmrun ARGS` in a fresh interpreter, in tmp_path."""

    def run(args, env_extra=None, check=True, timeout=600):
        return helpers.run_cli(args, tmp_path, env_extra, check, timeout)

    return run


@pytest.fixture
def torchrun(tmp_path):
    """`torchrun(args, env_extra=None, check=True)`: `torchrun --standalone --nproc_per_node=2 -m plmrun.cli
    ARGS` in tmp_path, on CPU/gloo."""

    def run(args, env_extra=None, check=True, launcher=("--standalone", "--nproc_per_node=2"), timeout=300):
        return helpers.run_torchrun(args, tmp_path, env_extra, check, launcher, timeout)

    return run
