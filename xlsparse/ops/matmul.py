"""Multi-mask gated matmul ops: SDDMM, SpMM and expert-ensemble mixing.

Reading order: pure-PyTorch references (the test oracle and the fallback), fake impls, the
dispatching wrappers, the autograd of the ensemble ops, then the autograd Functions of the two
linear layers (`SparseDeltaLinearFunction`, `MultiDeltaLinearFunction`) built on SDDMM and SpMM.

A delta Δ of a weight [O, I] is (indices [K], values [K]), flat row-major, sorted and unique.
The C++ kernels are in csrc/cpu/matmul.cpp and csrc/cuda/matmul.cu, the Triton kernels in
xlsparse/triton/matmul.py; the math they share is csrc/include/xlsparse/matmul.h.
"""
import contextlib
import functools
import os
import threading
import time

import torch
import torch.nn.functional as F

from .. import _ext
from . import checks, registry
from ._common import acc_dtype
from .compose import apply_diffs_, restore_diffs_, sparse_axpy_


def first_order_only(fn):
    """Like torch's @once_differentiable, but the gradients carry an error node whenever the backward
    runs with grad mode on (create_graph=True), not only when the incoming grad requires grad: the
    gradients also depend on saved inputs (weight, values, logits) that require grad, and with a
    constant incoming grad (torch.autograd.grad(y.sum(), x, create_graph=True)) once_differentiable
    returned them as constants, silently dropping every second-order term."""
    @functools.wraps(fn)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = fn(ctx, *grads)
        if not torch.is_grad_enabled():
            return outputs
        single = not isinstance(outputs, tuple)
        outs = (outputs,) if single else outputs
        # The error node also takes what the gradients depend on (the incoming grads, the saved
        # tensors) where it requires grad: with fresh leaves alone it had no edge to them, and a
        # backward that reaches them only (torch.autograd.grad(y.sum() + gx.square().sum(), values))
        # never ran it: it returned the first-order term alone, silently
        deps = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
        err = torch._C._functions.DelayedError(
            b"trying to differentiate twice an xlsparse op whose backward is not differentiable "
            b"(double backward / create_graph=True is not supported)", len(outs) + len(deps))

        def fake_requires_grad(t):
            if t is not None:
                t = t.detach()
                t.requires_grad = True
            return t
        wrapped = err(*[fake_requires_grad(t) for t in outs], *deps)
        if not isinstance(wrapped, tuple):
            wrapped = (wrapped,)
        return wrapped[0] if single else tuple(wrapped[:len(outs)])
    return wrapper


# --- references ---


def _selection(token_index, token_bounds):
    """The selected token ids, or None for all tokens (checked by the wrapper)."""
    if token_index is None or token_bounds is None:
        return token_index
    lo, hi = (int(v) for v in token_bounds.tolist())
    return token_index[lo:hi]


def sddmm_reference(grad_out, x, indices, token_index=None, token_bounds=None, token_scale=None):
    """out[n] = Σ_t s_t grad_out[t, r_n] x[t, c_n], in the accumulation dtype, rounded once."""
    cols = x.shape[1]
    acc = acc_dtype(x.dtype)
    a, b = grad_out.to(acc), x.to(acc)
    if token_scale is not None:
        b = b * token_scale.to(acc)[:, None]
    sel = _selection(token_index, token_bounds)
    if sel is not None:
        a, b = a[sel], b[sel]
    idx = indices.long()
    rows, cols_of = idx // cols, idx % cols
    out = torch.empty(idx.numel(), dtype=acc, device=x.device)
    step = 1 << 14  # bounds the [T, step] temporaries
    for i in range(0, idx.numel(), step):
        out[i : i + step] = (a[:, rows[i : i + step]] * b[:, cols_of[i : i + step]]).sum(0)
    return out.to(x.dtype)


def spmm_reference(out, x, indices, values, token_index=None, token_bounds=None, token_scale=None, transpose=False):
    """out += s ⊙ x Δᵀ (or s ⊙ x Δ when transposed) over the selected tokens, rounded once."""
    groups, xcols = out.shape[1], x.shape[1]
    sel = _selection(token_index, token_bounds)
    if indices.numel() == 0 or (sel is not None and sel.numel() == 0):
        return
    acc = acc_dtype(x.dtype)
    shape = (xcols, groups) if transpose else (groups, xcols)
    delta = torch.zeros(shape[0] * shape[1], dtype=acc, device=x.device)
    delta[indices.long()] = values.to(acc)
    delta = delta.view(shape)
    xs = x.to(acc)
    if token_scale is not None:
        xs = xs * token_scale.to(acc)[:, None]
    if sel is not None:
        xs = xs[sel]
    y = xs @ (delta if transpose else delta.T)
    # Only the output columns the delta reaches are written (and rounded), as in the kernels.
    cols = _reached_columns([indices], groups, xcols, transpose, x.device).nonzero().flatten()[None, :]
    if sel is not None:  # a token listed twice adds twice, as in the kernels (and as SDDMM sums it twice)
        summed = torch.zeros(x.shape[0], y.shape[1], dtype=acc, device=x.device).index_add_(0, sel, y)
        sel = sel.unique()
        y = summed[sel]
    rows = (torch.arange(x.shape[0], device=x.device) if sel is None else sel)[:, None]
    out[rows, cols] = (out[rows, cols].to(acc) + y[:, cols[0]]).to(out.dtype)


