"""The MFU denominator: best-of peak cached per machine, override, contention flag, MFU never above 100%."""

import json

import pytest
import torch

from plmrun.train import peak as P

CPU, F32 = torch.device("cpu"), torch.float32
SMALL = dict(seconds=0.01, n=128)  # a real matmul, small enough for a shared test machine


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLMRUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(P.PEAK_ENV, raising=False)
    return tmp_path / "cache" / P.CACHE_NAME


def _key():
    return P.machine_key(CPU, F32) + "|n=128"


def test_miss_measures_best_of_windows_and_writes_the_cache(cache):
    pk = P.stable_peak(CPU, F32, **SMALL)
    assert pk.source == "measured" and pk.flops >= pk.quick > 0 and not pk.contended
    saved = json.loads(cache.read_text())
    assert saved == {_key(): {"flops": pk.flops, "runs": 1}}
    assert [p.name for p in cache.parent.iterdir()] == [P.CACHE_NAME]  # no temporary file left behind


def test_hit_keeps_the_maximum_over_runs(cache):
    first = P.stable_peak(CPU, F32, **SMALL)
    second = P.stable_peak(CPU, F32, **SMALL)
    assert second.source == "cache" and second.flops == max(first.flops, second.quick)
    assert json.loads(cache.read_text())[_key()] == {"flops": second.flops, "runs": 2}


def test_a_low_cached_peak_is_raised_to_this_run(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({_key(): {"flops": 1.0, "runs": 4}, "other machine": {"flops": 5.0}}))
    pk = P.stable_peak(CPU, F32, **SMALL)
    assert pk.flops == pk.quick > 1.0 and not pk.contended
    saved = json.loads(cache.read_text())
    assert saved[_key()] == {"flops": pk.quick, "runs": 5} and saved["other machine"] == {"flops": 5.0}


def test_contention_flag_when_start_up_is_far_below_the_cached_best(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({_key(): {"flops": 1e18, "runs": 1}}))  # a best this run cannot reach
    pk = P.stable_peak(CPU, F32, **SMALL)
    assert pk.flops == 1e18 and pk.contended and pk.quick < P.CONTENDED_BELOW * pk.flops
    assert "machine contended" in pk.describe()
    assert json.loads(cache.read_text())[_key()]["flops"] == 1e18  # a contended run never lowers the best
    quiet = P.Peak(flops=100e9, source="cache", quick=90e9, contended=False, key="k")
    assert "contended" not in quiet.describe()


@pytest.mark.parametrize(
    "damage",
    [
        "{not json",
        "[1, 2]",
        '{"k": {"flops": "fast"}}',
        '{"k": {"flops": -3}}',
        '{"k": {"flops": 1e11, "runs": "many"}}',
        "",
    ],
)
def test_corrupted_cache_warns_in_one_line_and_is_measured_again(cache, capsys, damage):
    cache.parent.mkdir(parents=True)
    cache.write_text(damage)
    pk = P.stable_peak(CPU, F32, **SMALL)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreadable matmul peak cache" in err and str(cache) in err
    assert pk.source == "measured"
    assert json.loads(cache.read_text()) == {_key(): {"flops": pk.flops, "runs": 1}}


def test_override_wins_and_leaves_the_cache_alone(cache, monkeypatch):
    monkeypatch.setenv(P.PEAK_ENV, "1e18")
    pk = P.stable_peak(CPU, F32, **SMALL)
    assert pk.source == "override" and pk.flops == 1e18 and pk.contended
    assert not cache.exists()
    for bad in ("fast", "-4e11", "0", "nan", "inf"):
        monkeypatch.setenv(P.PEAK_ENV, bad)
        with pytest.raises(P.PeakError, match=P.PEAK_ENV):
            P.stable_peak(CPU, F32, **SMALL)


def test_read_only_rank_does_not_write(cache):
    P.stable_peak(CPU, F32, update=False, **SMALL)
    assert not cache.exists()


def test_key_names_dtype_threads_and_torch():
    base = P.machine_key(CPU, F32, threads=1)
    assert base != P.machine_key(CPU, torch.bfloat16, threads=1)
    assert base != P.machine_key(CPU, F32, threads=2)
    assert torch.__version__ in base and "1 threads" in base


def test_mfu_is_clamped_and_flagged_above_the_peak():
    assert P.mfu(5e8, 1.0, 1e9) == (0.5, False)
    assert P.mfu(4e9, 2.0, 1e9, world_size=4) == (0.5, False)
    assert P.mfu(2e9, 1.0, 1e9) == (1.0, True)  # an underestimated peak: reported as a bound, never 200%


def test_unwritable_cache_warns_and_still_gives_a_peak(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PLMRUN_CACHE", str(blocker / "cache"))  # a directory under a file: mkdir fails, even as root
    monkeypatch.delenv(P.PEAK_ENV, raising=False)
    pk = P.stable_peak(CPU, F32, **SMALL)
    assert pk.source == "measured" and pk.flops > 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot save the matmul peak" in err
