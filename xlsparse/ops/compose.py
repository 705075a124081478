"""Sparse-diff composition ops: pure-PyTorch reference, fake impl, and the dispatching wrappers.

The C++ kernels are in csrc/cpu/compose.cpp and csrc/cuda/compose.cu, the Triton kernels in
xlsparse/triton/compose.py; the update math they share is csrc/include/xlsparse/compose.h.
Arguments are checked once, in xlsparse/ops/checks.py, before any backend runs.
"""
import torch

from .. import _ext
from . import checks, registry
from ._common import acc_dtype


# --- sparse_axpy_ ---

def sparse_axpy_reference(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float) -> None:
    """Pure-PyTorch sparse_axpy_: computed in the accumulation dtype, rounded once on store."""
    flat = dense.view(-1)
    idx = indices.long()
    acc = acc_dtype(dense.dtype)
    flat[idx] = (flat[idx].to(acc) + alpha * values.to(acc)).to(dense.dtype)


registry.define("sparse_axpy_", sparse_axpy_reference)

if _ext.loaded():

    @torch.library.register_fake("xlsparse::sparse_axpy_")
    def _sparse_axpy_fake(dense, indices, values, alpha):
        checks.sparse_update("sparse_axpy_", dense, indices, values)


def sparse_axpy_(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """`dense.view(-1)[indices] += alpha * values`, in place; returns `dense`.

    `indices` are int32 or int64, sorted and unique, inside [0, dense.numel()); `values` have
    dense's dtype. Half types are updated in float32 and rounded once. Bad input raises before
    anything is written; inputs that share memory with `dense` are read as they were before.
    """
    op = "sparse_axpy_"
    checks.sparse_update(op, dense, indices, values)
    checks.not_differentiable(op, values=values)
    checks.no_grad_leaf(op, dense=dense)
    checks.finite(op, alpha=alpha)
    if checks.can_read(dense) and not registry.compiled(op, dense.device):
        checks.indices(op, indices, dense.numel())
    written = checks.memory_keys([dense])
    indices, values = (checks.unaliased(written, t.contiguous()) for t in (indices, values))
    registry.call(op, dense.device, dense, indices, values, float(alpha))
    return dense


# --- apply_diffs_ / restore_diffs_: many deltas on many tensors, one call ---

def entries_by_target(num_dense: int, target) -> list[list[int]]:
    """Entry numbers grouped by the tensor they update, in the order given."""
    groups = [[] for _ in range(num_dense)]
    for e, t in enumerate(target):
        groups[t].append(e)
    return groups


def apply_diffs_reference(dense, indices, values, target, alphas, saved) -> None:
    """Pure-PyTorch apply_diffs_: per tensor, over the union of its entries' supports, the shares
    alpha * value are summed in the accumulation dtype (entries in the order given), added to the
    old value and stored once."""
    for t, group in enumerate(entries_by_target(len(dense), target)):
        if not group:
            continue
        flat = dense[t].view(-1)
        union = torch.unique(torch.cat([indices[e].long() for e in group]))
        old = flat[union]
        shares = torch.zeros(union.numel(), dtype=acc_dtype(flat.dtype), device=flat.device)
        for e in group:
            pos = torch.searchsorted(union, indices[e].long())
            saved[e].copy_(old[pos])
            shares[pos] += alphas[e] * values[e].to(shares.dtype)
        flat[union] = (old.to(shares.dtype) + shares).to(flat.dtype)


def restore_diffs_reference(dense, indices, saved, target) -> None:
    """Pure-PyTorch restore_diffs_: puts the displaced values back."""
    for e, t in enumerate(target):
        dense[t].view(-1)[indices[e].long()] = saved[e]


registry.define("apply_diffs_", apply_diffs_reference)
registry.define("restore_diffs_", restore_diffs_reference)

if _ext.loaded():

    @torch.library.register_fake("xlsparse::apply_diffs_")
    def _apply_diffs_fake(dense, indices, values, target, alphas, saved):
        checks.diff_entries("apply_diffs_", dense, indices, values, target, read_data=False)
        checks.saved("apply_diffs_", values, alphas, saved)

    @torch.library.register_fake("xlsparse::restore_diffs_")
    def _restore_diffs_fake(dense, indices, saved, target):
        checks.diff_entries("restore_diffs_", dense, indices, saved, target, read_data=False, values_name="saved")


def _one_slot_per_tensor(dense: list, target: list) -> tuple[list, list]:
    """The same tensor given twice (tied weights) becomes one slot: its entries are summed like
    any two entries on one tensor. Distinct tensors that overlap are refused by the checks."""
    slots, unique, remap = {}, [], []
    for d in dense:
        # A traced or fake tensor has no address, but the same object (a tied weight) is still
        # itself: left as two slots under torch.compile, the second entry's saved values held the
        # first's share, so restore_diffs_ left it in the weight
        readable = isinstance(d, torch.Tensor) and checks.can_read(d)
        key = (d.data_ptr(), d.device, d.dtype, tuple(d.shape), tuple(d.stride())) if readable else id(d)
        if key not in slots or d.device.type == "meta":
            slots[key] = len(unique)
            unique.append(d)
        remap.append(slots[key])
    return unique, [remap[t] if 0 <= t < len(remap) else t for t in target]


def _diff_call(op: str, dense, indices, values, target, values_name: str = "values"):
    """Checked, contiguous, unaliased arguments of apply_diffs_ / restore_diffs_."""
    dense, indices, values = list(dense), list(indices), list(values)
    # int() read True as 1 and 1.9 as 1: an entry written into the wrong tensor
    target = [checks.count(op, f"target[{e}]", t) for e, t in enumerate(target)]
    dense, target = _one_slot_per_tensor(dense, target)
    device = dense[0].device if dense else torch.device("cpu")
    compiled = registry.compiled(op, device)
    written = checks.diff_entries(op, dense, indices, values, target, read_data=not compiled, compiled=compiled,
                                  values_name=values_name)
    # dense too, unlike sparse_axpy_'s (dense + const: autograd's identity is its derivative): the
    # compiled kernels passed the gradient through entries restore_diffs_ overwrites (1, not 0) and
    # gave apply_diffs_'s displaced values none, where the reference differentiated both
    checks.not_differentiable(op, **{values_name: values, "dense": dense})
    indices = [checks.unaliased(written, i.contiguous()) for i in indices]
    values = [checks.unaliased(written, v.contiguous()) for v in values]
    return dense, indices, values, target


def apply_diffs_(dense: list, indices: list, values: list, target: list, alphas: list) -> list[torch.Tensor]:
    """For every entry e: `dense[target[e]].view(-1)[indices[e]] += alphas[e] * values[e]`, in place,
    in one call. Returns the values each entry displaced, for `restore_diffs_`.

    Entries on one tensor may overlap: their shares alpha * value are summed in float32 (float64
    for float64 data), in entry order, added to the old value and stored once. The same tensor
    given twice in `dense` counts as one. indices are sorted and unique per entry; values have
    their tensor's dtype. Bad input raises before any write.
    """
    dense, indices, values, target = _diff_call("apply_diffs_", dense, indices, values, target)
    # checked before float(), as sparse_axpy_'s alpha: it read True as 1.0, "0.5" as 0.5, and a
    # tensor that requires grad as a number, whose gradient was dropped silently
    checks.finite("apply_diffs_", **{f"alphas[{e}]": a for e, a in enumerate(alphas)})
    alphas = [float(a) for a in alphas]
    # empty_like: 1.1 µs a tensor where torch.empty(shape, dtype=, device=) took 4.1 (400 entries per
    # apply of two XLM-R diffs); values are contiguous here, so saved is too
    saved = [torch.empty_like(v) for v in values]
    checks.saved("apply_diffs_", values, alphas, saved)
    device = dense[0].device if dense else torch.device("cpu")
    registry.call("apply_diffs_", device, dense, indices, values, target, alphas, saved)
    return saved


def restore_diffs_(dense: list, indices: list, saved: list, target: list) -> None:
    """Undo `apply_diffs_` bit-exactly: `dense[target[e]].view(-1)[indices[e]] = saved[e]`."""
    dense, indices, saved, target = _diff_call("restore_diffs_", dense, indices, saved, target, "saved")
    device = dense[0].device if dense else torch.device("cpu")
    registry.call("restore_diffs_", device, dense, indices, saved, target)


# --- merge_deltas: union of sorted supports ---

def merge_deltas_reference(indices, values, weights, numel: int):
    """Pure-PyTorch merge_deltas: the sorted union, values summed in the accumulation dtype."""
    union = torch.unique(torch.cat([i.long() for i in indices]))
    out = torch.zeros(union.numel(), dtype=acc_dtype(values[0].dtype), device=union.device)
    for i, v, w in zip(indices, values, weights):
        out[torch.searchsorted(union, i.long())] += w * v.to(out.dtype)
    return union.to(indices[0].dtype), out.to(values[0].dtype)


# merge_deltas and topk_masks have no Triton kernel: on a GPU without the CUDA build they run the
# reference (plain PyTorch on the GPU).
registry.define("merge_deltas", merge_deltas_reference, backends=("reference", "cpu", "cuda"))

if _ext.loaded():

    @torch.library.register_fake("xlsparse::merge_deltas")
    def _merge_deltas_fake(indices, values, weights, numel):
        checks.merge("merge_deltas", indices, values, weights, numel, read_data=False)
        size = torch.library.get_ctx().new_dynamic_size()
        return indices[0].new_empty(size), values[0].new_empty(size)


def merge_deltas(indices: list, values: list, weights: list, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The union of several sorted, unique supports over a tensor of `numel` elements, with values
    `sum_i weights[i] * values[i]` (float32 accumulation, in delta order). Linear time, no dense copy."""
    # weights and numel checked before float() and int(), which read True as 1, "0.5" as 0.5 and
    # numel 5.7 as 5, and a weight that requires grad as a number (its gradient dropped silently)
    indices, values, weights = list(indices), list(values), list(weights)
    numel = checks.count("merge_deltas", "numel", numel)
    checks.merge("merge_deltas", indices, values, weights, numel)
    weights = [float(w) for w in weights]
    checks.not_differentiable("merge_deltas", values=values)
    if indices[0].device.type == "meta":  # the union's size is data: meta tensors have none
        raise ValueError("merge_deltas: meta tensors hold no indices to merge; the output size depends on them")
    indices, values = [i.contiguous() for i in indices], [v.contiguous() for v in values]
    return registry.call("merge_deltas", indices[0].device, indices, values, weights, numel)


# --- topk_masks: global top-K by magnitude ---

def topk_masks_reference(tensors, k: int) -> list[torch.Tensor]:
    """Pure-PyTorch topk_masks: a stable sort of all magnitudes (concatenated)."""
    device = tensors[0].device if tensors else torch.device("cpu")
    wide = torch.float64 if tensors and tensors[0].dtype == torch.float64 else torch.float32
    mags = torch.cat([x.detach().reshape(-1).to(wide).abs() for x in tensors]) if tensors else torch.zeros(0)
    flat = torch.zeros(mags.numel(), dtype=torch.bool, device=device)
    # A stable descending sort keeps equal magnitudes in position order: the lowest wins ties.
    flat[torch.sort(mags, descending=True, stable=True).indices[:k]] = True
    return [m.view(x.shape).clone() for m, x in zip(flat.split([x.numel() for x in tensors]), tensors)]


registry.define("topk_masks", topk_masks_reference, backends=("reference", "cpu", "cuda"))

if _ext.loaded():

    @torch.library.register_fake("xlsparse::topk_masks")
    def _topk_masks_fake(tensors, k):
        checks.topk("topk_masks", tensors, k, read_data=False)
        return [torch.empty(x.shape, dtype=torch.bool, device=x.device) for x in tensors]


def topk_masks(tensors: list, k: int) -> list[torch.Tensor]:
    """Bool masks of the `k` largest |x| over all `tensors` together, without concatenating them.

    Exactly k entries are True. Equal magnitudes go to the lowest flat position, earlier tensors
    first. On CPU: a histogram of the top 16 bits of every magnitude, then one pass that writes
    the masks and gathers the few entries sharing the k-th magnitude's top bits, which are ranked
    exactly (a full radix select, one more pass, when over 4M entries share them). On CUDA: 8-bit
    radix passes. NaN raises ValueError.
    """
    checks.tensor_list("topk_masks", "tensors", tensors)
    tensors, k = list(tensors), checks.count("topk_masks", "k", k)
    checks.topk("topk_masks", tensors, k)
    if not tensors:
        return []
    tensors = [t.contiguous() for t in tensors]
    return registry.call("topk_masks", tensors[0].device, tensors, k)
