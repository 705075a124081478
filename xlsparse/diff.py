"""Sparse diffs of a model: the data (`SparseDelta`, `SparseDiff`), the fused apply with its
bit-exact revert, diff arithmetic, LT-SFT selection, and files (xlsparse's safetensors format and
composable-sft's `pytorch_diff.bin`).

A `SparseDelta` is one parameter's difference: flat row-major `indices` (sorted, unique, int32
below 2^31 elements, int64 above) and `values` of any float dtype. A `SparseDiff` maps parameter
names to deltas, plus `dense` differences (added like the sparse ones) and `absolute` values that
replace a parameter outright (composable-sft's "abs", e.g. a newly trained classifier head).
"""
import collections
import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import re
import tempfile
import threading
import warnings
import weakref
from collections.abc import Iterable, Mapping

import torch

from ._paths import made_folder, path_arg
from .functional import topk_mask
from .ops import checks
from .ops import compose as _ops
from .ops._common import acc_dtype

FORMAT = "xlsparse.SparseDiff"
FORMAT_VERSION = 1
COMPOSABLE_SFT_FILE = "pytorch_diff.bin"


def index_dtype(numel: int) -> torch.dtype:
    """The index dtype of a delta over `numel` elements: int32 below 2^31, int64 above."""
    return torch.int32 if numel < 2**31 else torch.int64


def budget(what: str, total: int, k: int | None = None, density: float | None = None, floor: bool = False) -> int:
    """How many entries to select: `k`, or the share `density` of `total` (rounded to the nearest,
    or down with `floor`); exactly one of `k` and `density` is given."""
    if (k is None) == (density is None):
        raise ValueError(f"{what}: give exactly one of k or density")
    if density is not None:
        checks.finite(what, density=density)  # a bool passed the range check: True selected every entry
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"{what}: density must be in [0, 1], got {density}")
        k = int(density * total) if floor else round(density * total)
    k = checks.count(what, "k", k)
    if not 0 <= k <= total:
        raise ValueError(f"{what}: k = {k} is outside [0, {total}] (the elements to choose from)")
    return int(k)


def scale_list(op: str, name: str, scales, count: int) -> list[float]:
    """`scales` (a diff call's `alphas` or `weights`) as `count` finite floats, one per diff; None
    gives 1 each. A lone number raised Python's bare "'float' object is not iterable"."""
    if scales is None:
        return [1.0] * count
    try:
        scales = list(scales)
    except TypeError:
        raise TypeError(f"{op}: {name} must be a list of numbers, one per diff, got {scales!r}") from None
    if len(scales) != count:
        raise ValueError(f"{op}: {count} diffs but {len(scales)} {name}")
    checks.finite(op, **{f"{name}[{i}]": s for i, s in enumerate(scales)})  # before float(): "0.5" was read
    return [float(s) for s in scales]


def _refuse_unrankable(op: str, changes: dict, left: str, noun: str, hint: str) -> None:
    """Changes ({name: tensor}) ranked by size must be finite: topk_mask raised "tensors[0] holds
    NaN", naming a position in a list the caller never saw, and ranked an inf first, silently.
    The message names the parameters: "{op}: {left} NaN or inf in {n} {noun}, e.g. [...]"."""
    bad = [n for n, d in changes.items() if not bool(d.isfinite().all())]
    if bad:
        raise ValueError(f"{op}: {left} NaN or inf in {len(bad)} {noun}, e.g. {bad[:3]}, so their changes cannot be "
                         f"ranked by size ({hint})")


def _delta_at(t: torch.Tensor, mask: torch.Tensor) -> "SparseDelta":
    """The entries of `t` where `mask` is True, as a SparseDelta (indices sorted by construction)."""
    idx = mask.reshape(-1).nonzero().squeeze(1)
    return SparseDelta._trusted(idx.to(index_dtype(t.numel())), t.reshape(-1)[idx], t.shape)


def _check_delta(indices, values, shape, where: str):
    """Validate one delta and return (indices in the canonical dtype, values, torch.Size)."""
    try:
        shape = torch.Size(checks.count(where, "shape", s) for s in shape)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{where}: shape must be a sequence of ints, got {shape!r}") from exc
    if any(s < 0 for s in shape):
        raise ValueError(f"{where}: shape {tuple(shape)} has a negative size")
    numel = math.prod(shape)
    if numel >= 2**63:
        raise ValueError(f"{where}: shape {tuple(shape)} has {numel} elements, more than int64 can index")
    if not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise TypeError(f"{where}: indices and values must be tensors")
    if indices.dim() != 1 or values.dim() != 1:
        raise ValueError(f"{where}: indices and values must be 1-D, got {tuple(indices.shape)} and {tuple(values.shape)}")
    if indices.numel() != values.numel():
        raise ValueError(f"{where}: {indices.numel()} indices but {values.numel()} values")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"{where}: indices must be an integer tensor, got {indices.dtype}")
    checks.value_dtype(where, "values", values.dtype)
    if indices.device != values.device:
        raise ValueError(f"{where}: indices are on {indices.device} but values on {values.device}")
    if indices.numel():
        wide = indices.long()
        bad = ((wide < 0) | (wide >= numel)).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise IndexError(f"{where}: indices[{i}] = {int(wide[i])} is outside [0, {numel}) for shape {tuple(shape)}")
        bad = (wide[1:] <= wide[:-1]).nonzero()
        if bad.numel():
            i = int(bad[0]) + 1
            raise ValueError(f"{where}: indices must be sorted and unique; indices[{i}] = {int(wide[i])} "
                             f"follows indices[{i - 1}] = {int(wide[i - 1])}")
    return indices.to(index_dtype(numel)), values, shape


