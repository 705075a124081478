"""Masked-gradient update ops: pure-PyTorch reference, fake impl, dispatch and autograd.

- `masked_adamw_` / `masked_sgd_`: one AdamW / SGD step of many parameters at the entries each
  one's selector chooses (all, a bool mask, or sorted flat indices with state of size K).
- `multi_mask_weight_grad`: dW = Σ_l M_l ⊙ (dY_lᵀ X_l) for tokens grouped by language.

The C++ kernels are in csrc/cpu/optim.cpp and csrc/cuda/optim.cu, the Triton kernels in
xlsparse/triton/optim.py; the update math they share is csrc/include/xlsparse/optim.h.
"""
import torch

from .. import _ext
from . import _common

_common.register("masked_adamw_")
_common.register("masked_sgd_")
_common.register("multi_mask_weight_grad")


# --- argument checks (the Python twin of check_masked_step in csrc/include/xlsparse/optim.h) ---

def selection_of(selector: torch.Tensor | None) -> str:
    """"all", "mask" (a bool tensor of the param's shape) or "indices" (sorted flat indices)."""
    if selector is None:
        return "all"
    return "mask" if selector.dtype == torch.bool else "indices"


def check_masked_step(op, params, grads, selectors, states: dict, steps, inits, grad_scale, found_inf,
                      read_data: bool = True) -> None:
    """Shapes, dtypes and devices of a masked step; with read_data, also the indices' order."""
    n = len(params)
    if not (len(grads) == len(selectors) == len(steps) == n):
        raise ValueError(f"{op}: params, grads, selectors and steps must have one entry per parameter, got "
                         f"{n}, {len(grads)}, {len(selectors)}, {len(steps)}")
    if len(inits) not in (0, n):
        raise ValueError(f"{op}: inits must be empty or have {n} entries")
    for name, lst in states.items():
        if len(lst) != n:
            raise ValueError(f"{op}: {name} must have {n} entries, got {len(lst)}")
    for scalar in (grad_scale, found_inf):
        if scalar is None:
            continue
        if scalar.numel() != 1 or scalar.dtype != torch.float32:
            raise ValueError(f"{op}: grad_scale and found_inf must be one-element float32 tensors")
        if n and scalar.device != params[0].device:
            raise ValueError(f"{op}: grad_scale and found_inf must be on the parameters' device")
    for i, p in enumerate(params):
        if not p.is_floating_point():
            raise TypeError(f"{op}: params[{i}] must be floating point, got {p.dtype}")
        if p.dtype != params[0].dtype:
            raise TypeError(f"{op}: every param of one call must have dtype {params[0].dtype}; params[{i}] is {p.dtype}")
        if p.device != params[0].device:
            raise ValueError(f"{op}: every tensor must be on {params[0].device}")
        if not p.is_contiguous():
            raise ValueError(f"{op}: params[{i}] must be contiguous")
        g = grads[i]
        if g.shape != p.shape or not g.is_contiguous() or g.device != p.device:
            raise ValueError(f"{op}: grads[{i}] must be a contiguous tensor of shape {tuple(p.shape)} on {p.device}, "
                             f"got {tuple(g.shape)}")
        if g.dtype != p.dtype:
            raise TypeError(f"{op}: grads[{i}] dtype {g.dtype} does not match the param's {p.dtype}")
        sel = selectors[i]
        kind = selection_of(sel)
        state_numel = p.numel()
        if kind == "mask":
            if sel.shape != p.shape or not sel.is_contiguous() or sel.device != p.device:
                raise ValueError(f"{op}: masks[{i}] must be a contiguous bool tensor of the param's shape "
                                 f"{tuple(p.shape)} on {p.device}, got {tuple(sel.shape)}")
        elif kind == "indices":
            if sel.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{op}: masks[{i}] must be a bool mask or int32/int64 indices, got {sel.dtype}")
            if sel.dim() != 1 or not sel.is_contiguous() or sel.device != p.device:
                raise ValueError(f"{op}: indices[{i}] must be a contiguous 1-D tensor on {p.device}")
            if sel.numel() > p.numel():
                raise ValueError(f"{op}: indices[{i}] has {sel.numel()} entries, more than the param's {p.numel()}")
            if read_data:
                _common.check_indices(op, sel, p.numel())
            state_numel = sel.numel()
        for name, lst in states.items():
            t = lst[i]
            if t.numel() != state_numel or not t.is_contiguous() or t.device != p.device:
                raise ValueError(f"{op}: {name}[{i}] must be contiguous with {state_numel} entries on {p.device}, "
                                 f"got {t.numel()}")
            if t.dtype != p.dtype:
                raise TypeError(f"{op}: {name}[{i}] dtype {t.dtype} does not match the param's {p.dtype}")
        st = steps[i]
        shared = st.numel() == 1 and st.dtype == torch.float32
        own = st.numel() == state_numel and st.dtype == torch.int32 and st.is_contiguous()
        if not (shared or own) or st.device != p.device:
            raise ValueError(f"{op}: steps[{i}] must be a one-element float32 tensor or an int32 tensor with "
                             f"{state_numel} entries on {p.device}, got {st.dtype} with {st.numel()}")
        if inits:
            init = inits[i]
            if init is None:
                raise ValueError(f"{op}: inits[{i}] is missing")
            if init.numel() != state_numel or not init.is_contiguous() or init.device != p.device:
                raise ValueError(f"{op}: inits[{i}] must be contiguous with {state_numel} entries on {p.device}")
            if init.dtype != p.dtype:
                raise TypeError(f"{op}: inits[{i}] dtype {init.dtype} does not match the param's {p.dtype}")


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


