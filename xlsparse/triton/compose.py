"""Triton kernels of the compose family: kernels, then launchers registered as torch ops."""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..ops import registry
from .common import INTERPRET, acc_type


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


@triton_op("xlsparse::triton_sparse_axpy_", mutates_args={"dense"})
def triton_sparse_axpy_(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float) -> None:
    k = indices.numel()
    if k == 0:
        return
    block = 4096 if INTERPRET else 1024
    # alpha travels as a tensor: a Python float would be rounded to float32 for float64 data.
    alpha_t = torch.full((1,), alpha, dtype=torch.float64, device=dense.device)
    wrap_triton(_sparse_axpy_kernel)[(triton.cdiv(k, block),)](
        dense, indices.contiguous(), values.contiguous(), alpha_t, k, dense.numel(), BLOCK=block, ACC=acc_type(dense.dtype)
    )


# An explicit fake impl: under TRITON_INTERPRET=1 the default one would run the interpreter on
# fake tensors.
@triton_sparse_axpy_.register_fake
def _triton_sparse_axpy_fake(dense, indices, values, alpha):
    return None


# --- apply_diffs_: the entries of one tensor, concatenated; offsets[f] is where entry f starts ---

@triton.jit
def _find(idx_ptr, j, start, end, live, steps):
    """Vector binary search of j in the sorted idx[start, end): (position, found)."""
    lo = tl.zeros_like(j) + start
    hi = tl.zeros_like(j) + end
    for _ in range(steps):
        go = live & (lo < hi)
        mid = (lo + hi) // 2
        v = tl.load(idx_ptr + mid, mask=go, other=0)
        right = go & (v < j)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(go & ~right, mid, hi)
    inside = live & (lo < end)
    found = inside & (tl.load(idx_ptr + lo, mask=inside, other=-1) == j)
    return lo, found


@triton.jit
def _apply_union_kernel(dense_ptr, idx_ptr, val_ptr, saved_ptr, offsets_ptr, alpha_ptr, n_entries, total, steps,
                        BLOCK: tl.constexpr, ACC: tl.constexpr):
    m = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = m < total
    j = tl.load(idx_ptr + m, mask=live, other=0)
    entry = tl.zeros_like(m)
    for f in range(1, n_entries):
        entry += (m >= tl.load(offsets_ptr + f)).to(tl.int64)
    old = tl.load(dense_ptr + j, mask=live, other=0.0)
    acc = tl.zeros([BLOCK], ACC)
    # The first entry that holds j owns it; entries before this element's decide ownership
    # before any share is added, since f runs in order.
    owner = live
    for f in range(0, n_entries):
        pos, found = _find(idx_ptr, j, tl.load(offsets_ptr + f), tl.load(offsets_ptr + f + 1), live, steps)
        owner = owner & ~(found & (f < entry))
        take = owner & found & (f >= entry)
        tl.store(saved_ptr + pos, old, mask=take)
        v = tl.load(val_ptr + pos, mask=take, other=0.0).to(ACC)
        alpha = tl.load(alpha_ptr + f).to(ACC)
        acc = tl.where(take, acc + alpha * v, acc)
    # The shares are summed first and added to the old value once, as in the C++ kernels.
    tl.store(dense_ptr + j, (old.to(ACC) + acc).to(dense_ptr.dtype.element_ty), mask=owner)


@triton.jit
def _scatter_kernel(dense_ptr, idx_ptr, val_ptr, k, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < k
    idx = tl.load(idx_ptr + offs, mask=live, other=0).to(tl.int64)
    tl.store(dense_ptr + idx, tl.load(val_ptr + offs, mask=live), mask=live)


def _groups(num_dense: int, target: list[int]) -> list[list[int]]:
    groups = [[] for _ in range(num_dense)]
    for e, t in enumerate(target):
        groups[t].append(e)
    return groups


@triton_op("xlsparse::triton_apply_diffs_", mutates_args={"dense", "saved"})
def triton_apply_diffs_(dense: list[torch.Tensor], indices: list[torch.Tensor], values: list[torch.Tensor],
                        target: list[int], alphas: list[float], saved: list[torch.Tensor]) -> None:
    block = 4096 if INTERPRET else 1024
    # One launch per tensor over its entries concatenated; the union is formed by ownership.
    for t, group in enumerate(_groups(len(dense), target)):
        lengths = [indices[e].numel() for e in group]
        total = sum(lengths)
        if total == 0:
            continue
        device = dense[t].device
        idx = torch.cat([indices[e].to(torch.int64) for e in group])
        val = torch.cat([values[e] for e in group])
        offsets = torch.tensor([0] + lengths, dtype=torch.int64, device=device).cumsum(0)
        alpha_t = torch.tensor([alphas[e] for e in group], dtype=torch.float64, device=device)
        out = torch.empty_like(val)
        steps = max(lengths).bit_length() + 1
        wrap_triton(_apply_union_kernel)[(triton.cdiv(total, block),)](
            dense[t], idx, val, out, offsets, alpha_t, len(group), total, steps, BLOCK=block,
            ACC=acc_type(dense[t].dtype))
        for e, part in zip(group, out.split(lengths)):
            saved[e].copy_(part)


@triton_apply_diffs_.register_fake
def _triton_apply_diffs_fake(dense, indices, values, target, alphas, saved):
    return None


@triton_op("xlsparse::triton_restore_diffs_", mutates_args={"dense"})
def triton_restore_diffs_(dense: list[torch.Tensor], indices: list[torch.Tensor], saved: list[torch.Tensor],
                          target: list[int]) -> None:
    block = 4096 if INTERPRET else 1024
    for e, t in enumerate(target):
        k = indices[e].numel()
        if k:
            wrap_triton(_scatter_kernel)[(triton.cdiv(k, block),)](dense[t], indices[e].contiguous(),
                                                                   saved[e].contiguous(), k, BLOCK=block)


@triton_restore_diffs_.register_fake
def _triton_restore_diffs_fake(dense, indices, saved, target):
    return None


registry.register("sparse_axpy_", "triton", triton_sparse_axpy_)
registry.register("apply_diffs_", "triton", triton_apply_diffs_)
registry.register("restore_diffs_", "triton", triton_restore_diffs_)
