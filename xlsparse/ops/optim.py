"""Masked-gradient update ops: pure-PyTorch reference, fake impl, dispatch and autograd.

- `masked_adamw_` / `masked_sgd_`: one AdamW / SGD step of many parameters at the entries each
  one's selector chooses (all, a bool mask, or sorted flat indices with state of size K).
- `multi_mask_weight_grad`: dW = Σ_l M_l ⊙ (dY_lᵀ X_l) for tokens grouped by language.

The C++ kernels are in csrc/cpu/optim.cpp and csrc/cuda/optim.cu, the Triton kernels in
xlsparse/triton/optim.py; the update math they share is csrc/include/xlsparse/optim.h.
"""
import torch

from .. import _ext
from . import checks, registry
from ._common import acc_dtype
from .checks import selection_of


def _adamw_states(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad):
    states = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        states["max_exp_avg_sqs"] = max_exp_avg_sqs
    return states


def _entries(p: torch.Tensor, selector: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat param positions, state positions) of the selected entries."""
    kind = selection_of(selector)
    if kind == "all":
        pos = torch.arange(p.numel(), device=p.device)
        return pos, pos
    if kind == "mask":
        pos = selector.reshape(-1).nonzero().flatten()
        return pos, pos
    return selector.long(), torch.arange(selector.numel(), device=p.device)


def _step_counts(step: torch.Tensor, spos: torch.Tensor):
    """The step count after this step: one number for a shared counter, a float64 tensor per entry
    otherwise (the bias corrections 1 - beta^t cancel: beta^t rounded to fp32 first loses 5 digits)."""
    if step.dtype == torch.int32:
        return step[spos].to(torch.float64) + 1
    return float(step) + 1


def _advance(step: torch.Tensor, spos: torch.Tensor) -> None:
    if step.dtype == torch.int32:
        step[spos] += 1
    else:
        step += 1


# --- masked_adamw_ ---

def masked_adamw_reference(params, grads, selectors, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, inits,
                           lr, beta1, beta2, eps, weight_decay, l1_to_init, amsgrad, grad_scale=None,
                           found_inf=None) -> None:
    """Pure-PyTorch masked_adamw_: torch.optim.AdamW's formulas in the accumulation dtype."""
    inits = inits if l1_to_init != 0 else []
    if found_inf is not None and float(found_inf) != 0:
        return
    scale = 1.0 if grad_scale is None else float(grad_scale)
    for i, p in enumerate(params):
        ppos, spos = _entries(p, selectors[i])
        acc = acc_dtype(p.dtype)
        t = _step_counts(steps[i], spos)
        flat = p.view(-1)
        w = flat[ppos].to(acc)
        g = grads[i].view(-1)[ppos].to(acc) / scale
        if inits:
            g = g + l1_to_init * torch.sign(w - inits[i].view(-1)[spos].to(acc))
        m = exp_avgs[i].view(-1)[spos].to(acc)
        v = exp_avg_sqs[i].view(-1)[spos].to(acc)
        w = w * (1 - lr * weight_decay)
        m = m.lerp(g, 1 - beta1)
        v = v * beta2 + (1 - beta2) * g * g
        second = v
        if amsgrad:
            second = torch.maximum(max_exp_avg_sqs[i].view(-1)[spos].to(acc), v)
            max_exp_avg_sqs[i].view(-1)[spos] = second.to(p.dtype)
        step_size = lr / (1 - beta1 ** t)
        bias2_sqrt = (1 - beta2 ** t) ** 0.5
        if isinstance(t, torch.Tensor):  # computed in float64, rounded once, as torch rounds its Python floats
            step_size, bias2_sqrt = step_size.to(acc), bias2_sqrt.to(acc)
        w = w - step_size * m / (second.sqrt() / bias2_sqrt + eps)
        flat[ppos] = w.to(p.dtype)
        exp_avgs[i].view(-1)[spos] = m.to(p.dtype)
        exp_avg_sqs[i].view(-1)[spos] = v.to(p.dtype)
        _advance(steps[i], spos)


registry.define("masked_adamw_", masked_adamw_reference)

if _ext.loaded():

    @torch.library.register_fake("xlsparse::masked_adamw_")
    def _masked_adamw_fake(params, grads, selectors, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, inits, lr,
                           beta1, beta2, eps, weight_decay, l1_to_init, amsgrad, grad_scale=None, found_inf=None):
        checks.masked_step("masked_adamw_", params, grads, selectors,
                           _adamw_states(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad), steps,
                           inits if l1_to_init != 0 else None, grad_scale, found_inf, read_data=False)


