"""Functional forms of the xlsparse ops, for use inside models and training loops."""
import torch

from .ops import checks as _checks
from .ops import compose as _compose
from .ops import matmul as _matmul
from .routing import TokenGroups


def topk_mask(tensors: list, k: int) -> list[torch.Tensor]:
    """Bool masks of the `k` entries of largest magnitude over all `tensors` together (LT-SFT's
    global selection), without concatenating them.

    Exactly k entries are True; equal magnitudes go to the lowest flat position, earlier tensors
    first. Tensors of mixed float dtypes are compared in their promoted dtype. Masks carry no
    gradient. NaN raises ValueError; k outside [0, total] raises ValueError.
    """
    _checks.tensor_list("topk_mask", "tensors", tensors)
    tensors = [t.detach() for t in tensors]
    for i, t in enumerate(tensors):  # before any promotion: an int or bool tensor would become float silently
        _checks.float_dtype("topk_mask", f"tensors[{i}]", t)
    if len({t.dtype for t in tensors}) > 1:
        wide = tensors[0].dtype
        for t in tensors:
            wide = torch.promote_types(wide, t.dtype)
        tensors = [t.to(wide) for t in tensors]
    return _compose.topk_masks([t.contiguous() for t in tensors], k)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs linear layers in on x's device, or None when autocast is off."""
    device = x.device.type
    if device not in ("cpu", "cuda", "xpu", "mps"):  # meta tensors (shapes only) have no autocast
        return None
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def cast_for_autocast(dtype: torch.dtype, *tensors):
    """The floating-point tensors cast to autocast's `dtype` (None, integer and float64 tensors pass).

    The ops follow nn.Linear's autocast rule: inputs, base weight, bias and delta values all run
    in the autocast dtype, except float64 ones, which autocast leaves alone. The casts happen here,
    once, outside the ops, so autograd carries each gradient back to its parameter's own dtype;
    callers then run the op with autocast off."""
    return [t if t is None or not t.is_floating_point() or t.dtype == torch.float64 else t.to(dtype) for t in tensors]


MERGE_MIN_TOKENS = 64


def merge_pays(num_tokens: int) -> bool:
    """True when writing Δ into W0 for the call (and back out after) beats adding an SpMM term X Δᵀ.

    The write and the restore are scattered passes over the K entries, once for the forward and
    once for dX; the SpMM costs T·K multiply-adds each time. Both scale with K, so only T decides.
    Measured (4096 x 1024 at 1% and 5%, 1 thread, on a loaded machine): the write plus restore cost
    about 70 ns per entry (a cache miss each), the paths were level within noise from T = 16 to 64,
    and at T = 2048 the write took ~3% of the SpMMs' time.
    """
    return num_tokens >= MERGE_MIN_TOKENS


def sparse_delta_linear(x, weight, bias, indices, values, merged_weight=None) -> torch.Tensor:
    """Y = X (W0 + Δ)ᵀ + b for a frozen (or trainable) base `weight` W0 [O, I] and a sparse delta
    Δ = (indices, values): `indices` [K] flat row-major into W0, sorted and unique, `values` [K].

    `x` has any leading dims. The backward gives dX = dY (W0 + Δ), dvalues through an SDDMM (no
    dense O x I gradient is ever allocated; a bfloat16 delta on a CPU where that was timed faster
    takes one dense dYᵀX and a gather, `ops.matmul.dense_dw_pays`), db, and dW0 only when `weight` requires grad. With
    enough tokens (`merge_pays`) and grad enabled, the forward and dX multiply by W0 + Δ written
    into `weight`'s own storage for the call and restored bit-exactly after (K values of extra
    memory, no O x I copy kept for the backward; calls on one weight from several threads take
    turns, and nothing else may read `weight` from another thread meanwhile). Without grad they
    multiply by a merged copy freed after the call; with few tokens they add an SpMM term. Pass
    `merged_weight` (W0 + Δ as a tensor of its own) to multiply by that instead.
    fp32, bf16, fp16 (accumulating in fp32) and fp64. Under `torch.autocast` it computes in the
    autocast dtype by W0 + Δ rounded to it once, bit for bit as a merged nn.Linear does.
    `merged_weight` gets no gradient (dW0 and dvalues carry it): one that requires grad raises.
    """
    if merged_weight is not None and torch.is_grad_enabled() and getattr(merged_weight, "requires_grad", False):
        # the backward returns None for it: a trainable merged weight got no gradient, silently
        raise ValueError("sparse_delta_linear: merged_weight requires grad, but it gets no gradient (the gradient "
                         "reaches weight and values); pass merged_weight.detach()")
    dtype = autocast_dtype(x)
    if dtype is not None:
        merge = merged_weight is None and weight.is_floating_point() and weight.dtype not in (dtype, torch.float64)
        x, bias, low_values, merged_weight = cast_for_autocast(dtype, x, bias, values, merged_weight)
        if merge:
            merged_weight = _autocast_merged(x, weight, bias, indices, values, low_values)
        # W0 itself serves only dW0: without it, one cast copy (the merged one), not two
        low_weight = merged_weight if merge and not weight.requires_grad else cast_for_autocast(dtype, weight)[0]
        with torch.autocast(x.device.type, enabled=False):
            return sparse_delta_linear(x, low_weight, bias, indices, low_values, merged_weight)
    _checks.linear("sparse_delta_linear", x, weight, bias, [indices], [values])
    lead = x.shape[:-1]
    x2d = x.reshape(lead.numel(), weight.shape[1])
    in_place = merged_weight is None and merge_pays(x2d.shape[0])
    if in_place and not _may_write_weight(weight, x, bias):
        merged_weight, in_place = _matmul.merged_weight(weight, indices, values), False
    y = _matmul.SparseDeltaLinearFunction.apply(x2d, weight, bias, indices, values, merged_weight, in_place)
    return y.reshape(*lead, weight.shape[0])


