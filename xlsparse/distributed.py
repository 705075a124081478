"""Helpers for data-parallel training with torch.distributed (DDP, FSDP, HF Accelerate).

Gradients need nothing from xlsparse: DDP averages the gradients of the trainable delta values
like any other parameter, and the masked optimizers then take the same step on every rank. What
must be synchronised by hand is *selection*: importance scores and |Δ| are computed from each
rank's own data, so a top-K over the local scores picks a different mask on each rank and the
replicas drift apart. Reduce the scores first (`all_reduce_scores`), or call `topk_mask`, which
does both; every rank then picks the same mask (the reduced buffer is bit-identical on all ranks
and the top-K is deterministic, ties to the lowest position).
"""
import zlib

import torch
import torch.distributed as dist

from . import functional
from .diff import _is_dtensor
from .ops import checks


def _world(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_scores(scores, op: str = "sum", group=None):
    """Sum (op="sum") or average (op="mean") importance scores over the ranks of `group`, in
    place, in one collective call (the tensors travel as one flat float buffer).

    `scores`: a list of tensors, a dict {name: tensor}, or a dict of those dicts (per language).
    Returns `scores`. A no-op without an initialised process group of more than one rank.
    DTensor scores (FSDP2) raise TypeError on every rank: their value is already global.
    """
    if op not in ("sum", "mean"):
        raise ValueError(f"all_reduce_scores: op must be 'sum' or 'mean', got {op!r}")
    named = _leaves(scores)
    tensors = [t for _, t in named]
    if not _world(group):
        return scores
    error = None
    for i, t in enumerate(tensors):
        if _is_dtensor(t):
            # one global value already (FSDP2 averaged the gradients it came from); summing each
            # process's local part would add shards of different entries
            error = TypeError(f"all_reduce_scores: score {i} is a DTensor (FSDP2's fully_shard), which holds one value "
                              "for all processes: there is nothing to reduce. Pass score.full_tensor() (the whole "
                              "tensor, the same on every process) to xlsparse.functional.topk_mask instead")
        elif not t.is_floating_point():
            error = TypeError(f"all_reduce_scores: score {i} must be floating point, got {t.dtype}")
        elif t.device != tensors[0].device:
            error = ValueError(f"all_reduce_scores: scores must share one device; score {i} is on {t.device}")
        if error is not None:
            break
    # Every rank joins the check, even with no scores or a bad one: a rank that raised or returned
    # alone would leave the others in a collective that pairs with its next one (DDP's gradients).
    # The buffer pairs entries by position: a rank whose dict holds other names (or the same names
    # in another order, which _leaves sorts away), dtypes or op would add unrelated scores.
    same, failed = _agree(named, group, error is not None, op)
    if error is not None:
        raise error
    if failed:
        raise ValueError("all_reduce_scores: another rank was given scores it refused (see its error)")
    if not same:
        raise ValueError("all_reduce_scores: the ranks hold scores under different names or shapes "
                         "(or dtypes, or another op)")
    if not tensors:
        return scores
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
    # before the copy: a lone tensor was iterated as its rows, one mask per row
    checks.tensor_list("topk_mask", "tensors", tensors)
    tensors = [t.detach().clone() for t in tensors]
    all_reduce_scores(tensors, group=group)
    return functional.topk_mask(tensors, k)


def same_on_all_ranks(tensors, group=None) -> bool:
    """True when every tensor (masks, indices, values) is bit-identical on all ranks of `group`:
    a cheap check (a layout check, then all-reduces of per-tensor checksums) to run after a mask
    update. Other names, shapes, dtypes or numbers of tensors on some rank give False on every rank.
    A DTensor (FSDP2) raises TypeError on every rank: its processes hold different shards by design."""
    named = _leaves(tensors)
    tensors = [t for _, t in named]
    if not _world(group):
        return True
    dtensor = next((i for i, t in enumerate(tensors) if _is_dtensor(t)), None)
    # One fixed-size check first, on every rank: with other counts or shapes the checksum buffers
    # below would differ in size (gloo aborts; NCCL may pair them anyway).
    same, failed = _agree(named, group, dtensor is not None)
    if failed:
        raise TypeError(f"same_on_all_ranks: {'tensor ' + str(dtensor) if dtensor is not None else 'a tensor on another rank'} "
                        "is a DTensor (FSDP2's fully_shard), whose processes hold different shards by design; pass "
                        "plain tensors (the buffers, or a DTensor's full_tensor())")
    if not same:
        return False
    if not tensors:
        return True
    sums = torch.stack([fingerprint(t).to(tensors[0].device) for t in tensors])  # NCCL reduces GPU tensors
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(low, high))