def spmm_gated_reference(out, x, indices, values, gates, transpose=False):
    """out += Σ_e gates[:, e] ⊙ x Δ_eᵀ (or x Δ_e when transposed), summed in the accumulation dtype
    and rounded once, only in the output columns some delta reaches."""
    acc = acc_dtype(x.dtype)
    total = out.to(acc)
    for idx, vals, scale in zip(indices, values, gates.unbind(1)):
        spmm_reference(total, x.to(acc), idx, vals.to(acc), token_scale=scale, transpose=transpose)
    reached = _reached_columns(indices, out.shape[1], x.shape[1], transpose, x.device)
    out[:, reached] = total[:, reached].to(out.dtype)


def _reached_columns(indices, groups, xcols, transpose, device):
    """[groups] bool: the output columns that some entry of the deltas `indices` adds to."""
    reached = torch.zeros(groups, dtype=torch.bool, device=device)
    for idx in indices:
        reached[(idx.long() % groups) if transpose else (idx.long() // xcols)] = True
    return reached


def _prob_mixture(z, lw, lse):
    """log Σ_e exp(lw_e + z_e − lse_e) [T, V] in the accumulation dtype: the prob-space log-probs,
    as the forward computes them and the backward recomputes them."""
    return torch.logsumexp(lw.T[:, :, None] + z - lse[:, :, None], 0)


def _logit_mixture(z, lw):
    """Σ_e exp(lw_e) z_e [T, V]: the logit-space mixed logits, in the accumulation dtype. An expert
    of weight 0 (lw = −inf, dropped by top-k) adds nothing, even where its logits are ±inf."""
    return _times(lw.T.exp()[:, :, None], z).sum(0)


def ensemble_logprobs_reference(logits, log_weights, prob_space):
    """(log-probs [T, V], logsumexp) of the mixture, computed in the accumulation dtype."""
    acc = acc_dtype(logits.dtype)
    z, lw = logits.to(acc), log_weights.to(acc)
    if prob_space:
        lse = torch.logsumexp(z, -1)  # [E, T]
        out = _prob_mixture(z, lw, lse)
    else:
        zbar = _logit_mixture(z, lw)
        lse = torch.logsumexp(zbar, -1)[None]
        out = zbar - lse[0][:, None]
    return out.to(logits.dtype), lse


def ensemble_logprobs_backward_reference(grad, logits, log_weights, out, lse, prob_space):
    # `out` (the logits' dtype: bf16 rounds log-probs near −10 to a 0.0625 grid, ~1% off in the
    # gradient) is only checked, never read: the log-probs are recomputed in the accumulation dtype
    # from the logits, the weights and the saved (float32) lse, as the forward computed them.
    acc = acc_dtype(logits.dtype)
    g, z, lw = grad.to(acc), logits.to(acc), log_weights.to(acc)
    if prob_space:
        o = _prob_mixture(z, lw, lse)
        o = o.masked_fill(o == float("-inf"), float("inf"))  # a class every expert bans: posterior 0
        post = (lw.T[:, :, None] + z - lse[:, :, None] - o[None]).exp()  # [E, T, V]
        S = (g[None] * post).sum(-1)  # [E, T]
        dz = g[None] * post - (z - lse[:, :, None]).exp() * S[:, :, None]
        dlw = S.T
    else:
        d = g - (_logit_mixture(z, lw) - lse[0][:, None]).exp() * g.sum(-1, keepdim=True)
        dz, dlw = _logit_mixture_backward(z, lw, d)
    return dz.to(logits.dtype), dlw.to(log_weights.dtype)


def _logit_mixture_backward(z, lw, d):
    """(∂L/∂z [E, T, V], ∂L/∂lw [T, E]) through `_logit_mixture` from d = ∂L/∂zbar [T, V]: w_e d
    and w_e ⟨d, z_e⟩, both 0 for an expert of weight 0."""
    w = lw.T.exp()  # [E, T]
    return w[:, :, None] * d[None], _times(w, _times(d[None], z).sum(-1)).T


def _times(d, z):
    """d * z with 0 · (±inf) = 0: a class no expert allows adds nothing where its gradient is 0,
    and an expert of weight 0 adds nothing."""
    return torch.where(d == 0, 0, d * z)


def ensemble_nll_reference(logits, log_weights, targets, prob_space):
    acc = acc_dtype(logits.dtype)
    z, lw = logits.to(acc), log_weights.to(acc)
    zy = z.gather(2, targets.expand(z.shape[0], -1)[:, :, None])[:, :, 0]  # [E, T]
    if prob_space:
        lse = torch.logsumexp(z, -1)
        nll = -torch.logsumexp(lw.T + zy - lse, 0)
    else:
        lse = torch.logsumexp(_logit_mixture(z, lw), -1)[None]
        nll = lse[0] - _times(lw.T.exp(), zy).sum(0)
    # nll stays in the accumulation dtype, like lse: the prob-space backward reads it in the
    # posterior exp(lw + zy - lse + nll), and rounded to bf16 (a 0.0625 grid near 10) that is ~3% off
    return nll, lse


def ensemble_nll_backward_reference(grad, logits, log_weights, targets, nll, lse, prob_space):
    acc = acc_dtype(logits.dtype)
    g, z, lw, n = grad.to(acc), logits.to(acc), log_weights.to(acc), nll.to(acc)
    onehot = F.one_hot(targets, z.shape[2]).to(acc)  # [T, V]
    if prob_space:
        zy = z.gather(2, targets.expand(z.shape[0], -1)[:, :, None])[:, :, 0]  # not z · onehot: 0 · (−inf) is NaN
        n = n.masked_fill(n == float("inf"), float("-inf"))  # a target every expert bans: posterior 0
        post = (lw.T + zy - lse + n).exp()  # [E, T]
        dz = (g * post)[:, :, None] * ((z - lse[:, :, None]).exp() - onehot[None])
        dlw = (-g * post).T
    else:
        d = g[:, None] * ((_logit_mixture(z, lw) - lse[0][:, None]).exp() - onehot)
        dz, dlw = _logit_mixture_backward(z, lw, d)
    return dz.to(logits.dtype), dlw.to(log_weights.dtype)


# --- autograd of the ensemble ops: one backward for every backend ---


def _logprobs_setup(ctx, inputs, output):
    logits, log_weights, prob_space = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, log_weights, output[0], output[1])
    ctx.prob_space = prob_space


@first_order_only
def _logprobs_backward(ctx, grad_out, _grad_lse):
    logits, log_weights, out, lse = ctx.saved_tensors
    dz, dlw = ensemble_logprobs_backward(grad_out, logits, log_weights, out, lse, ctx.prob_space)
    return dz, dlw, None


def _nll_setup(ctx, inputs, output):
    logits, log_weights, targets, prob_space = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, log_weights, targets, output[0], output[1])
    ctx.prob_space = prob_space


