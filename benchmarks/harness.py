"""The benchmark harness every family uses.

A run (see `xlsparse bench`):
  1. describes the machine: CPU model, vector ISA from /proc/cpuinfo, threads, torch version;
  2. measures the ceilings: copy bandwidth (the faster of a copy_ and an in-place add_), fp32 GEMM,
     bf16 GEMM where the hardware has bf16;
  3. times every case and its baseline alternately in this process (so that a load spike hits
     both), and measures each one's peak extra memory;
  4. measures the ceilings again. The table is marked NOISY when the two differ by more than 10%
     (relative to the lower), when the 1-minute load average was above the thread count as the run
     started, or when other processes took more than 10% of the run's thread time (/proc/stat; the
     load average during the run counts the run's own threads, so it cannot say).

Before a row is timed, its `check` (where the family script gives one) runs ours and the baseline
once on the row's own inputs and raises when they do not compute the same thing: the row then
fails instead of timing two different computations.

Each row gives the median and the (min, max) spread of both timings, and the roofline share: the
GFLOP/s the op must do against the GEMM rate (compute-bound ops) or the GB/s it must move against
the copy bandwidth (memory-bound ops). The family scripts count those flops and bytes; sparse
gathers count the 64-byte cache lines they touch, not elements.

Peak memory of a CPU call is the highest running total of tensor allocations that torch's profiler
records during one call, above what was allocated before it. It sees every tensor the calling
thread allocates, temporaries inside ops included, and does not depend on how glibc caches freed
pages, which made the resident-set high-water mark either miss reused memory or count one reused
buffer several times. It does not see allocations made on the worker threads of a parallel loop,
nor a C++ kernel's std::vector scratch: SDDMM (the kernel of the extra-memory target) therefore
allocates all its scratch on the calling thread, one slot per worker thread, so that it is
counted; SpMM's per-thread transposes are not. On CUDA it is torch.cuda.max_memory_allocated. No
allocator setting is changed: the timed calls run under glibc's defaults, as users run.
"""
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

# --- the machine -------------------------------------------------------------------------------

# (name shown, /proc/cpuinfo flag that proves it)
ISA_FLAGS = (("AVX2", "avx2"), ("FMA", "fma"), ("AVX-512", "avx512f"), ("AVX-512-BF16", "avx512_bf16"),
             ("AMX-BF16", "amx_bf16"))


def read_cpuinfo() -> str:
    """The text of /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first processor listed in /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def vector_isa(flags: set[str]) -> list[str]:
    """The vector instruction sets that matter here, by name, from cpuinfo flags."""
    return [name for name, flag in ISA_FLAGS if flag in flags]


def has_bf16_hardware(flags: set[str]) -> bool:
    """bf16 dot products in hardware (AVX-512-BF16 or AMX); without them a bf16 GEMM is emulated."""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_in_hardware(device: str) -> bool:
    """Whether `device` multiplies bf16 in hardware: any GPU, or a CPU with AVX-512-BF16 or AMX."""
    return device == "cuda" or has_bf16_hardware(cpu_flags(read_cpuinfo()))


def cpu_model(cpuinfo: str) -> str:
    """The first "model name" in /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> float:
    """The 1-minute load average (0 where the OS does not say)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _busy_and_own_ticks() -> tuple[int, int] | None:
    """(busy clock ticks of all CPUs, ticks of this process and its reaped children), or None
    where /proc does not say."""
    try:
        with open("/proc/stat") as f:
            cpu = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = cpu[3] + cpu[4]  # idle + iowait
    own = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return sum(cpu[:8]) - idle, own


@dataclass
class RunLoad:
    """What else the machine did while a table was measured.

    The load average alone cannot say: a run with 2 threads on 2 cores makes it about 2 by itself,
    and kernel threads push it past 2 (2.2 seen on an idle machine). So the harness counts the CPU
    time that other processes used during the run, from /proc/stat less this process's own."""

    load_before: float  # 1-min load average when the run started: the machine's state, not ours
    others_cores: float | None  # mean cores busy with other processes during the run (None: unknown)


