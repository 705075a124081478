"""Functional forms of the xlsparse ops, for use inside models and training loops."""
import torch

from .ops import compose as _compose


def topk_mask(tensors: list, k: int) -> list[torch.Tensor]:
    """Bool masks of the `k` entries of largest magnitude over all `tensors` together (LT-SFT's
    global selection), without concatenating them.

    Exactly k entries are True; equal magnitudes go to the lowest flat position, earlier tensors
    first. Tensors of mixed float dtypes are compared in their promoted dtype. Masks carry no
    gradient. NaN raises ValueError; k outside [0, total] raises ValueError.
    """
    tensors = [t.detach() for t in tensors]
    if len({t.dtype for t in tensors}) > 1:
        wide = tensors[0].dtype
        for t in tensors:
            wide = torch.promote_types(wide, t.dtype)
        tensors = [t.to(wide) for t in tensors]
    return _compose.topk_masks([t.contiguous() for t in tensors], k)
