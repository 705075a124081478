"""Triton kernels of the optim family: kernels, then launchers registered as torch ops.

The formulas are those of csrc/include/xlsparse/optim.h (torch.optim.AdamW / SGD). A step launches
one kernel per parameter; each program handles BLOCK state entries of one selection kind.
"""
import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..ops import registry
from .common import INTERPRET, acc_type

SEL_ALL, SEL_MASK, SEL_INDICES = 0, 1, 2


@triton.jit
def _selected(sel_ptr, found_inf_ptr, n, BLOCK: tl.constexpr, SEL: tl.constexpr, HAS_INF: tl.constexpr):
    """State offsets of this program, the flat param positions they map to, and which are live."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    pos = offs
    if SEL == 1:
        live = live & (tl.load(sel_ptr + offs, mask=live, other=0) != 0)
    if SEL == 2:
        pos = tl.load(sel_ptr + offs, mask=live, other=0).to(tl.int64)
    if HAS_INF:  # AMP: an inf somewhere in the grads skips the whole step
        live = live & ((tl.zeros([BLOCK], dtype=tl.float32) + tl.load(found_inf_ptr)) == 0)
    return offs, pos, live


@triton.jit
def _step_count(step_ptr, offs, live, OWN_STEP: tl.constexpr, ACC: tl.constexpr):
    """The count after this step; per-entry counts are advanced here, a shared one by the launcher.
    One return: the GPU compiler types every return of a function, the untaken one included, and a
    block and a scalar do not match (the interpreter never saw it)."""
    if OWN_STEP:
        t = tl.load(step_ptr + offs, mask=live, other=0) + 1
        tl.store(step_ptr + offs, t, mask=live)
        t = t.to(ACC)
    else:
        t = tl.load(step_ptr).to(ACC) + 1
    return t


@triton.jit
def _one_minus_pow(log_beta, t, ACC: tl.constexpr):
    """1 − β^t in float64, rounded once to ACC: 1 − exp(t log β) in fp32 cancels when β^t is near 1
    (β2 = 0.999 at t = 1: 7e-6 relative off, 8e-5 at 0.9999). log_beta is the float64 hyper-parameter."""
    return (1 - tl.exp(t.to(tl.float64) * log_beta)).to(ACC)


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """IEEE square root: fp32 `tl.sqrt` compiles to sqrt.approx.ftz (flushes denormals, not
    torch's or the CUDA kernel's sqrt); float64's is IEEE already."""
    if ACC == tl.float32:
        r = tl.sqrt_rn(x)
    else:
        r = tl.sqrt(x)
    return r


@triton.jit
def _div(x, y, ACC: tl.constexpr):
    """IEEE division: fp32 `/` compiles to div.full (2 ulp); float64's is IEEE already."""
    if ACC == tl.float32:
        r = tl.div_rn(x, y)
    else:
        r = x / y
    return r


@triton.jit
def _masked_adamw_kernel(p_ptr, g_ptr, sel_ptr, m_ptr, v_ptr, vmax_ptr, init_ptr, step_ptr, hp_ptr, scale_ptr,
                         found_inf_ptr, n, BLOCK: tl.constexpr, SEL: tl.constexpr, OWN_STEP: tl.constexpr,
                         AMSGRAD: tl.constexpr, L1: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
                         ACC: tl.constexpr):
    offs, pos, live = _selected(sel_ptr, found_inf_ptr, n, BLOCK, SEL, HAS_INF)
    # hyper-parameters travel as float64 so that float64 params are not stepped with fp32-rounded ones
    lr = tl.load(hp_ptr + 0).to(ACC)
    beta2 = tl.load(hp_ptr + 2).to(ACC)
    eps = tl.load(hp_ptr + 3).to(ACC)
    decay = tl.load(hp_ptr + 4).to(ACC)
    l1 = tl.load(hp_ptr + 5).to(ACC)
    log_beta1 = tl.load(hp_ptr + 6)  # float64: see _one_minus_pow
    log_beta2 = tl.load(hp_ptr + 7)
    one_minus_beta1 = tl.load(hp_ptr + 1).to(ACC)  # 1 − β from float64: 1 − fp32(0.999) is 1.3e-5 off
    one_minus_beta2 = tl.load(hp_ptr + 8).to(ACC)
    t = _step_count(step_ptr, offs, live, OWN_STEP, ACC)
    step_size = _div(lr, _one_minus_pow(log_beta1, t, ACC), ACC)
    bias2_sqrt = _sqrt(_one_minus_pow(log_beta2, t, ACC), ACC)

    p = tl.load(p_ptr + pos, mask=live, other=0.0).to(ACC)
    g = tl.load(g_ptr + pos, mask=live, other=0.0).to(ACC)
    m = tl.load(m_ptr + offs, mask=live, other=0.0).to(ACC)
    v = tl.load(v_ptr + offs, mask=live, other=0.0).to(ACC)
    if HAS_SCALE:
        g = _div(g, tl.load(scale_ptr).to(ACC), ACC)
    if L1:
        diff = p - tl.load(init_ptr + offs, mask=live, other=0.0).to(ACC)
        g = g + l1 * ((diff > 0).to(ACC) - (diff < 0).to(ACC))
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    second = v
    if AMSGRAD:
        vmax = tl.load(vmax_ptr + offs, mask=live, other=0.0).to(ACC)
        vmax = tl.where((vmax > v) | (vmax != vmax), vmax, v)
        tl.store(vmax_ptr + offs, vmax.to(vmax_ptr.dtype.element_ty), mask=live)
        second = vmax
    p = p - _div(step_size * m, _div(_sqrt(second, ACC), bias2_sqrt, ACC) + eps, ACC)
    tl.store(p_ptr + pos, p.to(p_ptr.dtype.element_ty), mask=live)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=live)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=live)


