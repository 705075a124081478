"""Every argument rule of the xlsparse ops, written once, checked before any kernel runs.

The op wrappers call these for every backend. Bad input raises:
- `TypeError` for a wrong dtype (or an argument that is not a tensor), a scalar that is not a
  number or that requires grad with grad mode on (`number`, `finite`), an on/off option that is not a bool
  (`flag`);
- `IndexError` for an index, target or token id outside its range;
- `RuntimeError` for an input of a non-differentiable op that requires grad with grad mode on
  (`not_differentiable`), or an in-place output that is a leaf requiring grad (`no_grad_leaf`);
- `ValueError` for everything else: shapes, devices, order, duplicates, aliasing between outputs,
  a non-contiguous output, a non-finite hyperparameter.
Inputs that are read only are made contiguous (a copy when needed) and copied when they share
memory with an output, so every backend sees the same, well-formed tensors. The fake impls call
the same functions with `read_data=False`: metadata only. The C++ kernels keep just the checks
that protect their raw pointers (csrc/include/xlsparse/checks.h).
"""
import math
import numbers
from collections.abc import Mapping

import torch
from torch._subclasses.fake_tensor import FakeTensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
# Tensors that are never fake or traced wrappers: a type test (40 ns) spares the subclass checks.
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def can_read(*tensors) -> bool:
    """Data checks need real data: not while tracing, not on meta or fake tensors (FakeTensorMode,
    or AOT tracing's functional wrappers of them: reading one raised a data-dependent error)."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t is None:
            continue
        if t.is_meta:
            return False
        if type(t) not in PLAIN_TENSOR_TYPES and torch._guards.detect_fake_mode([t]) is not None:
            return False
    return True


def is_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")


def all_tensors(op: str, lists: dict) -> None:
    """is_tensor for every element of every list in `lists` ({argument name: list}), naming
    `name[i]` only when one is not a tensor."""
    if not all(isinstance(t, torch.Tensor) for lst in lists.values() for t in lst):
        for name, lst in lists.items():
            for i, t in enumerate(lst):
                is_tensor(op, f"{name}[{i}]", t)


def float_dtype(op: str, name: str, t: torch.Tensor) -> None:
    """t holds float16, bfloat16, float32 or float64 (the dtypes every kernel is built for)."""
    is_tensor(op, name, t)
    value_dtype(op, name, t.dtype)


def value_dtype(op: str, name: str, dtype: torch.dtype) -> None:
    """dtype is float16, bfloat16, float32 or float64 (float8 too is refused: no op takes it)."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be floating point (float16, bfloat16, float32 or float64), got {dtype}")


def index_dtype(op: str, name: str, t: torch.Tensor) -> None:
    is_tensor(op, name, t)
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")


def same_device(op: str, first: torch.Tensor, **tensors) -> None:
    device = first.device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{op}: {name} must be on device {device} like the op's other tensors, got {t.device}")


def contiguous_output(op: str, name: str, t: torch.Tensor) -> None:
    """A tensor the op writes in place must be contiguous (a copy would drop the writes)."""
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (the op writes it in place)")


def is_real(v) -> bool:
    """A real number, not a bool, None or a string: float() read True as 1.0 and "0.5" as 0.5."""
    # a float first: the ABC check takes 1 µs, and apply checks an alpha per entry (400 on XLM-R)
    return type(v) is float or (isinstance(v, numbers.Real) and not isinstance(v, bool))


def is_whole(v) -> bool:
    """An integer, not a float or a bool (True would count as 1; int(2.7) would pick 2)."""
    # an int first, as in is_real: apply checks a target per entry (400 on XLM-R)
    return type(v) is int or (isinstance(v, numbers.Integral) and not isinstance(v, bool))