class LoadMonitor:
    """Started before a run, finished after it: the run's `RunLoad`."""

    def __init__(self):
        self.load_before = load_average()
        self.ticks = _busy_and_own_ticks()
        self.start = time.perf_counter()

    def finish(self) -> RunLoad:
        ticks, seconds = _busy_and_own_ticks(), time.perf_counter() - self.start
        if self.ticks is None or ticks is None or seconds <= 0:
            return RunLoad(self.load_before, None)
        others = (ticks[0] - self.ticks[0]) - (ticks[1] - self.ticks[1])
        return RunLoad(self.load_before, max(0.0, others / os.sysconf("SC_CLK_TCK") / seconds))


@dataclass
class Machine:
    """What a table must say about where it was measured."""

    device: str  # "cpu" or "cuda"
    processor: str  # CPU model, or the GPU's name
    isa: list[str]
    kernel_set: str  # the instruction set xlsparse's CPU kernels run with (xlsparse._ext.cpu_capability)
    threads: int
    torch: str
    bf16_hardware: bool


def describe_machine(device: str = "cpu") -> Machine:
    """This machine, as a table's header states it (call after torch.set_num_threads)."""
    info = read_cpuinfo()
    processor = cpu_model(info)
    if device == "cuda":
        processor = f"{torch.cuda.get_device_name()} (host: {processor})"
    from xlsparse import _ext

    return Machine(device, processor, vector_isa(cpu_flags(info)), _ext.cpu_capability() or "none (no extension)",
                   torch.get_num_threads(), torch.__version__, bf16_in_hardware(device))


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a timer reads the work and not its launch."""
    if device == "cuda":
        torch.cuda.synchronize()


# --- ceilings ----------------------------------------------------------------------------------

@dataclass
class Ceilings:
    copy_gbs: float  # bytes read + written per second: the faster of a large copy_ and an in-place add_
    gemm_fp32_gflops: float
    gemm_bf16_gflops: float | None  # None where bf16 is emulated (not a ceiling worth quoting)


def _best_seconds(fn: Callable[[], object], device: str, seconds: float) -> float:
    """The fastest of at least 3 calls, repeated for `seconds`: a ceiling is the best the machine
    does, and a short window misses it (within one minute on an idle 2-core EPYC, best-of-5
    copies, 80 ms in all, read 45 to 55 GB/s; the best of 1 s, 53 to 54)."""
    fn()
    sync(device)
    best, start, reps = math.inf, time.perf_counter(), 0
    while reps < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        sync(device)
        best, reps = min(best, time.perf_counter() - t0), reps + 1
    return best


def measure_ceilings(machine: Machine, quick: bool = False) -> Ceilings:
    """The machine's copy bandwidth and GEMM rates, each the best of about a second of runs.

    The copy bandwidth is the faster of two counts: a copy_ (its source read and its destination
    written, 2 n) and an in-place add_ (both read, one written back, 3 n). On a CPU a copy_ also
    reads each destination line before it writes it (write-allocate), traffic its 2 n leaves out,
    so it read a third below the bandwidth that in-place kernels (apply, AdamW: every line read and
    written back, all counted) reach, and their shares went past 100% of it. The add_ moves no byte
    that its count leaves out. Where a copy_ is the faster (a GPU, whose writes need no read), its
    rate counts."""
    device = machine.device
    seconds = 0.25 if quick else 1.0
    n = (64 if quick else 256) * 2**20 // 4
    if device == "cuda":
        n *= 8
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    copy_gbs = 2 * n * 4 / _best_seconds(lambda: dst.copy_(src), device, seconds) / 1e9
    add_gbs = 3 * n * 4 / _best_seconds(lambda: dst.add_(src), device, seconds) / 1e9  # dst stays finite: k x src
    copy_gbs = max(copy_gbs, add_gbs)
    del src, dst
    m = 1024 if quick else 2048
    if device == "cuda":
        m = 8192
    a, b = torch.randn(m, m, device=device), torch.randn(m, m, device=device)
    fp32 = 2 * m**3 / _best_seconds(lambda: a @ b, device, seconds) / 1e9
    bf16 = None
    if machine.bf16_hardware:  # an emulated bf16 GEMM is no ceiling (about 10 s for 2048x4096x1024 on AVX2)
        a, b = a.bfloat16(), b.bfloat16()
        bf16 = 2 * m**3 / _best_seconds(lambda: a @ b, device, seconds) / 1e9
    return Ceilings(copy_gbs, fp32, bf16)


def gemm_ceiling(ceilings: Ceilings, dtype: str) -> float:
    """The GEMM rate a compute-bound row of `dtype` is compared with (fp32 where bf16 is emulated)."""
    if dtype in ("bfloat16", "float16") and ceilings.gemm_bf16_gflops:
        return ceilings.gemm_bf16_gflops
    return ceilings.gemm_fp32_gflops


def best_ceilings(before: Ceilings, after: Ceilings) -> Ceilings:
    """The higher of each ceiling: a ceiling measured under load is too low and would flatter rows."""
    bf16 = None if before.gemm_bf16_gflops is None else max(before.gemm_bf16_gflops, after.gemm_bf16_gflops or 0)
    return Ceilings(max(before.copy_gbs, after.copy_gbs), max(before.gemm_fp32_gflops, after.gemm_fp32_gflops), bf16)


NOISE_TOLERANCE = 0.10


def noisy_reasons(before: Ceilings, after: Ceilings, load: RunLoad, threads: int,
                  tolerance: float = NOISE_TOLERANCE) -> list[str]:
    """Why a table measured between `before` and `after` is not to be trusted (empty: quiet):
    a ceiling moved by more than `tolerance`, the load average exceeded the thread count before
    the run, or other processes took more than `tolerance` of the CPU time the run's threads had."""
    reasons = []
    pairs = [("copy bandwidth", before.copy_gbs, after.copy_gbs),
             ("fp32 GEMM", before.gemm_fp32_gflops, after.gemm_fp32_gflops)]
    if before.gemm_bf16_gflops and after.gemm_bf16_gflops:
        pairs.append(("bf16 GEMM", before.gemm_bf16_gflops, after.gemm_bf16_gflops))
    for name, a, b in pairs:
        change = abs(b - a) / min(a, b)  # relative to the lower one: 30 -> 33.2 is 10.7%, not 9.6%
        if change > tolerance:
            reasons.append(f"{name} changed by {100 * change:.0f}% during the run ({a:.1f} -> {b:.1f})")
    if load.load_before > threads:
        reasons.append(f"1-min load average was {load.load_before:.1f} when the run started, "
                       f"above the {threads} threads used")
    if load.others_cores is None:
        reasons.append("the CPU time of other processes could not be read")
    elif load.others_cores > tolerance * threads:
        reasons.append(f"other processes kept {load.others_cores:.2f} cores busy during the run, "
                       f"more than {100 * tolerance:.0f}% of the {threads} threads used")
    return reasons


