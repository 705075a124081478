"""What every op family shares: backend choice per device and the Python side of argument checks.

The backend of an op call is chosen from the device of its tensors:
CPU -> the C++ kernel ("cpu"), CUDA -> the CUDA C++ kernel ("cuda"), falling back to "triton"
and then "reference" when a compiled kernel is missing. `XLSPARSE_BACKEND` overrides the choice.
"""
import functools
import os

import torch

from .. import _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")

# op name -> True when it has a Triton implementation; filled by the family modules.
OPS: dict[str, bool] = {}


def register(op: str, has_triton: bool = True) -> None:
    """Record `xlsparse::<op>` so that `xlsparse.backends()` reports it."""
    OPS[op] = has_triton


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, and CPU tensors under TRITON_INTERPRET=1."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


# torch.compile evaluates the choice once while tracing and keeps it as a constant.
@torch.compiler.assume_constant_result
def backend_for(op: str, device: torch.device) -> str:
    """The backend that runs `op` on `device`: XLSPARSE_BACKEND if set, else the fastest present."""
    forced = os.environ.get("XLSPARSE_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"XLSPARSE_BACKEND={forced!r} is not one of {BACKENDS}")
        if forced == "cpu" and not (device.type == "cpu" and _ext.has_kernel(op, "CPU")):
            raise RuntimeError(f"XLSPARSE_BACKEND=cpu but {op} has no CPU kernel for a {device.type} tensor")
        if forced == "cuda" and not (device.type == "cuda" and _ext.has_kernel(op, "CUDA")):
            raise RuntimeError(f"XLSPARSE_BACKEND=cuda but {op} has no CUDA kernel for a {device.type} tensor")
        if forced == "triton" and not (OPS.get(op, False) and triton_usable(device)):
            raise RuntimeError(
                f"XLSPARSE_BACKEND=triton but triton cannot run {op} on {device.type} "
                "(install triton; CPU tensors need TRITON_INTERPRET=1)"
            )
        return forced
    if device.type == "cpu" and _ext.has_kernel(op, "CPU"):
        return "cpu"
    if device.type == "cuda":
        if _ext.has_kernel(op, "CUDA"):
            return "cuda"
        if OPS.get(op, False) and triton_usable(device):
            return "triton"
    return "reference"


def backends() -> dict[str, dict[str, bool]]:
    """For every op, which compiled backends this install has: {op: {"cpu", "cuda", "triton"}}."""
    return {
        op: {
            "cpu": _ext.has_kernel(op, "CPU"),
            "cuda": _ext.has_kernel(op, "CUDA"),
            "triton": has_triton and triton_importable(),
        }
        for op, has_triton in OPS.items()
    }


def mark_written(tensors) -> None:
    """Bump the version counters of tensors a C++ kernel wrote in place. The dispatcher does not
    do it for ops defined in C++, so without this autograd would miss an in-place change of a
    saved tensor, and caches keyed on `_version` (SparseDeltaLinear's merged weight) would go stale
    after an optimizer step. Inference tensors have no counter; compiled graphs track writes
    themselves."""
    if torch.compiler.is_compiling():
        return
    tensors = [t for t in tensors if t is not None and not t.is_inference()]
    if tensors:
        torch.autograd.graph.increment_version(tensors)


# --- argument checks (the Python twin of csrc/include/xlsparse/checks.h) ---

def check_sparse_update(op: str, dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    """Metadata checks for an in-place update of dense.view(-1) at `indices` by `values`."""
    if not dense.is_contiguous():
        raise ValueError(f"{op}: dense must be contiguous")
    if indices.dim() != 1 or values.dim() != 1:
        raise ValueError(f"{op}: indices and values must be 1-D, got {tuple(indices.shape)} and {tuple(values.shape)}")
    if indices.numel() != values.numel():
        raise ValueError(f"{op}: indices has {indices.numel()} entries but values has {values.numel()}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: indices must be int32 or int64, got {indices.dtype}")
    if not dense.is_floating_point():
        raise TypeError(f"{op}: dense must be floating point, got {dense.dtype}")
    if values.dtype != dense.dtype:
        raise TypeError(f"{op}: values dtype {values.dtype} does not match dense dtype {dense.dtype}")
    if indices.device != dense.device or values.device != dense.device:
        raise ValueError(
            f"{op}: dense, indices and values must be on one device, got {dense.device}, {indices.device}, {values.device}"
        )


def check_indices(op: str, indices: torch.Tensor, numel: int) -> None:
    """Indices must be strictly increasing and inside [0, numel). Reads the data (a sync on CUDA)."""
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= numel:
        raise IndexError(f"{op}: indices out of range [0, {numel}): min {lo}, max {hi}")
    if indices.numel() > 1:
        bad = torch.nonzero(indices[1:] <= indices[:-1])
        if bad.numel():
            i = int(bad[0]) + 1
            raise ValueError(
                f"{op}: indices must be sorted and unique; position {i} holds {int(indices[i])} after {int(indices[i - 1])}"
            )


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