@triton.jit
def _masked_sgd_kernel(p_ptr, g_ptr, sel_ptr, buf_ptr, step_ptr, hp_ptr, scale_ptr, found_inf_ptr, n,
                       BLOCK: tl.constexpr, SEL: tl.constexpr, OWN_STEP: tl.constexpr, MOMENTUM: tl.constexpr,
                       NESTEROV: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, ACC: tl.constexpr):
    offs, pos, live = _selected(sel_ptr, found_inf_ptr, n, BLOCK, SEL, HAS_INF)
    lr = tl.load(hp_ptr + 0).to(ACC)
    momentum = tl.load(hp_ptr + 1).to(ACC)
    one_minus_dampening = tl.load(hp_ptr + 2).to(ACC)
    weight_decay = tl.load(hp_ptr + 3).to(ACC)
    t = _step_count(step_ptr, offs, live, OWN_STEP, ACC)
    p = tl.load(p_ptr + pos, mask=live, other=0.0).to(ACC)
    g = tl.load(g_ptr + pos, mask=live, other=0.0).to(ACC)
    if HAS_SCALE:
        g = _div(g, tl.load(scale_ptr).to(ACC), ACC)
    g = tl.where(weight_decay != 0, g + weight_decay * p, g)  # as torch: no 0 * inf = NaN
    if MOMENTUM:
        buf = tl.load(buf_ptr + offs, mask=live, other=0.0).to(ACC)
        buf = tl.where(t == 1, g, buf * momentum + one_minus_dampening * g)  # first step: the gradient
        tl.store(buf_ptr + offs, buf.to(buf_ptr.dtype.element_ty), mask=live)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    tl.store(p_ptr + pos, (p - lr * g).to(p_ptr.dtype.element_ty), mask=live)