# --- cases and timing --------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A goal for one row, judged from one run.

    metric "speedup": baseline median / xlsparse median >= bound;
    metric "roofline": roofline share (a fraction) >= bound;
    metric "extra_memory": (peak - baseline peak) / unit_bytes <= bound.
    """

    label: str
    metric: str
    bound: float
    unit_bytes: int = 0

    def judge(self, row: "Row") -> tuple[float | None, bool | None]:
        """(the measured value, whether it meets the bound); (None, None) if it was not measured."""
        if self.metric == "speedup":
            value = row.speedup
        elif self.metric == "roofline":
            value = None if row.roofline_pct is None else row.roofline_pct / 100
        elif self.metric == "extra_memory":
            if row.baseline_peak_mib is None or math.isnan(row.peak_mib) or not self.unit_bytes:
                return None, None
            value = (row.peak_mib - row.baseline_peak_mib) * 2**20 / self.unit_bytes
            return value, value <= self.bound
        else:
            raise ValueError(f"Target.metric must be speedup, roofline or extra_memory, not {self.metric!r}")
        # a FAILED row's times are NaN, so its share and speed-up are too: not measured, not a miss
        return (None, None) if value is None or math.isnan(value) else (value, value >= self.bound)


@dataclass
class Case:
    """One row: `fn` (xlsparse) against `baseline` on the same inputs.

    `bytes` and `flops` are what the op must move and compute (the minimum, counted by the family
    script): a row with only `flops` is compute-bound, one with only `bytes` memory-bound, and one
    with both is judged against whichever roof binds it (`roofline`).
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
    masks: str = "uniform"  # "uniform" random supports, or which real masks
    targets: tuple[Target, ...] = ()
    pairs: int | None = None  # timed pairs after one warm-up pair, for calls of tens of seconds (default 2 + 7)
    # Run once before timing: raises ValueError when ours and the baseline do not compute the same
    # thing on this row's inputs (see `assert_same`).
    check: Callable[[], None] | None = None
    # Run before each call of `fn`, outside the timer and the memory peak: what the call consumes
    # (a revert row's apply), so that only `fn` is measured.
    setup: Callable[[], object] | None = None