def _step_counts(step: torch.Tensor, spos: torch.Tensor, acc: torch.dtype):
    """The step count after this step: one number for a shared counter, a tensor per entry otherwise."""
    if step.dtype == torch.int32:
        return step[spos].to(acc) + 1
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
    check_masked_step("masked_adamw_", params, grads, selectors,
                      _adamw_states(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad), steps, inits, grad_scale, found_inf)
    if found_inf is not None and float(found_inf) != 0:
        return
    scale = 1.0 if grad_scale is None else float(grad_scale)
    for i, p in enumerate(params):
        ppos, spos = _entries(p, selectors[i])
        acc = _common.acc_dtype(p.dtype)
        t = _step_counts(steps[i], spos, acc)
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
        w = w - step_size * m / (second.sqrt() / bias2_sqrt + eps)
        flat[ppos] = w.to(p.dtype)
        exp_avgs[i].view(-1)[spos] = m.to(p.dtype)
        exp_avg_sqs[i].view(-1)[spos] = v.to(p.dtype)
        _advance(steps[i], spos)


if _ext.loaded():

    @torch.library.register_fake("xlsparse::masked_adamw_")
    def _masked_adamw_fake(params, grads, selectors, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, inits, lr,
                           beta1, beta2, eps, weight_decay, l1_to_init, amsgrad, grad_scale=None, found_inf=None):
        check_masked_step("masked_adamw_", params, grads, selectors,
                          _adamw_states(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad), steps,
                          inits if l1_to_init != 0 else [], grad_scale, found_inf, read_data=False)


def masked_adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], selectors: list[torch.Tensor | None],
                  exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor],
                  steps: list[torch.Tensor], inits: list[torch.Tensor | None], *, lr: float, beta1: float,
                  beta2: float, eps: float, weight_decay: float, l1_to_init: float = 0.0, amsgrad: bool = False,
                  grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
    """One AdamW step of every param, in place, at the entries its selector chooses.

    selectors[i]: None (every entry), a bool mask of the param's shape, or sorted unique flat
    int32/int64 indices (compact: exp_avgs/exp_avg_sqs/max_exp_avg_sqs/inits then hold one value
    per index). steps[i] is a one-element float32 count or an int32 count per state entry; the op
    advances it. On the chosen entries the math is torch.optim.AdamW's (with
    `l1_to_init * sign(p - init)` added to the gradient); nothing else is read into the result or
    written. AMP: grads are divided by grad_scale, and nothing changes when found_inf != 0.
    All params share one dtype and device.
    """
    if not params:
        return
    args = (params, grads, selectors, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], steps,
            inits if l1_to_init != 0 else [], float(lr), float(beta1), float(beta2), float(eps),
            float(weight_decay), float(l1_to_init), bool(amsgrad), grad_scale, found_inf)
    backend = _common.backend_for("masked_adamw_", params[0].device)
    if backend == "reference":
        masked_adamw_reference(*args)
    elif backend == "triton":
        from ..triton.optim import triton_masked_adamw_

        check_masked_step("masked_adamw_", *_checked(args, amsgrad), read_data=not torch.compiler.is_compiling())
        triton_masked_adamw_(*args)
    else:
        torch.ops.xlsparse.masked_adamw_(*args)
        _common.mark_written([*params, *exp_avgs, *exp_avg_sqs, *args[5], *steps])