def masked_adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], selectors: list[torch.Tensor | None],
                  exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor],
                  steps: list[torch.Tensor], inits: list[torch.Tensor | None], *, lr: float, beta1: float,
                  beta2: float, eps: float, weight_decay: float, l1_to_init: float = 0.0, amsgrad: bool = False,
                  grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                  check_indices: bool = True) -> None:
    """One AdamW step of every param, in place, at the entries its selector chooses.

    selectors[i]: None (every entry), a bool mask of the param's shape, or sorted unique flat
    int32/int64 indices (compact: exp_avgs/exp_avg_sqs/max_exp_avg_sqs/inits then hold one value
    per index). steps[i] is a one-element float32 count or an int32 count per state entry; the op
    advances it. On the chosen entries the math is torch.optim.AdamW's (with
    `l1_to_init * sign(p - init)` added to the gradient); nothing else is read into the result or
    written. AMP: grads are divided by grad_scale, and nothing changes when found_inf != 0.
    All params share one dtype and device. Hyperparameters follow torch.optim.AdamW's rules
    (`checks.adamw_hyperparameters`): a bad one raises ValueError naming it, and nothing is written.
    check_indices=False skips the Python check that the indices are sorted, unique and in range
    (every other check still runs): for a caller that checked them when it made them, as
    MaskedAdamW does. That check launches several ops per tensor, about 30 µs each on a CPU; over
    a model's 65+ tensors that cost as much as the compact step itself at 1% (measured). The
    compiled CPU and CUDA kernels check the indices again themselves, whatever this flag says: on
    a CPU in one pass over them, on a GPU with device syncs per tensor (not yet measured).
    """
    op = "masked_adamw_"
    checks.adamw_hyperparameters(op, lr, beta1, beta2, eps, weight_decay, l1_to_init, amsgrad)
    if not params:
        return
    max_exp_avg_sqs = list(max_exp_avg_sqs) if amsgrad else []
    inits = list(inits) if l1_to_init != 0 else None
    states = _adamw_states(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad)
    keys = checks.masked_step(op, params, grads, selectors, states, steps, inits, grad_scale, found_inf, check_indices,
                              compiled=registry.compiled(op, params[0].device))
    inits = inits or []
    grads, selectors, inits = checks.step_inputs(keys, grads, selectors, inits)
    registry.call(op, params[0].device, list(params), grads, selectors, list(exp_avgs), list(exp_avg_sqs),
                  max_exp_avg_sqs, list(steps), inits, float(lr), float(beta1), float(beta2), float(eps),
                  float(weight_decay), float(l1_to_init), bool(amsgrad), grad_scale, found_inf)


# --- masked_sgd_ ---

def masked_sgd_reference(params, grads, selectors, momentum_buffers, steps, lr, momentum, dampening, weight_decay,
                         nesterov, grad_scale=None, found_inf=None) -> None:
    """Pure-PyTorch masked_sgd_: torch.optim.SGD's formulas in the accumulation dtype."""
    if found_inf is not None and float(found_inf) != 0:
        return
    scale = 1.0 if grad_scale is None else float(grad_scale)
    for i, p in enumerate(params):
        ppos, spos = _entries(p, selectors[i])
        acc = acc_dtype(p.dtype)
        flat = p.view(-1)
        w = flat[ppos].to(acc)
        g = grads[i].view(-1)[ppos].to(acc) / scale
        if weight_decay != 0:  # as torch: skipped when zero, so an inf weight does not become NaN
            g = g + weight_decay * w
        if momentum != 0:
            step = steps[i]
            first = step[spos] == 0 if step.dtype == torch.int32 else torch.full_like(g, float(step) == 0, dtype=torch.bool)
            buf = momentum_buffers[i].view(-1)[spos].to(acc)
            buf = torch.where(first, g, buf * momentum + (1 - dampening) * g)
            momentum_buffers[i].view(-1)[spos] = buf.to(p.dtype)
            g = g + momentum * buf if nesterov else buf
        flat[ppos] = (w - lr * g).to(p.dtype)
        _advance(steps[i], spos)


registry.define("masked_sgd_", masked_sgd_reference)

if _ext.loaded():

    @torch.library.register_fake("xlsparse::masked_sgd_")
    def _masked_sgd_fake(params, grads, selectors, momentum_buffers, steps, lr, momentum, dampening, weight_decay,
                         nesterov, grad_scale=None, found_inf=None):
        states = {"momentum_buffers": momentum_buffers} if momentum != 0 else {}
        checks.masked_step("masked_sgd_", params, grads, selectors, states, steps, None, grad_scale, found_inf,
                           read_data=False)