@triton.jit
def _multi_mask_weight_grad_kernel(dy_ptr, x_ptr, masks_ptr, order_ptr, offsets_ptr, out_ptr, num_ids, rows, cols,
                                   stride_dy, stride_x, BO: tl.constexpr, BI: tl.constexpr, BT: tl.constexpr,
                                   ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One [BO, BI] tile of dW: per language, the tile of dY_lᵀ X_l over its tokens, added under
    the language's mask. The grid depends on the shape only, not on the routing."""
    o = tl.program_id(0) * BO + tl.arange(0, BO)
    i = tl.program_id(1) * BI + tl.arange(0, BI)
    o_live = o < rows
    i_live = i < cols
    acc = tl.zeros((BO, BI), dtype=ACC)
    for lang in range(num_ids):
        start = tl.load(offsets_ptr + lang)
        end = tl.load(offsets_ptr + lang + 1)
        part = tl.zeros((BO, BI), dtype=ACC)
        for t0 in range(start, end, BT):
            t = t0 + tl.arange(0, BT)
            t_live = t < end
            tok = tl.load(order_ptr + t, mask=t_live, other=0)
            dy = tl.load(dy_ptr + tok[:, None] * stride_dy + o[None, :], mask=t_live[:, None] & o_live[None, :],
                         other=0.0)
            x = tl.load(x_ptr + tok[:, None] * stride_x + i[None, :], mask=t_live[:, None] & i_live[None, :],
                        other=0.0)
            if UPCAST:  # the interpreter's bf16/fp16 dot is wrong; on a GPU half types use tensor cores
                dy = dy.to(ACC)
                x = x.to(ACC)
            part += tl.dot(tl.trans(dy), x, input_precision=PRECISION, out_dtype=ACC)
        m = tl.load(masks_ptr + (lang * rows + o[:, None]).to(tl.int64) * cols + i[None, :],
                    mask=o_live[:, None] & i_live[None, :], other=0)
        acc += tl.where(m != 0, part, 0.0)
    tl.store(out_ptr + o[:, None].to(tl.int64) * cols + i[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=o_live[:, None] & i_live[None, :])


# --- launchers ---

BLOCK = 4096 if INTERPRET else 1024  # state entries per program
def _sel_kind(selector: torch.Tensor | None) -> int:
    if selector is None:
        return SEL_ALL
    return SEL_MASK if selector.dtype == torch.bool else SEL_INDICES


def _advance_shared_steps(steps: list[torch.Tensor], found_inf: torch.Tensor | None) -> None:
    """Shared counts advance by one unless the step was skipped; no host sync."""
    shared = [s for s in steps if s.dtype == torch.float32]
    if shared:
        torch._foreach_add_(shared, 1.0 if found_inf is None else (found_inf == 0).float().reshape(()))


@triton_op("xlsparse::triton_masked_adamw_",
           mutates_args={"params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"})
def triton_masked_adamw_(params: list[torch.Tensor], grads: list[torch.Tensor],
                         selectors: list[torch.Tensor | None], exp_avgs: list[torch.Tensor],
                         exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor],
                         steps: list[torch.Tensor], inits: list[torch.Tensor | None], lr: float, beta1: float,
                         beta2: float, eps: float, weight_decay: float, l1_to_init: float, amsgrad: bool,
                         grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
    if not params:
        return
    device = params[0].device
    hp = torch.tensor([lr, 1 - beta1, beta2, eps, 1 - lr * weight_decay, l1_to_init,
                       math.log(beta1) if beta1 > 0 else -math.inf, math.log(beta2) if beta2 > 0 else -math.inf,
                       1 - beta2],
                      dtype=torch.float64, device=device)
    for i, p in enumerate(params):
        sel = selectors[i]
        n = sel.numel() if _sel_kind(sel) == SEL_INDICES else p.numel()
        if n == 0:
            continue
        wrap_triton(_masked_adamw_kernel)[(triton.cdiv(n, BLOCK),)](
            p, grads[i], p if sel is None else sel, exp_avgs[i], exp_avg_sqs[i],
            max_exp_avg_sqs[i] if amsgrad else p, inits[i] if l1_to_init != 0 else p, steps[i], hp,
            p if grad_scale is None else grad_scale, p if found_inf is None else found_inf, n,
            BLOCK=BLOCK, SEL=_sel_kind(sel), OWN_STEP=steps[i].dtype == torch.int32, AMSGRAD=amsgrad,
            L1=l1_to_init != 0, HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
            ACC=acc_type(p.dtype))
    _advance_shared_steps(steps, found_inf)


@triton_masked_adamw_.register_fake
def _triton_masked_adamw_fake(*args, **kwargs):
    return None


@triton_op("xlsparse::triton_masked_sgd_", mutates_args={"params", "momentum_buffers", "steps"})
def triton_masked_sgd_(params: list[torch.Tensor], grads: list[torch.Tensor], selectors: list[torch.Tensor | None],
                       momentum_buffers: list[torch.Tensor], steps: list[torch.Tensor], lr: float, momentum: float,
                       dampening: float, weight_decay: float, nesterov: bool, grad_scale: torch.Tensor | None = None,
                       found_inf: torch.Tensor | None = None) -> None:
    if not params:
        return
    device = params[0].device
    hp = torch.tensor([lr, momentum, 1 - dampening, weight_decay], dtype=torch.float64, device=device)
    for i, p in enumerate(params):
        sel = selectors[i]
        n = sel.numel() if _sel_kind(sel) == SEL_INDICES else p.numel()
        if n == 0:
            continue
        wrap_triton(_masked_sgd_kernel)[(triton.cdiv(n, BLOCK),)](
            p, grads[i], p if sel is None else sel, momentum_buffers[i] if momentum != 0 else p, steps[i], hp,
            p if grad_scale is None else grad_scale, p if found_inf is None else found_inf, n,
            BLOCK=BLOCK, SEL=_sel_kind(sel), OWN_STEP=steps[i].dtype == torch.int32, MOMENTUM=momentum != 0,
            NESTEROV=nesterov, HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
            ACC=acc_type(p.dtype))
    _advance_shared_steps(steps, found_inf)


@triton_masked_sgd_.register_fake
def _triton_masked_sgd_fake(*args, **kwargs):
    return None


@triton_op("xlsparse::triton_multi_mask_weight_grad", mutates_args={})
def triton_multi_mask_weight_grad(grad_out: torch.Tensor, input: torch.Tensor, masks: torch.Tensor,
                                  order: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    rows, cols = grad_out.shape[1], input.shape[1]
    out = torch.empty(rows, cols, dtype=input.dtype, device=input.device)
    if out.numel() == 0:
        return out
    dy = grad_out if grad_out.stride(1) == 1 else grad_out.contiguous()
    x = input if input.stride(1) == 1 else input.contiguous()
    block = 64
    grid = (triton.cdiv(rows, block), triton.cdiv(cols, block))
    wrap_triton(_multi_mask_weight_grad_kernel)[grid](
        dy, x, masks.contiguous(), order, offsets, out, masks.shape[0], rows, cols, dy.stride(0), x.stride(0),
        BO=block, BI=block, BT=32, ACC=acc_type(input.dtype),
        PRECISION="ieee", UPCAST=INTERPRET)  # fp32 products in IEEE fp32, not TF32: the op must match the per-language loop
    return out


@triton_multi_mask_weight_grad.register_fake
def _triton_multi_mask_weight_grad_fake(grad_out, input, masks, order, offsets):
    return grad_out.new_empty(grad_out.shape[1], input.shape[1])


registry.register("masked_adamw_", "triton", triton_masked_adamw_)
registry.register("masked_sgd_", "triton", triton_masked_sgd_)
registry.register("multi_mask_weight_grad", "triton", triton_multi_mask_weight_grad)