@dataclass
class Row:
    """One measured case. `achieved`, `roofline_pct`, `bound` and `targets` are filled by
    `judge` once the run's ceilings are known."""

    op: str
    shape: str
    density: float | None
    dtype: str
    backend: str
    masks: str
    ms: float  # median
    ms_min: float
    ms_max: float
    baseline: str
    baseline_ms: float | None
    baseline_ms_min: float | None
    baseline_ms_max: float | None
    speedup: float | None
    peak_mib: float
    baseline_peak_mib: float | None
    flops: int = 0
    bytes: int = 0
    note: str = ""
    achieved: str = ""
    roofline_pct: float | None = None
    bound: str = ""  # "compute", "memory" or ""
    goals: tuple[Target, ...] = ()
    targets: list[dict] = field(default_factory=list)  # each goal judged: label, bound, value, met


def time_alternately(fn: Callable[[], object], baseline: Callable[[], object] | None, device: str = "cpu",
                     warmup: int = 2, reps: int = 7, min_seconds: float = 0.0,
                     setup: Callable[[], object] | None = None) -> tuple[list[float], list[float]]:
    """Seconds per call of `fn` and `baseline`, timed in turn after warm-up, in the order fn,
    baseline, baseline, fn, fn, ... (ABBA: neither always runs in the other's wake of caches and
    freed memory). `setup`, where given, runs before each call of `fn`, untimed.

    Runs at least `reps` pairs, more while under `min_seconds` in all, at most 200.
    """
    calls = [fn] if baseline is None else [fn, baseline]
    setups = [setup, None]
    for _ in range(warmup):
        for call, before in zip(calls, setups):
            if before is not None:
                before()
            call()
    sync(device)
    times: list[list[float]] = [[] for _ in calls]
    order = list(zip(calls, setups, times))
    start = time.perf_counter()
    while len(times[0]) < reps or time.perf_counter() - start < min_seconds:
        for call, before, out in order:
            if before is not None:
                before()
                sync(device)
            t0 = time.perf_counter()
            call()
            sync(device)
            out.append(time.perf_counter() - t0)
        order.reverse()
        if len(times[0]) >= 200:
            break
    return times[0], (times[1] if baseline is not None else [])


