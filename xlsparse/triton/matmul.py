"""Triton kernels of the matmul family: SDDMM, SpMM and expert-ensemble mixing.

Kernels first, then the launchers registered as torch ops. Launch grids depend only on shapes
(K entries, the token list's length, T), never on routing data: a program reads its token range
from `token_bounds` on the device and masks what lies outside it, as vLLM's LoRA kernels do.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..ops import registry
from .common import INTERPRET, acc_type

# --- SDDMM / SpMM ---


@triton.jit
def _token_range(index_len, num_tokens, bounds_ptr, HAS_INDEX: tl.constexpr, HAS_BOUNDS: tl.constexpr):
    if HAS_BOUNDS:
        begin = tl.load(bounds_ptr).to(tl.int64)
        end = tl.load(bounds_ptr + 1).to(tl.int64)
    elif HAS_INDEX:
        begin = tl.zeros((), tl.int64)
        end = tl.zeros((), tl.int64) + index_len
    else:
        begin = tl.zeros((), tl.int64)
        end = tl.zeros((), tl.int64) + num_tokens
    return begin, end


@triton.jit
def _sddmm_kernel(a_ptr, b_ptr, idx_ptr, out_ptr, tok_ptr, bounds_ptr, scale_ptr, k, rows, cols, num_tokens, index_len,
                  HAS_INDEX: tl.constexpr, HAS_BOUNDS: tl.constexpr, HAS_SCALE: tl.constexpr,
                  BN: tl.constexpr, BT: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    live = offs < k
    flat = tl.load(idx_ptr + offs, mask=live, other=0).to(tl.int64)
    r = flat // cols
    c = flat % cols
    begin, end = _token_range(index_len, num_tokens, bounds_ptr, HAS_INDEX, HAS_BOUNDS)
    # Kahan-compensated over the token blocks: summed plainly, 128 blocks of 32 tokens (T = 4099)
    # failed the float64 comparison on an H200; under the interpreter 257 blocks were 3.3x further
    # from float64 than torch's pairwise sum.
    acc = tl.zeros((BN,), ACC)
    lost = tl.zeros((BN,), ACC)
    for j0 in range(begin, end, BT):
        j = j0 + tl.arange(0, BT)
        tlive = j < end
        if HAS_INDEX:
            t = tl.load(tok_ptr + j, mask=tlive, other=0).to(tl.int64)
        else:
            t = j.to(tl.int64)
        m = tlive[:, None] & live[None, :]
        a = tl.load(a_ptr + t[:, None] * rows + r[None, :], mask=m, other=0.0).to(ACC)
        b = tl.load(b_ptr + t[:, None] * cols + c[None, :], mask=m, other=0.0).to(ACC)
        if HAS_SCALE:
            s = tl.load(scale_ptr + t, mask=tlive, other=0.0).to(ACC)
            b = b * s[:, None]
        part = tl.sum(a * b, axis=0) - lost
        total = acc + part
        lost = (total - acc) - part
        acc = total
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=live)


# CUDA's limit on a grid's second axis: SpMM's token blocks past it loop inside the programs.
MAX_GRID_1 = 65535


@triton.jit
def _spmm_kernel(out_ptr, x_ptr, idx_ptr, val_ptr, tok_ptr, bounds_ptr, scale_ptr, k, groups, xcols, dcols, num_tokens,
                 index_len, TRANSPOSE: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_BOUNDS: tl.constexpr,
                 HAS_SCALE: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    live = offs < k
    flat = tl.load(idx_ptr + offs, mask=live, other=0).to(tl.int64)
    if TRANSPOSE:
        g = flat % dcols
        other = flat // dcols
    else:
        g = flat // dcols
        other = flat % dcols
    val = tl.load(val_ptr + offs, mask=live, other=0.0).to(ACC)
    begin, end = _token_range(index_len, num_tokens, bounds_ptr, HAS_INDEX, HAS_BOUNDS)
    # token blocks stride by the programs on axis 1, which the launch caps at MAX_GRID_1
    for block in range(tl.program_id(1), tl.cdiv(end - begin, BT), tl.num_programs(1)):
        j = begin + (block + tl.zeros((), tl.int64)) * BT + tl.arange(0, BT)  # int64 (an int in the interpreter)
        tlive = j < end
        if HAS_INDEX:
            t = tl.load(tok_ptr + j, mask=tlive, other=0).to(tl.int64)
        else:
            t = j
        m = tlive[:, None] & live[None, :]
        xv = tl.load(x_ptr + t[:, None] * xcols + other[None, :], mask=m, other=0.0).to(ACC)
        contrib = xv * val[None, :]
        if HAS_SCALE:
            contrib = contrib * tl.load(scale_ptr + t, mask=tlive, other=0.0).to(ACC)[:, None]
        tl.atomic_add(out_ptr + t[:, None] * groups + g[None, :], contrib, mask=m)


def _selection(x, token_index, token_bounds, token_scale):
    """Pointer stand-ins and flags for the optional token selection tensors (the kernels read them
    as flat arrays, hence contiguous)."""
    dummy = x
    return (
        dummy if token_index is None else token_index.contiguous(),
        dummy if token_bounds is None else token_bounds.contiguous(),
        dummy if token_scale is None else token_scale.contiguous(),
        dict(HAS_INDEX=token_index is not None, HAS_BOUNDS=token_bounds is not None, HAS_SCALE=token_scale is not None),
        x.shape[0] if token_index is None else token_index.numel(),
    )


@triton_op("xlsparse::triton_sddmm", mutates_args=())
def triton_sddmm(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, token_index: torch.Tensor | None,
                 token_bounds: torch.Tensor | None, token_scale: torch.Tensor | None) -> torch.Tensor:
    k = indices.numel()
    out = torch.empty(k, dtype=x.dtype, device=x.device)
    if k == 0:
        return out
    a, b, indices = grad_out.contiguous(), x.contiguous(), indices.contiguous()
    tok, bounds, scale, flags, index_len = _selection(x, token_index, token_bounds, token_scale)
    bn, bt = (1024, 64) if INTERPRET else (64, 32)
    wrap_triton(_sddmm_kernel)[(triton.cdiv(k, bn),)](
        a, b, indices, out, tok, bounds, scale, k, a.shape[1], b.shape[1], x.shape[0], index_len,
        BN=bn, BT=bt, ACC=acc_type(x.dtype), **flags)
    return out


@triton_sddmm.register_fake
def _triton_sddmm_fake(grad_out, x, indices, token_index, token_bounds, token_scale):
    return x.new_empty(indices.shape)


@triton_op("xlsparse::triton_spmm_", mutates_args={"out"})
def triton_spmm_(out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                 token_index: torch.Tensor | None, token_bounds: torch.Tensor | None, token_scale: torch.Tensor | None,
                 transpose: bool) -> None:
    k = indices.numel()
    if k == 0 or x.shape[0] == 0:
        return
    groups, xcols = out.shape[1], x.shape[1]
    xc, indices, values = x.contiguous(), indices.contiguous(), values.contiguous()
    # The entries' products gather by atomics into a zeroed wide buffer that is added to `out`
    # once, so each output element is rounded once (float64 adds in place).
    wide = out.dtype == torch.float64
    target = out if wide else torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    tok, bounds, scale, flags, index_len = _selection(x, token_index, token_bounds, token_scale)
    bn, bt = (256, 256) if INTERPRET else (64, 32)
    grid = (triton.cdiv(k, bn), min(triton.cdiv(index_len, bt), MAX_GRID_1))
    wrap_triton(_spmm_kernel)[grid](
        target, xc, indices, values, tok, bounds, scale, k, groups, xcols, groups if transpose else xcols,
        x.shape[0], index_len, TRANSPOSE=transpose, BN=bn, BT=bt, ACC=acc_type(x.dtype), **flags)
    if not wide:
        # Added where a selected token meets a column that an entry reaches; every other element
        # keeps its bits (−0.0, NaN payloads), as on the CPU. On the device: no host sync.
        reached = torch.zeros(groups, dtype=torch.bool, device=out.device)
        reached[indices.long() % groups if transpose else indices.long() // xcols] = True
        keep = _selected_rows(out.shape[0], token_index, token_bounds, out.device)[:, None] & reached[None, :]
        out.copy_(torch.where(keep, (out.float() + target).to(out.dtype), out))


def _selected_rows(num_tokens: int, token_index, token_bounds, device) -> torch.Tensor:
    """Bool [T]: the tokens of the selection (token_index[token_bounds[0]:token_bounds[1]])."""
    if token_index is None:
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    live = torch.ones(token_index.numel(), dtype=torch.int32, device=device)
    if token_bounds is not None:
        j = torch.arange(token_index.numel(), device=device)
        live = ((j >= token_bounds[0]) & (j < token_bounds[1])).int()
    return torch.zeros(num_tokens, dtype=torch.int32, device=device).index_add_(0, token_index.long(), live) > 0


@triton_spmm_.register_fake
def _triton_spmm_fake(out, x, indices, values, token_index, token_bounds, token_scale, transpose):
    return None


# --- expert-ensemble mixing: one program per token ---


@triton.jit
def _lse_step(m, s, z):
    """One block z of an online logsumexp: the running max m and the sum s of exp(· − m).
    While every class so far is banned (all −inf), shift by 0, not by −inf: exp(−inf − (−inf)) is NaN
    and would poison the sum of every later block."""
    new_m = tl.maximum(m, tl.max(z, 0))
    shift = tl.where(new_m == float("-inf"), 0.0, new_m)
    return new_m, s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), 0)


@triton.jit
def _row_lse(z_ptr, V, BV: tl.constexpr, ACC: tl.constexpr):
    """log Σ_v exp(z[v]) of one row, online over blocks."""
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    for v0 in range(0, V, BV):
        v = v0 + tl.arange(0, BV)
        z = tl.load(z_ptr + v, mask=v < V, other=float("-inf")).to(ACC)
        m, s = _lse_step(m, s, z)
    return tl.where(m == float("-inf"), m, m + tl.log(s))  # a row banning every class: −inf, not NaN


@triton.jit
def _mixed_block(z_ptr, lw_ptr, t, T, E, V, v, ACC: tl.constexpr):
    """Σ_e w_e z_e[t, v] for a block of classes v (logit-space mixing); an expert of weight 0
    (dropped by top-k) adds nothing, even where its logits are ±inf."""
    zbar = tl.zeros(v.shape, ACC)
    for e in range(E):
        w = tl.exp(tl.load(lw_ptr + t * E + e).to(ACC))
        zbar += _times_nonzero(w, tl.load(z_ptr + (e * T + t) * V + v, mask=v < V, other=0.0).to(ACC))
    return zbar


@triton.jit
def _times_nonzero(w, z):
    """w · z with 0 · (±inf) = 0 (times_nonzero in matmul.h)."""
    return tl.where(w == 0, 0.0, w * z)


@triton.jit
def _prob_mixture_block(z_ptr, lw_ptr, lse_ptr, t, T, E, V, v, ACC: tl.constexpr):
    """log Σ_e exp(lw_e + z_e[t, v] − lse_e) for a block of classes v (prob-space mixing), online
    over the experts: the forward's log-probs, which the backward recomputes in ACC rather than read
    the output rounded to the logits' dtype (bf16 near −10: a 0.0625 grid, ~1% off in the posterior)."""
    m = tl.full(v.shape, float("-inf"), ACC)
    s = tl.zeros(v.shape, ACC)
    for e in range(E):
        c = tl.load(lw_ptr + t * E + e).to(ACC) - tl.load(lse_ptr + e * T + t)
        x = tl.load(z_ptr + (e * T + t) * V + v, mask=v < V, other=0.0).to(ACC) + c
        new_m = tl.maximum(m, x)
        # a class every expert bans so far (all −inf): shift by 0, not by −inf (NaN)
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = new_m
    return m + tl.log(s)


