"""The matmul peak that MFU divides by: the best this machine has shown, not the load of the moment.

Why: a short matmul timed at start-up measures the load of the moment, so on a busy machine the peak
comes out several times too low and MFU above 100%. So the peak is a best-of, kept per
machine in `$PLMRUN_CACHE/matmul_peak.json` (default ~/.cache/plmrun), keyed by everything a matmul
rate depends on: CPU model and vector ISA flags (or the GPU's name and capability), torch version,
dtype and thread count. Every start still times a short matmul: the cache keeps the maximum over
runs (written atomically), and a start-up rate far below the cached best says the machine is
contended now, which the run reports. The first run on a machine takes the best of a few windows.
PLMRUN_PEAK_FLOPS (FLOP/s per device, e.g. 4.06e11) overrides the peak, e.g. with a datasheet figure.
An MFU above 100% means the peak was underestimated: mfu() clamps it and flags it, it never shows it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from plmrun.errors import PlmrunError

PEAK_ENV = "PLMRUN_PEAK_FLOPS"
CACHE_NAME = "matmul_peak.json"
# A start-up rate under this fraction of the cached best means other work shares the machine now.
CONTENDED_BELOW = 0.7
# First run on a machine: the best of this many timing windows.
FIRST_WINDOWS = 3
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "asimd", "sve")


class PeakError(PlmrunError, ValueError):
    """A PLMRUN_PEAK_FLOPS value that is not a positive number."""


@dataclass(frozen=True)
class Peak:
    """The MFU denominator (FLOP/s per device) and how it was obtained.

    source: 'override' (PLMRUN_PEAK_FLOPS), 'cache' (best of earlier runs and this one) or 'measured'
    (first run with this key: best of FIRST_WINDOWS windows). quick: this start-up's rate.
    contended: quick < CONTENDED_BELOW × flops, i.e. other work slowed this start-up's matmul (never
    on a first run: nothing to compare with, which describe() says)."""

    flops: float
    source: str
    quick: float
    contended: bool
    key: str

    def describe(self) -> str:
        """One line for the run's start line and summary."""
        text = f"peak {self.flops / 1e9:.0f} GFLOP/s ({self.source})"
        if self.source == "measured":
            text += "; first measurement with this key, contention unknown"
        if self.contended:
            text += (
                f"; machine contended: start-up matmul {self.quick / 1e9:.0f} GFLOP/s, "
                f"{self.quick / self.flops:.0%} of the peak, so time and tok/s are slower than this machine's"
            )
        return text


def machine_key(device: torch.device, dtype: torch.dtype, threads: int | None = None) -> str:
    """What a matmul rate depends on: processor (CPU model + ISA flags, or GPU name + capability),
    torch version, dtype and (CPU) thread count."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        proc = f"{torch.cuda.get_device_name(device)} sm{major}{minor}"
    else:
        model, flags = cpu_model_and_flags()
        proc = (
            f"{model} [{' '.join(flags) or torch.backends.cpu.get_cpu_capability()}] "
            f"{threads or torch.get_num_threads()} threads"
        )
    return f"{device.type}|{proc}|torch {torch.__version__}|{str(dtype).removeprefix('torch.')}"


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and which of ISA_FLAGS it has (from /proc/cpuinfo where there is one)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and model in ("", platform.processor() or platform.machine()):
                model = value.strip()
            elif name.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, [f for f in ISA_FLAGS if f in flags]


def time_matmul(device: torch.device, dtype: torch.dtype, seconds: float = 0.4, n: int = 0) -> float:
    """FLOP/s of a large square n×n matmul (0: 2048 on CPU, 8192 on GPU) on this device and dtype over
    about `seconds`; float8_e4m3fn times torch._scaled_mm (float8 in, bf16 out), the matmul of train.fp8."""
    n = n or (2048 if device.type == "cpu" else 8192)
    if dtype == torch.float8_e4m3fn:  # float8 inputs, bf16 output, unit scales: what a Float8Linear runs
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype).t()  # column-major, as torch._scaled_mm needs
        one = torch.ones((), device=device)
        matmul = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    else:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        matmul = lambda: a @ b
    matmul()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or reps < 2:
        matmul()
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2.0 * n**3 * reps / (time.perf_counter() - t0)


def cache_file() -> Path:
    root = os.environ.get("PLMRUN_CACHE") or Path.home() / ".cache" / "plmrun"
    return Path(root) / CACHE_NAME


def read_cache(path: Path) -> dict:
    """{key: {"flops": best, "runs": n}}; a damaged file is reported in one line and treated as empty
    (the peak is measured again and the file rewritten)."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not all(
            isinstance(v, dict) and _positive(v.get("flops")) and _positive(v.get("runs", 1)) for v in data.values()
        ):
            raise ValueError("not a {key: {flops: number, runs: count}} table")
        return data
    except (FileNotFoundError, NotADirectoryError):  # no cache yet (the write says why if it cannot make one)
        return {}
    except (OSError, ValueError) as e:
        print(
            f"warning: {path}: unreadable matmul peak cache ({str(e).splitlines()[0]}); measuring again",
            file=sys.stderr,
            flush=True,
        )
        return {}