@first_order_only
def _nll_backward(ctx, grad_nll, _grad_lse):
    logits, log_weights, targets, nll, lse = ctx.saved_tensors
    dz, dlw = ensemble_nll_backward(grad_nll, logits, log_weights, targets, nll, lse, ctx.prob_space)
    return dz, dlw, None, None


registry.define("sddmm", sddmm_reference)
registry.define("spmm_", spmm_reference)
registry.define("spmm_gated_", spmm_gated_reference, backends=("reference", "cpu"))
registry.define("ensemble_logprobs", ensemble_logprobs_reference, backward=_logprobs_backward,
                setup_context=_logprobs_setup)
registry.define("ensemble_logprobs_backward", ensemble_logprobs_backward_reference)
registry.define("ensemble_nll", ensemble_nll_reference, backward=_nll_backward, setup_context=_nll_setup)
registry.define("ensemble_nll_backward", ensemble_nll_backward_reference)


# --- fake impls: metadata checks and output shapes ---

if _ext.loaded():

    @torch.library.register_fake("xlsparse::sddmm")
    def _sddmm_fake(grad_out, x, indices, token_index, token_bounds, token_scale):
        checks.token_matmul("sddmm", grad_out, x, indices, token_index, token_bounds, token_scale, ("grad_out", "x"))
        return x.new_empty(indices.shape)

    @torch.library.register_fake("xlsparse::spmm_")
    def _spmm_fake(out, x, indices, values, token_index, token_bounds, token_scale, transpose):
        checks.token_matmul("spmm_", out, x, indices, token_index, token_bounds, token_scale, ("out", "x"))
        checks.spmm_values(x, indices, values)

    @torch.library.register_fake("xlsparse::spmm_gated_")
    def _spmm_gated_fake(out, x, indices, values, gates, transpose):
        checks.gated_deltas("spmm_gated_", out, x, indices, values, gates)

    def _lse_fake(logits, prob_space):
        return logits.new_empty(checks.lse_shape(logits, prob_space), dtype=acc_dtype(logits.dtype))

    @torch.library.register_fake("xlsparse::ensemble_logprobs")
    def _ensemble_logprobs_fake(logits, log_weights, prob_space):
        checks.ensemble("ensemble_logprobs", logits, log_weights)
        return logits.new_empty(logits.shape[1:]), _lse_fake(logits, prob_space)

    @torch.library.register_fake("xlsparse::ensemble_logprobs_backward")
    def _ensemble_logprobs_backward_fake(grad, logits, log_weights, out, lse, prob_space):
        checks.ensemble("ensemble_logprobs_backward", logits, log_weights)
        checks.ensemble_saved("ensemble_logprobs_backward", logits, grad, out, lse, prob_space)
        return torch.empty_like(logits, memory_format=torch.contiguous_format), log_weights.new_empty(log_weights.shape)

    @torch.library.register_fake("xlsparse::ensemble_nll")
    def _ensemble_nll_fake(logits, log_weights, targets, prob_space):
        checks.ensemble("ensemble_nll", logits, log_weights, targets)
        return logits.new_empty(logits.shape[1:2], dtype=acc_dtype(logits.dtype)), _lse_fake(logits, prob_space)

    @torch.library.register_fake("xlsparse::ensemble_nll_backward")
    def _ensemble_nll_backward_fake(grad, logits, log_weights, targets, nll, lse, prob_space):
        checks.ensemble("ensemble_nll_backward", logits, log_weights, targets)
        checks.ensemble_saved("ensemble_nll_backward", logits, grad, nll, lse, prob_space)
        return torch.empty_like(logits, memory_format=torch.contiguous_format), log_weights.new_empty(log_weights.shape)


