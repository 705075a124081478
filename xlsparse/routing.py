"""Token-to-language routing, built once per batch and shared by every converted layer.

A batch carries one language (or expert) id per example `[B]` or per token `[B, S]`; −1 means
"base only / no update". Layers that need it (`SubnetworkLinear`, `MultiDeltaLinear`) read the
active `Routing` set by `xlsparse.hf.route` (or `routing.use`), so the ids are expanded to tokens
and grouped by id once, not once per layer, as in vLLM's LoRA metadata.
"""
import contextlib
import math
import numbers
import threading
from dataclasses import dataclass, field

import torch


def check_language_keys(what: str, keys) -> None:
    """Integer ids index the languages in insertion order, so an integer language key, or a name
    that is one ("1"), must be its own position: {1: a, 0: b} routed id 1 to b, the language keyed 0."""
    for position, key in enumerate(keys):
        number = key if isinstance(key, numbers.Integral) else None
        if isinstance(key, str) and key.isdecimal():
            number = int(key)
        if number is not None and number != position:
            raise ValueError(f"{what}: language key {key!r} is at position {position}, but integer routing ids index "
                             f"the languages in insertion order (id {number} would pick another language); name "
                             "languages with words, or key them 0, 1, ... in order")


def check_id_dtype(ids: torch.Tensor) -> None:
    """Ids are integers: float or bool ids were truncated to a row (0.9 routed to id 0)."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"route: ids must be integers (or language names), got {ids.dtype}")


def check_ids(ids: torch.Tensor, num_ids: int) -> None:
    """Ids must lie in [−1, num_ids): a host-side check (one sync), done once per batch."""
    if ids.numel():
        _check_id_range(*torch.stack([ids.min(), ids.max()]).tolist(), num_ids)  # one sync, not two


def _check_id_range(lo: int, hi: int, num_ids: int) -> None:
    if lo < -1 or hi >= num_ids:
        raise IndexError(f"route: ids must lie in [-1, {num_ids}), got min {lo}, max {hi}")


@dataclass(frozen=True)
class TokenGroups:
    """Tokens grouped by id: `order` lists token positions sorted stably by id; id e owns
    `order[offsets[e]:offsets[e + 1]]` (`counts[e]` tokens). The −1 tokens are dropped in eager
    mode; under torch.compile they stay at the front of `order`, before `offsets[0]`, so that no
    shape depends on the data (the kernels read only the groups' bounds).

    `host_counts` is `counts` on the host in eager mode, read by the sync `build` makes anyway to
    drop the −1 tokens; under torch.compile it is None, since a graph has no host sync."""

    ids: torch.Tensor  # [T] int64, −1 = none
    order: torch.Tensor  # [T_routed] int64
    counts: torch.Tensor  # [E] int64
    offsets: torch.Tensor  # [E + 1] int64
    num_ids: int
    host_counts: tuple[int, ...] | None  # [E] ints, or None under torch.compile

    @staticmethod
    def build(ids: torch.Tensor, num_ids: int) -> "TokenGroups":
        """Group the flat token ids [T] (values in [−1, num_ids): checked on the host in eager
        mode, by an assert in the graph under torch.compile)."""
        check_id_dtype(ids)
        ids = ids.reshape(-1).long()
        if torch.compiler.is_compiling():
            # the host check would break the graph; unchecked, an id out of range (`route=` or
            # `language_ids=` of a compiled layer, `routing.use`) ran the base only, silently
            torch._assert_async(((ids >= -1) & (ids < num_ids)).all(), f"route: ids must lie in [-1, {num_ids})")
            order = torch.sort(ids, stable=True).indices
            counts = (ids.unsqueeze(0) == torch.arange(num_ids, device=ids.device).unsqueeze(1)).sum(1)
            offsets = torch.cat([(ids < 0).sum().reshape(1), counts]).cumsum(0)
            return TokenGroups(ids, order, counts, offsets, num_ids, None)
        # the range and the counts in one read back: the one sync of a build, whose counts also
        # drop the −1 tokens (out-of-range ids land in the end bins, then raise)
        bins = torch.bincount((ids + 1).clamp(0, num_ids + 1), minlength=num_ids + 2)
        counts = bins[1:num_ids + 1]
        if ids.numel():
            lo, hi, *host = torch.cat([torch.stack([ids.min(), ids.max()]), bins]).tolist()
            _check_id_range(lo, hi, num_ids)
            host_counts = tuple(host[1:num_ids + 1])
        else:
            host_counts = (0,) * num_ids
        order = torch.sort(ids, stable=True).indices
        order = order[ids.numel() - sum(host_counts):]  # the −1 tokens sort first
        offsets = torch.zeros(num_ids + 1, dtype=torch.long, device=ids.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return TokenGroups(ids, order, counts, offsets, num_ids, host_counts)

    def active(self) -> list[int]:
        """Ids that own at least one token (a sync when the counts are not on the host)."""
        counts = self.counts.tolist() if self.host_counts is None else self.host_counts
        return [e for e, c in enumerate(counts) if c]


def expand_ids(ids: torch.Tensor, lead_shape) -> torch.Tensor:
    """Flat per-token ids [T] for a layer input whose leading dims are `lead_shape` ([B, S] or [T]).

    Per-example ids must have the batch's length ([B]); per-token ids the batch's shape ([B, S],
    or T ids for a layer that sees flat [T] tokens, or, for a layer that sees one row per example
    [B], the same id on every token of each example). Anything else is a ValueError naming both
    shapes: a count that merely divides the token count would route rows to the wrong language.
    """
    lead = tuple(lead_shape)
    if ids.numel() == 0 and math.prod(lead) != 0:  # an empty batch takes empty ids, as nn.Linear takes it
        raise ValueError("route: language_ids is empty; give one id per example or per token")
    if tuple(ids.shape) == lead:
        return ids.reshape(-1)
    if ids.dim() == 1 and len(lead) >= 1 and ids.shape[0] == lead[0]:  # one id per example
        return ids.repeat_interleave(math.prod(lead[1:]))
    if len(lead) == 1 and ids.numel() == lead[0] and ids.dim() == 2:  # [B, S] ids, flattened tokens
        return ids.reshape(-1)
    hint = ""
    if ids.dim() == 2 and lead == (ids.shape[0],):
        # per-token ids and a layer that sees one row per example (BERT's pooler, a sequence classifier's
        # head on the pooled token): an example whose tokens all hold one id is in that language. A
        # one-language batch routed per token (the meta-learning and scoring recipes) failed here.
        first = ids[:, :1]
        if torch.compiler.is_compiling():
            torch._assert_async((ids == first).all(), "route: an example's per-token ids differ, and this layer sees "
                                                      "one row per example")
            return first.reshape(-1)
        if bool((ids == first).all()):
            return first.reshape(-1)
        hint = ("; this layer sees one row per example (a pooled head), and some example's tokens hold several ids "
                "(-1 on padding too): give one id per example [B]")
    if ids.dim() == 1 and lead and lead[0] > ids.shape[0] > 0 and lead[0] % ids.shape[0] == 0:  # > 0: no modulo by 0
        if len(lead) > 1:  # generate repeats each example for its beams and returned sequences
            hint = ("; generate(num_beams=..., num_return_sequences=...) repeats each example: give the ids to "
                    "generate(..., language_ids=ids), which repeats them with the rows")
        else:  # OPT's feed-forward layers see [B * S, H]: which example a row is cannot be told
            hint = "; this layer sees the batch's tokens flattened: give one id per token [B, S]"
    elif ids.dim() == 1 and len(lead) > 1 and lead[0] == 1 < ids.shape[0]:
        # DeBERTa's query and key projections also run on the relative-position embeddings [1, 2·span, H]
        hint = ("; this layer runs on one input shared by the batch's examples (DeBERTa's relative-position "
                "embeddings, in its query and key projections), which no one example's language fits: route "
                "batches of one example, or leave those layers out of target_modules")
    raise ValueError(f"route: language ids of shape {list(ids.shape)} fit neither the batch's examples "
                     f"[{lead[0] if lead else 0}] nor its tokens {list(lead)} (the layer input's leading dims){hint}")


@dataclass
class Routing:
    """Language ids of one batch, per example [B] or per token [B, S], for `num_ids` languages.

    `tokens(lead_shape)` expands them to the flat tokens of a layer input with those leading dims
    and groups them once; every layer that asks again with the same shape gets the cached groups.
    """

    ids: torch.Tensor
    num_ids: int
    _cache: dict = field(default_factory=dict, repr=False)
    # ids of the modules of the model `xlsparse.hf.route` was given; None (`use`): every layer
    modules: frozenset | None = field(default=None, repr=False)
    # set (an id) for a batch known to be of one language: every row of every layer is then that id,
    # whatever the layer's input shape (DeBERTa's relative-position embeddings, shared by the examples)
    one_id: int | None = field(default=None, repr=False)

    def _flat(self, ids: torch.Tensor, lead: tuple) -> torch.Tensor:
        if self.one_id is not None:
            return torch.full((math.prod(lead),), self.one_id, dtype=torch.long, device=ids.device)
        return expand_ids(ids, lead)

    def tokens(self, lead_shape, device: torch.device | None = None) -> TokenGroups:
        """The token groups for a layer input with leading dims `lead_shape`, on `device` (the
        layer's: ids given as a list are built on the CPU, and the kernels refused them beside a
        CUDA model); cached per shape and device."""
        ids = self.ids if device is None else self.ids.to(device)
        if torch.compiler.is_compiling():  # no Python state in a graph; the grouping is a few cheap ops
            return TokenGroups.build(self._flat(ids, tuple(lead_shape)), self.num_ids)
        key = (tuple(lead_shape), ids.device)
        if key not in self._cache:
            self._cache[key] = TokenGroups.build(self._flat(ids, key[0]), self.num_ids)
        return self._cache[key]


class _Active(threading.local):
    """The routings in force in this thread, innermost last, and how many checkpoint
    recomputations under `checkpoint_context` are running. A thread-local, not a ContextVar:
    torch.compile traces through it without a graph break."""

    def __init__(self):
        self.stack: list[Routing] = []
        self.replays = 0


_ACTIVE = _Active()


def current(layer=None) -> Routing | None:
    """The routing set by the innermost `use` (or `xlsparse.hf.route`), or None.

    With `layer`: the innermost routing that covers it (`use`, or a `route` of a model holding it).
    A layer that only other models' routings are in force for raises: run by their ids, another
    model with as many languages was silently routed by ids that were never given for it."""
    stack = _ACTIVE.stack
    if layer is None or not stack:
        return stack[-1] if stack else None
    for active in reversed(stack):
        if active.modules is None or id(layer) in active.modules:
            return active
    raise RuntimeError(f"{type(layer).__name__}: the active xlsparse.hf.route was given another model; route this "
                       "one by its own ids (`with xlsparse.hf.route(model, language_ids):`, nested if need be)")


def checkpoint_context():
    """`context_fn` for torch.utils.checkpoint (non-reentrant): the recomputation in the backward
    runs under the routing in force when the forward ran, which has ended by then. With HF models:
    `model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
    "context_fn": xlsparse.routing.checkpoint_context})`."""
    return contextlib.nullcontext(), _replayed(current())


def unrouted_recomputation() -> bool:
    """True inside a backward pass outside `checkpoint_context`: a forward run there is gradient
    checkpointing's recomputation, and the routing its first run had has ended."""
    return torch._C._current_graph_task_id() != -1 and not _ACTIVE.replays


@contextlib.contextmanager
def _replayed(active: Routing | None):
    _ACTIVE.replays += 1
    try:
        with _reentered(active):
            yield
    finally:
        _ACTIVE.replays -= 1


@contextlib.contextmanager
def _reentered(active: Routing | None):
    if active is None:
        yield
        return
    _ACTIVE.stack.append(active)
    try:
        yield
    finally:
        _ACTIVE.stack.pop()


@contextlib.contextmanager
def use(ids: torch.Tensor, num_ids: int, modules: frozenset | None = None):
    """Route the layers run inside this block by `ids` ([B] or [B, S], −1 = base only); with
    `modules` (ids of modules), only those layers."""
    active = Routing(torch.as_tensor(ids), num_ids, modules=modules)
    with _reentered(active):
        yield active