def write_cache(path: Path, data: dict) -> None:
    """Atomically: a temporary file in the same directory, then rename (never a half-written cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stable_peak(
    device: torch.device, dtype: torch.dtype, seconds: float = 0.4, update: bool = True, n: int = 0
) -> Peak:
    """The MFU denominator for `device`/`dtype` at the current thread count: PLMRUN_PEAK_FLOPS if set,
    else max(cached best, this start-up's rate), the cache raised to it (update=False: read only,
    e.g. on ranks other than 0). contended compares this start-up's rate to that peak. n: matmul size
    (time_matmul's; part of the key when set, so small test matmuls never mix with real peaks)."""
    key = machine_key(device, dtype) + (f"|n={n}" if n else "")
    override = os.environ.get(PEAK_ENV)
    if override is not None:
        try:
            flops = float(override)
        except ValueError:
            flops = float("nan")
        if not _positive(flops):
            raise PeakError(
                f"{PEAK_ENV}={override!r}: expected the peak in FLOP/s per device, a positive number "
                "such as 4.06e11; unset it to use the measured best"
            )
        quick = time_matmul(device, dtype, seconds, n)
        return Peak(flops, "override", quick, quick < CONTENDED_BELOW * flops, key)
    path = cache_file()
    cache = read_cache(path)
    best = cache.get(key, {}).get("flops")
    if best is None:  # first run here: no reference to call it contended against; the best of a few windows
        flops = quick = max(time_matmul(device, dtype, seconds, n) for _ in range(FIRST_WINDOWS))
        source, runs = "measured", 1
    else:
        quick = time_matmul(device, dtype, seconds, n)
        flops, source, runs = max(best, quick), "cache", int(cache[key].get("runs", 1)) + 1
    if update:
        cache[key] = {"flops": flops, "runs": runs}
        try:
            write_cache(path, cache)
        except OSError as e:  # a read-only cache directory costs the next run a re-measure, nothing more
            print(f"warning: {path}: cannot save the matmul peak ({e.strerror or e})", file=sys.stderr, flush=True)
    return Peak(flops, source, quick, quick < CONTENDED_BELOW * flops, key)


def run_peak(device: torch.device, dtypes: list[torch.dtype], update: bool = True) -> Peak:
    """The MFU denominator of a run whose matmuls run in `dtypes` (bf16 and float8 under train.fp8): the
    fastest of their stable peaks, so a mixed run is measured against the best its device can do (float8 on
    an H100; bf16 on a CPU, where float8 matmuls are emulated and slower)."""
    return max((stable_peak(device, dt, update=update) for dt in dtypes), key=lambda p: p.flops)


def mfu(flops: float, seconds: float, peak: float, world_size: int = 1) -> tuple[float, bool]:
    """(model FLOP utilisation in [0, 1], over): `flops` model FLOPs done in `seconds` by `world_size`
    devices of `peak` FLOP/s each. over=True when the rate exceeded the peak, which only an
    underestimated peak can cause: the MFU is then clamped to 1.0 and must be reported as a bound."""
    rate = flops / max(seconds, 1e-9) / (peak * world_size)
    return min(rate, 1.0), rate > 1.0


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
