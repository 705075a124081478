"""Triton kernels of the compose family: kernels, then launchers registered as torch ops."""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import INTERPRET


@triton.jit
def _sparse_axpy_kernel(dense_ptr, idx_ptr, val_ptr, alpha_ptr, k, numel, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < k
    idx = tl.load(idx_ptr + offs, mask=live, other=0).to(tl.int64)
    # Out-of-range indices are rejected before launch; the mask keeps a bad one from writing anyway.
    live = live & (idx >= 0) & (idx < numel)
    alpha = tl.load(alpha_ptr).to(ACC)
    val = tl.load(val_ptr + offs, mask=live, other=0.0).to(ACC)
    old = tl.load(dense_ptr + idx, mask=live, other=0.0).to(ACC)
    tl.store(dense_ptr + idx, (old + alpha * val).to(dense_ptr.dtype.element_ty), mask=live)


def acc_type(dtype: torch.dtype):
    """Triton accumulation type: float64 stays float64, half types and float32 use float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton_op("xlsparse::triton_sparse_axpy_", mutates_args={"dense"})
def triton_sparse_axpy_(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float) -> None:
    k = indices.numel()
    if k == 0:
        return
    block = 4096 if INTERPRET else 1024
    # alpha travels as a tensor: a Python float would be rounded to float32 for float64 data.
    alpha_t = torch.full((1,), alpha, dtype=torch.float64, device=dense.device)
    wrap_triton(_sparse_axpy_kernel)[(triton.cdiv(k, block),)](
        dense, indices, values, alpha_t, k, dense.numel(), BLOCK=block, ACC=acc_type(dense.dtype)
    )


# An explicit fake impl: under TRITON_INTERPRET=1 the default one would run the interpreter on
# fake tensors.
@triton_sparse_axpy_.register_fake
def _triton_sparse_axpy_fake(dense, indices, values, alpha):
    return None