def _checked(args, amsgrad):
    """The check_masked_step arguments for a masked_adamw_ argument tuple."""
    params, grads, selectors, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, inits = args[:8]
    return (params, grads, selectors, _adamw_states(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad), steps, inits,
            args[15], args[16])


# --- masked_sgd_ ---

def masked_sgd_reference(params, grads, selectors, momentum_buffers, steps, lr, momentum, dampening, weight_decay,
                         nesterov, grad_scale=None, found_inf=None) -> None:
    """Pure-PyTorch masked_sgd_: torch.optim.SGD's formulas in the accumulation dtype."""
    states = {"momentum_buffers": momentum_buffers} if momentum != 0 else {}
    check_masked_step("masked_sgd_", params, grads, selectors, states, steps, [], grad_scale, found_inf)
    if found_inf is not None and float(found_inf) != 0:
        return
    scale = 1.0 if grad_scale is None else float(grad_scale)
    for i, p in enumerate(params):
        ppos, spos = _entries(p, selectors[i])
        acc = _common.acc_dtype(p.dtype)
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


if _ext.loaded():

    @torch.library.register_fake("xlsparse::masked_sgd_")
    def _masked_sgd_fake(params, grads, selectors, momentum_buffers, steps, lr, momentum, dampening, weight_decay,
                         nesterov, grad_scale=None, found_inf=None):
        states = {"momentum_buffers": momentum_buffers} if momentum != 0 else {}
        check_masked_step("masked_sgd_", params, grads, selectors, states, steps, [], grad_scale, found_inf,
                          read_data=False)