# --- dispatching wrappers: check once, then the backend the table picks ---


def sddmm(grad_out, x, indices, token_index=None, token_bounds=None, token_scale=None) -> torch.Tensor:
    """SDDMM: `out[n] = Σ_t s_t · grad_out[t, r_n] · x[t, c_n]` for Δ entries n at (r_n, c_n).

    grad_out [T, O] and x [T, I] share a dtype; indices [K] (int32/int64) index a row-major
    [O, I] weight, sorted and unique. Tokens are `token_index[token_bounds[0]:token_bounds[1]]`
    (all T when None; each token at most once), each scaled by `token_scale[t]`. Accumulates in
    fp32 (fp64 for fp64); returns [K] in x's dtype. No O x I buffer is ever allocated.
    """
    op = "sddmm"
    checks.token_matmul(op, grad_out, x, indices, token_index, token_bounds, token_scale, ("grad_out", "x"))
    checks.not_differentiable(op, grad_out=grad_out, x=x, token_scale=token_scale)
    if checks.can_read(x):
        if not registry.compiled(op, x.device):
            checks.indices(op, indices, grad_out.shape[1] * x.shape[1])
        checks.selected_tokens(op, x.shape[0], token_index, token_bounds)
    args = [None if t is None else t.contiguous() for t in (grad_out, x, indices, token_index, token_bounds, token_scale)]
    return registry.call(op, x.device, *args)


def spmm_(out, x, indices, values, token_index=None, token_bounds=None, token_scale=None, transpose=False) -> torch.Tensor:
    """SpMM, in place: `out += s ⊙ (x @ Δᵀ)`, or `out += s ⊙ (x @ Δ)` when `transpose`; returns out.

    Δ is (indices, values) of an [O, I] weight. Not transposed: out [T, O], x [T, I]; transposed:
    out [T, I], x [T, O]. The token selection is as in `sddmm`. Each output element is updated in
    fp32 and rounded once. Inputs that share memory with `out` are read as they were before.
    """
    op = "spmm_"
    checks.flag(op, "transpose", transpose)  # transpose="False" is truthy: it ran x Δ for x Δᵀ, silently
    checks.token_matmul(op, out, x, indices, token_index, token_bounds, token_scale, ("out", "x"))
    checks.not_differentiable(op, out=out, x=x, values=values, token_scale=token_scale)
    checks.contiguous_output(op, "out", out)
    checks.spmm_values(x, indices, values)
    if checks.can_read(x):
        if not registry.compiled(op, x.device):
            checks.indices(op, indices, out.shape[1] * x.shape[1])
        checks.selected_tokens(op, x.shape[0], token_index, token_bounds)
    written = checks.memory_keys([out])
    args = [None if t is None else checks.unaliased(written, t.contiguous())
            for t in (x, indices, values, token_index, token_bounds, token_scale)]
    registry.call(op, x.device, out, *args, bool(transpose))
    return out


