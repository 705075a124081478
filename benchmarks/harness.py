"""The benchmark harness every family uses.

It measures the machine's ceilings first (copy bandwidth, fp32 GEMM rate), times each case as the
median of several runs after warm-up, measures peak extra memory, and prints one markdown table
whose rows also go to `benchmarks/results/<family>.json`.

Peak memory on CPU is the growth of the process's resident-set high-water mark during one call
(VmHWM, reset through /proc/self/clear_refs). glibc is told to serve every allocation above 64 KiB
with mmap so that freed buffers leave the resident set and each call's peak is seen afresh.
"""
import ctypes
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

_M_MMAP_THRESHOLD = -3
try:
    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 16)
except OSError:  # not glibc: peak memory is then only approximate
    pass


@dataclass
class Case:
    """One row: `fn` (xlsparse) against `baseline` on the same inputs.

    `bytes` and `flops` are what the op must move and compute (the minimum, counted by the
    family script); the table shows the achieved rate against the machine's ceiling.
    """

    op: str
    shape: str
    dtype: str
    fn: Callable[[], object]
    baseline: Callable[[], object] | None = None
    baseline_name: str = ""
    density: float | None = None
    backend: str = ""
    bytes: int = 0
    flops: int = 0
    note: str = ""


@dataclass
class Row:
    op: str
    shape: str
    density: float | None
    dtype: str
    backend: str
    median_ms: float
    baseline: str
    baseline_ms: float | None
    speedup: float | None
    achieved: str
    ceiling_pct: float | None
    peak_mib: float
    baseline_peak_mib: float | None
    note: str = ""
    extra: dict = field(default_factory=dict)


def _sync(device: str = "cpu") -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], warmup: int = 2, reps: int = 7, min_seconds: float = 0.0) -> float:
    """Median wall time of `fn` over `reps` runs (more while under `min_seconds`), after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak memory one call of `fn` adds above what is resident before it, in MiB."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        return float("nan")
    base = _status_kib("VmRSS")
    fn()
    return max(0, _status_kib("VmHWM") - base) / 1024


@dataclass
class Ceilings:
    copy_gbs: float
    gemm_gflops: float
    threads: int
    machine: str


def measure_ceilings(quick: bool = False) -> Ceilings:
    """Copy bandwidth (bytes read + written by a large `copy_`) and the fp32 GEMM rate."""
    n = (64 if quick else 256) * 2**20 // 4
    src, dst = torch.randn(n), torch.empty(n)
    t = median_seconds(lambda: dst.copy_(src), warmup=2, reps=5)
    copy_gbs = 2 * n * 4 / t / 1e9
    m = 1024 if quick else 2048
    a, b = torch.randn(m, m), torch.randn(m, m)
    t = median_seconds(lambda: a @ b, warmup=1, reps=3 if quick else 5)
    return Ceilings(copy_gbs, 2 * m**3 / t / 1e9, torch.get_num_threads(), _machine())


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def measure(case: Case, ceilings: Ceilings, quick: bool = False) -> Row:
    """Time `case` and its baseline and build its table row."""
    reps = 3 if quick else 7
    t = median_seconds(case.fn, warmup=1 if quick else 2, reps=reps, min_seconds=0 if quick else 0.5)
    peak = peak_mib(case.fn)
    tb = peak_b = speedup = None
    if case.baseline is not None:
        tb = median_seconds(case.baseline, warmup=1 if quick else 2, reps=reps, min_seconds=0 if quick else 0.5)
        peak_b = peak_mib(case.baseline)
        speedup = tb / t
    if case.flops:
        rate = case.flops / t / 1e9
        achieved, pct = f"{rate:.1f} GFLOP/s", 100 * rate / ceilings.gemm_gflops
    elif case.bytes:
        rate = case.bytes / t / 1e9
        achieved, pct = f"{rate:.1f} GB/s", 100 * rate / ceilings.copy_gbs
    else:
        achieved, pct = "", None
    return Row(case.op, case.shape, case.density, case.dtype, case.backend, t * 1e3, case.baseline_name,
               None if tb is None else tb * 1e3, speedup, achieved, pct, peak, peak_b, case.note)


HEADER = ("| op | shape | density | dtype | backend | median ms | baseline | baseline ms | speed-up "
          "| achieved | % of ceiling | peak MiB | baseline peak MiB |")


def format_row(r: Row) -> str:
    def num(x, fmt):
        return "" if x is None else format(x, fmt)

    density = "" if r.density is None else f"{100 * r.density:g}%"
    return (f"| {r.op} | {r.shape} | {density} | {r.dtype} | {r.backend} | {r.median_ms:.3f} | {r.baseline} "
            f"| {num(r.baseline_ms, '.3f')} | {num(r.speedup, '.2f')}{'x' if r.speedup else ''} | {r.achieved} "
            f"| {num(r.ceiling_pct, '.0f')} | {r.peak_mib:.1f} | {num(r.baseline_peak_mib, '.1f')} |")


def print_ceilings(c: Ceilings) -> None:
    print(f"machine: {c.machine}; torch threads: {c.threads}")
    print(f"ceilings: copy {c.copy_gbs:.1f} GB/s (read + write), fp32 GEMM {c.gemm_gflops:.0f} GFLOP/s\n")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))


def save(family: str, rows: list[Row], ceilings: Ceilings, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{family}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"family": family, "ceilings": asdict(ceilings), "rows": [asdict(r) for r in rows]}, f, indent=1)
    os.replace(tmp, path)
    return path


def cache_lines(indices: torch.Tensor, element_size: int, line: int = 64) -> int:
    """How many distinct cache lines a gather or scatter at `indices` touches."""
    if indices.numel() == 0:
        return 0
    return int(torch.unique_consecutive(indices.long() // (line // element_size)).numel())