@torch.no_grad()
def _autocast_merged(x, weight, bias, indices, values, low_values):
    """W0 + Δ rounded to autocast's dtype (that of `x`) once, as autocast rounds a merged
    nn.Linear's weight: W0 and Δ cast apart and summed in that dtype were up to one of its steps
    off at the K entries. The same memory as autocast's own cast of W0; the K sums are gathered
    by row and column, so a strided W0 is not copied whole."""
    merged = weight.detach().to(x.dtype, memory_format=torch.contiguous_format)
    _checks.linear("sparse_delta_linear", x, merged, bias, [indices], [low_values])  # before the gather reads them
    idx = indices.long()
    rows, cols = idx // weight.shape[1], idx % weight.shape[1]
    merged.view(-1)[idx] = (weight.detach()[rows, cols] + values.detach()).to(x.dtype)
    return merged


def _may_write_weight(weight, x, bias) -> bool:
    """Whether a call may write Δ into W0's own storage for its products. Not without grad
    (inference, maybe on several threads sharing the model: a merged copy is used and W0 only
    read); not in a traced graph, which must not write its inputs; not into a strided weight,
    which has no flat view to write; not when x or the bias views W0's storage (they would be
    read as W0 + Δ while it is written)."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling() and weight.is_contiguous()
            and not _shares_storage(weight, x, bias))


def _shares_storage(weight, *tensors) -> bool:
    """True when one of `tensors` views the storage of `weight` (so writing Δ into it changes them)."""
    key = _checks.memory_key(weight)
    return key is not None and any(_checks.memory_key(t) == key for t in tensors)


def multi_delta_linear(x, weight, bias, indices: list, values: list, route=None, gates=None) -> torch.Tensor:
    """Y_t = X_t W0ᵀ + b + Σ_e g_{t,e} X_t Δ_eᵀ for E sparse deltas Δ_e = (indices[e], values[e]).

    Which delta a token uses is given one of two ways:
      - `route`: hard routing, one id per token (shape x.shape[:-1] or flat [T]); id e uses Δ_e,
        −1 the base only. A `xlsparse.routing.TokenGroups` built once per batch may be passed
        instead so that every layer reuses the same grouping.
      - `gates` [..., E]: soft gates, every token mixes every delta (X-ELM style ensembles).
    With neither, every token uses the base only. The backward gives dX, dvalues and, for soft
    gates that require grad, dgates. Under hard routing in eager mode, dvalues of a delta that
    owns no token of the batch is None, so an optimizer leaves that delta alone (no momentum step,
    no weight decay), like an inactive PEFT adapter; under torch.compile (no host counts) it is
    zeros. Soft gates give every delta its dvalues. Under hard routing in eager mode, when every
    delta's token group is large enough (`merge_pays`), the forward and dX multiply each group by
    W0 + Δ_e, written into `weight` for its product and restored bit-exactly after, as
    `sparse_delta_linear` does (without grad: into one merged copy, W0 only read); otherwise by W0
    plus SpMM terms, whose launch grids do not depend on the routing data. Under
    `torch.autocast` it computes in the autocast dtype, as nn.Linear does, with W0 and each Δ_e
    cast to it apart: at the deltas' entries the weight can be one step of that dtype off a merged
    nn.Linear's (`sparse_delta_linear` rounds W0 + Δ once; E merged copies would cost E weights).
    """
    dtype = autocast_dtype(x)
    if dtype is not None:
        x, weight, bias, gates, *values = cast_for_autocast(dtype, x, weight, bias, gates, *values)
        with torch.autocast(x.device.type, enabled=False):
            return multi_delta_linear(x, weight, bias, indices, values, route, gates)
    _checks.linear("multi_delta_linear", x, weight, bias, list(indices), list(values))
    num = len(indices)
    lead = x.shape[:-1]
    x2d = x.reshape(lead.numel(), weight.shape[1])
    tokens = x2d.shape[0]
    order = offsets = gates2d = host_counts = None
    if route is not None and gates is not None:
        raise ValueError("multi_delta_linear: give route or gates, not both")
    if gates is not None:
        if tuple(gates.shape) not in (tuple(lead) + (num,), (tokens, num)):
            raise ValueError(f"multi_delta_linear: gates must be [..., {num}] over {tokens} tokens, got {tuple(gates.shape)}")
        if not gates.is_floating_point():
            raise TypeError(f"multi_delta_linear: gates must be floating point, got {gates.dtype}")
        gates2d = gates.reshape(tokens, num)
    elif route is not None:
        if not isinstance(route, TokenGroups):
            route = torch.as_tensor(route, device=x.device)
            if tuple(route.shape) not in (tuple(lead), (tokens,)):
                # a [S, B] route for x [B, S, I] has the right count but the wrong token order
                raise ValueError(f"multi_delta_linear: route has {route.numel()} ids for {tokens} tokens in shape "
                                 f"{tuple(route.shape)}; it must have shape {tuple(lead)} or ({tokens},)")
        groups = route if isinstance(route, TokenGroups) else TokenGroups.build(route, num)
        if groups.ids.numel() != tokens:
            raise ValueError(f"multi_delta_linear: route has {groups.ids.numel()} ids for {tokens} tokens")
        if groups.num_ids != num:
            raise ValueError(f"multi_delta_linear: route is built for {groups.num_ids} ids but {num} deltas are given")
        order, offsets, host_counts = groups.order, groups.offsets, groups.host_counts
    else:
        return torch.nn.functional.linear(x, weight, bias)
    in_place = None  # W0 plus SpMM terms: soft gates, a traced graph, or a group too small to merge for
    if host_counts is not None and not torch.compiler.is_compiling() and all(merge_pays(c) for c in host_counts if c):
        # each language's tokens by its own W0 + Δ_e, written into W0 as sparse_delta_linear does
        # (a merged copy without grad or where W0 cannot be written). An ad-hoc A/B (7 alternating
        # repeats, medians), four real e5-small LT-SFT deltas (15.8%, 1536x384, T = 2048, 2 threads,
        # Xeon): fwd+bwd 81 -> 50 ms, bf16 71 -> 38;
        # uniform 1% at 4096x1024: fp32 level (216 / 212), bf16 138 -> 94; only the fp32 forward
        # without grad lost, 7% (the copy)
        in_place = _may_write_weight(weight, x, bias)
    y = _matmul.MultiDeltaLinearFunction.apply(x2d, weight, bias, order, offsets, gates2d, host_counts, in_place, num,
                                                 *indices, *values)
    return y.reshape(*lead, weight.shape[0])


def _space(op: str, space: str) -> bool:
    if space not in ("prob", "logit"):
        raise ValueError(f"{op}: space must be 'prob' or 'logit', got {space!r}")
    return space == "prob"


def ensemble_logprobs(logits, log_weights, space: str = "prob") -> torch.Tensor:
    """Log-probabilities [T, V] of a mixture of E experts' logits [E, T, V] with per-token
    log-weights [T, E].

    space="prob": log Σ_e exp(log w_e + log_softmax(z_e)) (a mixture of the experts' distributions);
    space="logit": log_softmax(Σ_e w_e z_e), where an expert of weight 0 adds nothing, even where
    its logits are ±inf. Computed without materialising E softmaxes (the extra
    memory is the [T, V] output and an [E, T] logsumexp); differentiable in both inputs.
    """
    out, _ = _matmul.ensemble_logprobs_op(logits, log_weights, _space("ensemble_logprobs", space))
    return out


def ensemble_nll(logits, log_weights, targets, space: str = "prob") -> torch.Tensor:
    """Negative log-likelihood [T] of `targets` [T] under the mixture of `ensemble_logprobs`, fused:
    no [T, V] output is written. Differentiable in logits and log_weights. Returned in the logits'
    dtype; the backward reads the op's float32 nll, not this rounded copy."""
    nll, _ = _matmul.ensemble_nll_op(logits, log_weights, targets, _space("ensemble_nll", space))
    return nll.to(logits.dtype)