def spmm_gated_(out, x, indices, values, gates, transpose=False) -> torch.Tensor:
    """`out += Σ_e gates[:, e] ⊙ (x @ Δ_eᵀ)` (or `x @ Δ_e` when `transpose`) for E deltas, in place;
    returns out. `indices` and `values` are lists of E tensors, each pair one delta as in `spmm_`;
    gates [T, E]. The CPU kernel transposes x and passes over out once for all E deltas, and
    updates each output element in fp32 once; elsewhere it runs one `spmm_` per delta (a bf16 or
    fp16 out is then rounded once per delta).
    """
    op = "spmm_gated_"
    checks.flag(op, "transpose", transpose)
    checks.gated_deltas(op, out, x, indices, values, gates)
    checks.not_differentiable(op, out=out, x=x, gates=gates, values=list(values))
    checks.contiguous_output(op, "out", out)
    # No kernel of its own here: one spmm_ per delta, whose own checks would refuse delta e only
    # after the deltas before it were added, so every delta is checked first.
    per_delta = registry.backend_for(op, x.device) == "reference" and registry.backend_for("spmm_", x.device) != "reference"
    if checks.can_read(x) and (per_delta or not registry.compiled(op, x.device)):
        for idx in indices:
            checks.indices(op, idx, out.shape[1] * x.shape[1])
    # Copies of inputs that share out's memory, before any delta is added: each delta reads them
    # as they were before the call.
    written = checks.memory_keys([out])
    x, gates = (checks.unaliased(written, t.contiguous()) for t in (x, gates))
    indices = [checks.unaliased(written, t.contiguous()) for t in indices]
    values = [checks.unaliased(written, t.contiguous()) for t in values]
    if per_delta:
        for idx, vals, scale in zip(indices, values, gates.unbind(1)):
            spmm_(out, x, idx, vals, token_scale=scale, transpose=transpose)
        return out
    registry.call(op, x.device, out, x, indices, values, gates, bool(transpose))
    return out


def ensemble_logprobs_op(logits, log_weights, prob_space: bool):
    """(log-probs [T, V], logsumexp) of the expert mixture; differentiable in logits and log_weights."""
    checks.ensemble("ensemble_logprobs", logits, log_weights)
    checks.flag("ensemble_logprobs", "prob_space", prob_space)  # functional's space="logit" here ran prob space
    return registry.call("ensemble_logprobs", logits.device, logits.contiguous(), log_weights.contiguous(),
                         bool(prob_space))


def ensemble_nll_op(logits, log_weights, targets, prob_space: bool):
    """(negative log-likelihood [T], logsumexp) of the expert mixture at `targets`, both in the
    accumulation dtype (float32, float64 for float64 logits); differentiable."""
    checks.ensemble("ensemble_nll", logits, log_weights, targets)
    checks.targets_in_range("ensemble_nll", targets, logits.shape[2])
    checks.flag("ensemble_nll", "prob_space", prob_space)
    return registry.call("ensemble_nll", logits.device, logits.contiguous(), log_weights.contiguous(),
                         targets.contiguous(), bool(prob_space))


def ensemble_logprobs_backward(grad, logits, log_weights, out, lse, prob_space: bool):
    """(d logits, d log_weights) of `ensemble_logprobs_op`. `out` (the saved output, in the logits'
    dtype) is checked but not read: every backend recomputes the log-probs in the accumulation dtype
    from logits, log_weights and the saved float32 lse, as the forward computed them."""
    op = "ensemble_logprobs_backward"
    checks.flag(op, "prob_space", prob_space)
    checks.ensemble(op, logits, log_weights)
    checks.ensemble_saved(op, logits, grad, out, lse, prob_space)
    args = [t.contiguous() for t in (grad, logits, log_weights, out, lse)]
    return registry.call(op, logits.device, *args, bool(prob_space))


def ensemble_nll_backward(grad, logits, log_weights, targets, nll, lse, prob_space: bool):
    """(d logits, d log_weights) of `ensemble_nll_op`, from its saved nll and logsumexp; grad and
    nll are in the accumulation dtype, as `ensemble_nll_op` returns nll."""
    op = "ensemble_nll_backward"
    checks.flag(op, "prob_space", prob_space)
    checks.ensemble(op, logits, log_weights, targets)
    checks.targets_in_range(op, targets, logits.shape[2])
    checks.ensemble_saved(op, logits, grad, nll, lse, prob_space)
    args = [t.contiguous() for t in (grad, logits, log_weights, targets, nll, lse)]
    return registry.call(op, logits.device, *args, bool(prob_space))


# --- autograd of the linear layers ---


def merged_weight(weight, indices, values) -> torch.Tensor:
    """W0 + Δ as a new dense tensor (detached): the weight the merged forward multiplies by."""
    merged = weight.detach().clone(memory_format=torch.contiguous_format)  # sparse_axpy_ writes a flat tensor
    return sparse_axpy_(merged, indices, values.detach().to(weight.dtype))


def write_delta_(weight, indices, values) -> torch.Tensor:
    """Add Δ into `weight`'s own storage (a contiguous tensor) and return the K entries it
    displaced, for `restore_entries_`. Writes through `.data`: the version counter does not move."""
    w = weight.data
    (displaced,) = apply_diffs_([w], [indices], [values.detach().to(w.dtype)], [0], [1.0])
    return displaced


def restore_entries_(weight, indices, displaced) -> None:
    """Write back the entries `write_delta_` displaced: `weight` is bit-identical to before."""
    restore_diffs_([weight.data], [indices], [displaced], [0])


_WRITERS_LOCK = threading.Lock()
_WRITERS: dict[int, threading.Lock] = {}  # storage address -> the lock its writes take turns on


