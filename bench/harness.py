"""Shared benchmark utilities: timing, physical limits, JSON-lines records.

* ``time_ms(fn)``: median milliseconds; CUDA events around each call after warm-up
  on a GPU, ``perf_counter`` on CPU.
* ``copy_bandwidth_gbps(device)`` / ``gemm_tflops(device, dtype)``: the device's
  measured copy bandwidth and cuBLAS rate, measured once per process, in the same
  run as the op timings they normalise.
* ``peak_memory_bytes(fn)``: peak allocated bytes above the live set while ``fn`` runs.
* ``record(...)``: appends one JSON object to ``<results>/<device>.jsonl`` with the
  device, torch/triton/CUDA versions and git commit. ``POSENC_FAST_BENCH_RESULTS``
  overrides the results folder (default ``bench/results``),
  ``POSENC_FAST_BENCH_RESULTS_FILE`` the file.

Op benchmark files are small factories over these: build a workload, call
``measure_case`` with the backend callables and the eager/compiled baselines.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def results_dir() -> Path:
    return Path(os.environ.get("POSENC_FAST_BENCH_RESULTS", ROOT / "bench" / "results"))


@functools.lru_cache(maxsize=None)
def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name(DEVICE)
    return platform.processor() or platform.machine() or "cpu"


def device_slug() -> str:
    if not ON_GPU:
        return "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name()).strip("-").lower()


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except Exception:
        return os.environ.get("POSENC_FAST_COMMIT", "unknown")


@functools.lru_cache(maxsize=None)
def versions() -> Dict[str, Optional[str]]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda}


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], *, warmup: int = 10, rep: int = 50) -> float:
    """Median time of ``fn()`` in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    if ON_GPU:
        # Flush L2 between calls so every call streams its operands from HBM, as
        # inside a model; the flush itself is outside the timed region.
        flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.float32, device=DEVICE)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        for s, e in zip(starts, ends):
            flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second)."""
    n = nbytes // 4 if ON_GPU else (64 << 20) // 4
    src = torch.randn(n, device=DEVICE)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=5, rep=20)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


@functools.lru_cache(maxsize=None)
def gemm_tflops(dtype: torch.dtype = torch.bfloat16, size: int = 8192) -> float:
    """Measured matmul rate (TFLOP/s) for square ``size`` GEMMs in ``dtype``."""
    if not ON_GPU:
        dtype, size = torch.float32, 512
    a = torch.randn(size, size, device=DEVICE, dtype=dtype)
    b = torch.randn(size, size, device=DEVICE, dtype=dtype)
    ms = time_ms(lambda: a @ b, warmup=5, rep=20)
    return 2 * size ** 3 / (ms * 1e-3) / 1e12


def peak_memory_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak bytes allocated above the memory live before ``fn`` (None on CPU)."""
    if not ON_GPU:
        return None
    sync()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    base = torch.cuda.memory_allocated(DEVICE)
    out = fn()
    sync()
    peak = torch.cuda.max_memory_allocated(DEVICE) - base
    del out
    return int(peak)


def compile_fn(fn: Callable, **kwargs) -> Callable:
    torch._dynamo.reset()
    return torch.compile(fn, **kwargs)


def record(**fields) -> Dict[str, object]:
    """Appends one measurement to ``<results>/<device>.jsonl`` and returns it."""
    rec = {"device": device_name(), **{f"{k}_version": v for k, v in versions().items()},
           "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    target = os.environ.get("POSENC_FAST_BENCH_RESULTS_FILE")  # gpu_suite.sh: one file for the run
    path = Path(target) if target else results_dir() / f"{device_slug()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    return rec


_BASELINES: Dict[tuple, Dict[str, Optional[float]]] = {}


def baseline_ms(key: tuple, eager: Callable[[], object], compiled: Optional[Callable[[], object]]
                ) -> Dict[str, Optional[float]]:
    """Eager and torch.compile times of one workload, measured once per process
    (several backends of the same workload share them)."""
    if key not in _BASELINES:
        _BASELINES[key] = {
            "eager_ms": time_ms(eager),
            "compile_ms": time_ms(compiled) if compiled is not None else None,
        }
    return _BASELINES[key]


def measure_case(benchmark, *, op: str, direction: str, workload: str, dtype: torch.dtype, backend: str,
                 fn: Callable[[], object], baseline_key: tuple, eager: Callable[[], object],
                 compiled: Optional[Callable[[], object]], bytes_moved: Optional[int] = None,
                 flops: Optional[float] = None, headline: bool = False, memory_fn: Optional[Callable] = None,
                 **extra) -> Dict[str, object]:
    """Times ``fn`` against the eager and compiled baselines of the same workload,
    records one JSON line, and hands ``fn`` to pytest-benchmark for its table."""
    ms = time_ms(fn)
    base = baseline_ms(baseline_key, eager, compiled)
    copy_gbps = copy_bandwidth_gbps()
    gbps = bytes_moved / (ms * 1e-3) / 1e9 if bytes_moved else None
    rec = dict(op=op, direction=direction, workload=workload, dtype=str(dtype).replace("torch.", ""),
               backend=backend, ms=ms, eager_ms=base["eager_ms"], compile_ms=base["compile_ms"],
               speedup_vs_eager=base["eager_ms"] / ms,
               speedup_vs_compile=(base["compile_ms"] / ms) if base["compile_ms"] else None,
               bytes=bytes_moved, gbps=gbps, copy_gbps=copy_gbps,
               pct_of_copy_bandwidth=(100 * gbps / copy_gbps) if gbps else None,
               peak_mem_bytes=peak_memory_bytes(memory_fn or fn), headline=headline, **extra)
    if flops:
        rec["tflops"] = flops / (ms * 1e-3) / 1e12
        rec["gemm_tflops"] = gemm_tflops(dtype)
    rec = record(**rec)
    benchmark.extra_info.update({k: v for k, v in rec.items() if isinstance(v, (int, float, str, bool))})

    def synced():
        fn()
        sync()

    benchmark.pedantic(synced, rounds=10, warmup_rounds=2, iterations=1)
    return rec