@triton.jit
def _logprobs_kernel(z_ptr, lw_ptr, out_ptr, lse_ptr, T, E, V, PROB: tl.constexpr, BV: tl.constexpr,
                     ACC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    if PROB:
        for e in range(E):
            tl.store(lse_ptr + e * T + t, _row_lse(z_ptr + (e * T + t) * V, V, BV, ACC))
        # every thread reads back the scalars just stored: a store and a load of one global address
        # are not ordered across a program's threads on a GPU without a barrier
        tl.debug_barrier()
        for v0 in range(0, V, BV):
            v = v0 + tl.arange(0, BV)
            o = _prob_mixture_block(z_ptr, lw_ptr, lse_ptr, t, T, E, V, v, ACC)
            tl.store(out_ptr + t * V + v, o.to(out_ptr.dtype.element_ty), mask=v < V)
    else:
        m = tl.full((), float("-inf"), ACC)
        s = tl.zeros((), ACC)
        for v0 in range(0, V, BV):
            v = v0 + tl.arange(0, BV)
            zbar = _mixed_block(z_ptr, lw_ptr, t, T, E, V, v, ACC)
            zbar = tl.where(v < V, zbar, float("-inf"))
            m, s = _lse_step(m, s, zbar)
        lse = m + tl.log(s)
        tl.store(lse_ptr + t, lse)
        for v0 in range(0, V, BV):
            v = v0 + tl.arange(0, BV)
            zbar = _mixed_block(z_ptr, lw_ptr, t, T, E, V, v, ACC)
            tl.store(out_ptr + t * V + v, (zbar - lse).to(out_ptr.dtype.element_ty), mask=v < V)


@triton.jit
def _logprobs_backward_kernel(g_ptr, z_ptr, lw_ptr, lse_ptr, dz_ptr, dlw_ptr, T, E, V, PROB: tl.constexpr,
                              BV: tl.constexpr, BE: tl.constexpr, ACC: tl.constexpr):
    """The saved output is not read: rounded to the logits' dtype it put the posterior (prob) and the
    softmax (logit) ~1% off in bf16. Each block of classes recomputes the forward's log-probs in ACC
    from every expert's logits, once for all experts: the per-expert sums S live in a [BE] vector."""
    t = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BE)
    S = tl.zeros((BE,), ACC)  # per expert: Σ_v g · posterior (prob), Σ_v d · z_e (logit)
    if PROB:
        for v0 in range(0, V, BV):
            v = v0 + tl.arange(0, BV)
            live = v < V
            o = _prob_mixture_block(z_ptr, lw_ptr, lse_ptr, t, T, E, V, v, ACC)
            o = tl.where(o == float("-inf"), float("inf"), o)  # a class every expert bans: posterior 0
            g = tl.load(g_ptr + t * V + v, mask=live, other=0.0).to(ACC)
            for e in range(E):
                c = tl.load(lw_ptr + t * E + e).to(ACC) - tl.load(lse_ptr + e * T + t)
                z = tl.load(z_ptr + (e * T + t) * V + v, mask=live, other=0.0).to(ACC)
                S += tl.where(experts == e, tl.sum(tl.where(live, g * tl.exp(z + c - o), 0.0), 0), 0.0)
        for v0 in range(0, V, BV):
            v = v0 + tl.arange(0, BV)
            live = v < V
            o = _prob_mixture_block(z_ptr, lw_ptr, lse_ptr, t, T, E, V, v, ACC)
            o = tl.where(o == float("-inf"), float("inf"), o)
            g = tl.load(g_ptr + t * V + v, mask=live, other=0.0).to(ACC)
            for e in range(E):
                lse = tl.load(lse_ptr + e * T + t)
                c = tl.load(lw_ptr + t * E + e).to(ACC) - lse
                S_e = tl.sum(tl.where(experts == e, S, 0.0), 0)
                z = tl.load(z_ptr + (e * T + t) * V + v, mask=live, other=0.0).to(ACC)
                dz = g * tl.exp(z + c - o) - tl.exp(z - lse) * S_e
                tl.store(dz_ptr + (e * T + t) * V + v, dz.to(dz_ptr.dtype.element_ty), mask=live)
        tl.store(dlw_ptr + t * E + experts, S.to(dlw_ptr.dtype.element_ty), mask=experts < E)
    else:
        lse = tl.load(lse_ptr + t)
        G = tl.zeros((), ACC)
        for v0 in range(0, V, BV):
            v = v0 + tl.arange(0, BV)
            G += tl.sum(tl.load(g_ptr + t * V + v, mask=v < V, other=0.0).to(ACC), 0)
        for v0 in range(0, V, BV):
            v = v0 + tl.arange(0, BV)
            live = v < V
            g = tl.load(g_ptr + t * V + v, mask=live, other=0.0).to(ACC)
            # the gradient of the mixed logits, with the forward's log-probs recomputed as zbar − lse
            d = g - tl.exp(_mixed_block(z_ptr, lw_ptr, t, T, E, V, v, ACC) - lse) * G
            for e in range(E):
                w = tl.exp(tl.load(lw_ptr + t * E + e).to(ACC))
                z = tl.load(z_ptr + (e * T + t) * V + v, mask=live, other=0.0).to(ACC)
                S += tl.where(experts == e, tl.sum(tl.where(live & (d != 0), d * z, 0.0), 0), 0.0)  # 0 · (−inf) counts 0
                tl.store(dz_ptr + (e * T + t) * V + v, (w * d).to(dz_ptr.dtype.element_ty), mask=live)
        w = tl.exp(tl.load(lw_ptr + t * E + experts, mask=experts < E, other=0.0).to(ACC))
        tl.store(dlw_ptr + t * E + experts, _times_nonzero(w, S).to(dlw_ptr.dtype.element_ty), mask=experts < E)