class SparseDelta:
    """A sparse difference of one tensor: `values` at flat row-major `indices` of `shape`.

    Indices are validated (sorted, unique, in range) and stored as int32 when the tensor has
    fewer than 2^31 elements, else int64. Values may be any float dtype. Treat it as immutable.
    """

    __slots__ = ("indices", "values", "shape")

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, shape, *, name: str | None = None):
        where = "SparseDelta" if name is None else f"delta {name!r}"
        self.indices, self.values, self.shape = _check_delta(indices, values, shape, where)

    @classmethod
    def _trusted(cls, indices, values, shape) -> "SparseDelta":
        """A delta built by xlsparse itself from already valid parts: no checks."""
        out = cls.__new__(cls)
        out.indices, out.values, out.shape = indices, values, torch.Size(shape)
        return out

    @property
    def nnz(self) -> int:
        """Number of stored entries (K)."""
        return self.indices.numel()

    @property
    def numel(self) -> int:
        """Number of entries of the dense tensor this delta belongs to."""
        return math.prod(self.shape)

    @property
    def density(self) -> float:
        """nnz / numel (0 for an empty shape)."""
        return self.nnz / self.numel if self.numel else 0.0

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the values."""
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        """The device of the values (and indices)."""
        return self.values.device

    def to_dense(self) -> torch.Tensor:
        """The delta as a dense tensor of `shape`, zeros elsewhere."""
        out = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        out.view(-1)[self.indices.long()] = self.values
        return out

    def to(self, device=None, dtype=None) -> "SparseDelta":
        """A copy on `device` with values in `dtype` (indices keep their dtype)."""
        if dtype is not None:
            checks.value_dtype("SparseDelta.to", "dtype", dtype)
        return SparseDelta._trusted(self.indices.to(device), self.values.to(device=device, dtype=dtype), self.shape)

    @classmethod
    def from_dense(cls, t: torch.Tensor, k: int | None = None) -> "SparseDelta":
        """The nonzero entries of `t`, or with `k`, its k largest-magnitude entries (ties: lowest
        position first)."""
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"from_dense: t must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        t = t.detach()
        if k is None:
            return _delta_at(t, t != 0)
        # checked here: topk_mask's errors named "topk_masks" and its "tensors[0]", never given
        k = budget("SparseDelta.from_dense", t.numel(), k=k)
        if bool(t.isnan().any()):
            raise ValueError("SparseDelta.from_dense: t holds NaN, which has no magnitude to rank by; "
                             "k=None keeps every nonzero entry")
        return _delta_at(t, topk_mask([t], k)[0])

    def __repr__(self) -> str:
        return (f"SparseDelta(shape={tuple(self.shape)}, nnz={self.nnz}, density={self.density:.3g}, "
                f"dtype={self.values.dtype}, device={self.values.device})")


def _named_tensors(model, buffers: bool = True) -> dict[str, torch.Tensor]:
    """Parameters (and buffers) of an nn.Module by name, or a state dict as given."""
    if isinstance(model, torch.nn.Module):
        named = dict(model.named_parameters(remove_duplicate=False))
        if buffers:
            named.update(model.named_buffers(remove_duplicate=False))
        return named
    if isinstance(model, Mapping):
        return dict(model)
    raise TypeError(f"expected an nn.Module or a dict of tensors, got {type(model).__name__}")


def _storage_key(t: torch.Tensor) -> tuple:
    """Tensors with equal keys are one tensor under two names (tied weights)."""
    if t.is_meta:
        return ("meta", id(t))
    if t.numel() == 0:  # every empty tensor's data_ptr is 0: its storage object tells (detach() keeps it)
        return (t.device, "empty", t.untyped_storage()._cdata)
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _body_prefix(model, named: dict) -> str:
    """Where a model's body lives: its base_model_prefix, or for a state dict the first name part
    most names share ("roberta" beside "lm_head"). transformers lists XLM-R's tied decoder first in
    a state dict, so without it a body diff (exclude=["lm_head"]) lost the word embeddings."""
    if isinstance(model, torch.nn.Module):
        return getattr(model, "base_model_prefix", "") or ""
    heads = collections.Counter(n.split(".", 1)[0] for n in named if "." in n).most_common(2)
    return heads[0][0] if heads and (len(heads) == 1 or heads[0][1] > heads[1][1]) else ""


def _untied(named: dict, prefer: str = "") -> dict[str, torch.Tensor]:
    """`named` with every tied tensor kept once, under its first name, or under its first name
    inside `prefer` (a model's base_model_prefix: a tied decoder is the word-embedding matrix)."""
    first = {}
    for name, t in named.items():
        key = _storage_key(t)
        if key not in first or (prefer and name.startswith(prefer + ".") and not first[key].startswith(prefer + ".")):
            first[key] = name
    keep = set(first.values())
    return {name: t for name, t in named.items() if name in keep}


def _lookup(named: dict, name: str, what: str) -> torch.Tensor:
    if name not in named:
        raise KeyError(f"{what}: the model has no parameter or buffer named {name!r}")
    return named[name]


def _target(named: dict, name: str, shape, what: str) -> torch.Tensor:
    """The model's tensor that a diff entry changes: present, of the entry's shape, floating-point."""
    param = _lookup(named, name, what)
    if tuple(param.shape) != tuple(shape):
        raise ValueError(f"{what}: {name!r} has shape {tuple(shape)} but the model's tensor has {tuple(param.shape)}")
    if not param.is_floating_point():
        raise TypeError(f"{what}: {name!r} is {param.dtype}; diffs change floating-point tensors only")
    return param


def _placement(t: torch.Tensor) -> tuple:
    return t.device, t.dtype, t.data_ptr()


@functools.cache
def _dtensor_type() -> tuple:
    """(DTensor,), or () for a torch built without distributed; looked up once, since every step
    asks for every parameter and gradient."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return ()
    return (DTensor,)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t) not in checks.PLAIN_TENSOR_TYPES and isinstance(t, _dtensor_type())


def refuse_sharded(what: str, named: dict, instead: str) -> None:
    """Raise a ValueError when any of `named` ({name: tensor}) is a DTensor (FSDP2's `fully_shard`):
    each process holds a shard, and the reads and writes here go to whole tensors (they raised a raw "invalid
    python storage" error, or could leave a model half changed). Every process holds the same
    layout, so every one raises here, before anything changes and before any collective."""
    sharded = [n for n, t in named.items() if _is_dtensor(t)]
    if sharded:
        raise ValueError(f"{what}: the model is sharded with FSDP2 (fully_shard; {sharded[:3]} are DTensors), and {what} "
                         f"works on whole tensors; nothing was changed. {instead}")


class ApplyHandle:
    """What `apply` changed and the values it displaced. `revert()` restores them bit-exactly;
    as a context manager it reverts on exit."""

    def __init__(self, changed, calls, originals, model=None):
        # The changed tensors themselves (Parameters), by name, beside the detached views written
        # through: model.half() or .to(...) swaps a Parameter's storage, which revert must notice.
        self._changed = [(name, t, _placement(t)) for name, t in changed]
        # The model too (weakly): a Parameter replaced in it since apply (merge_and_unload,
        # load_state_dict(assign=True), a swapped module) leaves the old tensor intact, so only
        # the model can tell that a revert would write into a tensor it no longer holds.
        self._model = weakref.ref(model) if isinstance(model, torch.nn.Module) else None
        self._calls = calls  # the fused apply_diffs_ calls, one per device, with what each displaced
        self._originals = originals  # (tensor, copy before apply) for dense and absolute entries
        self.reverted = False

    def revert(self) -> None:
        """Put back every value the apply displaced, bit for bit. Only once. Reverts go in reverse
        order of the applies where they meet: while a later apply that is still in place changed
        some of the same entries, reverting this one would drop the later diff's change there
        and leave this one's, so it is a RuntimeError (disjoint supports revert in any order), also
        when that later apply's handle was dropped (its diff stays in the model for good).
        A tensor whose storage, dtype or device changed since apply (the model was converted)
        is a RuntimeError too. Nothing is written when it raises."""
        if self.reverted:
            raise RuntimeError("this apply handle was already reverted")
        if getattr(self, "_pinned", None):
            raise RuntimeError(f"revert: this apply changed tensors that {self._pinned} has swapped for their values at "
                               f"convert; revert it after leaving the {self._pinned} block (its exit puts the trained "
                               "values, this diff included, back); nothing was reverted")
        model = self._model() if self._model is not None else None
        if model is not None:  # sharded since apply: before the checks below, which read storages
            refuse_sharded("revert", {n: u for n, _, _ in self._changed if (u := _tensor_at(model, n)) is not None},
                           "Revert before fully_shard")
        later = _later_applies(self)
        if later:
            raise RuntimeError(f"revert: {later} were changed again by a later apply (or SparseDeltaLinear.merge) that "
                               "is still in place; revert the later apply (unmerge) first (reverts go in reverse "
                               "order of the applies; a later apply whose handle was dropped stays for good, and "
                               "so must this one), or the later "
                               "diff's changes would be lost and this diff's would stay; nothing was reverted")
        for name, t, placement in self._changed:
            if _placement(t) != placement:
                # same dtype and device: this handle is a copy (copy.deepcopy, pickle) holding copies of the tensors
                why = ("the model was converted or moved (model.half(), .to(...)) after apply; nothing was reverted. "
                       "Revert before converting the model" if (t.device, t.dtype) != placement[:2] else
                       "this handle is a copy (copy.deepcopy, pickle) of the one apply returned, or the tensor was "
                       "swapped since; nothing was reverted. Revert with the handle apply returned")
                raise RuntimeError(f"revert: {name!r} is no longer the storage the diff was applied to (it was "
                                   f"{placement[1]} on {placement[0]}, now {t.dtype} on {t.device}): {why}")
        if model is not None:
            for name, t, placement in self._changed:  # the changed names only: O(diff), not O(model)
                now = _tensor_at(model, name)
                if now is None:  # renamed, not replaced (a wrapper such as PEFT's base_layer): still the model's
                    now = next((u for u in _named_tensors(model).values() if _placement(u) == placement), None)
                if now is None or _placement(now) != placement:
                    raise RuntimeError(f"revert: the model's {name!r} is no longer the tensor the diff was applied to "
                                       "(a module or parameter was replaced after apply: merge_and_unload, "
                                       "load_state_dict(assign=True), ...): reverting would write into the old "
                                       "tensor and leave the diff in the model; nothing was reverted. Revert before "
                                       "replacing it")
        with _exclusive([*(t for c in self._calls for t in c.dense), *(t for t, _ in self._originals)], "revert"):
            self._restore()

    def _restore(self) -> None:
        with torch.no_grad():
            for call in self._calls:
                _ops.restore_diffs_(call.dense, call.indices, call.saved, call.target)
            for tensor, copy in self._originals:
                tensor.copy_(copy)
        self.reverted = True
        _forget_apply(self)

    def _touched(self) -> dict:
        """{storage key: flat indices this apply changed, or None for the whole tensor}; the keys
        taken afresh (a deep copy's tensors are new)."""
        return _touched_of([*((_storage_key(call.dense[t]), idx) for call in self._calls
                              for idx, t in zip(call.indices, call.target)),
                            *((_storage_key(t), None) for t, _ in self._originals)])

    def __getstate__(self) -> dict:
        # a weak reference does not pickle; the model goes along strongly (deepcopy maps it to the
        # copy), and becomes weak again on the other side
        state = dict(self.__dict__)
        state["_model"] = self._model() if self._model is not None else None
        return state

    def __setstate__(self, state: dict) -> None:
        model = state.pop("_model")
        self.__dict__.update(state)
        self._model = weakref.ref(model) if model is not None else None

    def __enter__(self) -> "ApplyHandle":
        return self

    def __exit__(self, *exc) -> None:
        if not self.reverted:
            self.revert()


@dataclasses.dataclass
class _FusedCall:
    """The arguments of one apply_diffs_ call (tensors of one device) and the values it displaced."""

    dense: list = dataclasses.field(default_factory=list)
    slot: dict = dataclasses.field(default_factory=dict)  # storage key -> its position in dense
    slot_of: dict = dataclasses.field(default_factory=dict)  # id(param) -> its position (a key per param, once)
    indices: list = dataclasses.field(default_factory=list)
    values: list = dataclasses.field(default_factory=list)
    target: list = dataclasses.field(default_factory=list)
    alphas: list = dataclasses.field(default_factory=list)
    saved: list = dataclasses.field(default_factory=list)

    def add(self, param: torch.Tensor, delta: "SparseDelta", alpha: float, key: tuple) -> None:
        """Entry `delta` (scaled by `alpha`) on `param`, whose `_storage_key` is `key`."""
        if id(param) not in self.slot_of:
            # one slot per tensor, also for two tensor objects over one storage (tied)
            if key not in self.slot:
                self.slot[key] = len(self.dense)
                self.dense.append(param.detach())
            self.slot_of[id(param)] = self.slot[key]
        # one index dtype per tensor, the canonical one: a layer built from int64 indices
        # (SparseDeltaLinear.from_linear(indices=...)) extracts int64 deltas below 2^31
        device, dtype = param.device, index_dtype(param.numel())
        indices, values = delta.indices, delta.values
        # .to() only where it changes something: a no-op .to() costs 0.75 µs, twice per entry
        if indices.device != device or indices.dtype != dtype:
            indices = indices.to(device=device, dtype=dtype)
        self.indices.append(indices)
        self.values.append(values if values.device == device else values.to(device))
        self.target.append(self.slot_of[id(param)])
        self.alphas.append(alpha)

    def run(self) -> None:
        """Write every entry and record what each displaced (`saved`, for restore_diffs_).

        apply_diffs_ takes values of their tensor's dtype. A tensor given values that its dtype
        cannot hold exactly (float32 or the other half type on a bfloat16/float16 tensor, float64
        on a float32 one) instead has its entries merged in the wider dtype (at least float32,
        alphas applied), added to the old values there and stored once, here: rounding each value
        to the tensor's dtype first lost diffs that nearly cancel (0.001 where the float32 sum is
        0.0049; float16 1.0039 - 1.0 gave 0 on bfloat16). The merges run before anything is written.
        `indices`, `target` and `saved` list what is written at every point, so that `apply` restores
        a call that fails half way (an inference tensor refused the wide write after apply_diffs_
        had written the other tensors, which stayed changed)."""
        indices, values, target, alphas = self.indices, self.values, self.target, self.alphas
        self.indices, self.target, self.saved = [], [], []
        wide = {}
        for t in {t for e, t in enumerate(target) if not _holds_exactly(self.dense[t].dtype, values[e].dtype)
                  and self.dense[t].device.type != "meta"}:  # meta: no data
            g = [e for e, at in enumerate(target) if at == t]
            acc = torch.promote_types(torch.float32, self.dense[t].dtype)
            for e in g:
                acc = torch.promote_types(acc, values[e].dtype)
            wide[t] = _ops.merge_deltas([indices[e].long() for e in g], [values[e].to(acc) for e in g],
                                        [alphas[e] for e in g], self.dense[t].numel())
        keep = [e for e, t in enumerate(target) if t not in wide]
        if keep:
            kept_indices, kept_target = [indices[e] for e in keep], [target[e] for e in keep]
            kept_values = [values[e].to(self.dense[target[e]].dtype) for e in keep]
            self.saved = _ops.apply_diffs_(self.dense, kept_indices, kept_values, kept_target, [alphas[e] for e in keep])
            self.indices, self.target = kept_indices, kept_target
        if wide:
            old = [self.dense[t].view(-1)[idx] for t, (idx, _) in wide.items()]
            new = [(o.to(val.dtype) + val).to(o.dtype) for o, (_, val) in zip(old, wide.values())]
            # stored by restore_diffs_, which writes given values as apply_diffs_ does (into a model
            # loaded under torch.inference_mode too, where indexing in place raised)
            _ops.restore_diffs_(self.dense, [idx for idx, _ in wide.values()], new, list(wide))
            self.indices += [idx for idx, _ in wide.values()]
            self.saved += old
            self.target += list(wide)


def _holds_exactly(dtype: torch.dtype, values: torch.dtype) -> bool:
    """Whether a tensor of `dtype` holds every value of dtype `values` exactly."""
    if values == dtype:
        return True
    wider = {torch.float32: (torch.float16, torch.bfloat16), torch.float64: (torch.float16, torch.bfloat16, torch.float32)}
    return values in wider.get(dtype, ())


def apply(diffs, model, alphas=None, with_abs: bool = True) -> ApplyHandle:
    """`W <- W + sum_i alphas[i] * diffs[i]` on every parameter the diffs name, in one fused call
    (one per device, for a model spread over several).

    Deltas of several diffs on one parameter are summed in float32 (float64 for float64
    parameters or values), in the diffs' own precision (float32 values on a bfloat16 model are not rounded
    to bfloat16 first), and stored once; dense entries likewise. Absolute entries are copied in; a parameter
    that is absolute in one diff and named by another diff of the call (tied names included) is a
    ValueError, as in `SparseDiff.merge`, and so is an absolute entry on output embeddings that the
    model ties to its input embeddings (it would replace both). An entry of a float16 or bfloat16
    parameter that overflows to inf from finite values (the parameter's and every diff's) is a
    ValueError too, and the model is left as it was. Returns a handle whose `revert()` restores the model
    bit-exactly (also usable as a context manager).

    `with_abs=False` skips the absolute entries of every diff in the call (composable-sft's
    `apply(model, with_abs=False)`): a language SFT's MLM head is then neither needed by nor
    copied into a task model. Otherwise a diff with absolute entries needs alpha 1: a replaced
    value cannot be scaled (ValueError).

    Diffs are in the model's own layout: on a model converted by `xlsparse.hf.convert`, entries of
    a GPT-2 Conv1D weight ([in, out], as `hf.extract_diff` and `from_models` give them) go to the
    converted layer's [out, in] weight transposed.
    """
    diffs = _diff_list("apply", [diffs] if isinstance(diffs, SparseDiff) else diffs)
    if not checks.flag("apply", "with_abs", with_abs):  # with_abs="no" is truthy: it applied the heads
        diffs = [d.without_absolute() for d in diffs]
    alphas = scale_list("apply", "alphas", alphas, len(diffs))
    named = _named_tensors(model)
    refuse_sharded("apply", {n: named[n] for d in diffs for n in (*d.deltas, *d.dense, *d.absolute) if n in named},
                   "Apply the diffs before fully_shard, or to an unsharded copy of the model")
    stored = _transposed_weights(model, {n for d in diffs for n in (*d.deltas, *d.dense, *d.absolute)})
    if stored:  # converted GPT-2 Conv1D layers: diffs are in the model's [in, out] layout, the weight is [out, in]
        for i, d in enumerate(diffs):
            for name, entry in {**d.deltas, **d.dense, **d.absolute}.items():
                own = tuple(named[name].shape)[::-1] if name in stored and name in named else None
                if own is not None and tuple(entry.shape) != own:  # before the transposition names the shape wrongly
                    raise ValueError(f"apply: diff {i}: {name!r} has shape {tuple(entry.shape)}, but diffs are in the "
                                     f"model's own layout: this GPT-2 Conv1D weight is {own} ([in, out]; the converted "
                                     "layer stores it [out, in])")
        diffs = [_to_stored_layout(d, stored) for d in diffs]
    calls = {}  # device -> _FusedCall: the op runs on one device, so a model spread over several gets one call each
    touched_whole, claims, changed = {}, {}, {}
    # each named tensor's storage key once (a language + task diff on XLM-R asked ~1000 times: 2 ms)
    keys = {n: _storage_key(named[n]) for d in diffs for n in (*d.deltas, *d.dense, *d.absolute) if n in named}
    # a diff's tensor that views one this apply writes (absolute={"b": model.a.detach()}) is read as it
    # was before the call: read after the sparse writes, b got the changed a
    written = checks.memory_keys(named[n] for n in keys)
    diffs = [_unaliased(d, written) for d in diffs]
    for i, (diff, alpha) in enumerate(zip(diffs, alphas)):
        what = f"apply: diff {i}"
        _refuse_scaled_absolute("apply", "alphas", i, diff, alpha)
        _refuse_absolute_on_tied_decoder(what, diff, model)
        _refuse_tied_twice(what, diff, keys)
        _refuse_absolute_clash(i, diff, named, claims, keys)
        for name, delta in diff.deltas.items():
            param = _target(named, name, delta.shape, what)
            if not param.is_contiguous():
                raise ValueError(f"{what}: {name!r} is not contiguous")
            calls.setdefault(param.device, _FusedCall()).add(param, delta, alpha, keys[name])
            changed.setdefault(id(param), (name, param))
        for name, t in [*diff.dense.items(), *diff.absolute.items()]:
            param = _target(named, name, t.shape, what)
            touched_whole.setdefault(id(param), param.detach())
            changed.setdefault(id(param), (name, param))
    # Each apply_diffs_ call checks its sparse entries before it writes, and a failed call (or a
    # dense or absolute entry) restores what the calls before it wrote: the model is left untouched.
    calls = list(calls.values())
    with _exclusive([*(t for c in calls for t in c.dense), *touched_whole.values()], "apply"), torch.no_grad():
        originals = [(t, t.clone()) for t in touched_whole.values()]
        handle = ApplyHandle(changed.values(), [], originals, model)
        try:
            for call in calls:
                handle._calls.append(call)  # before it runs: what it wrote before failing is restored too
                call.run()
            # Dense entries too are summed in the accumulation dtype and stored once.
            parts = {}  # storage key (tied names: one tensor) -> (tensor, [(dense entry, alpha)])
            for diff, alpha in zip(diffs, alphas):
                for name, t in diff.dense.items():
                    parts.setdefault(_storage_key(named[name]), (named[name].detach(), []))[1].append((t, alpha))
            # A tensor that also took sparse deltas in this call: fold them into the dense sum and
            # add it all to the value before apply, so the tensor is rounded once, not twice. Every
            # term is weighted in the widest dtype of them all (a float32 term weighted in float32
            # was rounded before a float64 sum).
            before = {_storage_key(t): c for t, c in originals}
            for key, (param, dense) in parts.items():
                sparse = [(d, alpha) for diff, alpha in zip(diffs, alphas) for n, d in diff.deltas.items()
                          if _storage_key(named[n]) == key]
                wide = functools.reduce(torch.promote_types, [t.dtype for t, _ in dense] + [d.dtype for d, _ in sparse],
                                        acc_dtype(param.dtype))
                share = sum(t.to(device=param.device, dtype=wide) * alpha for t, alpha in dense)
                if sparse:
                    share = share.contiguous()
                    flat = share.view(-1)
                    for d, alpha in sparse:
                        flat.index_add_(0, d.indices.long().to(flat.device), d.values.to(flat) * alpha)
                    param.copy_(before[key].to(share.dtype) + share)
                else:
                    param.copy_(param.to(share.dtype) + share)
            for diff in diffs:
                for name, t in diff.absolute.items():
                    named[name].detach().copy_(t)
            _refuse_apply_overflow(calls, originals, diffs, named)
        except BaseException:
            handle._restore()  # a failure half way (out of memory...) leaves the model as it was
            raise
    _remember_apply(handle, keys)
    return handle


def _diff_list(op: str, diffs) -> list:
    """`diffs` as a list of SparseDiff; anything else raises a TypeError naming `op`. A {language:
    diff} dict was read as its keys, and one diff or a number raised a bare "not iterable"."""
    if isinstance(diffs, (Mapping, str)) or not isinstance(diffs, Iterable):
        raise TypeError(f"{op}: diffs must be a list of SparseDiff, got a {type(diffs).__name__}")
    diffs = list(diffs)
    for i, d in enumerate(diffs):
        if not isinstance(d, SparseDiff):
            raise TypeError(f"{op}: diffs[{i}] is a {type(d).__name__}, not a SparseDiff")
    return diffs


def _unaliased(diff: "SparseDiff", written: set) -> "SparseDiff":
    """`diff` with a copy of each of its tensors that shares memory with `written` (`checks.memory_keys`)."""
    if not written or not any(checks.memory_key(t) in written for t in (
            *(d.values for d in diff.deltas.values()), *diff.dense.values(), *diff.absolute.values())):
        return diff
    return SparseDiff._trusted(
        {n: SparseDelta._trusted(d.indices, checks.unaliased(written, d.values), d.shape) for n, d in diff.deltas.items()},
        {n: checks.unaliased(written, t) for n, t in diff.dense.items()},
        {n: checks.unaliased(written, t) for n, t in diff.absolute.items()}, diff.base_model)


class ConvertedLayer:
    """What xlsparse's converted layers (xlsparse.nn) share with `apply`: `transposed` is True
    when the layer replaced a GPT-2 Conv1D and stores its [in, out] weight as [out, in], while
    diffs keep the model's own layout. A state dict holds such a weight in the model's own layout
    too: transformers' files of a converted model (its `save_pretrained`, the Trainer's checkpoints)
    then load into the model's class, where a square [out, in] weight loaded silently transposed."""

    transposed = False

    def _state_weight(self, saved):
        """The weight a state dict holds, in the stored layout (`saved`: what torch put there)."""
        return saved

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        if key in destination:
            weight = self._state_weight(destination[key])
            destination[key] = weight.detach().t().contiguous() if self.transposed else weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        unknown = False
        if self.transposed and key in state_dict:
            weight = self._stored_from_state(state_dict[key], key)
            if weight is None:  # torch raises with its other errors, after the entries that fit
                error_msgs.append(f"{key} is a square GPT-2 Conv1D weight whose entries match this converted layer's "
                                  "in neither layout (no more in one than in the other), so whether the state dict "
                                  "holds it as [in, out] (xlsparse's state dicts) or [out, in] (those written before) "
                                  "cannot be told; it was not loaded: convert the base model the state dict was "
                                  "trained from, then load it")
                del state_dict[key]
                unknown = True
            else:
                state_dict[key] = weight
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if unknown and key in missing_keys:  # named in the error already
            missing_keys.remove(key)

    def _stored_from_state(self, saved, key):
        """A converted Conv1D's weight from a state dict, in the stored [out, in] layout. xlsparse writes
        the model's own [in, out] layout, but state dicts written before it did (transformers'
        files, Trainer checkpoints) hold [out, in], and nothing in them says which: the shape tells
        for a non-square weight; for a square one (GPT-2's attn.c_proj), the layout in which clearly
        more entries equal the layer's weight (its base, frozen or trained at some entries only),
        else the one whose entries lie clearly nearer it (a weight trained at every entry, as a
        dense subnetwork mask does, equals it nowhere). When neither, None: taking the wrong one
        loaded the weight transposed, silently."""
        stored = tuple(self.weight.shape)
        if tuple(saved.shape) != stored[::-1]:  # [out, in] of a non-square weight: an older state dict
            if tuple(saved.shape) == stored:
                self._warn_old_layout(key)
            return saved  # else torch names the shape that fits neither layout
        flipped = saved.t().contiguous()
        if stored[0] != stored[1] or torch.equal(flipped, saved):  # non-square, or symmetric (a zero weight)
            return flipped
        mine = self.weight.detach()
        coarse = max((saved.dtype, mine.dtype), key=lambda d: torch.finfo(d).eps)
        mine = mine.to(coarse)
        # only entries where the two layouts of this layer's weight differ tell them apart (a pruned
        # weight's zeros, a symmetric pair, fit either)
        telling = mine != mine.t()

        def agree(t):  # telling entries equal to this layer's, compared in the coarser dtype (a cast state dict)
            return int(((t.to(device=mine.device, dtype=coarse) == mine) & telling).sum())

        def gap(t):  # the median distance at the telling entries: fine-tuning moves a weight little
            return float((t.to(device=mine.device, dtype=coarse) - mine)[telling].abs().float().nanmedian())

        count = int(telling.sum())
        if not count:
            return None
        # Exact matches decide only well above chance: a bf16 weight trained at every entry still
        # equals the base at ~0.1% of the entries of either layout, and the wrong layout won with a
        # few more (tiny GPT-2 in bf16, every c_proj entry trained: loaded transposed, logits 0.11 off)
        as_own, as_stored = agree(flipped), agree(saved)
        if as_own > 2 * as_stored + count // 100:
            return flipped
        if as_stored > 2 * as_own + count // 100:
            self._warn_old_layout(key)
            return saved
        own_gap, stored_gap = gap(flipped), gap(saved)
        if own_gap < stored_gap / 2:
            return flipped
        if stored_gap < own_gap / 2:
            self._warn_old_layout(key)
            return saved
        return None

    @staticmethod
    def _warn_old_layout(key):
        warnings.warn(f"load_state_dict: {key} is in the [out, in] layout of state dicts written before xlsparse saved "
                      "converted GPT-2 Conv1D weights in Conv1D's [in, out]; loaded as such. Save again to write the "
                      "current layout (transformers' GPT-2 class cannot load the older files)", stacklevel=4)


def _transposed_weights(model, names) -> set:
    """Those of `names` that are weights of converted GPT-2 Conv1D layers (`xlsparse.hf.convert`),
    which store [out, in] while the model's own layout, that of its diffs, is Conv1D's [in, out].
    Looks up the named layers only: an apply's cost does not grow with the model."""
    if not isinstance(model, torch.nn.Module):
        return set()
    out = set()
    for name in names:
        owner, _, leaf = name.rpartition(".")
        m = _submodule(model, owner) if leaf == "weight" else None
        if isinstance(m, ConvertedLayer) and m.transposed:
            out.add(name)
    return out


def _own_layout(model, named: dict) -> dict:
    """`named` (tensors of `model` by name) with the weights of converted GPT-2 Conv1D layers
    seen in the model's own [in, out] layout, as its state dict and its diffs hold them."""
    stored = _transposed_weights(model, named)
    return {n: x.t() if n in stored and x.dim() == 2 else x for n, x in named.items()}


def _submodule(model: torch.nn.Module, name: str):
    """model.get_submodule(name), or None when there is none."""
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None


def _tensor_at(model: torch.nn.Module, name: str):
    """The parameter or buffer `name` of `model` (as named_parameters/named_buffers name it), or None."""
    owner, _, leaf = name.rpartition(".")
    m = _submodule(model, owner)
    if m is None:
        return None
    t = m._parameters.get(leaf)
    return t if t is not None else m._buffers.get(leaf)


def _transpose_delta(delta, rows: int, cols: int) -> "SparseDelta":
    """A delta of an [rows, cols] tensor re-indexed for its [cols, rows] transpose."""
    idx = delta.indices.long()
    flat = (idx % cols) * rows + idx // cols
    order = torch.argsort(flat)
    return SparseDelta._trusted(flat[order].to(index_dtype(rows * cols)), delta.values[order], (cols, rows))


def _to_stored_layout(diff: "SparseDiff", names: set) -> "SparseDiff":
    """`diff` with its entries on `names` transposed to the converted layers' [out, in] storage (a
    square weight passed the shape check and took the diff transposed)."""
    hit = names & {*diff.deltas, *diff.dense, *diff.absolute}
    if not hit:
        return diff

    def delta(d):
        return _transpose_delta(d, *d.shape) if len(d.shape) == 2 else d  # else apply's shape check names it

    def whole(t):
        return t.t() if t.dim() == 2 else t

    return SparseDiff._trusted({n: delta(d) if n in hit else d for n, d in diff.deltas.items()},
                               {n: whole(t) if n in hit else t for n, t in diff.dense.items()},
                               {n: whole(t) if n in hit else t for n, t in diff.absolute.items()}, diff.base_model)


# Applies (and merges, EntryWrite) still in place, per changed tensor (by storage), oldest first: a
# revert restores the values its apply displaced, so it is right only while no later apply in
# place changed the same tensor. Weak references: a handle that is dropped is never reverted.
_in_place: dict = {}


_keys_of = weakref.WeakKeyDictionary()  # handle -> its storage keys, taken once when it is remembered


def _touched_of(writes) -> dict:
    """{storage key: the flat indices written there, or None for the whole tensor} of
    [(storage key, indices or None)]."""
    out = {}
    for key, idx in writes:
        if key in out and out[key] is None:
            continue
        if idx is None:
            out[key] = None
        else:
            out[key] = idx.long() if key not in out else torch.cat([out[key], idx.long().to(out[key].device)])
    return out


class _Ref(weakref.ref):
    """A weak reference to an apply's handle that keeps what the apply wrote (`_touched`). A handle
    dropped unreverted leaves its diff in the model for good, and an earlier apply's revert over
    the same entries must still see it: it restored the values before both, so `h = apply(d)`,
    `apply(d)` (dropped), `h.revert()` gave the base instead of base + d, silently. It holds the
    storage keys and the diff's indices, and the changed tensors (the model's own) only weakly:
    holding the written views kept a deleted model's weights alive (a dropped apply's whole 4 MB
    weight of a 1000 × 1000 linear)."""

    __slots__ = ("_keyed", "_tensors")

    def __init__(self, handle: "ApplyHandle"):
        super().__init__(handle)
        keyed = []
        for call in handle._calls:  # the keys apply took for the call's slots (14 µs each to take again)
            key_at = {slot: key for key, slot in call.slot.items()}
            keyed += [(key_at[t], idx) for idx, t in zip(call.indices, call.target)]
        self._keyed = keyed + [(_storage_key(t), None) for t, _ in handle._originals]
        self._tensors = [weakref.ref(t) for _, t, _ in handle._changed]

    def _touched(self) -> dict:
        return _touched_of(self._keyed)


def _entry(r):
    """What `r` refers to: the live handle, or a dropped apply's `_Ref` itself while a tensor it
    changed lives; None for neither."""
    h = r()
    if h is not None or not isinstance(r, _Ref):
        return h
    return r if any(t() is not None for t in r._tensors) else None


def _pruned(refs) -> list:
    """`refs` less the dead: a dropped apply's `_Ref` stays while something earlier is in place (whose
    revert it must block); with nothing before it, it blocks no revert."""
    kept = [r for r in refs if _entry(r) is not None]
    while kept and kept[0]() is None:
        kept.pop(0)
    return kept


def _handle_keys(handle, known: dict | None = None) -> list:
    """The storage keys of the tensors `handle` changed, as they were when it was remembered (a
    copy or an unpickled handle takes them afresh); every apply + revert asked three times.
    `known`: {name: storage key} already taken (apply's)."""
    keys = _keys_of.get(handle)
    if keys is None:
        known = known or {}
        keys = list(dict.fromkeys(known[n] if n in known else _storage_key(t) for n, t, _ in handle._changed))
        _keys_of[handle] = keys
    return keys


_held: list = []  # lists that keep alive the handles of the applies made meanwhile (`holding_applies`)


@contextlib.contextmanager
def holding_applies():
    """Inside the block, the handle of every new apply is kept alive (even one its caller drops,
    which would otherwise stay in the model for good) and listed in the yielded list, so that the
    block's owner (`xlsparse.hf.disable`) can revert it on exit (the list is in creation order)."""
    kept = []
    with _busy_lock:
        _held.append(kept)
    try:
        yield kept
    finally:
        with _busy_lock:
            _held[:] = [k for k in _held if k is not kept]


def _remember_apply(handle, known: dict | None = None) -> None:
    with _busy_lock:
        if isinstance(handle, ApplyHandle):
            for kept in _held:
                kept.append(handle)
        if len(_in_place) > 1024:  # applies never reverted leave dead references: sweep them now and then
            for key in [k for k, refs in _in_place.items() if all(r() is None for r in refs)]:
                del _in_place[key]
        ref = _Ref(handle) if isinstance(handle, ApplyHandle) else weakref.ref(handle)
        for key in _handle_keys(handle, known):
            _in_place[key] = _pruned(_in_place.get(key, [])) + [ref]


def _forget_apply(handle) -> None:
    with _busy_lock:
        for key in _handle_keys(handle):
            stack = _pruned([r for r in _in_place.get(key, []) if r() is not handle])
            if stack:
                _in_place[key] = stack
            else:
                _in_place.pop(key, None)


def applies_on(tensors) -> list:
    """The applies still in place (not merge()'s EntryWrite records) that changed one of
    `tensors`, by storage."""
    keys = {_storage_key(t) for t in tensors}
    with _busy_lock:
        found = {id(h): h for key in keys for r in _in_place.get(key, []) if isinstance(h := r(), ApplyHandle)
                 and not h.reverted}
    return list(found.values())


def _later_applies(handle) -> list:
    """Names of the tensors of `handle` whose changed entries a later, not yet reverted apply
    changed again (the entries overlap, or one of them is a dense or absolute entry)."""
    with _busy_lock:
        later = {}
        for key in _handle_keys(handle):
            alive = [e for r in _in_place.get(key, []) if (e := _entry(r)) is not None]
            if handle in alive:
                later[key] = alive[alive.index(handle) + 1:]
    if not any(later.values()):
        return []
    mine, names = handle._touched(), []
    for name, t, _ in handle._changed:
        key = _storage_key(t)
        for other in later.get(key, []):
            theirs = other._touched().get(key, "absent")
            if isinstance(theirs, str):
                continue
            if mine.get(key) is None or theirs is None or bool(torch.isin(mine[key], theirs.to(mine[key].device)).any()):
                names.append(name)
                break
    return names


class EntryWrite:
    """Entries of a tensor written in place outside `apply` that an undo restores later
    (`SparseDeltaLinear.merge`). Registered like an apply, so that reverting an earlier apply over
    the same entries refuses while it is in place, and it sees later applies over them."""

    def __init__(self, name: str, tensor: torch.Tensor, indices: torch.Tensor):
        self._changed = [(name, tensor, _placement(tensor))]
        self._indices = indices

    def _touched(self) -> dict:
        return {_storage_key(self._changed[0][1]): self._indices.long()}

    @classmethod
    def register(cls, name: str, tensor: torch.Tensor, indices: torch.Tensor) -> "EntryWrite":
        """Record that `indices` of `tensor` were just written; keep the result alive until `release`."""
        record = cls(name, tensor, indices)
        _remember_apply(record)
        return record

    def __setstate__(self, state: dict) -> None:
        # a deep copy or an unpickled copy (that of a merged layer) writes the copy's tensor, which
        # the registry does not know yet: register it, or unmerge() would not see later applies
        self.__dict__.update(state)
        _remember_apply(self)

    def written_over(self) -> bool:
        """True while a later apply that is still in place changed some of these entries."""
        return bool(_later_applies(self))

    def release(self) -> None:
        """The entries were restored: they no longer block earlier reverts."""
        _forget_apply(self)


# Tensors an apply or revert is writing now, by storage: a second thread that reaches one of them
# is refused instead of interleaving its writes (which would corrupt the bit-exact revert).
_busy_storages: set = set()
_busy_lock = threading.Lock()


@contextlib.contextmanager
def _exclusive(tensors, what: str):
    keys = checks.memory_keys(tensors)
    with _busy_lock:
        if keys & _busy_storages:
            raise RuntimeError(f"{what}: another thread is applying or reverting a diff on the same model tensors; "
                               "serialise apply/revert calls on one model")
        _busy_storages.update(keys)
    try:
        yield
    finally:
        with _busy_lock:
            _busy_storages.difference_update(keys)


def _refuse_absolute_on_tied_decoder(what: str, diff: "SparseDiff", model) -> None:
    """An absolute entry on the output embeddings of a model that ties them to its input
    embeddings would replace both. Such an entry comes from training them untied (LT-SFT's
    untie_embeddings; a tied matrix is stored under its input-embedding name): on the usual tied
    base it overwrote the input embeddings. Other tied names (XLM-R's lm_head.bias and
    lm_head.decoder.bias) are one parameter in training too, and their absolute entries apply."""
    if not diff.absolute or not isinstance(model, torch.nn.Module):
        return
    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return
    weight = getattr(out, "weight", None)
    if weight is None or inp is None or weight is not getattr(inp, "weight", None):
        return
    decoder = {f"{n}.weight" for n, m in model.named_modules(remove_duplicate=False) if m is out}
    for name in diff.absolute:
        if name in decoder:
            embeddings = sorted(f"{n}.weight" for n, m in model.named_modules(remove_duplicate=False) if m is inp)
            raise ValueError(
                f"{what}: {name!r} is an absolute entry (it replaces the whole tensor), and this model ties it to "
                f"{embeddings}, which it would replace too. A diff trained with them untied (LT-SFT's "
                "untie_embeddings) needs the base untied first: model.get_output_embeddings().weight = "
                "torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone()); with_abs=False skips "
                "absolute entries")


def _refuse_tied_twice(what: str, diff: "SparseDiff", keys: dict) -> None:
    """A diff that names both names of one tied tensor would change it twice (`keys`: the model's
    storage key of each name it has)."""
    first = {}
    for name in [*diff.deltas, *diff.dense, *diff.absolute]:
        if name in keys:
            other = first.setdefault(keys[name], name)
            if other != name:
                raise ValueError(f"{what}: names both {other!r} and {name!r}, which are one tied tensor; "
                                 "keep one of them")


HALF_DTYPES = (torch.float16, torch.bfloat16)


def _overflow_error(op: str, what: str, dtype: torch.dtype, fix: str) -> ValueError:
    """A sum rounded to a half dtype can overflow (float16 holds 65504 at most): an inf from finite
    terms is refused, naming the entry, rather than written."""
    return ValueError(f"{op}: {what} overflows {dtype} (largest finite {torch.finfo(dtype).max:g}); {fix}")


def _refuse_overflow(name: str, total: torch.Tensor, terms, op: str = "merge", what: str | None = None,
                     fix: str = "merge them as float32: diff.to(dtype=torch.float32)") -> None:
    """`merge`'s (or `op`'s) half-precision weighted sum: inf from finite terms is refused."""
    if total.dtype in HALF_DTYPES and total.numel() and not torch.isfinite(total).all() \
            and all(bool(torch.isfinite(t).all()) for t in terms):
        raise _overflow_error(op, what or f"the weighted sum of {name!r}", total.dtype, fix)


def _refuse_apply_overflow(calls, originals, diffs, named) -> None:
    """`apply` into a half-precision tensor: an entry that was finite before the call and is not after,
    while every value the diffs add to that tensor is finite, is refused (the caller restores the
    model). Only the entries written are read, and all tensors answer in one read-back."""
    found = []  # (tensor, tensor of one bool: some entry overflowed)
    for call in calls:
        for idx, old, t in zip(call.indices, call.saved, call.target):
            param = call.dense[t]
            if param.dtype in HALF_DTYPES and idx.numel() and param.device.type != "meta":
                new = param.view(-1).index_select(0, idx.long())
                found.append((param, (torch.isfinite(old) & ~torch.isfinite(new)).any()))
    for param, before in originals:
        if param.dtype in HALF_DTYPES and param.numel() and param.device.type != "meta":
            found.append((param, (torch.isfinite(before) & ~torch.isfinite(param)).any()))
    if not found or not bool(torch.stack([bad.to(found[0][1].device) for _, bad in found]).any()):
        return
    for param, bad in found:
        if not bool(bad):
            continue
        key = _storage_key(param)
        names = [n for d in diffs for n in (*d.deltas, *d.dense, *d.absolute) if _storage_key(named[n]) == key]
        terms = [e.values if isinstance(e, SparseDelta) else e for d in diffs
                 for n, e in (*d.deltas.items(), *d.dense.items(), *d.absolute.items()) if n in names]
        if all(bool(torch.isfinite(t).all()) for t in terms):
            raise _overflow_error("apply", f"{names[0]!r} plus the diffs", param.dtype,
                                  "apply them to the model in float32 (model.float()), or scale them down (alphas)")


def _refuse_scaled_absolute(op: str, scales: str, i: int, diff: "SparseDiff", scale: float) -> None:
    """Absolute entries replace a parameter and have no scaled version: a weight or alpha other
    than 1 on a diff that has them is refused (ignoring it made -d or alpha=0 install the head)."""
    if diff.absolute and scale != 1.0:
        raise ValueError(f"{op}: {scales}[{i}] = {scale:g}, but diff {i} has absolute entries {sorted(diff.absolute)}, "
                         "which replace a parameter and cannot be scaled; drop them with with_abs=False or "
                         "diff.without_absolute(), or choose heads explicitly with xlsparse.hf.arithmetic.combine")


def _refuse_absolute_clash(i: int, diff: "SparseDiff", named: dict, claims: dict, keys: dict) -> None:
    """An absolute entry replaces its tensor, so another change of that tensor (tied names
    included) in the same apply would be lost or not depending on the order: refused, as in
    `merge`. `claims` maps each tensor to the first (diff, name, absolute?) that named it; `keys`
    holds the storage key of each name."""
    for name in [*diff.deltas, *diff.dense, *diff.absolute]:
        absolute = name in diff.absolute
        _lookup(named, name, f"apply: diff {i}")
        j, other, other_absolute = claims.setdefault(keys[name], (i, name, absolute))
        if j != i and (absolute or other_absolute):
            names = repr(name) if name == other else f"{other!r} (tied to {name!r})"
            raise ValueError(f"apply: {names} is changed by diffs {j} and {i}, and one of them is an absolute entry; "
                             "absolute values replace a parameter and have no sum with another change "
                             "(apply(..., with_abs=False) skips them)")


def _patterns(p) -> list:
    """Regular expressions given as a string or any iterable of them (read once: a generator is spent
    after one pass), as a list."""
    return [p] if isinstance(p, str) else list(p or [])


def _selected(name: str, include, exclude, aliases=()) -> bool:
    """Whether `name` is selected: it or one of its `aliases` (other names of one tied tensor)
    matches an `include` pattern (or there is none), and `name` matches no `exclude` pattern."""
    inc, exc = _patterns(include), _patterns(exclude)
    return ((not inc or any(re.search(p, n) for p in inc for n in (name, *aliases)))
            and not any(re.search(p, name) for p in exc))


class SparseDiff:
    """A model diff: `deltas` {name: SparseDelta}, `dense` {name: Tensor} differences, and
    `absolute` {name: Tensor} values that replace a parameter (e.g. a new classifier head).

    Construction validates every delta and names the offending parameter in the error.
    """

    def __init__(self, deltas: Mapping | None = None, dense: Mapping | None = None, *, absolute: Mapping | None = None,
                 base_model: str | None = None):
        for kind, group in (("deltas", deltas), ("dense", dense), ("absolute", absolute)):
            # names are parameter names: save and save_composable_sft wrote other keys (1, None)
            # into files that load and load_composable_sft then refuse
            if group is not None and not isinstance(group, Mapping):
                raise TypeError(f"SparseDiff: {kind} must be a dict {{parameter name: ...}}, got {type(group).__name__}")
            bad = [n for n in (group or {}) if not isinstance(n, str)]
            if bad:
                raise TypeError(f"SparseDiff: {kind} names must be strings (parameter names), got {bad[:3]!r}")
        self.deltas: dict[str, SparseDelta] = {}
        for name, d in (deltas or {}).items():
            if not all(hasattr(d, a) for a in ("indices", "values", "shape")):
                raise TypeError(f"delta {name!r}: expected a SparseDelta, got {type(d).__name__}")
            self.deltas[name] = SparseDelta(d.indices, d.values, d.shape, name=name)
        self.dense = dict(dense or {})
        self.absolute = dict(absolute or {})
        for kind, group in (("dense", self.dense), ("absolute", self.absolute)):
            for name, t in group.items():
                if not isinstance(t, torch.Tensor) or t.dtype not in checks.FLOAT_DTYPES:
                    raise TypeError(f"{kind} entry {name!r}: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
                                    f"got {getattr(t, 'dtype', type(t).__name__)}")
        both = set(self.deltas) & (set(self.dense) | set(self.absolute)) | set(self.dense) & set(self.absolute)
        if both:
            raise ValueError(f"parameters {sorted(both)} appear in more than one of deltas, dense and absolute")
        self.base_model = base_model

    @classmethod
    def _trusted(cls, deltas, dense=None, absolute=None, base_model=None) -> "SparseDiff":
        out = cls.__new__(cls)
        out.deltas, out.dense, out.absolute, out.base_model = dict(deltas), dict(dense or {}), dict(absolute or {}), base_model
        return out

    # --- description ---
    @property
    def nnz(self) -> int:
        """Stored sparse entries over all deltas."""
        return sum(d.nnz for d in self.deltas.values())

    def __len__(self) -> int:
        return len(self.deltas) + len(self.dense) + len(self.absolute)

    def __repr__(self) -> str:
        return (f"SparseDiff({len(self.deltas)} deltas, nnz={self.nnz}, {len(self.dense)} dense, "
                f"{len(self.absolute)} absolute, base_model={self.base_model!r})")

    def to(self, device=None, dtype=None) -> "SparseDiff":
        """A copy on `device`; `dtype` converts sparse and dense values (absolute ones keep theirs)."""
        if dtype is not None:
            checks.value_dtype("SparseDiff.to", "dtype", dtype)
        return SparseDiff._trusted({n: d.to(device, dtype) for n, d in self.deltas.items()},
                                   {n: t.to(device=device, dtype=dtype) for n, t in self.dense.items()},
                                   {n: t.to(device=device) for n, t in self.absolute.items()}, self.base_model)

    # --- apply ---
    def apply(self, model, alpha: float = 1.0, with_abs: bool = True) -> ApplyHandle:
        """`W <- W + alpha * diff` in one fused call; `handle.revert()` undoes it bit-exactly.
        `with_abs=False` skips the absolute entries; with them, alpha must be 1 (see `apply`)."""
        return apply([self], model, [alpha], with_abs=with_abs)

    def without_absolute(self) -> "SparseDiff":
        """The same diff without its absolute entries (e.g. a language SFT's MLM head), sharing
        the delta and dense tensors."""
        return SparseDiff._trusted(self.deltas, self.dense, {}, self.base_model)

    @contextlib.contextmanager
    def applied(self, model, alpha: float = 1.0, with_abs: bool = True):
        """`with diff.applied(model, alpha=...):` the model carries the diff inside the block
        (`with_abs` as in `apply`)."""
        with self.apply(model, alpha, with_abs=with_abs) as handle:
            yield handle

    # --- arithmetic ---
    @classmethod
    def merge(cls, diffs, weights=None, with_abs: bool = True) -> "SparseDiff":
        """`sum_i weights[i] * diffs[i]`: per parameter, a linear-time union of the sorted supports
        (no densifying), summed in float32 (float64 where a diff's values are float64). A parameter
        that is dense in any diff is summed dense.
        Absolute entries pass through as they are, so a diff that has them needs weight 1, and
        one named by two diffs is an error (a replaced value has no scaled version and no sum).
        `with_abs=False` drops every absolute entry first (composing a language SFT and a task
        SFT that both carry heads); `xlsparse.hf.arithmetic.combine` chooses heads explicitly."""
        diffs = _diff_list("merge", diffs)
        if not checks.flag("merge", "with_abs", with_abs):
            diffs = [d.without_absolute() for d in diffs]
        # every weight is checked, not only those of sparse deltas (merge_deltas checks those): d * nan
        # on a dense-only diff would otherwise poison the model on apply
        weights = scale_list("merge", "weights", weights, len(diffs))
        for i, (d, w) in enumerate(zip(diffs, weights)):
            _refuse_scaled_absolute("merge", "weights", i, d, w)
        dense_names = {n for d in diffs for n in d.dense}
        deltas, dense, absolute = {}, {}, {}
        for name in dict.fromkeys(n for d in diffs for n in d.deltas):
            if name in dense_names:
                continue
            parts = [(d.deltas[name], w) for d, w in zip(diffs, weights) if name in d.deltas]
            shape = parts[0][0].shape
            for p, _ in parts:
                if p.shape != shape:
                    raise ValueError(f"merge: delta {name!r} has shapes {tuple(shape)} and {tuple(p.shape)}")
            dtype = parts[0][0].values.dtype
            for p, _ in parts[1:]:
                dtype = torch.promote_types(dtype, p.values.dtype)
            # detached: diff arithmetic is data, and merge_deltas refuses values that require grad
            idx, val = _ops.merge_deltas([p.indices.to(index_dtype(math.prod(shape))) for p, _ in parts],
                                         [p.values.detach().to(dtype) for p, _ in parts],
                                         [w for _, w in parts], math.prod(shape))
            _refuse_overflow(name, val, [p.values for p, _ in parts])
            deltas[name] = SparseDelta._trusted(idx, val, shape)
        for name in dict.fromkeys(n for d in diffs for n in d.dense):
            parts = [(d.dense[name] if name in d.dense else d.deltas[name].to_dense(), w)
                     for d, w in zip(diffs, weights) if name in d.dense or name in d.deltas]
            for part, _ in parts[1:]:
                if part.shape != parts[0][0].shape:
                    raise ValueError(f"merge: dense entry {name!r} has shapes {tuple(parts[0][0].shape)} and "
                                     f"{tuple(part.shape)}")
            dtype = functools.reduce(torch.promote_types, [p.dtype for p, _ in parts])
            # every part weighted in the sum's dtype: a float32 part weighted in float32 first was
            # rounded before a float64 sum
            acc = acc_dtype(dtype)
            dense[name] = sum(w * p.to(acc) for p, w in parts).to(dtype)
            _refuse_overflow(name, dense[name], [p for p, _ in parts])
        for d in diffs:
            for name, t in d.absolute.items():
                if name in absolute or name in deltas or name in dense:
                    raise ValueError(f"merge: absolute entry {name!r} is in more than one diff; absolute values "
                                     "replace a parameter and have no sum (merge(..., with_abs=False) drops them)")
                absolute[name] = t
        base = {d.base_model for d in diffs} - {None}
        if len(base) > 1:  # a name may differ for one model (a path and a hub name), so no error
            warnings.warn(f"merge: the diffs name different base models {sorted(base)}; deltas from "
                          "different bases do not add up to one fine-tuning. The merged diff names none.")
        return cls._trusted(deltas, dense, absolute, base.pop() if len(base) == 1 else None)

    def __add__(self, other: "SparseDiff") -> "SparseDiff":
        if not isinstance(other, SparseDiff):
            return NotImplemented
        return SparseDiff.merge([self, other])

    def __sub__(self, other: "SparseDiff") -> "SparseDiff":
        """`self - other`; `other` must have no absolute entries (they cannot be negated)."""
        if not isinstance(other, SparseDiff):
            return NotImplemented
        return SparseDiff.merge([self, other], [1.0, -1.0])

    def __mul__(self, scale: float) -> "SparseDiff":
        """`scale * self`; a diff with absolute entries can only be scaled by 1 (see `merge`)."""
        if not isinstance(scale, (int, float)):
            return NotImplemented
        # a bool (float(True) scales by 1) or NaN was refused by merge as "weights[0]", a list never given
        checks.finite("SparseDiff *", scale=scale)
        return SparseDiff.merge([self], [scale])

    __rmul__ = __mul__

    def __neg__(self) -> "SparseDiff":
        """`-self`; refused for a diff with absolute entries (see `merge`)."""
        return self * -1.0

    def __truediv__(self, scale: float) -> "SparseDiff":
        """`self * (1 / scale)` (`merge`'s scaling): within 1 ulp of `values / scale`, exact for a
        power of two; refused for 0 and infinity."""
        if not isinstance(scale, (int, float)):
            return NotImplemented
        # d / inf would be a silent 0 * d (1 / inf == 0 passes merge's finiteness check); first, so
        # that d / False is refused as a bool, not as a division by zero
        checks.finite("SparseDiff /", divisor=scale)
        if scale == 0:
            raise ZeroDivisionError("SparseDiff / 0: the scale must be nonzero")
        return self * (1.0 / scale)

    # --- LT-SFT selection ---
    @classmethod
    def from_models(cls, base, tuned, k: int | None = None, density: float | None = None, include=None, exclude=None,
                    base_model: str | None = None) -> "SparseDiff":
        """LT-SFT's selection: the k (or density * total) entries of largest |tuned - base|, global
        over every parameter the two models share (same name and shape); with neither k nor
        density, every entry that changed (as `SparseDelta.from_dense` with k=None). Buffers of a module
        (running statistics) are not ranked; one that differs is named in a warning. Dicts are
        taken whole.

        `include` / `exclude`: regular expressions (a string or a list) searched in parameter
        names; e.g. exclude=[r"embeddings", r"LayerNorm|layer_norm", r"classifier|lm_head|pooler"].
        Ties go to the lowest flat position, earlier parameters first. Models may also be dicts.
        Differences are taken, and values stored, in the wider dtype of the two tensors (float32
        for a bfloat16 model tuned from a float32 one), so the base's own rounding is not in them.
        They are still rounded to that dtype: where tuned/base lies outside [1/2, 2] (a change as
        large as the weight, or one that crosses zero), tuned − base can need more bits than the
        dtype holds, and base + diff is an ulp off tuned there (float32 weights of ~0.02 moved by
        ~0.013: 11,916 of 90,000 entries; bfloat16 ones alike); a difference that overflows a
        half dtype is a ValueError. For an exact diff pass copies of the two models in a dtype wider
        than both (`copy.deepcopy(model).float()` of bfloat16 or float16 models, `.double()` of
        float32 ones; deepcopy keeps tied weights tied): values are then stored in it, and `apply`
        adds float64 values in float64.
        Each `include` pattern must match some parameter (else ValueError: a typo would select nothing).
        Tied parameters (one tensor under two names, e.g. GPT-2's `lm_head.weight` and
        `transformer.wte.weight`) are read once, under their first name inside the body
        (`base_model_prefix`; for a state dict, the first name part most names share), which
        `exclude` reads; `include` may match any of their names. Names that base ties are read once
        the same way when tuned holds them as separate copies (a state dict of clones), which must
        then be equal (else ValueError: base + diff cannot hold two values). The weight of a GPT-2 Conv1D layer converted by
        `xlsparse.hf.convert` (stored [out, in]) is read in the model's own [in, out] layout, the
        layout of its state dict and of `apply`. A selected floating-point
        tensor of `tuned` that `base` lacks (a new head) is a ValueError: a diff holds changes of
        the base's tensors, so exclude it (or store it whole with `SparseDiff(..., absolute={name: tensor})`).
        A model sharded with FSDP2 is a ValueError: pass its full state dict instead. With k or
        density, a change that is NaN or inf (a diverged fine-tuning) cannot be ranked: ValueError
        naming the parameters.
        """
        # lists, read for every name: a generator was spent on the first (include then selected
        # everything, exclude excluded from the first name only)
        include, exclude = _patterns(include), _patterns(exclude)
        named, b = _named_tensors(tuned, buffers=False), _named_tensors(base)
        # a shard is not the tensor: a ranking per process, or a raw error inside DTensor
        for model in (named, b):
            refuse_sharded("from_models", model, "Pass full state dicts instead: torch.distributed.checkpoint."
                           "state_dict.get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)).")
        t = _untied(named, _body_prefix(tuned, named))
        # include may name a tied tensor by any of its names: include=["lm_head"] on GPT-2, whose tied
        # weight is kept as transformer.wte.weight, gave an empty diff (exclude reads the kept name:
        # exclude=["lm_head"] keeps a body's tied word embeddings, as composable-sft's body SFTs do)
        tied = {}
        for n, x in named.items():
            tied.setdefault(_storage_key(x), []).append(n)
        aliases = {n: tied[_storage_key(x)] for n, x in t.items()}
        # ties of base that tuned does not show (a state dict of separate copies, {k: v.clone()}):
        # applied to base the names are one tensor, so they are read once too, under base's kept
        # name (exclude=["embeddings"] kept the decoder's copy, and apply changed the embeddings)
        in_base = {n: b[n] for n in t if n in b}
        kept = _untied(in_base, _body_prefix(base, b))
        kept_of = {_storage_key(x): n for n, x in kept.items()}
        for n in [n for n in in_base if n not in kept]:
            first = kept_of[_storage_key(b[n])]
            if not torch.equal(t[n].detach(), t[first].detach()):
                raise ValueError(f"from_models: base ties {first!r} and {n!r} into one tensor, but tuned holds "
                                 "different values for them; a diff of base cannot hold both (tie them in tuned, or "
                                 "untie base first)")
            aliases[first] = list(dict.fromkeys([*aliases[first], *aliases.pop(n)]))
            del t[n]
        # a converted GPT-2 Conv1D layer stores its weight [out, in]; diffs are in the model's own
        # [in, out] layout (a square weight was ranked, and its diff stored, transposed)
        b, t = _own_layout(base, b), _own_layout(tuned, t)
        # as convert's target_modules: a pattern that matches nothing (a typo) would select nothing
        # from it, silently (an empty diff when it is the only one)
        floats = [n for n, x in named.items() if x.is_floating_point()]
        unmatched = [p for p in include if not any(re.search(p, n) for n in floats)]
        if unmatched:
            raise ValueError(f"from_models: include patterns {unmatched} match no parameter of tuned (it has "
                             f"{floats[:6]}{' ...' if len(floats) > 6 else ''})")
        if isinstance(tuned, torch.nn.Module):
            moved = [n for n, x in tuned.named_buffers() if x.is_floating_point() and n in b and b[n].shape == x.shape
                     and not torch.equal(b[n].detach().to(x), x.detach()) and _selected(n, include, exclude)]
            if moved:
                warnings.warn(f"from_models: buffers {moved[:3]} differ between base and tuned (e.g. running statistics); "
                              "a diff holds parameters only, so they are not in it", stacklevel=2)
        selected = [n for n in t if t[n].is_floating_point() and _selected(n, include, exclude, aliases[n])]
        missing = [n for n in selected if n not in b]
        if missing and any(".delta_values" in n for n in missing):
            # excluding them, as the next message says, gave a diff of the frozen base weights: zeros
            raise ValueError(f"from_models: tuned holds layers converted by xlsparse.hf (e.g. {missing[0]!r}), whose "
                             "trained values are held apart from the weights (in them only while merged); take its "
                             "diff with xlsparse.hf.extract_diff(tuned)")
        if missing:
            raise ValueError(f"from_models: {len(missing)} tensors of tuned are not in base, e.g. {missing[:3]} (models "
                             "of another class or prefix?); exclude them with exclude=[...]")
        names = selected
        for n in names:
            if b[n].shape != t[n].shape:
                raise ValueError(f"from_models: {n!r} has shape {tuple(b[n].shape)} in base but {tuple(t[n].shape)} in tuned")
        every = k is None and density is None
        if not every:
            k = budget("from_models", sum(t[n].numel() for n in names), k, density)
        with torch.no_grad():
            # in the wider of the two dtypes: a bfloat16 tuned model minus a float32 base rounded
            # to bfloat16 first was off by the base's rounding (up to 0.0078 at |θ| ~ 3), as large
            # as a fine-tuning change, and base + diff no longer gave tuned at the chosen entries
            wide = {n: torch.promote_types(t[n].dtype, b[n].dtype) for n in names}
            diffs = []
            for n in names:
                new, old = t[n].detach().to(wide[n]), b[n].detach().to(t[n].device, wide[n])
                # an entry equal in both did not change: an inf there gave inf - inf = NaN, a change
                # kept by default (base + diff was NaN) and refused as unrankable with k
                d = (new - old).masked_fill_(new == old, 0)
                # two half-precision models: a change past the dtype's range is inf, and base + diff
                # was inf where tuned is finite (as apply and merge refuse such a sum)
                if d.dtype in HALF_DTYPES and bool((d.isinf() & new.isfinite() & old.isfinite()).any()):
                    raise _overflow_error("from_models", f"tuned − base of {n!r}", d.dtype,
                                          "pass float32 copies of the two models (copy.deepcopy(model).float())")
                diffs.append(d)
            if not every:  # every change is kept as it is, NaN too: base + diff is still tuned
                _refuse_unrankable("from_models", dict(zip(names, diffs)), "tuned − base holds", "parameters",
                                   "did the fine-tuning diverge? exclude them, or pass neither k nor density")
            masks = [d != 0 for d in diffs] if every else topk_mask(diffs, k)
            deltas = {n: _delta_at(d, m) for n, d, m in zip(names, diffs, masks)}
        return cls._trusted(deltas, base_model=base_model)

    # --- xlsparse files: one safetensors file, the JSON description in its metadata ---
    def save(self, path: str, base_model: str | None = None) -> None:
        """Write one safetensors file; its metadata holds JSON with every entry's shape and dtype,
        the xlsparse version and the base model's name. Written to a temporary file, then renamed."""
        from safetensors.torch import save_file

        from ._version import __version__

        path = path_arg("SparseDiff.save: path", path, "file")
        tensors, meta = {}, {"format": FORMAT, "format_version": FORMAT_VERSION, "xlsparse_version": __version__,
                              "base_model": base_model or self.base_model, "deltas": [], "dense": [], "absolute": []}
        for i, (name, d) in enumerate(self.deltas.items()):
            # the canonical index dtype: a delta built by xlsparse from int64 indices (e.g. a
            # SparseDeltaLinear's) may still hold int64 below 2^31
            idx_dtype = index_dtype(d.numel)
            tensors[f"delta.{i}.indices"] = d.indices.detach().cpu().to(idx_dtype).contiguous()
            tensors[f"delta.{i}.values"] = d.values.detach().cpu().contiguous()
            meta["deltas"].append({"name": name, "shape": list(d.shape), "nnz": d.nnz, "dtype": str(d.values.dtype),
                                   "index_dtype": str(idx_dtype)})
        for kind in ("dense", "absolute"):
            for i, (name, t) in enumerate(getattr(self, kind).items()):
                tensors[f"{kind}.{i}"] = t.detach().cpu().contiguous()
                meta[kind].append({"name": name, "shape": list(t.shape), "dtype": str(t.dtype)})
        # safetensors refuses tensors that share memory ("Some tensors share memory"): one support
        # given to two deltas, one dense tensor under two names. Each is written as its own copy.
        seen = set()
        for key, t in tensors.items():
            storage = t.untyped_storage().data_ptr()
            if storage in seen:
                tensors[key] = t.clone()
            elif storage:  # 0: an empty tensor, which holds no memory
                seen.add(storage)
        _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"xlsparse": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str, device="cpu") -> "SparseDiff":
        """Read a file written by `save`. Every shape, dtype, bound and the index order is checked;
        a truncated or corrupt file raises ValueError saying so (IndexError for an index outside
        its tensor), naming the file."""
        from safetensors import safe_open

        try:  # before reading: torch's own error for an absent CUDA is a bare AssertionError
            usable = torch.empty(0, device=device).device.type != "meta"
        except (RuntimeError, AssertionError) as exc:
            raise ValueError(f"SparseDiff.load: device={device!r} is not usable here: {exc}") from exc
        if not usable:  # the index checks read the data, which meta tensors lack
            raise ValueError(f"SparseDiff.load: device={device!r} is not usable here: meta tensors hold no data")
        path = path_arg("SparseDiff.load: path", path, "file")  # os.path.isfile(3) asks about file descriptor 3
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                header = (f.metadata() or {}).get("xlsparse")
                keys = set(f.keys())
                if header is None:
                    raise ValueError(f"{path}: not an xlsparse diff file (no 'xlsparse' metadata)")
                try:
                    meta = json.loads(header)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: the 'xlsparse' metadata is not valid JSON: {exc}") from exc
                tensors = {k: f.get_tensor(k) for k in keys}
        except ValueError:
            raise
        except Exception as exc:  # safetensors raises its own error type for bad headers and sizes
            raise ValueError(f"{path}: unreadable xlsparse diff file (truncated or corrupt?): {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{path}: metadata does not describe a {FORMAT}")
        version = meta.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:  # 1.0 or true are not version 1
            raise ValueError(f"{path}: format version {version!r}, this xlsparse reads {FORMAT_VERSION}")
        for kind in ("deltas", "dense", "absolute"):
            entries = meta.get(kind)
            if not isinstance(entries, list) or not all(isinstance(m, dict) for m in entries):
                raise ValueError(f"{path}: malformed metadata: {kind!r} must be a list of objects")
            names = [m.get("name") for m in entries]
            if not all(isinstance(n, str) for n in names):
                raise ValueError(f"{path}: malformed metadata: every {kind} entry needs a string name")
            if len(set(names)) != len(names):
                dup = sorted({n for n in names if names.count(n) > 1})
                raise ValueError(f"{path}: {kind} entries {dup} appear more than once")
            for m in entries:
                _meta_shape(path, f"{kind} entry {m['name']!r}", m.get("shape"))
                if kind == "deltas" and (type(m.get("nnz")) is not int or m["nnz"] < 0):
                    raise ValueError(f"{path}: malformed metadata: delta {m['name']!r}: nnz must be a non-negative int, "
                                     f"got {m.get('nnz')!r}")

        def tensor(key, what, dtype_name, shape=None):
            if key not in tensors:
                raise ValueError(f"{path}: {what}: tensor {key!r} is missing")
            t = tensors.pop(key)
            if str(t.dtype) != dtype_name:
                raise ValueError(f"{path}: {what}: dtype {t.dtype} but the metadata says {dtype_name}")
            if shape is not None and list(t.shape) != list(shape):
                raise ValueError(f"{path}: {what}: shape {tuple(t.shape)} but the metadata says {tuple(shape)}")
            return t

        try:
            deltas = {}
            for i, m in enumerate(meta["deltas"]):
                what = f"delta {m['name']!r}"
                idx = tensor(f"delta.{i}.indices", what, m["index_dtype"], [m["nnz"]])
                val = tensor(f"delta.{i}.values", what, m["dtype"], [m["nnz"]])
                # an index dtype other than the canonical one is made canonical by SparseDelta: save
                # wrote a SparseDeltaLinear's int64 indices below 2^31 elements as they were until
                # 2026-12-01, and those files (hf.save_pretrained's too) hold valid diffs
                try:  # an index out of range or out of order: named with the file, as every other check
                    deltas[m["name"]] = SparseDelta(idx, val, m["shape"], name=m["name"]).to(device)
                except (ValueError, IndexError) as exc:
                    raise type(exc)(f"{path}: {exc}") from exc
            whole = {}
            for kind in ("dense", "absolute"):
                whole[kind] = {m["name"]: tensor(f"{kind}.{i}", f"{kind} entry {m['name']!r}", m["dtype"], m["shape"]).to(device)
                               for i, m in enumerate(meta[kind])}
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: malformed metadata: {exc!r}") from exc
        if tensors:
            raise ValueError(f"{path}: tensors {sorted(tensors)} are not described by the metadata")
        try:  # an integer dense or absolute entry, a name in two kinds: a malformed file
            return cls(deltas, whole["dense"], absolute=whole["absolute"], base_model=meta.get("base_model"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc

    # --- composable-sft's pytorch_diff.bin ---
    @classmethod
    def load_composable_sft(cls, path: str) -> "SparseDiff":
        """Read composable-sft's `pytorch_diff.bin` (a file, or a folder holding one):
        `{"diffs": {name: {"size", "index_steps", "values"}}, "abs": {name: tensor}}` with flat
        column-major indices, delta-encoded (the first absolute). Loaded with weights_only=True;
        indices are decoded in int64, so tensors above 2^31 elements are safe."""
        path = path_arg("load_composable_sft: path", path, "folder or a .bin file")
        if os.path.isdir(path):
            path = os.path.join(path, COMPOSABLE_SFT_FILE)
        try:
            with torch.serialization.safe_globals(_numpy_scalar_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: cannot read a composable-sft diff file: {exc}") from exc
        if not isinstance(obj, dict) or not set(obj) <= {"diffs", "abs"}:
            # A few keys only: an xlsparse .safetensors diff (which torch.load reads too) has thousands.
            got = f"{len(obj)} keys such as {sorted(obj, key=str)[:3]}" if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path}: not a composable-sft diff: expected a dict with keys 'diffs' and 'abs', got {got}")
        encoded, absolute = obj.get("diffs", {}), obj.get("abs", {})
        if not isinstance(encoded, dict) or not isinstance(absolute, dict):
            raise ValueError(f"{path}: 'diffs' and 'abs' must be dicts")
        deltas = {name: _decode_composable_sft(f"{path}: delta {name!r}", name, enc) for name, enc in encoded.items()}
        for name, t in absolute.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{path}: abs entry {name!r} must be a floating-point tensor")
        try:  # a name both in "diffs" and "abs" too: a malformed file
            return cls(deltas, absolute=dict(absolute))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def save_composable_sft(self, path: str) -> None:
        """Write composable-sft's `pytorch_diff.bin`. A `path` ending in `.bin` (not a folder) is the
        file itself; any other path is a folder (made if missing, as composable-sft's `SFT.save` and
        HF's `save_pretrained` do) that gets `pytorch_diff.bin`; an existing file there is refused
        with nothing written. Missing parent folders are made (and removed again if the write fails).
        Dense differences are written as sparse diffs over every element; absolute entries as "abs"."""
        path = path_arg("save_composable_sft: path", path, "folder or a .bin file")
        if os.path.isdir(path) or not path.endswith(".bin"):
            # written as a file, "out/de" could not be read where a composable-sft folder is expected
            if os.path.exists(path) and not os.path.isdir(path):
                raise FileExistsError(errno.EEXIST, "save_composable_sft: path is an existing file, not a folder "
                                      "(name the file itself with a .bin path)", path)
            path = os.path.join(path, COMPOSABLE_SFT_FILE)
        encoded = {}
        items = [(n, d.indices.long().cpu(), d.values.detach().cpu(), d.shape) for n, d in self.deltas.items()]
        items += [(n, torch.arange(t.numel()), t.detach().cpu().reshape(-1), t.shape) for n, t in self.dense.items()]
        for name, idx, val, shape in items:
            column = _reorder(idx, shape, to_row=False)
            order = torch.argsort(column)
            column = column[order]
            steps = torch.cat([column[:1], column[1:] - column[:-1]])
            encoded[name] = {"size": torch.Size(shape), "index_steps": steps.tolist(), "values": val[order].contiguous()}
        obj = {"diffs": encoded, "abs": {n: t.detach().cpu() for n, t in self.absolute.items()}}
        with made_folder(os.path.dirname(path) or "."):
            _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _decode_composable_sft(what: str, name, enc) -> "SparseDelta":
    """One composable-sft delta: int64 index steps (the first absolute, the rest positive) whose
    running sum must neither overflow int64 nor leave the tensor."""
    if not isinstance(name, str):
        raise ValueError(f"{what}: names must be strings")
    if not isinstance(enc, dict) or set(enc) != {"size", "index_steps", "values"}:
        raise ValueError(f"{what}: expected keys size, index_steps, values")
    size = enc["size"]
    if not isinstance(size, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                        for d in size):
        raise ValueError(f"{what}: size must be a sequence of non-negative ints, got {size!r}")
    shape, numel = tuple(size), math.prod(size)
    if numel >= 2**63:
        raise ValueError(f"{what}: size {shape} has more elements than int64 can index")
    raw = enc["index_steps"]
    # torch.as_tensor([True, 2, 3]) is int64: the True would be read as the step 1
    if isinstance(raw, (list, tuple)) and any(isinstance(s, bool) for s in raw):
        raise ValueError(f"{what}: index_steps must be integers, got a bool in the list")
    try:
        steps = torch.as_tensor(raw).reshape(-1)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ValueError(f"{what}: index_steps must be int64 numbers: {exc}") from exc
    # read as int64 directly, a step of 1.7 became 1 and True 1: another index, silently ([] is float32)
    if steps.numel() and (steps.dtype.is_floating_point or steps.dtype.is_complex or steps.dtype == torch.bool):
        raise ValueError(f"{what}: index_steps must be integers, got {steps.dtype}")
    steps = steps.to(torch.int64)
    values = enc["values"]
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.numel() != steps.numel():
        raise ValueError(f"{what}: values must be a 1-D tensor with one entry per index step")
    if not values.is_floating_point():
        raise ValueError(f"{what}: values must be floating point, got {values.dtype}")
    if steps.numel() == 0:
        return SparseDelta(steps, values, shape, name=name)
    bad = (steps[1:] <= 0).nonzero()
    if bad.numel():
        raise ValueError(f"{what}: index_steps[{int(bad[0]) + 1}] = {int(steps[int(bad[0]) + 1])} is not "
                         "positive (indices must be sorted and unique)")
    if int(steps[0]) < 0:
        raise IndexError(f"{what}: the first index {int(steps[0])} is negative")
    column = steps.cumsum(0)
    # Positive steps make the sum strictly increasing; int64 wrap-around is the only way down.
    if column.numel() > 1 and bool((column[1:] <= column[:-1]).any()):
        raise ValueError(f"{what}: index_steps overflow int64 in their running sum")
    if int(column[-1]) >= numel:
        raise IndexError(f"{what}: indices span [{int(column[0])}, {int(column[-1])}], outside [0, {numel})")
    row = _reorder(column, shape, to_row=True)
    order = torch.argsort(row)
    return SparseDelta(row[order], values[order], shape, name=name)


def _meta_shape(path: str, what: str, shape) -> None:
    """A shape in file metadata is a list of non-negative ints, taken as written: not coerced."""
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"{path}: malformed metadata: {what}: shape must be a list of non-negative ints, got {shape!r}")
    if math.prod(shape) >= 2**63:
        raise ValueError(f"{path}: {what}: shape {shape} has {math.prod(shape)} elements, more than int64 can index")


def _reorder(flat: torch.Tensor, shape, to_row: bool) -> torch.Tensor:
    """Flat column-major indices to row-major (to_row) or back, in int64."""
    shape = list(shape)
    col_strides = [math.prod(shape[:d]) for d in range(len(shape))]
    row_strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    src, dst = (col_strides, row_strides) if to_row else (row_strides, col_strides)
    out = torch.zeros_like(flat, dtype=torch.int64)
    for size, s, t in zip(shape, src, dst):
        out += (flat // s) % size * t
    return out


def _numpy_scalar_globals() -> list:
    """composable-sft writes its first index step as a numpy int64: allow exactly that type, under
    both of its pickled names. numpy 2 pickles it as numpy._core.multiarray.scalar; numpy 1.x
    (every SFT composable-sft released) as numpy.core.multiarray.scalar, which torch's allowlist,
    matching names, refused under numpy 2."""
    try:
        import numpy as np
    except ImportError:
        return []
    scalar = (getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray).scalar
    names = {f"numpy.{m}.multiarray.scalar" for m in ("core", "_core")} - {f"{scalar.__module__}.{scalar.__name__}"}
    return [scalar, *((scalar, name) for name in sorted(names)), np.dtype, type(np.dtype(np.int64))]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write) -> None:
    """write(tmp) into a temporary file beside `path`, then rename it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    # mkstemp's and os.replace's errors name the temporary file, not `path`; and os.replace would
    # refuse a folder only after the whole write.
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, path) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved diff gets the usual mode (0644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