def masked_sgd_(params: list[torch.Tensor], grads: list[torch.Tensor], selectors: list[torch.Tensor | None],
                momentum_buffers: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, momentum: float = 0.0,
                dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                check_indices: bool = True) -> None:
    """One SGD step of every param, in place, at the entries its selector chooses (see `masked_adamw_`,
    also for `check_indices`).

    torch.optim.SGD's formulas: weight decay added to the gradient, then momentum (the buffer starts
    as the gradient on an entry's first step), optionally Nesterov. momentum_buffers is empty when
    momentum == 0. Hyperparameters follow torch.optim.SGD's rules (`checks.sgd_hyperparameters`).
    """
    op = "masked_sgd_"
    checks.sgd_hyperparameters(op, lr, momentum, dampening, weight_decay, nesterov)
    if not params:
        return
    momentum_buffers = list(momentum_buffers) if momentum != 0 else []
    states = {"momentum_buffers": momentum_buffers} if momentum != 0 else {}
    keys = checks.masked_step(op, params, grads, selectors, states, steps, None, grad_scale, found_inf, check_indices,
                              compiled=registry.compiled(op, params[0].device))
    grads, selectors, _ = checks.step_inputs(keys, grads, selectors, [])
    registry.call(op, params[0].device, list(params), grads, selectors, momentum_buffers, list(steps), float(lr),
                  float(momentum), float(dampening), float(weight_decay), bool(nesterov), grad_scale, found_inf)


# --- multi_mask_weight_grad ---

def multi_mask_weight_grad_reference(grad_out, input, masks, order, offsets) -> torch.Tensor:
    """Pure-PyTorch multi_mask_weight_grad: one masked product per language, in the accumulation dtype."""
    acc = acc_dtype(input.dtype)
    dw = torch.zeros(grad_out.shape[1], input.shape[1], dtype=acc, device=input.device)
    off = offsets.tolist()
    for lang in range(masks.shape[0]):
        tokens = order[off[lang]:off[lang + 1]]
        if tokens.numel():
            part = grad_out[tokens].to(acc).t() @ input[tokens].to(acc)
            dw += torch.where(masks[lang], part, 0)
    return dw.to(input.dtype)


def _multi_mask_weight_grad_fake(grad_out, input, masks, order, offsets):
    checks.multi_mask_weight_grad(grad_out, input, masks, order, offsets, read_data=False)
    return grad_out.new_empty(grad_out.shape[1], input.shape[1])


def _multi_mask_weight_grad_setup(ctx, inputs, output):
    grad_out, input, masks, order, offsets = inputs
    ctx.save_for_backward(grad_out, input, masks, order, offsets)


def _multi_mask_weight_grad_backward(ctx, grad_dw):
    """The op is bilinear in (grad_out, input): d grad_out_t = x_t (M_l ⊙ G)ᵀ, d input_t = dy_t (M_l ⊙ G)."""
    grad_out, input, masks, order, offsets = ctx.saved_tensors
    d_grad_out = torch.zeros_like(grad_out) if ctx.needs_input_grad[0] else None
    d_input = torch.zeros_like(input) if ctx.needs_input_grad[1] else None
    off = offsets.tolist()
    for lang in range(masks.shape[0]):
        tokens = order[off[lang]:off[lang + 1]]
        masked = torch.where(masks[lang], grad_dw, 0)
        # index_add_: a token listed twice (a direct op call; the wrapper refuses it) counts twice, as in the forward
        if d_grad_out is not None:
            d_grad_out.index_add_(0, tokens, (input[tokens] @ masked.t()).to(d_grad_out.dtype))
        if d_input is not None:
            d_input.index_add_(0, tokens, (grad_out[tokens] @ masked).to(d_input.dtype))
    return d_grad_out, d_input, None, None, None


registry.define("multi_mask_weight_grad", multi_mask_weight_grad_reference,
                backward=_multi_mask_weight_grad_backward, setup_context=_multi_mask_weight_grad_setup)
if _ext.loaded():
    torch.library.register_fake("xlsparse::multi_mask_weight_grad")(_multi_mask_weight_grad_fake)


def multi_mask_weight_grad(grad_out: torch.Tensor, input: torch.Tensor, masks: torch.Tensor, order: torch.Tensor,
                           offsets: torch.Tensor) -> torch.Tensor:
    """dW = Σ_l masks[l] ⊙ (grad_out[tokens_l]ᵀ input[tokens_l]) in one pass, [O, I].

    grad_out [T, O], input [T, I], masks [L, O, I] bool; language l owns the token positions
    `order[offsets[l]:offsets[l + 1]]` (as in `xlsparse.routing.TokenGroups`), each token at most
    once; tokens in no group contribute nothing. No dense gradient per language is formed.
    """
    checks.multi_mask_weight_grad(grad_out, input, masks, order, offsets)
    args = [t.contiguous() for t in (grad_out, input, masks, order, offsets)]
    return registry.call("multi_mask_weight_grad", grad_out.device, *args)
