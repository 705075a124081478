"""Sparse-diff composition ops: pure-PyTorch reference, fake impl, and backend dispatch.

The C++ kernels are in csrc/cpu/compose.cpp and csrc/cuda/compose.cu, the Triton kernels in
xlsparse/triton/compose.py; the update math they share is csrc/include/xlsparse/compose.h.
"""
import os

import torch

from .. import _ext
from . import _common

_common.register("sparse_axpy_")
_common.register("apply_diffs_")
_common.register("restore_diffs_")
# merge_deltas and topk_masks have no Triton kernel: on a GPU without the CUDA build they run the
# reference (plain PyTorch on the GPU).
_common.register("merge_deltas", has_triton=False)
_common.register("topk_masks", has_triton=False)


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
        # the kernel reads indices and values as flat arrays
        triton_sparse_axpy_(dense, indices.contiguous(), values.contiguous(), float(alpha))
    else:
        torch.ops.xlsparse.sparse_axpy_(dense, indices, values, float(alpha))
        _common.mark_written([dense])
    return dense


# --- apply_diffs_ / restore_diffs_: many deltas on many tensors, one call ---

def check_diff_entries(op: str, dense, indices, values, target, read_indices: bool = True) -> None:
    """Entry e pairs indices[e] and values[e] with dense[target[e]]; every entry is checked
    before anything is written, and a message names the entry."""
    if not (len(indices) == len(values) == len(target)):
        raise ValueError(f"{op}: indices, values and target must have one entry each, got "
                         f"{len(indices)}, {len(values)}, {len(target)}")
    index_dtype = {}
    for e, t in enumerate(target):
        if not 0 <= t < len(dense):
            raise IndexError(f"{op}: target[{e}] = {t} is not a position in dense ({len(dense)} tensors)")
        where = f"{op} entry {e} (dense[{t}])"
        _common.check_sparse_update(where, dense[t], indices[e], values[e])
        if index_dtype.setdefault(t, indices[e].dtype) != indices[e].dtype:
            raise TypeError(f"{where}: every entry of one tensor must use one index dtype")
        if read_indices:
            _common.check_indices(where, indices[e], dense[t].numel())


def entries_by_target(num_dense: int, target) -> list[list[int]]:
    """Entry numbers grouped by the tensor they update, in the order given."""
    groups = [[] for _ in range(num_dense)]
    for e, t in enumerate(target):
        groups[t].append(e)
    return groups


def check_saved(op: str, values, alphas, saved) -> None:
    if not (len(alphas) == len(saved) == len(values)):
        raise ValueError(f"{op}: alphas and saved need {len(values)} entries, got {len(alphas)} and {len(saved)}")
    for e, (v, s) in enumerate(zip(values, saved)):
        if not s.is_contiguous() or s.shape != v.shape or s.dtype != v.dtype or s.device != v.device:
            raise ValueError(f"{op}: saved[{e}] must be a contiguous tensor like values[{e}]")


def apply_diffs_reference(dense, indices, values, target, alphas, saved) -> None:
    """Pure-PyTorch apply_diffs_: per tensor, over the union of its entries' supports, the shares
    alpha * value are summed in the accumulation dtype (entries in the order given), added to the
    old value and stored once."""
    check_diff_entries("apply_diffs_", dense, indices, values, target)
    check_saved("apply_diffs_", values, alphas, saved)
    for t, group in enumerate(entries_by_target(len(dense), target)):
        if not group:
            continue
        flat = dense[t].view(-1)
        union = torch.unique(torch.cat([indices[e].long() for e in group]))
        old = flat[union]
        shares = torch.zeros(union.numel(), dtype=_common.acc_dtype(flat.dtype), device=flat.device)
        for e in group:
            pos = torch.searchsorted(union, indices[e].long())
            saved[e].copy_(old[pos])
            shares[pos] += alphas[e] * values[e].to(shares.dtype)
        flat[union] = (old.to(shares.dtype) + shares).to(flat.dtype)


def restore_diffs_reference(dense, indices, saved, target) -> None:
    """Pure-PyTorch restore_diffs_: puts the displaced values back."""
    check_diff_entries("restore_diffs_", dense, indices, saved, target)
    for e, t in enumerate(target):
        dense[t].view(-1)[indices[e].long()] = saved[e]


