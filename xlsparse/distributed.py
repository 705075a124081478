"""Helpers for data-parallel training with torch.distributed (DDP, FSDP, HF Accelerate).

Gradients need nothing from xlsparse: DDP averages the gradients of the trainable delta values
like any other parameter, and the masked optimizers then take the same step on every rank. What
must be synchronised by hand is *selection*: importance scores and |Δ| are computed from each
rank's own data, so a top-K over the local scores picks a different mask on each rank and the
replicas drift apart. Reduce the scores first (`all_reduce_scores`), or call `topk_mask`, which
does both; every rank then picks the same mask (the reduced buffer is bit-identical on all ranks
and the top-K is deterministic, ties to the lowest position).
"""
import torch
import torch.distributed as dist

from . import functional


def _world(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_scores(scores, op: str = "sum", group=None):
    """Sum (op="sum") or average (op="mean") importance scores over the ranks of `group`, in
    place, in one collective call (the tensors travel as one flat float buffer).

    `scores`: a list of tensors, a dict {name: tensor}, or a dict of those dicts (per language).
    Returns `scores`. A no-op without an initialised process group of more than one rank.
    """
    if op not in ("sum", "mean"):
        raise ValueError(f"all_reduce_scores: op must be 'sum' or 'mean', got {op!r}")
    tensors = _leaves(scores)
    if not _world(group) or not tensors:
        return scores
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise TypeError(f"all_reduce_scores: score {i} must be floating point, got {t.dtype}")
        if t.device != tensors[0].device:
            raise ValueError(f"all_reduce_scores: scores must share one device; score {i} is on {t.device}")
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    if op == "mean":
        flat /= dist.get_world_size(group)
    with torch.no_grad():
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view(t.shape))
    return scores


def topk_mask(tensors: list, k: int, group=None) -> list[torch.Tensor]:
    """`xlsparse.functional.topk_mask` over scores summed across ranks: every rank gets the same
    masks. The tensors themselves are not changed."""
    tensors = [t.detach().clone() for t in tensors]
    all_reduce_scores(tensors, group=group)
    return functional.topk_mask(tensors, k)


def same_on_all_ranks(tensors, group=None) -> bool:
    """True when every tensor (masks, indices, values) is bit-identical on all ranks of `group`:
    a cheap check (one all-reduce of per-tensor checksums) to run after a mask update."""
    tensors = _leaves(tensors)
    if not _world(group) or not tensors:
        return True
    sums = torch.stack([_checksum(t) for t in tensors]).to(tensors[0].device)  # NCCL reduces GPU tensors
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(low, high))


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """An int64 fingerprint of a tensor's shape and bits (position-weighted, so order matters)."""
    raw = t.detach().contiguous().reshape(-1).cpu()
    if raw.dtype == torch.bool:
        raw = raw.to(torch.uint8)
    words = raw.view(torch.uint8).to(torch.int64) if raw.numel() else torch.zeros(1, dtype=torch.int64)
    weights = torch.arange(1, words.numel() + 1, dtype=torch.int64) % 1_000_003
    return (words * weights).sum() * 1_000_033 + t.numel()


def _leaves(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _leaves(v)]
    raise TypeError(f"expected tensors in lists or dicts, got {type(obj).__name__}")
