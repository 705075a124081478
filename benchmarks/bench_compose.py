"""Sparse-diff composition benchmarks (`xlsparse bench --family compose`)."""
import torch

from xlsparse.benchmarks import baselines
from xlsparse.benchmarks.harness import Case, cache_lines
from xlsparse.ops._common import backend_for
from xlsparse.ops.compose import sparse_axpy_

FAMILY = "compose"


def _axpy_case(n: int, density: float) -> Case:
    gen = torch.Generator().manual_seed(0)
    k = int(n * density)
    dense = torch.randn(n, generator=gen)
    idx = torch.randperm(n, generator=gen)[:k].sort().values
    vals = torch.randn(k, generator=gen)
    # Bytes: indices and values streamed once, each touched cache line of dense read and written.
    moved = k * (idx.element_size() + vals.element_size()) + 2 * 64 * cache_lines(idx, 4)
    return Case(
        op="sparse_axpy_",
        shape=f"[{n}]",
        density=density,
        dtype="float32",
        backend=backend_for("sparse_axpy_", dense.device),
        fn=lambda: sparse_axpy_(dense, idx, vals, 1e-3),
        baseline=lambda: baselines.index_add_axpy(dense, idx, vals, 1e-3),
        baseline_name="index_add_",
        bytes=moved,
    )


def cases(quick: bool = False) -> list[Case]:
    n = 8 * 2**20 if quick else 64 * 2**20
    return [_axpy_case(n, d) for d in (0.01, 0.05)]