if _ext.loaded():

    @torch.library.register_fake("xlsparse::apply_diffs_")
    def _apply_diffs_fake(dense, indices, values, target, alphas, saved):
        check_diff_entries("apply_diffs_", dense, indices, values, target, read_indices=False)
        check_saved("apply_diffs_", values, alphas, saved)

    @torch.library.register_fake("xlsparse::restore_diffs_")
    def _restore_diffs_fake(dense, indices, saved, target):
        check_diff_entries("restore_diffs_", dense, indices, saved, target, read_indices=False)


def apply_diffs_(dense: list, indices: list, values: list, target: list, alphas: list) -> list[torch.Tensor]:
    """For every entry e: `dense[target[e]].view(-1)[indices[e]] += alphas[e] * values[e]`, in place,
    in one call. Returns the values each entry displaced, for `restore_diffs_`.

    Entries on one tensor may overlap: their shares alpha * value are summed in float32 (float64
    for float64 data), in entry order, added to the old value and stored once. indices are sorted and
    unique per entry; values have their tensor's dtype. Bad input raises before any write.
    """
    dense, indices, values = list(dense), list(indices), list(values)
    target, alphas = [int(t) for t in target], [float(a) for a in alphas]
    saved = [torch.empty(v.shape, dtype=v.dtype, device=v.device) for v in values]
    device = dense[0].device if dense else torch.device("cpu")
    backend = _common.backend_for("apply_diffs_", device)
    if backend == "reference":
        apply_diffs_reference(dense, indices, values, target, alphas, saved)
    elif backend == "triton":
        from ..triton.compose import triton_apply_diffs_

        check_diff_entries("apply_diffs_", dense, indices, values, target,
                           read_indices=not torch.compiler.is_compiling())
        check_saved("apply_diffs_", values, alphas, saved)
        triton_apply_diffs_(dense, indices, values, target, alphas, saved)
    else:
        torch.ops.xlsparse.apply_diffs_(dense, indices, values, target, alphas, saved)
        _common.mark_written([dense[t] for t in set(target)])
    return saved


def restore_diffs_(dense: list, indices: list, saved: list, target: list) -> None:
    """Undo `apply_diffs_` bit-exactly: `dense[target[e]].view(-1)[indices[e]] = saved[e]`."""
    dense, indices, saved, target = list(dense), list(indices), list(saved), [int(t) for t in target]
    device = dense[0].device if dense else torch.device("cpu")
    backend = _common.backend_for("restore_diffs_", device)
    if backend == "reference":
        restore_diffs_reference(dense, indices, saved, target)
    elif backend == "triton":
        from ..triton.compose import triton_restore_diffs_

        check_diff_entries("restore_diffs_", dense, indices, saved, target,
                           read_indices=not torch.compiler.is_compiling())
        triton_restore_diffs_(dense, [i.contiguous() for i in indices], [v.contiguous() for v in saved], target)
    else:
        torch.ops.xlsparse.restore_diffs_(dense, indices, saved, target)
        _common.mark_written([dense[t] for t in set(target)])


# --- merge_deltas: union of sorted supports ---

def _backend_without_triton(op: str, device: torch.device) -> str:
    """backend_for an op with no Triton kernel: XLSPARSE_BACKEND=triton runs its reference."""
    if os.environ.get("XLSPARSE_BACKEND", "").strip().lower() == "triton":
        return "reference"
    return _common.backend_for(op, device)


def check_merge(op: str, indices, values, weights, numel: int, read_indices: bool = True) -> None:
    if len(indices) < 1:
        raise ValueError(f"{op}: needs at least one delta")
    if not (len(indices) == len(values) == len(weights)):
        raise ValueError(f"{op}: indices, values and weights must have one entry each, got "
                         f"{len(indices)}, {len(values)}, {len(weights)}")
    for e, (i, v) in enumerate(zip(indices, values)):
        where = f"{op} delta {e}"
        if i.dim() != 1 or v.dim() != 1 or i.numel() != v.numel():
            raise ValueError(f"{where}: indices and values must be 1-D of one length, got {tuple(i.shape)} and {tuple(v.shape)}")
        if i.dtype != indices[0].dtype or i.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{where}: index dtype {i.dtype} must be int32 or int64 and match delta 0's {indices[0].dtype}")
        if not v.is_floating_point() or v.dtype != values[0].dtype:
            raise TypeError(f"{where}: values must share one floating dtype, got {v.dtype} and {values[0].dtype}")
        if i.device != indices[0].device or v.device != indices[0].device:
            raise ValueError(f"{where}: all tensors must be on one device")
        if read_indices:
            _common.check_indices(where, i, numel)


