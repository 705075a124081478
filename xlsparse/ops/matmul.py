"""Multi-mask gated matmul ops: SDDMM, SpMM and expert-ensemble mixing.

Reading order: pure-PyTorch references (the test oracle and the fallback), fake impls, the
dispatching wrappers, the autograd of the ensemble ops, then the autograd Functions of the two
linear layers (`SparseDeltaLinearFunction`, `MultiDeltaLinearFunction`) built on SDDMM and SpMM.

A delta Δ of a weight [O, I] is (indices [K], values [K]), flat row-major, sorted and unique.
The C++ kernels are in csrc/cpu/matmul.cpp and csrc/cuda/matmul.cu, the Triton kernels in
xlsparse/triton/matmul.py; the math they share is csrc/include/xlsparse/matmul.h.
"""
import torch
import torch.nn.functional as F

from .. import _ext
from . import _common
from .compose import sparse_axpy_

for _op in ("sddmm", "spmm_", "ensemble_logprobs", "ensemble_logprobs_backward", "ensemble_nll", "ensemble_nll_backward"):
    _common.register(_op)

# --- argument checks (the Python twin of check_token_matmul / check_ensemble in matmul.h) ---


def check_token_matmul(op, a, b, indices, token_index, token_bounds, token_scale) -> None:
    """a [T, A] and b [T, B] share dtype, device and T; the token selection fits them."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{op}: expected 2-D token matrices, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{op}: token counts differ: {a.shape[0]} and {b.shape[0]}")
    if not a.is_floating_point():
        raise TypeError(f"{op}: expected floating point, got {a.dtype}")
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: dtypes differ: {a.dtype} and {b.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{op}: indices must be 1-D, got {tuple(indices.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: indices must be int32 or int64, got {indices.dtype}")
    if b.device != a.device or indices.device != a.device:
        raise ValueError(f"{op}: tensors must be on one device, got {a.device}, {b.device}, {indices.device}")
    if token_index is not None:
        if token_index.dtype != torch.int64:
            raise TypeError(f"{op}: token_index must be int64, got {token_index.dtype}")
        if token_index.dim() != 1 or token_index.device != a.device:
            raise ValueError(f"{op}: token_index must be 1-D on {a.device}")
    if token_bounds is not None:
        if token_index is None:
            raise ValueError(f"{op}: token_bounds needs token_index")
        if token_bounds.dtype != torch.int64:
            raise TypeError(f"{op}: token_bounds must be int64, got {token_bounds.dtype}")
        if token_bounds.numel() != 2 or token_bounds.device != a.device:
            raise ValueError(f"{op}: token_bounds must hold 2 entries on {a.device}")
    if token_scale is not None:
        if not token_scale.is_floating_point():
            raise TypeError(f"{op}: token_scale must be floating point")
        if token_scale.dim() != 1 or token_scale.shape[0] != a.shape[0] or token_scale.device != a.device:
            raise ValueError(f"{op}: token_scale must have shape [{a.shape[0]}] on {a.device}, got {tuple(token_scale.shape)}")


def check_spmm_values(x, indices, values) -> None:
    if values.dim() != 1 or values.numel() != indices.numel():
        raise ValueError(f"spmm_: values must be 1-D with {indices.numel()} entries like indices, got {tuple(values.shape)}")
    if values.dtype != x.dtype:
        raise TypeError(f"spmm_: values dtype {values.dtype} does not match x dtype {x.dtype}")
    if values.device != x.device:
        raise ValueError(f"spmm_: values must be on {x.device}")


def check_ensemble(op, logits, log_weights, targets=None) -> None:
    """logits [E, T, V], log_weights [T, E], targets [T] int64."""
    if logits.dim() != 3:
        raise ValueError(f"{op}: logits must be [E, T, V], got {tuple(logits.shape)}")
    if logits.shape[0] == 0 or logits.shape[2] == 0:
        raise ValueError(f"{op}: logits need E > 0 experts and V > 0 classes")
    e, t, _ = logits.shape
    if log_weights.dim() != 2 or tuple(log_weights.shape) != (t, e):
        raise ValueError(f"{op}: log_weights must be [T, E] = [{t}, {e}], got {tuple(log_weights.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{op}: logits must be floating point")
    if log_weights.dtype != logits.dtype:
        raise TypeError(f"{op}: log_weights dtype {log_weights.dtype} does not match logits dtype {logits.dtype}")
    if log_weights.device != logits.device:
        raise ValueError(f"{op}: logits and log_weights must be on one device")
    if targets is not None:
        if targets.dtype != torch.int64:
            raise TypeError(f"{op}: targets must be int64, got {targets.dtype}")
        if targets.dim() != 1 or targets.shape[0] != t:
            raise ValueError(f"{op}: targets must be [{t}], got {tuple(targets.shape)}")
        if targets.device != logits.device:
            raise ValueError(f"{op}: targets must be on {logits.device}")


def check_targets(op, targets, num_classes) -> None:
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= num_classes:
            raise IndexError(f"{op}: targets must lie in [0, {num_classes}), got min {lo}, max {hi}")


# --- references ---


def _selected_tokens(num_tokens, token_index, token_bounds):
    """The selected token ids (a LongTensor), validated like the kernels do."""
    if token_index is None:
        return None
    sel = token_index
    if token_bounds is not None:
        lo, hi = (int(v) for v in token_bounds.tolist())
        if not 0 <= lo <= hi <= token_index.numel():
            raise IndexError(f"token_bounds [{lo}, {hi}) do not fit token_index of {token_index.numel()} entries")
        sel = token_index[lo:hi]
    if sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= num_tokens):
        raise IndexError(f"token_index holds ids outside [0, {num_tokens})")
    return sel


def sddmm_reference(grad_out, x, indices, token_index=None, token_bounds=None, token_scale=None):
    """out[n] = Σ_t s_t grad_out[t, r_n] x[t, c_n], in the accumulation dtype, rounded once."""
    check_token_matmul("sddmm", grad_out, x, indices, token_index, token_bounds, token_scale)
    cols = x.shape[1]
    _common.check_indices("sddmm", indices, grad_out.shape[1] * cols)
    acc = _common.acc_dtype(x.dtype)
    a, b = grad_out.to(acc), x.to(acc)
    if token_scale is not None:
        b = b * token_scale.to(acc)[:, None]
    sel = _selected_tokens(x.shape[0], token_index, token_bounds)
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
    check_token_matmul("spmm_", out, x, indices, token_index, token_bounds, token_scale)
    if not out.is_contiguous():
        raise ValueError("spmm_: out must be contiguous")
    check_spmm_values(x, indices, values)
    groups, xcols = out.shape[1], x.shape[1]
    _common.check_indices("spmm_", indices, groups * xcols)
    sel = _selected_tokens(x.shape[0], token_index, token_bounds)
    if indices.numel() == 0 or (sel is not None and sel.numel() == 0):
        return
    acc = _common.acc_dtype(x.dtype)
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
    idx = indices.long()
    reached = torch.zeros(groups, dtype=torch.bool, device=x.device)
    reached[(idx % groups) if transpose else (idx // xcols)] = True
    cols = reached.nonzero().flatten()[None, :]
    rows = (torch.arange(x.shape[0], device=x.device) if sel is None else sel)[:, None]
    out[rows, cols] = (out[rows, cols].to(acc) + y[:, cols[0]]).to(out.dtype)


def ensemble_logprobs_reference(logits, log_weights, prob_space):
    """(log-probs [T, V], logsumexp) of the mixture, computed in the accumulation dtype."""
    check_ensemble("ensemble_logprobs", logits, log_weights)
    acc = _common.acc_dtype(logits.dtype)
    z, lw = logits.to(acc), log_weights.to(acc)
    if prob_space:
        lse = torch.logsumexp(z, -1)  # [E, T]
        out = torch.logsumexp(lw.T[:, :, None] + z - lse[:, :, None], 0)
    else:
        zbar = (lw.T.exp()[:, :, None] * z).sum(0)
        lse = torch.logsumexp(zbar, -1)[None]
        out = zbar - lse[0][:, None]
    return out.to(logits.dtype), lse


def ensemble_logprobs_backward_reference(grad, logits, log_weights, out, lse, prob_space):
    acc = _common.acc_dtype(logits.dtype)
    g, z, lw, o = grad.to(acc), logits.to(acc), log_weights.to(acc), out.to(acc)
    if prob_space:
        post = (lw.T[:, :, None] + z - lse[:, :, None] - o[None]).exp()  # [E, T, V]
        S = (g[None] * post).sum(-1)  # [E, T]
        dz = g[None] * post - (z - lse[:, :, None]).exp() * S[:, :, None]
        dlw = S.T
    else:
        d = g - o.exp() * g.sum(-1, keepdim=True)
        w = lw.T.exp()  # [E, T]
        dz = w[:, :, None] * d[None]
        dlw = (w * (d[None] * z).sum(-1)).T
    return dz.to(logits.dtype), dlw.to(log_weights.dtype)


def ensemble_nll_reference(logits, log_weights, targets, prob_space):
    check_ensemble("ensemble_nll", logits, log_weights, targets)
    check_targets("ensemble_nll", targets, logits.shape[2])
    acc = _common.acc_dtype(logits.dtype)
    z, lw = logits.to(acc), log_weights.to(acc)
    zy = z.gather(2, targets.expand(z.shape[0], -1)[:, :, None])[:, :, 0]  # [E, T]
    if prob_space:
        lse = torch.logsumexp(z, -1)
        nll = -torch.logsumexp(lw.T + zy - lse, 0)
    else:
        w = lw.T.exp()
        zbar = (w[:, :, None] * z).sum(0)
        lse = torch.logsumexp(zbar, -1)[None]
        nll = lse[0] - (w * zy).sum(0)
    return nll.to(logits.dtype), lse


def ensemble_nll_backward_reference(grad, logits, log_weights, targets, nll, lse, prob_space):
    acc = _common.acc_dtype(logits.dtype)
    g, z, lw, n = grad.to(acc), logits.to(acc), log_weights.to(acc), nll.to(acc)
    onehot = F.one_hot(targets, z.shape[2]).to(acc)  # [T, V]
    if prob_space:
        zy = (z * onehot[None]).sum(-1)
        post = (lw.T + zy - lse + n).exp()  # [E, T]
        dz = (g * post)[:, :, None] * ((z - lse[:, :, None]).exp() - onehot[None])
        dlw = (-g * post).T
    else:
        w = lw.T.exp()
        zbar = (w[:, :, None] * z).sum(0)
        d = g[:, None] * ((zbar - lse[0][:, None]).exp() - onehot)
        dz = w[:, :, None] * d[None]
        dlw = (w * (d[None] * z).sum(-1)).T
    return dz.to(logits.dtype), dlw.to(log_weights.dtype)


# --- fake impls ---

if _ext.loaded():

    @torch.library.register_fake("xlsparse::sddmm")
    def _sddmm_fake(grad_out, x, indices, token_index, token_bounds, token_scale):
        check_token_matmul("sddmm", grad_out, x, indices, token_index, token_bounds, token_scale)
        return x.new_empty(indices.shape)

    @torch.library.register_fake("xlsparse::spmm_")
    def _spmm_fake(out, x, indices, values, token_index, token_bounds, token_scale, transpose):
        check_token_matmul("spmm_", out, x, indices, token_index, token_bounds, token_scale)
        check_spmm_values(x, indices, values)

    def _lse_fake(logits, prob_space):
        e, t, _ = logits.shape
        return logits.new_empty((e if prob_space else 1, t), dtype=_common.acc_dtype(logits.dtype))

    @torch.library.register_fake("xlsparse::ensemble_logprobs")
    def _ensemble_logprobs_fake(logits, log_weights, prob_space):
        check_ensemble("ensemble_logprobs", logits, log_weights)
        return logits.new_empty(logits.shape[1:]), _lse_fake(logits, prob_space)

    @torch.library.register_fake("xlsparse::ensemble_logprobs_backward")
    def _ensemble_logprobs_backward_fake(grad, logits, log_weights, out, lse, prob_space):
        return torch.empty_like(logits, memory_format=torch.contiguous_format), log_weights.new_empty(log_weights.shape)

    @torch.library.register_fake("xlsparse::ensemble_nll")
    def _ensemble_nll_fake(logits, log_weights, targets, prob_space):
        check_ensemble("ensemble_nll", logits, log_weights, targets)
        return logits.new_empty(logits.shape[1:2]), _lse_fake(logits, prob_space)

    @torch.library.register_fake("xlsparse::ensemble_nll_backward")
    def _ensemble_nll_backward_fake(grad, logits, log_weights, targets, nll, lse, prob_space):
        return torch.empty_like(logits, memory_format=torch.contiguous_format), log_weights.new_empty(log_weights.shape)


# --- dispatching wrappers ---


def sddmm(grad_out, x, indices, token_index=None, token_bounds=None, token_scale=None) -> torch.Tensor:
    """SDDMM: `out[n] = Σ_t s_t · grad_out[t, r_n] · x[t, c_n]` for Δ entries n at (r_n, c_n).

    grad_out [T, O] and x [T, I] share a dtype; indices [K] (int32/int64) index a row-major
    [O, I] weight, sorted and unique. Tokens are `token_index[token_bounds[0]:token_bounds[1]]`
    (all T when None), each scaled by `token_scale[t]`. Accumulates in fp32 (fp64 for fp64);
    returns [K] in x's dtype. No O x I buffer is ever allocated.
    """
    backend = _common.backend_for("sddmm", x.device)
    if backend == "reference":
        return sddmm_reference(grad_out, x, indices, token_index, token_bounds, token_scale)
    if backend == "triton":
        from ..triton.matmul import triton_sddmm

        check_token_matmul("sddmm", grad_out, x, indices, token_index, token_bounds, token_scale)
        if not torch.compiler.is_compiling():
            _common.check_indices("sddmm", indices, grad_out.shape[1] * x.shape[1])
            _selected_tokens(x.shape[0], token_index, token_bounds)
        return triton_sddmm(grad_out, x, indices, token_index, token_bounds, token_scale)
    return torch.ops.xlsparse.sddmm(grad_out, x, indices, token_index, token_bounds, token_scale)


def spmm_(out, x, indices, values, token_index=None, token_bounds=None, token_scale=None, transpose=False) -> torch.Tensor:
    """SpMM, in place: `out += s ⊙ (x @ Δᵀ)`, or `out += s ⊙ (x @ Δ)` when `transpose`; returns out.

    Δ is (indices, values) of an [O, I] weight. Not transposed: out [T, O], x [T, I]; transposed:
    out [T, I], x [T, O]. The token selection is as in `sddmm`. Each output element is updated in
    fp32 and rounded once.
    """
    backend = _common.backend_for("spmm_", x.device)
    if backend == "reference":
        spmm_reference(out, x, indices, values, token_index, token_bounds, token_scale, transpose)
    elif backend == "triton":
        from ..triton.matmul import triton_spmm_

        check_token_matmul("spmm_", out, x, indices, token_index, token_bounds, token_scale)
        check_spmm_values(x, indices, values)
        if not out.is_contiguous():
            raise ValueError("spmm_: out must be contiguous")
        if not torch.compiler.is_compiling():
            _common.check_indices("spmm_", indices, out.shape[1] * x.shape[1])
            _selected_tokens(x.shape[0], token_index, token_bounds)
        triton_spmm_(out, x, indices, values, token_index, token_bounds, token_scale, transpose)
    else:
        torch.ops.xlsparse.spmm_(out, x, indices, values, token_index, token_bounds, token_scale, transpose)
        _common.mark_written([out])
    return out


def _ensemble_call(op, reference, *args):
    backend = _common.backend_for(op, args[1].device)
    if backend == "reference":
        return reference(*args)
    if backend == "triton":
        from ..triton import matmul as triton_matmul

        return getattr(triton_matmul, "triton_" + op)(*args)
    return getattr(torch.ops.xlsparse, op)(*args)


def ensemble_logprobs_op(logits, log_weights, prob_space: bool):
    """(log-probs [T, V], logsumexp) of the expert mixture; differentiable in logits and log_weights."""
    if _common.backend_for("ensemble_logprobs", logits.device) == "triton":
        check_ensemble("ensemble_logprobs", logits, log_weights)
    return _ensemble_call("ensemble_logprobs", ensemble_logprobs_reference, logits, log_weights, prob_space)


def ensemble_nll_op(logits, log_weights, targets, prob_space: bool):
    """(negative log-likelihood [T], logsumexp) of the expert mixture at `targets`; differentiable."""
    if _common.backend_for("ensemble_nll", logits.device) == "triton":
        check_ensemble("ensemble_nll", logits, log_weights, targets)
        if not torch.compiler.is_compiling():
            check_targets("ensemble_nll", targets, logits.shape[2])
    return _ensemble_call("ensemble_nll", ensemble_nll_reference, logits, log_weights, targets, prob_space)


# --- autograd of the ensemble ops: one backward, registered on the C++ and the Triton op ---


def _logprobs_setup(ctx, inputs, output):
    logits, log_weights, prob_space = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, log_weights, output[0], output[1])
    ctx.prob_space = prob_space


def _logprobs_backward(ctx, grad_out, _grad_lse):
    logits, log_weights, out, lse = ctx.saved_tensors
    dz, dlw = _ensemble_call("ensemble_logprobs_backward", ensemble_logprobs_backward_reference,
                             grad_out.contiguous(), logits, log_weights, out, lse, ctx.prob_space)
    return dz, dlw, None


def _nll_setup(ctx, inputs, output):
    logits, log_weights, targets, prob_space = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, log_weights, targets, output[0], output[1])
    ctx.prob_space = prob_space


def _nll_backward(ctx, grad_nll, _grad_lse):
    logits, log_weights, targets, nll, lse = ctx.saved_tensors
    dz, dlw = _ensemble_call("ensemble_nll_backward", ensemble_nll_backward_reference,
                             grad_nll.contiguous(), logits, log_weights, targets, nll, lse, ctx.prob_space)
    return dz, dlw, None, None


def register_ensemble_autograd(prefix: str) -> None:
    """Attach the ensemble backward to `xlsparse::<prefix>ensemble_logprobs` and `..._nll`."""
    torch.library.register_autograd(f"xlsparse::{prefix}ensemble_logprobs", _logprobs_backward, setup_context=_logprobs_setup)
    torch.library.register_autograd(f"xlsparse::{prefix}ensemble_nll", _nll_backward, setup_context=_nll_setup)


if _ext.loaded():
    register_ensemble_autograd("")


# --- autograd of the linear layers ---


def merged_weight(weight, indices, values) -> torch.Tensor:
    """W0 + Δ as a new dense tensor (detached): the weight the merged forward multiplies by."""
    merged = weight.detach().clone()
    return sparse_axpy_(merged, indices, values.detach().to(weight.dtype))


class SparseDeltaLinearFunction(torch.autograd.Function):
    """Y = X (W0 + Δ)ᵀ + b for 2-D X. With `merged` (W0 + Δ) the forward and dX are one GEMM each;
    without it they are a GEMM with W0 plus an SpMM. dvalues is an SDDMM, never a dense dW."""

    @staticmethod
    def forward(ctx, x, weight, bias, indices, values, merged):
        if merged is not None:
            y = F.linear(x, merged, bias)
        else:
            y = F.linear(x, weight, bias)
            spmm_(y, x, indices, values)
        ctx.save_for_backward(x, weight, indices, values, merged)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, indices, values, merged = ctx.saved_tensors
        dx = dw = db = dval = None
        dy = dy.contiguous()
        if ctx.needs_input_grad[0]:
            if merged is not None:
                dx = dy @ merged
            else:
                dx = dy @ weight
                spmm_(dx, dy, indices, values, transpose=True)
        if ctx.needs_input_grad[1]:
            dw = dy.T @ x
        if ctx.needs_input_grad[2]:
            db = dy.sum(0, dtype=_common.acc_dtype(dy.dtype)).to(dy.dtype)
        if ctx.needs_input_grad[4]:
            dval = sddmm(dy, x, indices)
        return dx, dw, db, None, dval, None


class MultiDeltaLinearFunction(torch.autograd.Function):
    """Y_t = X_t W0ᵀ + b + Σ_e s_{t,e} X_t Δ_eᵀ for 2-D X, with either hard routing (token e-group
    `order[offsets[e]:offsets[e+1]]`) or soft gates [T, E]. Arguments after `num_deltas` are the
    E index tensors, then the E value tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, order, offsets, gates, num_deltas, *deltas):
        indices, values = deltas[:num_deltas], deltas[num_deltas:]
        y = F.linear(x, weight, bias)
        for e in range(num_deltas):
            spmm_(y, x, indices[e], values[e], *_tokens(order, offsets, gates, e))
        ctx.num_deltas = num_deltas
        ctx.save_for_backward(x, weight, order, offsets, gates, *deltas)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, order, offsets, gates, *deltas = ctx.saved_tensors
        n = ctx.num_deltas
        indices, values = deltas[:n], deltas[n:]
        needs = ctx.needs_input_grad
        dy = dy.contiguous()
        dx = dw = db = dgates = None
        if needs[0]:
            dx = dy @ weight
            for e in range(n):
                spmm_(dx, dy, indices[e], values[e], *_tokens(order, offsets, gates, e), transpose=True)
        if needs[1]:
            dw = dy.T @ x
        if needs[2]:
            db = dy.sum(0, dtype=_common.acc_dtype(dy.dtype)).to(dy.dtype)
        dvalues = [sddmm(dy, x, indices[e], *_tokens(order, offsets, gates, e)) if needs[7 + n + e] else None
                   for e in range(n)]
        if gates is not None and needs[5]:
            # dg[t, e] = <dY_t, X_t Δ_eᵀ>: one SpMM into a scratch [T, O] per expert.
            acc = _common.acc_dtype(dy.dtype)
            dgates = torch.empty(gates.shape, dtype=acc, device=gates.device)
            scratch = torch.empty_like(dy)
            for e in range(n):
                scratch.zero_()
                spmm_(scratch, x, indices[e], values[e])
                dgates[:, e] = (scratch.to(acc) * dy.to(acc)).sum(-1)
            dgates = dgates.to(gates.dtype)
        return (dx, dw, db, None, None, dgates, None, *([None] * n), *dvalues)


def _tokens(order, offsets, gates, e):
    """(token_index, token_bounds, token_scale) of delta e: its routed group, or all tokens gated."""
    if gates is not None:
        return None, None, gates[:, e].contiguous()
    return order, offsets[e : e + 2], None