@contextlib.contextmanager
def delta_written_into(weight, indices, values):
    """Within the block, `weight`'s own storage holds W0 + Δ; on exit it holds W0 again, bit-exactly.
    The extra memory is K values, not a merged O x I copy. The version counter does not move, so
    autograd nodes that saved W0 see it unchanged, as it is once the block exits. Blocks on one
    storage from several threads take turns (two writes at once would leave W0 + 2Δ); other readers
    of `weight` on other threads must not run meanwhile."""
    # a fake tensor has no address (FakeTensorMode runs this code too): one shared lock then
    key = weight.untyped_storage().data_ptr() if checks.can_read(weight) else None
    with _WRITERS_LOCK:
        lock = _WRITERS.setdefault(key, threading.Lock())
    with lock:
        displaced = write_delta_(weight, indices, values)
        try:
            yield weight.data
        finally:
            restore_entries_(weight, indices, displaced)


def _times_merged(a, weight, bias, indices, values, merged, in_place, transpose=False):
    """a (W0 + Δ)ᵀ + bias, or a (W0 + Δ) with `transpose` (no bias): by the given merged weight, by
    W0 + Δ written into W0 for the call (`in_place`), or by W0 plus an SpMM term."""
    gemm = (lambda w: a @ w) if transpose else (lambda w: F.linear(a, w, bias))
    if merged is not None:
        return gemm(merged)
    if in_place:
        with delta_written_into(weight, indices, values) as w:
            return gemm(w)
    out = gemm(weight)
    spmm_(out, a, indices, values, transpose=transpose)
    return out


# Where the dense way can pay on a CPU: bfloat16, whose dense products run on AMX tiles or
# AVX-512-BF16. fp32 keeps SDDMM, so that an fp32 delta layer never allocates an O x I buffer
# (LT-SFT's phase 2 promises it; the paths crossed only at 35-40% on an AMD EPYC with AVX-512);
# fp16 has no fast dense path on these CPUs, and GPUs keep SDDMM.
DENSE_DW_DTYPES = (torch.bfloat16,)
# The crossover used while tracing (a traced graph cannot time kernels): an AMD EPYC's with
# AVX-512-BF16 (1 thread, T = 512 and 2048, 1024 x 1024 and 4096 x 1024: the paths crossed at 14-18%).
TRACED_DENSE_DW_MIN_DENSITY = 0.15
# Below this density the SDDMM is kept without timing. A 2-core host loaded by other jobs once timed
# SDDMM 10x slow, which would send typical 1% LT-SFT deltas to the dense way and its O x I buffer.
# AMX tiles, the fastest dense path, crossed at 4.3-5.2% (a 2-core Xeon, 2 threads, T = 2048,
# 2026-12-05: 768 x 768 to 4096 x 1024).
MIN_DENSE_DW_DENSITY = 0.02
# Timed pairs per delta shape: each way's fastest of 3 (a slow run on a shared host is noise, not cost).
DENSE_DW_PAIRS = 3
# Fewer tokens than this keep SDDMM untimed: both costs grow with the tokens, but a few tokens'
# timings are mostly call overhead and would set the choice for the real batches.
DENSE_DW_TIMED_MIN_TOKENS = 256
# The choice per (dtype, O, I, K, token count's power of two), timed on the first backward of each:
# True for the dense way.
_dense_dw_choice: dict[tuple, bool] = {}


def _gathered_dw(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, dw: torch.Tensor | None = None):
    """dvalues the dense way: dW = dYᵀX (or the given one) at the delta's entries."""
    return (dy.T @ x if dw is None else dw).reshape(-1).index_select(0, indices.long())


def time_dense_dw(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, pairs: int = DENSE_DW_PAIRS) -> bool:
    """True when one dense dYᵀX and a gather ran faster than the SDDMM on these very inputs, each
    way's fastest of `pairs` alternating runs. Timed per delta shape, as no one cost model held
    across shapes: SDDMM pays per row and column (its token transposes read both operands from
    memory) and per entry, and both parts moved 2x between shapes. On a 2-core Xeon with AMX (bf16,
    T = 2048) the paths crossed at 4.3-5.2%; a model fitted on one 1024 x 1024 probe put the
    crossover at 3.5-11%, and the crossover timed once on a 512 x 512 probe at 25% density (the rule
    before this one) read 8.1%, so a 5% 1024 x 4096 delta took the slower SDDMM (0.95x SpIEL's way)."""
    ways = (lambda: _gathered_dw(dy, x, indices), lambda: sddmm(dy, x, indices))
    best = [float("inf")] * 2
    for _ in range(pairs):
        for w, way in enumerate(ways):
            start = time.perf_counter()
            way()
            best[w] = min(best[w], time.perf_counter() - start)
    return best[0] <= best[1]


def _pinned_dense_dw_min_density() -> float | None:
    """XLSPARSE_DENSE_DW_MIN_DENSITY as a number, or None when it is not set."""
    pinned = os.environ.get("XLSPARSE_DENSE_DW_MIN_DENSITY")
    if pinned is None:
        return None
    try:
        value = float(pinned)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"XLSPARSE_DENSE_DW_MIN_DENSITY must be a positive number (inf: always SDDMM), got {pinned!r}")
    return value