def merge_deltas_reference(indices, values, weights, numel: int):
    """Pure-PyTorch merge_deltas: the sorted union, values summed in the accumulation dtype."""
    check_merge("merge_deltas", indices, values, weights, numel)
    union = torch.unique(torch.cat([i.long() for i in indices]))
    out = torch.zeros(union.numel(), dtype=_common.acc_dtype(values[0].dtype), device=union.device)
    for i, v, w in zip(indices, values, weights):
        out[torch.searchsorted(union, i.long())] += w * v.to(out.dtype)
    return union.to(indices[0].dtype), out.to(values[0].dtype)


if _ext.loaded():

    @torch.library.register_fake("xlsparse::merge_deltas")
    def _merge_deltas_fake(indices, values, weights, numel):
        check_merge("merge_deltas", indices, values, weights, numel, read_indices=False)
        size = torch.library.get_ctx().new_dynamic_size()
        return indices[0].new_empty(size), values[0].new_empty(size)


def merge_deltas(indices: list, values: list, weights: list, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The union of several sorted, unique supports over a tensor of `numel` elements, with values
    `sum_i weights[i] * values[i]` (float32 accumulation, in delta order). Linear time, no dense copy."""
    indices, values, weights = list(indices), list(values), [float(w) for w in weights]
    device = indices[0].device if indices else torch.device("cpu")
    if not indices or _backend_without_triton("merge_deltas", device) == "reference":
        return merge_deltas_reference(indices, values, weights, int(numel))
    return torch.ops.xlsparse.merge_deltas(indices, values, weights, int(numel))


# --- topk_masks: global top-K by magnitude ---

def check_topk(op: str, tensors, k: int) -> int:
    total = 0
    for t, x in enumerate(tensors):
        if not x.is_floating_point() or x.dtype != tensors[0].dtype:
            raise TypeError(f"{op}: tensors must share one floating dtype; tensors[{t}] is {x.dtype}")
        if x.device != tensors[0].device:
            raise ValueError(f"{op}: tensors must be on one device; tensors[{t}] is on {x.device}")
        total += x.numel()
    if not 0 <= k <= total:
        raise ValueError(f"{op}: k = {k} is outside [0, {total}] (the total element count)")
    return total


def topk_masks_reference(tensors, k: int) -> list[torch.Tensor]:
    """Pure-PyTorch topk_masks: a stable sort of all magnitudes (concatenated)."""
    total = check_topk("topk_masks", tensors, k)
    device = tensors[0].device if tensors else torch.device("cpu")
    wide = torch.float64 if tensors and tensors[0].dtype == torch.float64 else torch.float32
    mags = torch.cat([x.detach().reshape(-1).to(wide).abs() for x in tensors]) if tensors else torch.zeros(0)
    nan = mags.isnan().nonzero()
    if nan.numel():
        pos, t = int(nan[0]), 0
        while pos >= tensors[t].numel():
            pos, t = pos - tensors[t].numel(), t + 1
        raise ValueError(f"topk_masks: tensors[{t}] holds NaN")
    flat = torch.zeros(total, dtype=torch.bool, device=device)
    # A stable descending sort keeps equal magnitudes in position order: the lowest wins ties.
    flat[torch.sort(mags, descending=True, stable=True).indices[:k]] = True
    return [m.view(x.shape).clone() for m, x in zip(flat.split([x.numel() for x in tensors]), tensors)]


if _ext.loaded():

    @torch.library.register_fake("xlsparse::topk_masks")
    def _topk_masks_fake(tensors, k):
        check_topk("topk_masks", tensors, k)
        return [torch.empty(x.shape, dtype=torch.bool, device=x.device) for x in tensors]


def topk_masks(tensors: list, k: int) -> list[torch.Tensor]:
    """Bool masks of the `k` largest |x| over all `tensors` together, without concatenating them.

    Exactly k entries are True. Equal magnitudes go to the lowest flat position, earlier tensors
    first. On CPU: a histogram of the top 16 bits of every magnitude, then one pass that writes
    the masks and gathers the few entries sharing the k-th magnitude's top bits, which are ranked
    exactly (a full radix select, one more pass, when over 4M entries share them). On CUDA: 8-bit
    radix passes. NaN raises ValueError.
    """
    tensors, k = list(tensors), int(k)
    device = tensors[0].device if tensors else torch.device("cpu")
    if not tensors or _backend_without_triton("topk_masks", device) == "reference":
        return topk_masks_reference(tensors, k)
    return torch.ops.xlsparse.topk_masks(tensors, k)
