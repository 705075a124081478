"""Sparse-diff composition ops: pure-PyTorch reference, fake impl, and backend dispatch.

The C++ kernels are in csrc/cpu/compose.cpp and csrc/cuda/compose.cu, the Triton kernels in
xlsparse/triton/compose.py; the update math they share is csrc/include/xlsparse/compose.h.
"""
import torch

from .. import _ext
from . import _common

_common.register("sparse_axpy_")


def sparse_axpy_reference(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float) -> None:
    """Pure-PyTorch sparse_axpy_: computed in the accumulation dtype, rounded once on store."""
    _common.check_sparse_update("sparse_axpy_", dense, indices, values)
    _common.check_indices("sparse_axpy_", indices, dense.numel())
    flat = dense.view(-1)
    idx = indices.long()
    acc = _common.acc_dtype(dense.dtype)
    flat[idx] = (flat[idx].to(acc) + alpha * values.to(acc)).to(dense.dtype)


if _ext.loaded():

    @torch.library.register_fake("xlsparse::sparse_axpy_")
    def _sparse_axpy_fake(dense, indices, values, alpha):
        _common.check_sparse_update("sparse_axpy_", dense, indices, values)


def sparse_axpy_(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """`dense.view(-1)[indices] += alpha * values`, in place; returns `dense`.

    `indices` are int32 or int64, sorted and unique, inside [0, dense.numel()); `values` have
    dense's dtype. Half types are updated in float32 and rounded once. Bad input raises before
    anything is written.
    """
    backend = _common.backend_for("sparse_axpy_", dense.device)
    if backend == "reference":
        sparse_axpy_reference(dense, indices, values, alpha)
    elif backend == "triton":
        from ..triton.compose import triton_sparse_axpy_

        _common.check_sparse_update("sparse_axpy_", dense, indices, values)
        if not torch.compiler.is_compiling():
            _common.check_indices("sparse_axpy_", indices, dense.numel())
        triton_sparse_axpy_(dense, indices, values, float(alpha))
    else:
        torch.ops.xlsparse.sparse_axpy_(dense, indices, values, float(alpha))
    return dense