def masked_sgd_(params: list[torch.Tensor], grads: list[torch.Tensor], selectors: list[torch.Tensor | None],
                momentum_buffers: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, momentum: float = 0.0,
                dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
    """One SGD step of every param, in place, at the entries its selector chooses (see `masked_adamw_`).

    torch.optim.SGD's formulas: weight decay added to the gradient, then momentum (the buffer starts
    as the gradient on an entry's first step), optionally Nesterov. momentum_buffers is empty when
    momentum == 0.
    """
    if not params:
        return
    args = (params, grads, selectors, momentum_buffers if momentum != 0 else [], steps, float(lr), float(momentum),
            float(dampening), float(weight_decay), bool(nesterov), grad_scale, found_inf)
    backend = _common.backend_for("masked_sgd_", params[0].device)
    if backend == "reference":
        masked_sgd_reference(*args)
    elif backend == "triton":
        from ..triton.optim import triton_masked_sgd_

        states = {"momentum_buffers": args[3]} if momentum != 0 else {}
        check_masked_step("masked_sgd_", params, grads, selectors, states, steps, [], grad_scale, found_inf,
                          read_data=not torch.compiler.is_compiling())
        triton_masked_sgd_(*args)
    else:
        torch.ops.xlsparse.masked_sgd_(*args)
        _common.mark_written([*params, *args[3], *steps])


# --- multi_mask_weight_grad ---

def check_multi_mask_weight_grad(grad_out, input, masks, order, offsets, read_data: bool = True) -> None:
    """The Python twin of check_multi_mask_weight_grad in csrc/include/xlsparse/optim.h."""
    op = "multi_mask_weight_grad"
    if grad_out.dim() != 2 or input.dim() != 2 or grad_out.shape[0] != input.shape[0]:
        raise ValueError(f"{op}: grad_out [T, O] and input [T, I] must be 2-D with the same T, got "
                         f"{tuple(grad_out.shape)} and {tuple(input.shape)}")
    if not input.is_floating_point() or grad_out.dtype != input.dtype:
        raise TypeError(f"{op}: grad_out and input must share one floating dtype, got {grad_out.dtype} and {input.dtype}")
    if masks.dtype != torch.bool:
        raise TypeError(f"{op}: masks must be bool, got {masks.dtype}")
    if masks.dim() != 3 or masks.shape[1] != grad_out.shape[1] or masks.shape[2] != input.shape[1]:
        raise ValueError(f"{op}: masks must have shape [L, {grad_out.shape[1]}, {input.shape[1]}], got {tuple(masks.shape)}")
    if order.dtype != torch.int64 or offsets.dtype != torch.int64:
        raise TypeError(f"{op}: order and offsets must be int64")
    if order.dim() != 1 or offsets.dim() != 1 or offsets.numel() != masks.shape[0] + 1:
        raise ValueError(f"{op}: order must be 1-D and offsets must have L + 1 = {masks.shape[0] + 1} entries, got "
                         f"{tuple(offsets.shape)}")
    for name, t in (("input", input), ("masks", masks), ("order", order), ("offsets", offsets)):
        if t.device != grad_out.device:
            raise ValueError(f"{op}: {name} is on device {t.device} but grad_out on {grad_out.device}")
    if not read_data:
        return
    off = offsets.tolist()
    if off[0] < 0 or any(a > b for a, b in zip(off, off[1:])) or off[-1] > order.numel():
        raise ValueError(f"{op}: offsets must be non-decreasing inside [0, {order.numel()}]")
    if order.numel():
        lo, hi = int(order.min()), int(order.max())
        if lo < 0 or hi >= input.shape[0]:
            raise IndexError(f"{op}: order holds token {lo if lo < 0 else hi}, outside [0, {input.shape[0]})")


def multi_mask_weight_grad_reference(grad_out, input, masks, order, offsets) -> torch.Tensor:
    """Pure-PyTorch multi_mask_weight_grad: one masked product per language, in the accumulation dtype."""
    check_multi_mask_weight_grad(grad_out, input, masks, order, offsets)
    acc = _common.acc_dtype(input.dtype)
    dw = torch.zeros(grad_out.shape[1], input.shape[1], dtype=acc, device=input.device)
    off = offsets.tolist()
    for lang in range(masks.shape[0]):
        tokens = order[off[lang]:off[lang + 1]]
        if tokens.numel():
            part = grad_out[tokens].to(acc).t() @ input[tokens].to(acc)
            dw += torch.where(masks[lang], part, 0)
    return dw.to(input.dtype)


def _multi_mask_weight_grad_fake(grad_out, input, masks, order, offsets):
    check_multi_mask_weight_grad(grad_out, input, masks, order, offsets, read_data=False)
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
        if d_grad_out is not None:
            d_grad_out[tokens] = input[tokens] @ masked.t()
        if d_input is not None:
            d_input[tokens] = grad_out[tokens] @ masked
    return d_grad_out, d_input, None, None, None


if _ext.loaded():
    torch.library.register_fake("xlsparse::multi_mask_weight_grad")(_multi_mask_weight_grad_fake)
    torch.library.register_autograd("xlsparse::multi_mask_weight_grad", _multi_mask_weight_grad_backward,
                                    setup_context=_multi_mask_weight_grad_setup)


def multi_mask_weight_grad(grad_out: torch.Tensor, input: torch.Tensor, masks: torch.Tensor, order: torch.Tensor,
                           offsets: torch.Tensor) -> torch.Tensor:
    """dW = Σ_l masks[l] ⊙ (grad_out[tokens_l]ᵀ input[tokens_l]) in one pass, [O, I].

    grad_out [T, O], input [T, I], masks [L, O, I] bool; language l owns the token positions
    `order[offsets[l]:offsets[l + 1]]` (as in `xlsparse.routing.TokenGroups`); tokens in no group
    contribute nothing. No dense gradient per language is formed.
    """
    backend = _common.backend_for("multi_mask_weight_grad", grad_out.device)
    if backend == "reference":
        return multi_mask_weight_grad_reference(grad_out, input, masks, order, offsets)
    if backend == "triton":
        from ..triton.optim import triton_multi_mask_weight_grad

        check_multi_mask_weight_grad(grad_out, input, masks, order, offsets,
                                     read_data=not torch.compiler.is_compiling())
        return triton_multi_mask_weight_grad(grad_out, input, masks, order, offsets)
    return torch.ops.xlsparse.multi_mask_weight_grad(grad_out, input, masks, order, offsets)
