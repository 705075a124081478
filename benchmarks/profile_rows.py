"""Where a benchmark row's time goes: wall time per call against the device's kernel time, and
the host syncs, copies and kernel launches of one call, read from torch's profiler
(`python -m xlsparse.benchmarks.profile_rows --device cuda`, or `python -m benchmarks.profile_rows` in a
source tree; `benchmarks/gpu.sh` runs it).

On the first GPU (an H200) this is what explained the slow rows: a compact MaskedAdamW step made
196 host syncs, and an apply spent 10.5 ms on the host for 2.2 ms of kernels. Each row prints its
counts, then the kernels that took the most device time.
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from . import bench_compose, bench_matmul, bench_optim

# (family module, op, density, a word of the baseline's name): one row of each slow kind, fp32.
ROWS = [(bench_optim, "MaskedAdamW compact", 0.01, "index_select"),
        (bench_optim, "MaskedAdamW dense", 0.01, "unmasked"),
        (bench_compose, "apply lang+task", 0.01, "index_add_"),
        (bench_compose, "revert (bit-exact)", 0.01, ""),
        (bench_matmul, "sparse_delta_linear fwd+bwd", 0.01, "frozen"),
        (bench_matmul, "sddmm", 0.01, "dense"),
        (bench_matmul, "multi_delta_linear gates fwd", 0.01, ""),
        (bench_matmul, "multi_delta_linear hard fwd+bwd", 0.01, "")]
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def find(cases, op: str, density: float, baseline_word: str):
    """The first fp32 uniform-mask case of `op` near `density` whose baseline names the word."""
    for case in cases:
        near = case.density is None or abs(case.density - density) < 1e-4
        if case.op == op and case.dtype == "float32" and case.masks == "uniform" and near \
                and baseline_word in case.baseline_name:
            return case
    return None


def profile_call(fn, device: str, calls: int = 3, setup=None) -> dict:
    """Wall ms per call (after warm-up) and, per call, device kernel ms, host syncs, memcpys and
    launches, with the profiler's table of the kernels. `setup`, where given, runs before each
    call of `fn`, outside the timing and the profile (a revert row's apply)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(calls):
        if setup is not None:
            setup()
        fn()
    sync()
    wall = 0.0
    for _ in range(calls):
        if setup is not None:
            setup()
            sync()
        start = time.perf_counter()
        fn()
        sync()
        wall += time.perf_counter() - start
    wall_ms = wall / calls * 1e3
    with profile(activities=activities) as prof:
        for _ in range(calls):
            if setup is not None:
                prof.toggle_collection_dynamic(False, activities)
                setup()
                sync()
                prof.toggle_collection_dynamic(True, activities)
            fn()
        sync()
    events = prof.key_averages()

    def per_call(names):
        return sum(e.count for e in events if e.key in names) / calls

    kernel_us = sum(e.device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"wall_ms": wall_ms, "kernel_ms": kernel_us / calls / 1e3, "syncs": per_call(SYNCS),
            "memcpys": sum(e.count for e in events if e.key.startswith("cudaMemcpy")) / calls,
            "launches": per_call(LAUNCHES),
            "table": events.table(sort_by="device_time_total" if device == "cuda" else "self_cpu_time_total",
                                  row_limit=8, max_name_column_width=60)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="the --quick shapes of the benchmark families")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    made = {}
    for module, op, density, word in ROWS:
        if module not in made:
            made[module] = module.cases(quick=args.quick, device=args.device)
        case = find(made[module], op, density, word)
        if case is None:
            print(f"## {op}: no such row at {density:g}", flush=True)
            continue
        got = profile_call(case.fn, args.device, setup=case.setup)
        print(f"## {op}, {case.shape}, {100 * case.density:.2g}% (vs {case.baseline_name}): wall {got['wall_ms']:.3f} ms "
              f"a call, kernels {got['kernel_ms']:.3f} ms, host syncs {got['syncs']:.0f}, memcpys {got['memcpys']:.0f}, "
              f"launches {got['launches']:.0f}", flush=True)
        print(got["table"], flush=True)


if __name__ == "__main__":
    main()