_ODD = 0x5851F42D4C957F2D  # an odd multiplier (a 64-bit LCG's): the positions' weights use all 64 bits
_CHUNK = 1 << 22  # words per pass: 32 MiB int64 temporaries, not a widened copy of the whole tensor


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """An int64 [3] checksum of a tensor's bits, on its device: (Σ wᵢ, Σ wᵢ·(2·A·i + 1), numel)
    over its 32-bit (16-, 8-bit for narrower dtypes) words wᵢ, read as unsigned, with wrap-around
    int64 arithmetic. Changing one word changes the second sum (its weight is odd), and so does
    swapping two different words: the sum moves by (wᵢ - wⱼ)·2A·(i - j), which has at most
    31 + 1 + 31 factors of 2 (in a tensor of under 2^32 words), fewer than the 64 that would
    hide it. Other changes go unseen with a chance of about 2^-64."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    size = min(flat.element_size(), 4)
    words = flat.view({4: torch.uint32, 2: torch.uint16, 1: torch.uint8}[size])
    weights = torch.arange(min(words.numel(), _CHUNK), dtype=torch.int64, device=t.device) * (2 * _ODD) + 1
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    weighted = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, words.numel(), _CHUNK):
        chunk = words[start:start + _CHUNK].to(torch.int64)
        chunk_sum = chunk.sum()
        total += chunk_sum
        # Σ w·(2A·(start + k) + 1) = Σ w·(2A·k + 1) + (2A·start)·Σ w, all mod 2^64
        w = weights[:chunk.numel()]
        # int64 dot: 4x faster than mul + sum on a CPU (0.3 s for 256 MiB); CUDA's dot has no int64
        dot = torch.dot(chunk, w) if chunk.is_cpu else (chunk * w).sum()
        weighted += dot + chunk_sum * _wrap(2 * _ODD * start)
    return torch.stack([total, weighted, torch.tensor(t.numel(), device=t.device)])


def _wrap(x: int) -> int:
    """x as a two's-complement int64 (what torch's int64 arithmetic would hold)."""
    return (x + 2**63) % 2**64 - 2**63


def any_rank_of(model, flag: bool) -> bool:
    """`flag` or'ed over the processes of `model`'s DistributedDataParallel group (`flag` itself
    for an unwrapped model, which need not run in step with any other process): a step that
    refuses must refuse on every rank, or the others would wait in its next collective for good."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel) or not _world(model.process_group):
        return flag
    return _agree([], model.process_group, flag)[1]


def _agree(named, group, bad: bool = False, extra: str = "") -> tuple[bool, bool]:
    """(whether every rank of `group` holds the same names, shapes and dtypes (and `extra`), whether
    any rank passed `bad`), in one all-reduce of a fixed size that every rank must join."""
    layout = zlib.crc32(repr([extra] + [(path, tuple(t.shape), str(t.dtype)) for path, t in named]).encode())
    if named:
        device = named[0][1].device
    elif dist.get_backend(group) == "nccl":  # a rank with nothing to send still needs NCCL's device
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    check = torch.tensor([layout, -layout, int(bad)], dtype=torch.int64, device=device)
    dist.all_reduce(check, op=dist.ReduceOp.MAX, group=group)
    return int(check[0]) == -int(check[1]), bool(check[2])


def _leaves(obj, path: str = "") -> list[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor in `obj`; dicts in key order (str), not insertion order."""
    if isinstance(obj, torch.Tensor):
        return [(path, obj)]
    if isinstance(obj, dict):
        return [leaf for k in sorted(obj, key=str) for leaf in _leaves(obj[k], f"{path}/{k}")]
    if isinstance(obj, (list, tuple)):
        return [leaf for i, v in enumerate(obj) for leaf in _leaves(v, f"{path}/{i}")]
    raise TypeError(f"expected tensors in lists or dicts, got {type(obj).__name__}")