def _cpu_tensor_peak_bytes(fn: Callable[[], object]) -> float:
    """The highest running total of CPU tensor allocations during one call of `fn`."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    # kineto prints two "USDT" lines per profiler start/stop below level 6: one pair per row, noise
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = []  # (time, signed size): frees are negative
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    # On equal timestamps count the allocation before the free, so a peak is never missed.
    return peak_of_running_total([size for _, size in sorted(allocations, key=lambda a: (a[0], -a[1]))])


def peak_of_running_total(sizes: list[int]) -> int:
    """The highest prefix sum of signed allocation sizes (0 if it never goes above the start)."""
    total = peak = 0
    for size in sizes:
        total += size
        peak = max(peak, total)
    return peak


def peak_mib(fn: Callable[[], object], device: str = "cpu", setup: Callable[[], object] | None = None) -> float:
    """Peak memory one call of `fn` allocates above what was allocated before it (and after
    `setup`, where given), in MiB."""
    if setup is not None:
        setup()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        return _cpu_tensor_peak_bytes(fn) / 2**20
    except (ImportError, AttributeError, RuntimeError):  # a torch without the profiler's event tree
        return float("nan")


def roofline(flops: int, nbytes: int, dtype: str, seconds: float, ceilings: Ceilings) -> tuple[str, float | None, str]:
    """(achieved rate as text, share of the ceiling in %, "compute" or "memory").

    A row with both counts is judged against the roof that binds it: the roofline model's
    attainable rate is min(GEMM rate, flops/bytes x copy bandwidth), so the share is the higher of
    the two (an SDDMM at 1% does about 4 flops per byte it must read, below the machine's balance:
    against the GEMM rate alone its share read 2-3x too low)."""
    if flops and nbytes:
        compute = 100 * flops / seconds / 1e9 / gemm_ceiling(ceilings, dtype)
        memory = 100 * nbytes / seconds / 1e9 / ceilings.copy_gbs
        if memory > compute:
            return f"{nbytes / seconds / 1e9:.1f} GB/s", memory, "memory"
    if flops:
        rate = flops / seconds / 1e9
        return f"{rate:.1f} GFLOP/s", 100 * rate / gemm_ceiling(ceilings, dtype), "compute"
    if nbytes:
        rate = nbytes / seconds / 1e9
        return f"{rate:.1f} GB/s", 100 * rate / ceilings.copy_gbs, "memory"
    return "", None, ""


def timing_floor(device: str, quick: bool) -> float:
    """The seconds of timed pairs per case, at least: 1 on a CPU; 0.25 on a GPU, whose timings
    repeat within a few percent after warm-up and whose lease is short; none with --quick."""
    return 0.0 if quick else 0.25 if device == "cuda" else 1.0


def measure(case: Case, device: str = "cpu", quick: bool = False) -> Row:
    """Time `case` and its baseline alternately and measure both peaks."""
    warmup, reps = (1, 3) if quick else (2, 7)
    if case.check is not None:
        case.check()
    if case.pairs is not None:
        warmup, reps = 1, case.pairs
    ours, theirs = time_alternately(case.fn, case.baseline, device, warmup=warmup, reps=reps,
                                    min_seconds=timing_floor(device, quick), setup=case.setup)
    t = statistics.median(ours)
    tb = statistics.median(theirs) if theirs else None
    return Row(case.op, case.shape, case.density, case.dtype, case.backend, case.masks, t * 1e3, min(ours) * 1e3,
               max(ours) * 1e3, case.baseline_name, None if tb is None else tb * 1e3,
               min(theirs) * 1e3 if theirs else None, max(theirs) * 1e3 if theirs else None,
               None if tb is None else tb / t, peak_mib(case.fn, device, case.setup),
               None if case.baseline is None else peak_mib(case.baseline, device),
               case.flops, case.bytes, case.note, goals=case.targets)


def failed_row(case: Case, error: Exception) -> Row:
    """The row of a case whose run raised: no timings, the error in the note."""
    nan = math.nan
    return Row(case.op, case.shape, case.density, case.dtype, case.backend, case.masks, nan, nan, nan,
               case.baseline_name, None, None, None, None, nan, None, note=f"FAILED: {type(error).__name__}: {error}",
               goals=case.targets)


def judge(row: Row, ceilings: Ceilings) -> Row:
    """Fill the row's roofline share against `ceilings` and judge its targets."""
    row.achieved, row.roofline_pct, row.bound = roofline(row.flops, row.bytes, row.dtype, row.ms / 1e3, ceilings)
    row.targets = []
    for goal in row.goals:
        value, met = goal.judge(row)
        row.targets.append({"label": goal.label, "metric": goal.metric, "bound": goal.bound, "value": value,
                            "met": met})
    return row


# --- the table ---------------------------------------------------------------------------------