def dense_dw_pays(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, weight_shape) -> bool:
    """True when dvalues of a delta of `weight_shape` costs less as (dYᵀX)[indices], one dense
    O x I product and a gather, than as an SDDMM: only for a `DENSE_DW_DTYPES` delta on a CPU (real
    LT-SFT masks reach 36% in some matrices, where SpIEL's dense way would otherwise be faster).
    XLSPARSE_DENSE_DW_MIN_DENSITY pins the choice to a density (for runs that must repeat bit for
    bit across processes: the two ways round alike but sum in other orders; `inf` keeps SDDMM);
    else deltas below MIN_DENSE_DW_DENSITY keep SDDMM, and the others take whichever way ran faster
    on the first backward of a delta of their dtype, shape and K with at least
    DENSE_DW_TIMED_MIN_TOKENS tokens, per power of two of the token count (`time_dense_dw`, about
    six times one dvalues, once each per process; SDDMM until then), or the dense way from TRACED_DENSE_DW_MIN_DENSITY while tracing.
    So the choice follows the machine and the shape."""
    if dy.device.type != "cpu" or dy.dtype not in DENSE_DW_DTYPES:
        return False
    rows, cols = weight_shape
    nnz = indices.numel()
    pinned = _pinned_dense_dw_min_density()
    if pinned is not None:
        return nnz >= pinned * rows * cols
    if nnz == 0 or nnz < MIN_DENSE_DW_DENSITY * rows * cols:
        return False
    key = (dy.dtype, rows, cols, nnz, dy.shape[0].bit_length())
    if key not in _dense_dw_choice:
        if not checks.can_read(dy, x, indices):
            return nnz >= TRACED_DENSE_DW_MIN_DENSITY * rows * cols
        if dy.shape[0] < DENSE_DW_TIMED_MIN_TOKENS:
            return False
        try:
            _dense_dw_choice[key] = time_dense_dw(dy, x, indices)
        except RuntimeError as exc:  # the O x I product does not fit: SDDMM is the way
            # torch's CPU allocator raises a plain RuntimeError, not OutOfMemoryError
            if not (isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)):
                raise
            _dense_dw_choice[key] = False
    return _dense_dw_choice[key]


class SparseDeltaLinearFunction(torch.autograd.Function):
    """Y = X (W0 + Δ)ᵀ + b for 2-D X. The forward and dX multiply by W0 + Δ in one of three ways
    (`_times_merged`): a given merged weight, Δ written into W0 for the call (`in_place`), or W0
    plus an SpMM. dvalues is an SDDMM, or a gather from one dense dYᵀX: dW0's when W0 trains, else
    where that was timed faster on this machine (`dense_dw_pays`: bfloat16 deltas on a CPU)."""

    @staticmethod
    def forward(ctx, x, weight, bias, indices, values, merged, in_place):
        y = _times_merged(x, weight, bias, indices, values, merged, in_place)
        ctx.in_place = in_place
        ctx.save_for_backward(x, weight, indices, values, merged)
        return y

    @staticmethod
    @first_order_only  # the backward is not itself differentiable: a double backward raises
    def backward(ctx, dy):
        x, weight, indices, values, merged = ctx.saved_tensors
        dx = dw = db = dval = None
        dy = dy.contiguous()
        if ctx.needs_input_grad[0]:
            dx = _times_merged(dy, weight, None, indices, values, merged, ctx.in_place, transpose=True)
        if ctx.needs_input_grad[1]:
            dw = dy.T @ x
        if ctx.needs_input_grad[2]:
            db = dy.sum(0, dtype=acc_dtype(dy.dtype)).to(dy.dtype)
        if ctx.needs_input_grad[4]:
            # With dW0 at hand (W0 trains too) its gather always beats an SDDMM.
            if dw is not None or dense_dw_pays(dy, x, indices, weight.shape):
                dval = _gathered_dw(dy, x, indices, dw)
            else:
                dval = sddmm(dy, x, indices)
        return dx, dw, db, None, dval, None, None


def _times_merged_groups(a, weight, bias, indices, values, order, counts, in_place, transpose=False):
    """Each routed token group e (`order`, `counts[e]` tokens each, in order) times W0 + Δ_e, and
    the unrouted tokens times W0: a merged nn.Linear per language, as `_times_merged` does for one
    delta. Δ_e is written into W0 for its group's product (`in_place`), or into one private copy
    of W0 (one O x I buffer for all groups), and taken out again after."""
    gemm = (lambda t, w: t @ w) if transpose else (lambda t, w: F.linear(t, w, bias))
    tokens = a.shape[0]
    active = [e for e, c in enumerate(counts) if c]
    target = weight if in_place else weight.detach().clone(memory_format=torch.contiguous_format)
    if len(active) == 1 and counts[active[0]] == tokens:  # a batch of one language: no gather
        with delta_written_into(target, indices[active[0]], values[active[0]]) as w:
            return gemm(a, w)
    out = a.new_empty(tokens, weight.shape[1] if transpose else weight.shape[0])
    if sum(counts) < tokens:  # eager groups drop the −1 tokens: they take W0 alone
        rest = torch.ones(tokens, dtype=torch.bool, device=a.device)
        rest[order] = False
        rest = rest.nonzero().squeeze(1)
        out.index_copy_(0, rest, gemm(a.index_select(0, rest), weight))
    start = 0
    for e, c in enumerate(counts):
        if c:
            group = order[start : start + c]
            with delta_written_into(target, indices[e], values[e]) as w:
                out.index_copy_(0, group, gemm(a.index_select(0, group), w))
        start += c
    return out


