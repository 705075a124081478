"""Token-to-language routing, built once per batch and shared by every converted layer.

A batch carries one language (or expert) id per example `[B]` or per token `[B, S]`; −1 means
"base only / no update". Layers that need it (`SubnetworkLinear`, `MultiDeltaLinear`) read the
active `Routing` set by `xlsparse.hf.route` (or `routing.use`), so the ids are expanded to tokens
and grouped by id once, not once per layer, as in vLLM's LoRA metadata.
"""
import contextlib
import contextvars
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TokenGroups:
    """Tokens grouped by id: `order` lists token positions sorted stably by id, with the −1
    tokens dropped; id e owns `order[offsets[e]:offsets[e + 1]]` (`counts[e]` tokens)."""

    ids: torch.Tensor  # [T] int64, −1 = none
    order: torch.Tensor  # [T_routed] int64
    counts: torch.Tensor  # [E] int64
    offsets: torch.Tensor  # [E + 1] int64
    num_ids: int

    @staticmethod
    def build(ids: torch.Tensor, num_ids: int) -> "TokenGroups":
        """Group the flat token ids [T] (values in [−1, num_ids))."""
        ids = ids.reshape(-1).long()
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < -1 or hi >= num_ids:
                raise IndexError(f"route: ids must lie in [-1, {num_ids}), got min {lo}, max {hi}")
        counts = torch.bincount(ids + 1, minlength=num_ids + 1)[1:]
        order = torch.sort(ids, stable=True).indices
        order = order[ids.numel() - int(counts.sum()):]  # the −1 tokens sort first
        offsets = torch.zeros(num_ids + 1, dtype=torch.long, device=ids.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return TokenGroups(ids, order, counts, offsets, num_ids)

    def active(self) -> list[int]:
        """Ids that own at least one token."""
        return torch.nonzero(self.counts).flatten().tolist()


@dataclass
class Routing:
    """Language ids of one batch, per example [B] or per token [B, S], for `num_ids` languages.

    `tokens(T)` expands them to T flat tokens (T = B * S) and groups them once; every layer that
    asks again with the same T gets the cached groups.
    """

    ids: torch.Tensor
    num_ids: int
    _cache: dict = field(default_factory=dict, repr=False)

    def tokens(self, num_tokens: int) -> TokenGroups:
        if num_tokens not in self._cache:
            ids = self.ids
            if ids.dim() == 1 and ids.numel() != num_tokens:
                if num_tokens % ids.numel():
                    raise ValueError(f"route: {ids.numel()} example ids do not divide {num_tokens} tokens")
                ids = ids.repeat_interleave(num_tokens // ids.numel())
            if ids.numel() != num_tokens:
                raise ValueError(f"route: ids have shape {tuple(self.ids.shape)} but the layer sees {num_tokens} tokens")
            self._cache[num_tokens] = TokenGroups.build(ids, self.num_ids)
        return self._cache[num_tokens]


_ACTIVE: contextvars.ContextVar[Routing | None] = contextvars.ContextVar("xlsparse_routing", default=None)


def current() -> Routing | None:
    """The routing set by the innermost `use` (or `xlsparse.hf.route`), or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def use(ids: torch.Tensor, num_ids: int):
    """Route the layers run inside this block by `ids` ([B] or [B, S], −1 = base only)."""
    token = _ACTIVE.set(Routing(torch.as_tensor(ids), num_ids))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)