def header_lines(machine: Machine, before: Ceilings, after: Ceilings, load: RunLoad, quick: bool) -> list[str]:
    """The facts printed above every table, NOISY first when the run was disturbed."""
    lines = []
    reasons = noisy_reasons(before, after, load, machine.threads)
    if reasons:
        lines.append("**NOISY: do not publish these numbers.** " + "; ".join(reasons) + ".")
    isa = ", ".join(machine.isa) or "none of AVX2/AVX-512/AMX"

    def ceil(c: Ceilings) -> str:
        bf16 = f"{c.gemm_bf16_gflops:.0f}" if c.gemm_bf16_gflops else "not measured (emulated)"
        return (f"copy {c.copy_gbs:.1f} GB/s (read + write; the faster of copy_ and in-place add_), "
                f"fp32 GEMM {c.gemm_fp32_gflops:.0f} GFLOP/s, bf16 GEMM {bf16}")

    lines += [f"- processor: {machine.processor}; vector ISA: {isa}; xlsparse CPU kernels: {machine.kernel_set}",
              f"- device: {machine.device}; torch {machine.torch}; {machine.threads} threads"
              f"; 1-min load average at the start: {load.load_before:.2f}; cores busy with other "
              f"processes during the run: {'unknown' if load.others_cores is None else f'{load.others_cores:.2f}'}",
              f"- ceilings before: {ceil(before)}",
              f"- ceilings after:  {ceil(after)}",
              "- timing: median (min, max) of pairs timed alternately in one process"
              + ("; --quick: small shapes, 3 pairs" if quick else
                 f"; 7 pairs and {timing_floor(machine.device, quick):g} s at least (rows whose note says so: fewer)"),
              "- roofline share: against the higher of the two ceilings; peak = tensor allocations above the inputs"]
    return lines


TABLE_HEADER = ("| op | shape | density | masks | dtype | backend | ms median (min, max) | baseline "
                "| baseline ms median (min, max) | speed-up | achieved | roofline share | peak MiB "
                "| baseline peak MiB | note |")