class MultiDeltaLinearFunction(torch.autograd.Function):
    """Y_t = X_t W0ᵀ + b + Σ_e s_{t,e} X_t Δ_eᵀ for 2-D X, with either hard routing (token e-group
    `order[offsets[e]:offsets[e+1]]`) or soft gates [T, E]. Arguments after `num_deltas` are the
    E index tensors, then the E value tensors.

    Under hard routing with `in_place` not None (eager mode, every group large enough that
    `merge_pays`), the forward and dX multiply each group by W0 + Δ_e (`_times_merged_groups`:
    written into W0 itself when `in_place`, else into a copy); otherwise W0 plus SpMM terms.

    `host_counts` (hard routing in eager mode: the E group sizes, as ints) makes the gradient of
    the values of a delta whose group is empty None, not zeros, so that an optimizer skips that
    delta (no momentum step, no weight decay), as it skips an unused PEFT adapter. With None
    (soft gates, or hard routing under torch.compile, which has no host counts) every delta
    that requires grad gets a gradient, zeros for an empty group."""

    @staticmethod
    def forward(ctx, x, weight, bias, order, offsets, gates, host_counts, in_place, num_deltas, *deltas):
        indices, values = deltas[:num_deltas], deltas[num_deltas:]
        if in_place is None:
            y = F.linear(x, weight, bias)
            _add_deltas(y, x, indices, values, order, offsets, gates)
        else:
            y = _times_merged_groups(x, weight, bias, indices, values, order, host_counts, in_place)
        ctx.num_deltas = num_deltas
        ctx.host_counts = host_counts
        ctx.in_place = in_place
        ctx.save_for_backward(x, weight, order, offsets, gates, *deltas)
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x, weight, order, offsets, gates, *deltas = ctx.saved_tensors
        n = ctx.num_deltas
        indices, values = deltas[:n], deltas[n:]
        needs = ctx.needs_input_grad
        dy = dy.contiguous()
        dx = dw = db = dgates = None
        if needs[0] and ctx.in_place is not None:
            dx = _times_merged_groups(dy, weight, None, indices, values, order, ctx.host_counts, ctx.in_place,
                                      transpose=True)
        elif needs[0]:
            dx = dy @ weight
            _add_deltas(dx, dy, indices, values, order, offsets, gates, transpose=True)
        if needs[1]:
            dw = dy.T @ x
        if needs[2]:
            db = dy.sum(0, dtype=acc_dtype(dy.dtype)).to(dy.dtype)
        counts = ctx.host_counts
        dvalues = [sddmm(dy, x, indices[e], *_tokens(order, offsets, gates, e))
                   if needs[9 + n + e] and (counts is None or counts[e] > 0) else None
                   for e in range(n)]
        if gates is not None and needs[5]:
            # dg[t, e] = <dY_t, X_t Δ_eᵀ>: one SpMM into a scratch [T, O] per expert.
            acc = acc_dtype(dy.dtype)
            dgates = torch.empty(gates.shape, dtype=acc, device=gates.device)
            scratch = torch.empty_like(dy)
            for e in range(n):
                scratch.zero_()
                spmm_(scratch, x, indices[e], values[e])
                dgates[:, e] = (scratch.to(acc) * dy.to(acc)).sum(-1)
            dgates = dgates.to(gates.dtype)
        return (dx, dw, db, None, None, dgates, None, None, None, *([None] * n), *dvalues)


def _add_deltas(out, x, indices, values, order, offsets, gates, transpose=False):
    """out += x Δ_eᵀ (or x Δ_e) for every delta e over its tokens: soft-gated deltas in one
    `spmm_gated_`, routed ones one `spmm_` each."""
    if gates is not None:
        spmm_gated_(out, x, list(indices), list(values), gates, transpose)
        return
    for e in range(len(indices)):
        spmm_(out, x, indices[e], values[e], *_tokens(order, offsets, None, e), transpose=transpose)


def _tokens(order, offsets, gates, e):
    """(token_index, token_bounds, token_scale) of delta e: its routed group, or all tokens gated."""
    if gates is not None:
        return None, None, gates[:, e].contiguous()
    return order, offsets[e : e + 2], None