def tensor_list(op: str, name: str, v) -> None:
    """A list of tensors is not one tensor: iterated, a tensor gave its rows, one "tensor" each
    (topk_mask(w, k) returned a mask per row of w, and topk_mask(w, k)[0] the first row's)."""
    if isinstance(v, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a list of tensors, got a tensor; pass [t] for one tensor")
    if isinstance(v, Mapping):  # iterated, a dict gave its names: "'str' object has no attribute 'detach'"
        raise TypeError(f"{op}: {name} must be a list of tensors, got a dict; pass list(scores.values()) and zip "
                        "the masks with its keys")


def number(op: str, name: str, v) -> float:
    """v as a float: `is_real`, or a one-element tensor that is not bool; the message names the
    argument."""
    if isinstance(v, torch.Tensor) and v.requires_grad and torch.is_grad_enabled():
        # read as a number: alpha = torch.tensor(2., requires_grad=True) scaled the write and got no gradient
        raise TypeError(f"{op}: {name} requires grad, but it is read as a number and gets no gradient; pass "
                        f"float({name}) or call under torch.no_grad()")
    try:
        if not (is_real(v) or (isinstance(v, torch.Tensor) and v.dtype != torch.bool)):
            raise TypeError
        return float(v)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{op}: {name} must be a number, got {type(v).__name__}") from exc


def finite(op: str, **scalars) -> None:
    """Hyperparameters and scale factors must be finite numbers (`number`); the message names the
    argument."""
    for name, v in scalars.items():
        v = number(op, name, v)
        if not math.isfinite(v):
            raise ValueError(f"{op}: {name} must be finite, got {v}")


def flag(op: str, name: str, v) -> bool:
    """An on/off option must be a bool: bool("no") is True, and would turn the option on."""
    if not isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {v!r}")
    return v


def count(op: str, name: str, v) -> int:
    """A count (k, a size) must be an int (`is_whole`)."""
    if not is_whole(v):
        raise TypeError(f"{op}: {name} must be an int, got {v!r}")
    return int(v)


def memory_key(t: torch.Tensor | None):
    """The storage a tensor views (tensors with equal keys may overlap: conservatively, aliases),
    or None when it has none to compare: traced and fake tensors (compiled graphs handle their
    aliasing themselves), meta and empty tensors."""
    return None if torch.compiler.is_compiling() else _address(t)


def _address(t: torch.Tensor | None):
    """memory_key outside a compiled graph (asked once per call, not once per tensor)."""
    # This runs several times per tensor of an apply or an optimizer step, so it asks the
    # cheapest questions: the type test skips isinstance(FakeTensor) for plain tensors, and a meta
    # tensor's storage has address 0, which a real one never has (0.55 -> 0.4 µs).
    if t is None or (type(t) not in PLAIN_TENSOR_TYPES and isinstance(t, FakeTensor)) or t.numel() == 0:
        return None
    ptr = t.untyped_storage().data_ptr()
    return (t.device, ptr) if ptr else None


def memory_keys(tensors) -> set:
    """The storages of the tensors an op writes, looked up once per call: each input is then
    checked in O(1), not against every output (a step over hundreds of tensors would pay n²)."""
    if torch.compiler.is_compiling():
        return set()
    return {k for k in map(_address, tensors) if k is not None}


def unaliased(written: set, t):
    """t itself, or a copy of it when it shares memory with a tensor the op writes (`written`, from
    `memory_keys`): inputs are read as they were before the call, on every backend."""
    if written and _address(t) in written:  # empty inside a compiled graph: nothing to compare
        return t.clone(memory_format=torch.contiguous_format)
    return t


def distinct_outputs(op: str, lists: dict) -> set:
    """No two tensors an op writes may share memory: the result would depend on the write order.
    `lists` maps each written argument's name to its tensors. Returns their storages' keys
    (`memory_keys` of them). The names are formed only for the message: 260 f-strings took a
    fifth of a compact optimizer step's checks over 65 tensors."""
    compiling = torch.compiler.is_compiling()
    # Traced tensors have no addresses, but one tensor given twice is still itself: the graph
    # passed it to the kernel twice (stepped twice, from two threads) where eager refused it.
    key_of = (lambda t: None if t is None or t.numel() == 0 else id(t)) if compiling else _address
    span_of = (lambda t: (0, 1)) if compiling else _span
    keys = [k for lst in lists.values() for k in map(key_of, lst) if k is not None]
    found = set(keys)
    if len(found) < len(keys):  # one storage holds several: only overlapping spans clash (one flat buffer's slices do not)
        seen = {}
        for name, lst in lists.items():
            for i, t in enumerate(lst):
                key = key_of(t)
                if key is None:
                    continue
                span = span_of(t)
                for other, other_span in seen.get(key, ()):
                    if span[0] < other_span[1] and other_span[0] < span[1]:
                        raise ValueError(f"{op}: {other} and {name}[{i}] share memory; both are written by the op")
                seen.setdefault(key, []).append((f"{name}[{i}]", span))
    return set() if compiling else found


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) of the bytes of its storage that t can touch."""
    first = t.storage_offset() * t.element_size()
    last = first + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) * t.element_size()
    return first, last + t.element_size()


def indices(op: str, idx: torch.Tensor, numel: int) -> None:
    """Indices are strictly increasing (sorted, unique) and inside [0, numel). Reads the data."""
    all_indices([(op, idx, numel)])


def all_indices(items) -> None:
    """`indices(op, idx, numel)` of every item, raising for the first bad one. Each tensor is
    summarised where it lives (sorted and unique?, first, last) and the summaries are read back
    together: on a GPU one host sync for all of them, not three per tensor (on an H200, Triton's
    apply of two XLM-R-base diffs made 1593 syncs a call and took 97 ms for 9 ms of kernels)."""
    items = [item for item in items if item[1].numel()]
    if not items:
        return
    parts = [torch.stack([(i[1:] > i[:-1]).all().long(), i[0].long(), i[-1].long()]) for _, i, _ in items]
    by_device, summaries = {}, [None] * len(items)
    for n, part in enumerate(parts):
        by_device.setdefault(part.device, []).append(n)
    for positions in by_device.values():  # one read back per device
        for n, row in zip(positions, torch.stack([parts[n] for n in positions]).tolist()):
            summaries[n] = row
    for (op, idx, numel), (ordered, lo, hi) in zip(items, summaries):
        if not (ordered and 0 <= lo and hi < numel):
            _index_data(op, idx, numel)  # raises, naming the first bad position


def _index_data(op: str, idx: torch.Tensor, numel: int) -> None:
    k = idx.numel()
    if k > 1:
        bad = torch.nonzero(idx[1:] <= idx[:-1])
        if bad.numel():
            i = int(bad[0]) + 1
            raise ValueError(f"{op}: indices must be sorted and unique; position {i} holds {int(idx[i])} after "
                             f"{int(idx[i - 1])}")
    lo, hi = int(idx[0]), int(idx[-1])  # sorted: the ends are the extremes
    if lo < 0 or hi >= numel:
        raise IndexError(f"{op}: indices out of range [0, {numel}): min {lo}, max {hi}")


# --- compose ---

def sparse_update(op: str, dense, idx, values) -> None:
    """Metadata of an in-place update of dense.view(-1) at `idx` by `values`."""
    float_dtype(op, "dense", dense)
    index_dtype(op, "indices", idx)
    is_tensor(op, "values", values)
    contiguous_output(op, "dense", dense)
    if idx.dim() != 1 or values.dim() != 1:
        raise ValueError(f"{op}: indices and values must be 1-D, got {tuple(idx.shape)} and {tuple(values.shape)}")
    if idx.numel() != values.numel():
        raise ValueError(f"{op}: indices has {idx.numel()} entries but values has {values.numel()}")
    if values.dtype != dense.dtype:
        raise TypeError(f"{op}: values dtype {values.dtype} does not match dense dtype {dense.dtype}")
    same_device(op, dense, indices=idx, values=values)


def diff_entries(op: str, dense, idx, values, target, read_data: bool = True, compiled: bool = False,
                 values_name: str = "values") -> set:
    """Entry e pairs idx[e] and values[e] with dense[target[e]]; a message names the entry.
    Returns the dense tensors' storage keys (`memory_keys` of them). With `compiled` (a C++ kernel
    runs, whose `check_diff_entries` makes the same per-entry checks before any write), only the
    list lengths, the types and the aliasing, which the C++ check lacks: the per-entry checks here
    cost 1.1 ms of an apply of two XLM-R diffs (400 entries)."""
    if not (len(idx) == len(values) == len(target)):
        raise ValueError(f"{op}: indices, values and target must have one entry each, got "
                         f"{len(idx)}, {len(values)}, {len(target)}")
    all_tensors(op, {"dense": dense, "indices": idx, values_name: values})
    written = distinct_outputs(op, {"dense": dense})
    if compiled:
        return written
    for t, d in enumerate(dense[1:], 1):
        if d.device != dense[0].device:
            raise ValueError(f"{op}: the dense tensors must be on one device, got {dense[0].device} and {d.device} "
                             f"(dense[{t}]); call once per device, as xlsparse.apply does")
    index_type, data = {}, []
    for e, t in enumerate(target):
        if not 0 <= t < len(dense):
            raise IndexError(f"{op}: target[{e}] = {t} is not a position in dense ({len(dense)} tensors)")
        where = f"{op} entry {e} (dense[{t}])"
        sparse_update(where, dense[t], idx[e], values[e])
        if index_type.setdefault(t, idx[e].dtype) != idx[e].dtype:
            raise TypeError(f"{where}: every entry of one tensor must use one index dtype")
        if read_data and can_read(idx[e]):
            data.append((where, idx[e], dense[t].numel()))
    all_indices(data)
    return written


def saved(op: str, values, alphas, saved_values) -> None:
    if not (len(alphas) == len(saved_values) == len(values)):
        raise ValueError(f"{op}: alphas and saved need {len(values)} entries, got {len(alphas)} and {len(saved_values)}")
    finite(op, **{f"alphas[{e}]": a for e, a in enumerate(alphas)})
    for e, (v, s) in enumerate(zip(values, saved_values)):
        if not s.is_contiguous() or s.shape != v.shape or s.dtype != v.dtype or s.device != v.device:
            raise ValueError(f"{op}: saved[{e}] must be a contiguous tensor like values[{e}]")


def merge(op: str, idx, values, weights, numel: int, read_data: bool = True) -> None:
    if len(idx) < 1:
        raise ValueError(f"{op}: needs at least one delta")
    if not (len(idx) == len(values) == len(weights)):
        raise ValueError(f"{op}: indices, values and weights must have one entry each, got "
                         f"{len(idx)}, {len(values)}, {len(weights)}")
    if numel < 0:
        raise ValueError(f"{op}: numel must be >= 0, got {numel}")
    finite(op, **{f"weights[{e}]": w for e, w in enumerate(weights)})
    data = []
    for e, (i, v) in enumerate(zip(idx, values)):
        where = f"{op} delta {e}"
        index_dtype(where, "indices", i)
        float_dtype(where, "values", v)
        if i.dim() != 1 or v.dim() != 1 or i.numel() != v.numel():
            raise ValueError(f"{where}: indices and values must be 1-D of one length, got {tuple(i.shape)} and {tuple(v.shape)}")
        if i.dtype != idx[0].dtype:
            raise TypeError(f"{where}: index dtype {i.dtype} does not match delta 0's {idx[0].dtype}")
        if v.dtype != values[0].dtype:
            raise TypeError(f"{where}: values must share one dtype, got {v.dtype} and {values[0].dtype}")
        same_device(where, idx[0], indices=i, values=v)
        if read_data and can_read(i):
            data.append((where, i, numel))
    all_indices(data)


def topk(op: str, tensors, k: int, read_data: bool = True) -> int:
    """Returns the total element count. NaN (a magnitude with no order) raises ValueError."""
    total = 0
    for t, x in enumerate(tensors):
        float_dtype(op, f"tensors[{t}]", x)
        if x.dtype != tensors[0].dtype:
            raise TypeError(f"{op}: tensors must share one floating dtype; tensors[{t}] is {x.dtype}, tensors[0] {tensors[0].dtype}")
        same_device(op, tensors[0], **{f"tensors[{t}]": x})
        total += x.numel()
    if not 0 <= k <= total:
        raise ValueError(f"{op}: k = {k} is outside [0, {total}] (the total element count)")
    if read_data:
        for t, x in enumerate(tensors):
            if can_read(x) and x.isnan().any():
                raise ValueError(f"{op}: tensors[{t}] holds NaN")
    return total


# --- optim ---

def selection_of(selector) -> str:
    """"all", "mask" (a bool tensor of the param's shape) or "indices" (sorted flat indices)."""
    if selector is None:
        return "all"
    return "mask" if selector.dtype == torch.bool else "indices"


# What each hyperparameter is, for torch's words in the messages ("Invalid learning rate").
_MEANING = {"lr": "learning rate", "eps": "epsilon value", "beta1": "betas", "beta2": "betas",
            "weight_decay": "weight_decay value", "momentum": "momentum value", "l1_to_init": "L1 coefficient"}


def _at_least_zero(op: str, **scalars) -> None:
    for name, v in scalars.items():
        if not float(v) >= 0:  # NaN fails too (callers check finite first)
            raise ValueError(f"{op}: {name} must be >= 0 (invalid {_MEANING[name]}), got {v}")


def adamw_hyperparameters(op: str, lr, beta1, beta2, eps, weight_decay, l1_to_init, amsgrad) -> None:
    """torch.optim.AdamW's rules (lr, eps, weight_decay >= 0, betas in [0, 1)), and l1_to_init >= 0
    (a negative L1 pull pushes away from θ0); all finite. Checked on every step, by the op and by
    MaskedAdamW, before anything is written: a group's values can change after construction."""
    finite(op, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, l1_to_init=l1_to_init)
    _at_least_zero(op, lr=lr, eps=eps, weight_decay=weight_decay, l1_to_init=l1_to_init)
    for name, v in (("beta1", beta1), ("beta2", beta2)):
        if not 0 <= float(v) < 1:
            raise ValueError(f"{op}: {name} must be in [0, 1) (invalid {_MEANING[name]}), got {v}")
    flag(op, "amsgrad", amsgrad)


def sgd_hyperparameters(op: str, lr, momentum, dampening, weight_decay, nesterov) -> None:
    """torch.optim.SGD's rules: lr, momentum, weight_decay >= 0 (dampening is free, as in torch),
    all finite; Nesterov needs a momentum and zero dampening (with no momentum it did nothing)."""
    finite(op, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    _at_least_zero(op, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if flag(op, "nesterov", nesterov) and (float(momentum) <= 0 or float(dampening) != 0):
        raise ValueError(f"{op}: Nesterov momentum requires momentum > 0 and dampening = 0, got momentum "
                         f"{momentum} and dampening {dampening}")


def masked_step(op, params, grads, selectors, states: dict, steps, inits, grad_scale, found_inf,
                read_data: bool = True, compiled: bool = False) -> set:
    """Shapes, dtypes, devices and aliasing of a masked optimizer step; with read_data, the indices.
    Returns the memory keys of the tensors the step writes, for `step_inputs`. With `compiled` (a
    C++ kernel runs, whose `check_masked_step` makes the same per-tensor checks before any write),
    only the list lengths and the aliasing, which the C++ check lacks: the per-tensor checks here
    cost 1.3 ms a step over 65 tensors, a quarter of the compact kernel's 4.8 ms at 1%."""
    n = len(params)
    if not (len(grads) == len(selectors) == len(steps) == n):
        raise ValueError(f"{op}: params, grads, selectors and steps must have one entry per parameter, got "
                         f"{n}, {len(grads)}, {len(selectors)}, {len(steps)}")
    # inits is None when the step reads none (no l1_to_init); an empty list with l1_to_init on ran
    # the reference step without the L1 term
    if inits is not None and len(inits) != n:
        raise ValueError(f"{op}: l1_to_init needs one init per param: inits must have {n} entries, got {len(inits)}")
    for name, lst in states.items():
        if len(lst) != n:
            raise ValueError(f"{op}: {name} must have {n} entries, got {len(lst)}")
    no_grad_leaf(op, params=list(params))
    written = {"params": params, **states, "steps": steps}
    if compiled:
        all_tensors(op, {**written, "grads": grads})
        return distinct_outputs(op, written)
    for name, scalar in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if scalar is None:
            continue
        is_tensor(op, name, scalar)
        if scalar.numel() != 1 or scalar.dtype != torch.float32:
            raise ValueError(f"{op}: {name} must be a one-element float32 tensor")
        if n:
            same_device(op, params[0], **{name: scalar})
    data = []
    for i, p in enumerate(params):
        float_dtype(op, f"params[{i}]", p)
        if p.dtype != params[0].dtype:
            raise TypeError(f"{op}: every param of one call must have dtype {params[0].dtype}; params[{i}] is {p.dtype}")
        same_device(op, params[0], **{f"params[{i}]": p})
        contiguous_output(op, f"params[{i}]", p)
        g = grads[i]
        is_tensor(op, f"grads[{i}]", g)
        if g.shape != p.shape or g.device != p.device:
            raise ValueError(f"{op}: grads[{i}] must have shape {tuple(p.shape)} on {p.device}, got {tuple(g.shape)}")
        if g.dtype != p.dtype:
            raise TypeError(f"{op}: grads[{i}] dtype {g.dtype} does not match the param's {p.dtype}")
        sel = selectors[i]
        kind = selection_of(sel)
        state_numel = p.numel()
        if kind == "mask":
            if sel.shape != p.shape or sel.device != p.device:
                raise ValueError(f"{op}: masks[{i}] must be a bool tensor of the param's shape "
                                 f"{tuple(p.shape)} on {p.device}, got {tuple(sel.shape)}")
        elif kind == "indices":
            if sel.dtype not in INDEX_DTYPES:
                raise TypeError(f"{op}: masks[{i}] must be a bool mask or int32/int64 indices, got {sel.dtype}")
            if sel.dim() != 1 or sel.device != p.device:
                raise ValueError(f"{op}: indices[{i}] must be 1-D on {p.device}, got shape {tuple(sel.shape)}")
            if sel.numel() > p.numel():
                raise ValueError(f"{op}: indices[{i}] has {sel.numel()} entries, more than the param's {p.numel()}")
            if read_data and can_read(sel):
                data.append((f"{op} indices[{i}]", sel, p.numel()))
            state_numel = sel.numel()
        for name, lst in states.items():
            t = lst[i]
            is_tensor(op, f"{name}[{i}]", t)
            if t.numel() != state_numel or t.device != p.device:
                raise ValueError(f"{op}: {name}[{i}] must have {state_numel} entries on {p.device}, got {t.numel()}")
            if t.dtype != p.dtype:
                raise TypeError(f"{op}: {name}[{i}] dtype {t.dtype} does not match the param's {p.dtype}")
            contiguous_output(op, f"{name}[{i}]", t)
        st = steps[i]
        is_tensor(op, f"steps[{i}]", st)
        shared = st.numel() == 1 and st.dtype == torch.float32
        own = st.numel() == state_numel and st.dtype == torch.int32
        if not (shared or own) or st.device != p.device:
            raise ValueError(f"{op}: steps[{i}] must be a one-element float32 tensor or an int32 tensor with "
                             f"{state_numel} entries on {p.device}, got {st.dtype} with {st.numel()}")
        contiguous_output(op, f"steps[{i}]", st)
        if inits is not None:
            init = inits[i]
            if init is None:
                raise ValueError(f"{op}: inits[{i}] is missing")
            is_tensor(op, f"inits[{i}]", init)
            if init.numel() != state_numel or init.device != p.device:
                raise ValueError(f"{op}: inits[{i}] must have {state_numel} entries on {p.device}")
            if init.dtype != p.dtype:
                raise TypeError(f"{op}: inits[{i}] dtype {init.dtype} does not match the param's {p.dtype}")
    all_indices(data)
    return distinct_outputs(op, written)


def step_inputs(keys: set, grads, selectors, inits):
    """Contiguous, unaliased copies of a masked step's read-only inputs where needed; `keys` are
    the written tensors' memory keys (from `masked_step`)."""

    def fix(t):
        return None if t is None else unaliased(keys, t.contiguous())
    return [fix(g) for g in grads], [fix(s) for s in selectors], [fix(t) for t in inits]


def multi_mask_weight_grad(grad_out, input, masks, order, offsets, read_data: bool = True) -> None:
    op = "multi_mask_weight_grad"
    float_dtype(op, "input", input)
    is_tensor(op, "grad_out", grad_out)
    if grad_out.dtype != input.dtype:
        raise TypeError(f"{op}: grad_out and input must share one dtype, got {grad_out.dtype} and {input.dtype}")
    if grad_out.dim() != 2 or input.dim() != 2 or grad_out.shape[0] != input.shape[0]:
        raise ValueError(f"{op}: grad_out [T, O] and input [T, I] must be 2-D with the same T, got "
                         f"{tuple(grad_out.shape)} and {tuple(input.shape)}")
    is_tensor(op, "masks", masks)
    if masks.dtype != torch.bool:
        raise TypeError(f"{op}: masks must be bool, got {masks.dtype}")
    if masks.dim() != 3 or masks.shape[1] != grad_out.shape[1] or masks.shape[2] != input.shape[1]:
        raise ValueError(f"{op}: masks must have shape [L, {grad_out.shape[1]}, {input.shape[1]}], got {tuple(masks.shape)}")
    for name, t in (("order", order), ("offsets", offsets)):
        is_tensor(op, name, t)
        if t.dtype != torch.int64:
            raise TypeError(f"{op}: {name} must be int64, got {t.dtype}")
    if order.dim() != 1 or offsets.dim() != 1 or offsets.numel() != masks.shape[0] + 1:
        raise ValueError(f"{op}: order must be 1-D and offsets must have L + 1 = {masks.shape[0] + 1} entries, got "
                         f"{tuple(offsets.shape)}")
    same_device(op, grad_out, input=input, masks=masks, order=order, offsets=offsets)
    if not (read_data and can_read(order, offsets)):
        return
    off = offsets.tolist()
    if off[0] < 0 or any(a > b for a, b in zip(off, off[1:])) or off[-1] > order.numel():
        raise ValueError(f"{op}: offsets must be non-decreasing inside [0, {order.numel()}]")
    tokens(op, "order", order[off[0]:off[-1]], input.shape[0])


def tokens(op: str, name: str, ids: torch.Tensor, num_tokens: int) -> None:
    """Token ids lie in [0, num_tokens) and appear at most once (a token counted twice would be
    summed twice by some kernels and once by others: refused everywhere)."""
    if ids.numel():
        _token_rules(op, name, num_tokens, *_token_summary(ids, num_tokens).tolist())


def _token_summary(ids: torch.Tensor, num_tokens: int, inside: torch.Tensor | None = None) -> torch.Tensor:
    """[how many, min, max, most repeats] of the ids at the `inside` positions (all without it),
    computed where they live, so that a caller reads everything back in one host sync (on a GPU,
    a hard-routed fwd+bwd of 4 deltas made 48 syncs in these checks, 4 per matmul)."""
    inside = torch.ones_like(ids, dtype=torch.bool) if inside is None else inside
    valid = inside & (ids >= 0) & (ids < num_tokens)
    bins = torch.bincount(torch.where(valid, ids, num_tokens), minlength=num_tokens + 1)
    big = torch.iinfo(ids.dtype).max
    return torch.stack([inside.sum(), torch.where(inside, ids, big).min(), torch.where(inside, ids, -big).max(),
                        bins[:num_tokens].max() if num_tokens else bins.new_zeros(())])


def _token_rules(op: str, name: str, num_tokens: int, count: int, lo: int, hi: int, repeats: int) -> None:
    if count and (lo < 0 or hi >= num_tokens):
        raise IndexError(f"{op}: {name} holds token {lo if lo < 0 else hi}, outside [0, {num_tokens})")
    if repeats > 1:
        raise ValueError(f"{op}: {name} lists a token more than once")


def _named(tensors: dict):
    """(name, tensor) for each keyword of `tensors`; one given a list yields `name[i]` per element,
    formed only as the caller reaches it."""
    for name, ts in tensors.items():
        if isinstance(ts, list):
            yield from ((f"{name}[{i}]", t) for i, t in enumerate(ts))
        else:
            yield name, ts


def no_grad_leaf(op: str, **tensors) -> None:
    """The in-place ops' outputs: torch (and the reference backends) refuse to write into a leaf that
    requires grad with grad mode on; the compiled kernels wrote it anyway, outside autograd's view.
    A keyword given a list checks each of its tensors (`_named`)."""
    if not torch.is_grad_enabled():
        return
    for name, t in _named(tensors):
        if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf:
            raise RuntimeError(f"{op}: {name} is a leaf that requires grad, which cannot be written in place with "
                               "grad mode on; call it under torch.no_grad()")


# --- matmul ---

def not_differentiable(op: str, **tensors) -> None:
    """sddmm, spmm_, spmm_gated_ and the compose ops have no autograd kernel: with grad mode on, an input that
    requires grad got a result whose gradient was silently missing on the compiled backends (the
    reference one differentiated it). sparse_axpy_ checks its values only: the tensor it adds to may
    be in a graph (autograd sees the write, and its identity is the derivative); apply_diffs_ and
    restore_diffs_ check their dense tensors too. The linear layers' autograd Functions call
    sddmm and spmm_ with grad mode off. A keyword given a list checks each of its tensors
    (`_named`: an apply under no_grad forms no names)."""
    if not torch.is_grad_enabled():
        return
    for name, t in _named(tensors):
        if t is not None and t.requires_grad:
            raise RuntimeError(f"{op}: {name} requires grad, but {op} is not differentiable; call it under "
                               "torch.no_grad() (a delta that trains: xlsparse.functional.sparse_delta_linear / "
                               "multi_delta_linear)")


def token_matmul(op, a, b, idx, token_index, token_bounds, token_scale, names=("a", "b")) -> None:
    """a [T, A] and b [T, B] share dtype, device and T; the token selection fits them."""
    float_dtype(op, names[0], a)
    is_tensor(op, names[1], b)
    if b.dtype != a.dtype:
        raise TypeError(f"{op}: dtypes differ: {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{op}: expected 2-D token matrices, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{op}: token counts differ: {a.shape[0]} and {b.shape[0]}")
    index_dtype(op, "indices", idx)
    if idx.dim() != 1:
        raise ValueError(f"{op}: indices must be 1-D, got {tuple(idx.shape)}")
    same_device(op, a, **{names[1]: b, "indices": idx, "token_index": token_index, "token_bounds": token_bounds,
                          "token_scale": token_scale})
    if token_index is not None:
        is_tensor(op, "token_index", token_index)
        if token_index.dtype != torch.int64:
            raise TypeError(f"{op}: token_index must be int64, got {token_index.dtype}")
        if token_index.dim() != 1:
            raise ValueError(f"{op}: token_index must be 1-D, got {tuple(token_index.shape)}")
    if token_bounds is not None:
        if token_index is None:
            raise ValueError(f"{op}: token_bounds needs token_index")
        is_tensor(op, "token_bounds", token_bounds)
        if token_bounds.dtype != torch.int64:
            raise TypeError(f"{op}: token_bounds must be int64, got {token_bounds.dtype}")
        if token_bounds.dim() != 1 or token_bounds.numel() != 2:
            raise ValueError(f"{op}: token_bounds must be 1-D with 2 entries, got {tuple(token_bounds.shape)}")
    if token_scale is not None:
        float_dtype(op, "token_scale", token_scale)
        if token_scale.dim() != 1 or token_scale.shape[0] != a.shape[0]:
            raise ValueError(f"{op}: token_scale must have shape [{a.shape[0]}], got {tuple(token_scale.shape)}")


def selected_tokens(op, num_tokens: int, token_index, token_bounds) -> None:
    """The selected tokens, `token_index[token_bounds[0]:token_bounds[1]]` (all of it without
    bounds), fit the bounds, lie in [0, num_tokens) and appear once: read back in one host sync."""
    if token_index is None:
        return
    if token_bounds is None:
        tokens(op, "token_index", token_index, num_tokens)
        return
    n = token_index.numel()
    if n == 0:
        summary = torch.zeros(4, dtype=torch.long, device=token_bounds.device)
    else:
        position = torch.arange(n, device=token_index.device)
        summary = _token_summary(token_index, num_tokens, (position >= token_bounds[0]) & (position < token_bounds[1]))
    lo, hi, *summary = torch.cat([token_bounds, summary]).tolist()
    if not 0 <= lo <= hi <= n:
        raise IndexError(f"{op}: token_bounds [{lo}, {hi}) do not fit token_index of {n} entries")
    _token_rules(op, "token_index", num_tokens, *summary)


def spmm_values(x, idx, values, op="spmm_") -> None:
    is_tensor(op, "values", values)
    if values.dim() != 1 or values.numel() != idx.numel():
        raise ValueError(f"{op}: values must be 1-D with {idx.numel()} entries like indices, got {tuple(values.shape)}")
    if values.dtype != x.dtype:
        raise TypeError(f"{op}: values dtype {values.dtype} does not match x dtype {x.dtype}")
    same_device(op, x, values=values)


def gated_deltas(op, out, x, indices, values, gates) -> None:
    """spmm_gated_: E deltas as lists of (indices, values) and gates [T, E], each delta checked as
    one spmm_ scaled by its gate column."""
    if not isinstance(indices, (list, tuple)) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{op}: indices and values must be lists of tensors, one per delta")
    if len(indices) != len(values):
        raise ValueError(f"{op}: {len(indices)} index tensors but {len(values)} value tensors")
    float_dtype(op, "out", out)
    is_tensor(op, "x", x)
    float_dtype(op, "gates", gates)
    if gates.dim() != 2 or gates.shape[1] != len(indices) or gates.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: gates must have shape [{x.shape[0]}, {len(indices)}], got {tuple(gates.shape)}")
    for idx, vals, scale in zip(indices, values, gates.unbind(1)):
        token_matmul(op, out, x, idx, None, None, scale, ("out", "x"))
        spmm_values(x, idx, vals, op)


def ensemble(op, logits, log_weights, targets=None) -> None:
    """logits [E, T, V], log_weights [T, E], targets [T] int64."""
    float_dtype(op, "logits", logits)
    is_tensor(op, "log_weights", log_weights)
    if log_weights.dtype not in (logits.dtype, torch.float32):  # as check_ensemble in checks.h
        raise TypeError(f"{op}: log_weights dtype {log_weights.dtype} must be float32 or the logits dtype {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"{op}: logits must be [E, T, V], got {tuple(logits.shape)}")
    if logits.shape[0] == 0 or logits.shape[2] == 0:
        raise ValueError(f"{op}: logits need E > 0 experts and V > 0 classes")
    e, t, _ = logits.shape
    if log_weights.dim() != 2 or tuple(log_weights.shape) != (t, e):
        raise ValueError(f"{op}: log_weights must be [T, E] = [{t}, {e}], got {tuple(log_weights.shape)}")
    same_device(op, logits, log_weights=log_weights, targets=targets)
    if targets is not None:
        is_tensor(op, "targets", targets)
        if targets.dtype != torch.int64:
            raise TypeError(f"{op}: targets must be int64, got {targets.dtype}")
        if targets.dim() != 1 or targets.shape[0] != t:
            raise ValueError(f"{op}: targets must be [{t}], got {tuple(targets.shape)}")


def targets_in_range(op, targets, num_classes) -> None:
    if targets.numel() and can_read(targets):
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= num_classes:
            raise IndexError(f"{op}: targets must lie in [0, {num_classes}), got min {lo}, max {hi}")


def lse_shape(logits, prob_space: bool) -> tuple[int, int]:
    """The logsumexp an ensemble forward saves: per expert [E, T] in prob space, mixed [1, T] else."""
    e, t, _ = logits.shape
    return (e if prob_space else 1, t)


def ensemble_saved(op, logits, grad, result, lse, prob_space: bool) -> None:
    """The backward's grad, saved result (log-probs [T, V] or nll [T]) and lse fit the logits.
    Log-probs and their grad are in the logits' dtype; nll, its grad and lse in the accumulation dtype."""
    e, t, v = logits.shape
    nll = op.startswith("ensemble_nll")
    want = (t,) if nll else (t, v)
    wide = torch.float64 if logits.dtype == torch.float64 else torch.float32
    for name, x in (("grad", grad), ("saved output", result)):
        is_tensor(op, name, x)
        if tuple(x.shape) != want:
            raise ValueError(f"{op}: {name} must have shape {list(want)}, got {tuple(x.shape)}")
        if nll and x.dtype != wide:
            raise TypeError(f"{op}: {name} must be {wide} (the accumulation dtype), got {x.dtype}")
        if not nll and x.dtype != logits.dtype:
            raise TypeError(f"{op}: {name} dtype {x.dtype} does not match logits dtype {logits.dtype}")
    is_tensor(op, "lse", lse)
    if tuple(lse.shape) != lse_shape(logits, prob_space):
        raise ValueError(f"{op}: lse must have shape {list(lse_shape(logits, prob_space))}, got {tuple(lse.shape)}")
    if lse.dtype != wide:
        raise TypeError(f"{op}: lse must be {wide}, got {lse.dtype}")
    same_device(op, logits, grad=grad, result=result, lse=lse)


# --- the user-facing linear layers ---

def linear(op, x, weight, bias, idx: list, values: list) -> None:
    """x [..., I], weight [O, I], bias [O] and deltas (indices, values) of the weight."""
    float_dtype(op, "weight", weight)
    is_tensor(op, "x", x)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be [out_features, in_features], got {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[-1] if x.dim() else 0} features, weight expects {weight.shape[1]}")
    if x.dtype != weight.dtype:
        raise TypeError(f"{op}: x dtype {x.dtype} does not match weight dtype {weight.dtype}")
    if bias is not None:
        is_tensor(op, "bias", bias)
        if bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype:
            raise ValueError(f"{op}: bias must be [{weight.shape[0]}] of {weight.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if len(idx) != len(values):
        raise ValueError(f"{op}: {len(idx)} index tensors but {len(values)} value tensors")
    same_device(op, weight, x=x, bias=bias)
    data = []
    for e, (i, v) in enumerate(zip(idx, values)):
        index_dtype(op, f"indices[{e}]", i)
        is_tensor(op, f"values[{e}]", v)
        if v.dtype != weight.dtype:
            raise TypeError(f"{op}: values dtype {v.dtype} does not match weight dtype {weight.dtype}")
        if i.dim() != 1 or v.dim() != 1 or i.numel() != v.numel():
            raise ValueError(f"{op}: indices and values must be 1-D of one length, got {tuple(i.shape)} and {tuple(v.shape)}")
        if i.numel() > weight.numel():
            raise ValueError(f"{op}: {i.numel()} delta entries exceed the weight's {weight.numel()}")
        same_device(op, weight, indices=i, values=v)
        if can_read(i):
            data.append((op, i, weight.numel()))
    all_indices(data)