@triton.jit
def _nll_kernel(z_ptr, lw_ptr, y_ptr, nll_ptr, lse_ptr, T, E, V, PROB: tl.constexpr, BV: tl.constexpr,
                ACC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    y = tl.load(y_ptr + t).to(tl.int64)
    if PROB:
        mix = tl.full((), float("-inf"), ACC)
        for e in range(E):
            lse = _row_lse(z_ptr + (e * T + t) * V, V, BV, ACC)
            tl.store(lse_ptr + e * T + t, lse)
            x = tl.load(lw_ptr + t * E + e).to(ACC) + tl.load(z_ptr + (e * T + t) * V + y).to(ACC) - lse
            hi = tl.maximum(mix, x)
            shift = tl.where(hi == float("-inf"), 0.0, hi)  # the target banned by every expert so far
            mix = shift + tl.log(tl.exp(mix - shift) + tl.exp(x - shift))
        nll = -mix
    else:
        m = tl.full((), float("-inf"), ACC)
        s = tl.zeros((), ACC)
        for v0 in range(0, V, BV):
            v = v0 + tl.arange(0, BV)
            zbar = tl.where(v < V, _mixed_block(z_ptr, lw_ptr, t, T, E, V, v, ACC), float("-inf"))
            m, s = _lse_step(m, s, zbar)
        lse = m + tl.log(s)
        tl.store(lse_ptr + t, lse)
        zy = tl.zeros((), ACC)
        for e in range(E):
            zy += _times_nonzero(tl.exp(tl.load(lw_ptr + t * E + e).to(ACC)), tl.load(z_ptr + (e * T + t) * V + y).to(ACC))
        nll = lse - zy
    tl.store(nll_ptr + t, nll.to(nll_ptr.dtype.element_ty))


@triton.jit
def _nll_backward_kernel(g_ptr, z_ptr, lw_ptr, y_ptr, nll_ptr, lse_ptr, dz_ptr, dlw_ptr, T, E, V,
                         PROB: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    y = tl.load(y_ptr + t).to(tl.int64)
    g = tl.load(g_ptr + t).to(ACC)
    if PROB:
        nll = tl.load(nll_ptr + t).to(ACC)
        nll = tl.where(nll == float("inf"), float("-inf"), nll)  # a target every expert bans: posterior 0
        for e in range(E):
            lse = tl.load(lse_ptr + e * T + t)
            # posterior of expert e for the target; d nll / d z_e = post_e (softmax(z_e) − onehot)
            post = tl.exp(tl.load(lw_ptr + t * E + e).to(ACC) + tl.load(z_ptr + (e * T + t) * V + y).to(ACC) - lse + nll)
            for v0 in range(0, V, BV):
                v = v0 + tl.arange(0, BV)
                live = v < V
                z = tl.load(z_ptr + (e * T + t) * V + v, mask=live, other=0.0).to(ACC)
                dz = g * post * (tl.exp(z - lse) - tl.where(v == y, 1.0, 0.0))
                tl.store(dz_ptr + (e * T + t) * V + v, dz.to(dz_ptr.dtype.element_ty), mask=live)
            tl.store(dlw_ptr + t * E + e, (-g * post).to(dlw_ptr.dtype.element_ty))
    else:
        lse = tl.load(lse_ptr + t)
        for e in range(E):
            w = tl.exp(tl.load(lw_ptr + t * E + e).to(ACC))
            acc = tl.zeros((), ACC)
            for v0 in range(0, V, BV):
                v = v0 + tl.arange(0, BV)
                live = v < V
                zbar = _mixed_block(z_ptr, lw_ptr, t, T, E, V, v, ACC)
                d = g * (tl.exp(zbar - lse) - tl.where(v == y, 1.0, 0.0))  # d nll / d zbar
                z = tl.load(z_ptr + (e * T + t) * V + v, mask=live, other=0.0).to(ACC)
                acc += tl.sum(tl.where(live & (d != 0), d * z, 0.0), 0)  # 0 · (−inf) counts 0
                tl.store(dz_ptr + (e * T + t) * V + v, (w * d).to(dz_ptr.dtype.element_ty), mask=live)
            tl.store(dlw_ptr + t * E + e, _times_nonzero(w, acc).to(dlw_ptr.dtype.element_ty))


def _block_v(V: int) -> int:
    return min(triton.next_power_of_2(V), 8192 if INTERPRET else 2048)


def _lse_buffer(logits, prob_space):
    e, t, _ = logits.shape
    wide = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.empty((e if prob_space else 1, t), dtype=wide, device=logits.device)


@triton_op("xlsparse::triton_ensemble_logprobs", mutates_args=())
def triton_ensemble_logprobs(logits: torch.Tensor, log_weights: torch.Tensor, prob_space: bool) -> tuple[torch.Tensor, torch.Tensor]:
    E, T, V = logits.shape
    z, lw = logits.contiguous(), log_weights.contiguous()
    out = torch.empty((T, V), dtype=logits.dtype, device=logits.device)
    lse = _lse_buffer(logits, prob_space)
    if T:
        wrap_triton(_logprobs_kernel)[(T,)](z, lw, out, lse, T, E, V, PROB=prob_space, BV=_block_v(V),
                                            ACC=acc_type(logits.dtype))
    return out, lse


@triton_ensemble_logprobs.register_fake
def _triton_ensemble_logprobs_fake(logits, log_weights, prob_space):
    return logits.new_empty(logits.shape[1:]), _lse_buffer(logits, prob_space)


@triton_op("xlsparse::triton_ensemble_logprobs_backward", mutates_args=())
def triton_ensemble_logprobs_backward(grad: torch.Tensor, logits: torch.Tensor, log_weights: torch.Tensor,
                                      out: torch.Tensor, lse: torch.Tensor, prob_space: bool) -> tuple[torch.Tensor, torch.Tensor]:
    E, T, V = logits.shape
    dz = torch.empty((E, T, V), dtype=logits.dtype, device=logits.device)
    dlw = torch.empty((T, E), dtype=log_weights.dtype, device=logits.device)
    if T:
        # `out` is not read (only its place in the schema remains): the kernel recomputes it in ACC
        wrap_triton(_logprobs_backward_kernel)[(T,)](
            grad.contiguous(), logits.contiguous(), log_weights.contiguous(), lse.contiguous(), dz, dlw,
            T, E, V, PROB=prob_space, BV=_block_v(V), BE=max(2, triton.next_power_of_2(E)), ACC=acc_type(logits.dtype))
    return dz, dlw


@triton_ensemble_logprobs_backward.register_fake
def _triton_ensemble_logprobs_backward_fake(grad, logits, log_weights, out, lse, prob_space):
    return torch.empty_like(logits, memory_format=torch.contiguous_format), log_weights.new_empty(log_weights.shape)


@triton_op("xlsparse::triton_ensemble_nll", mutates_args=())
def triton_ensemble_nll(logits: torch.Tensor, log_weights: torch.Tensor, targets: torch.Tensor,
                        prob_space: bool) -> tuple[torch.Tensor, torch.Tensor]:
    E, T, V = logits.shape
    lse = _lse_buffer(logits, prob_space)
    nll = lse.new_empty((T,))  # in the accumulation dtype, as lse: the prob-space backward's posterior reads it
    if T:
        wrap_triton(_nll_kernel)[(T,)](logits.contiguous(), log_weights.contiguous(), targets.contiguous(), nll, lse,
                                       T, E, V, PROB=prob_space, BV=_block_v(V), ACC=acc_type(logits.dtype))
    return nll, lse


@triton_ensemble_nll.register_fake
def _triton_ensemble_nll_fake(logits, log_weights, targets, prob_space):
    lse = _lse_buffer(logits, prob_space)
    return lse.new_empty(logits.shape[1:2]), lse


@triton_op("xlsparse::triton_ensemble_nll_backward", mutates_args=())
def triton_ensemble_nll_backward(grad: torch.Tensor, logits: torch.Tensor, log_weights: torch.Tensor,
                                 targets: torch.Tensor, nll: torch.Tensor, lse: torch.Tensor,
                                 prob_space: bool) -> tuple[torch.Tensor, torch.Tensor]:
    E, T, V = logits.shape
    dz = torch.empty((E, T, V), dtype=logits.dtype, device=logits.device)
    dlw = torch.empty((T, E), dtype=log_weights.dtype, device=logits.device)
    if T:
        wrap_triton(_nll_backward_kernel)[(T,)](
            grad.contiguous(), logits.contiguous(), log_weights.contiguous(), targets.contiguous(), nll.contiguous(),
            lse.contiguous(), dz, dlw, T, E, V, PROB=prob_space, BV=_block_v(V), ACC=acc_type(logits.dtype))
    return dz, dlw


@triton_ensemble_nll_backward.register_fake
def _triton_ensemble_nll_backward_fake(grad, logits, log_weights, targets, nll, lse, prob_space):
    return torch.empty_like(logits, memory_format=torch.contiguous_format), log_weights.new_empty(log_weights.shape)


for _op, _fn in (("sddmm", triton_sddmm), ("spmm_", triton_spmm_), ("ensemble_logprobs", triton_ensemble_logprobs),
                 ("ensemble_logprobs_backward", triton_ensemble_logprobs_backward),
                 ("ensemble_nll", triton_ensemble_nll), ("ensemble_nll_backward", triton_ensemble_nll_backward)):
    registry.register(_op, "triton", _fn)