def _num(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _cell(text) -> str:
    """Text for a markdown table cell: a `|` inside (the op "global top-K |x|") would end the cell
    and shift every later column of the row under the wrong header."""
    return str(text).replace("|", "\\|")


def format_row(r: Row) -> str:
    """One markdown table row."""
    density = "" if r.density is None else f"{100 * r.density:.3g}%"
    ours = f"{r.ms:.3f} ({r.ms_min:.3f}, {r.ms_max:.3f})"
    theirs = "" if r.baseline_ms is None else f"{r.baseline_ms:.3f} ({r.baseline_ms_min:.3f}, {r.baseline_ms_max:.3f})"
    share = "" if r.roofline_pct is None else f"{r.roofline_pct:.0f}% of {'GEMM' if r.bound == 'compute' else 'copy'}"
    return (f"| {_cell(r.op)} | {_cell(r.shape)} | {density} | {_cell(r.masks)} | {r.dtype} | {_cell(r.backend)} "
            f"| {ours} | {_cell(r.baseline)} | {theirs} | {_num(r.speedup, '.2f')}{'x' if r.speedup else ''} "
            f"| {r.achieved} | {share} | {r.peak_mib:.1f} | {_num(r.baseline_peak_mib, '.1f')} | {_cell(r.note)} |")


def format_table(rows: list[Row]) -> list[str]:
    """The markdown table of `rows`, header first."""
    return [TABLE_HEADER, "|" + "---|" * (TABLE_HEADER.count("|") - 1)] + [format_row(r) for r in rows]


def _beside_bound(value: float, bound: float, digits: int) -> str:
    """`value` with `digits` decimals, or up to 2 more where fewer would print `bound` itself."""
    shown = next((d for d in range(digits, digits + 3) if round(value, d) != round(bound, 9)), digits + 2)
    return f"{value:.{shown}f}"


def format_targets(rows: list[Row], quick: bool) -> list[str]:
    """One line per target that a row carries: the target, the value measured, met or not."""
    lines = ["| target | row | measured | met |", "|---|---|---|---|"]
    for r in rows:
        for t in r.targets:
            kind = t["metric"]
            value = t["value"]
            # Enough decimals that a value other than the bound never prints as the bound
            # (0.9498x is not 0.95x, 79.96% is not 80%, 0.2549 of a weight is not 0.25).
            if value is None:
                shown = "not measured"
            elif kind == "speedup":
                shown = f"{_beside_bound(value, t['bound'], 2)}x"
            elif kind == "roofline":
                shown = f"{_beside_bound(100 * value, 100 * t['bound'], 0)}% of the ceiling"
            else:
                shown = f"{_beside_bound(value, t['bound'], 2)} of one O x I weight"
            met = {True: "yes", False: "**no**", None: "?"}[t["met"]]
            lines.append(f"| {_cell(t['label'])} | {_cell(f'{r.op}, {r.shape}, {r.dtype} vs {r.baseline}')} | {shown} "
                         f"| {met} |")
    if quick and len(lines) > 2:
        lines.append("\n(--quick shapes are smaller than the issue's cases: these verdicts do not count.)")
    return lines


def save(family: str, rows: list[Row], machine: Machine, before: Ceilings, after: Ceilings, load: RunLoad,
         out_dir: str) -> str:
    """Write one family's rows, with the machine and both ceilings, to `out_dir/<family>.json`."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{family}.json")
    tmp = path + ".tmp"
    record = {"family": family, "machine": asdict(machine), "ceilings_before": asdict(before),
              "ceilings_after": asdict(after), "load": asdict(load),
              "noisy": noisy_reasons(before, after, load, machine.threads), "rows": [asdict(r) for r in rows]}
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
    return path


# --- checking that both sides compute the same thing -------------------------------------------

def assert_same(what: str, ours, theirs, rtol: float | None = None) -> None:
    """Raise ValueError unless `ours` and `theirs` (tensors, or tuples of them) agree: the largest
    difference within `rtol` of the largest magnitude of `theirs` (default: 1e-3 for float32 and
    wider, 3e-2 for bfloat16/float16, which round each output once in their own precision)."""
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    theirs = theirs if isinstance(theirs, (tuple, list)) else (theirs,)
    if len(ours) != len(theirs):
        raise ValueError(f"check {what}: ours gives {len(ours)} outputs, the baseline {len(theirs)}")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"check {what}: output {i} has shape {tuple(a.shape)}, the baseline's {tuple(b.shape)}")
        tol = rtol if rtol is not None else (3e-2 if a.dtype in (torch.bfloat16, torch.float16) else 1e-3)
        a, b = a.detach().double(), b.detach().double()
        if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
            raise ValueError(f"check {what}: output {i} is not finite")
        scale = float(b.abs().max()) if b.numel() else 0.0
        err = float((a - b).abs().max()) if a.numel() else 0.0
        if err > tol * max(scale, 1e-30):
            raise ValueError(f"check {what}: output {i} differs from the baseline's by {err:.3g} "
                             f"(largest magnitude {scale:.3g}, tolerance {tol:g} of it)")


# --- counting what ops must move ---------------------------------------------------------------

LINE_BYTES = 64


def cache_lines(indices: torch.Tensor, element_size: int, line: int = LINE_BYTES) -> int:
    """How many distinct cache lines a gather or scatter at sorted `indices` touches."""
    if indices.numel() == 0:
        return 0
    return int(torch.unique_consecutive(indices.long() // (line // element_size)).numel())


# --- backend choice ----------------------------------------------------------------------------

def backend_of(op: str, device) -> str:
    """The backend xlsparse runs `op` with on `device`: the one place benchmarks ask.

    Where XLSPARSE_BACKEND names a backend the op lacks (no Triton top-K, say), the op runs its
    reference (or raises, which fails that row): the label says so rather than stopping the run.
    """
    from xlsparse.ops.registry import backend_for

    try:
        return backend_for(op, torch.device(device))
    except RuntimeError:
        return f"reference (no {os.environ.get('XLSPARSE_BACKEND', '')} kernel)"
