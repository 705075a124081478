"""Masked-gradient update benchmarks (`xlsparse bench --family optim`).

fp32 parameters in the shapes of XLM-R base layers plus an embedding block, N ≈ 32M (4M with
--quick), masks at 1%, 5% and 50%. Bytes are counted as 64-byte cache lines touched: at low density
each selected entry of p and g sits on its own line.
"""
import torch

from xlsparse.benchmarks import baselines
from xlsparse.benchmarks.harness import Case, cache_lines
from xlsparse.ops.registry import backend_for
from xlsparse.ops.optim import multi_mask_weight_grad
from xlsparse.optim import MaskedAdamW
from xlsparse.routing import TokenGroups

FAMILY = "optim"
LINE = 64
FLOATS_PER_LINE = LINE // 4


def _shapes(quick: bool) -> list[tuple[int, ...]]:
    """One XLM-R base layer: q, k, v, o, the FFN pair, their biases and two LayerNorms."""
    h, f = 768, 3072
    layer = [(h, h)] * 4 + [(f, h), (h, f)] + [(h,)] * 4 + [(f,), (h,)] + [(h,)] * 4
    if quick:
        return layer[:6]  # ≈ 7M
    return layer * 4 + [(5376, h)]  # ≈ 32.5M: four layers and a slice of the embedding


def _model(quick: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in _shapes(quick)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def _masks(params, density: float, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(p.shape, generator=gen) < density for p in params]


def _lines_with_selection(mask: torch.Tensor) -> int:
    """Cache lines of a float32 tensor that hold at least one selected entry."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % FLOATS_PER_LINE
    flat = torch.cat([flat, flat.new_zeros(pad)])
    return int(flat.view(-1, FLOATS_PER_LINE).any(1).sum())


def _dense_bytes(masks) -> int:
    # the mask once, then p, g, m, v read and p, m, v written on every line with a selected entry
    return sum(m.numel() + 7 * LINE * _lines_with_selection(m) for m in masks)


def _compact_bytes(indices) -> int:
    # p read + written and g read on each touched line; indices, exp_avg, exp_avg_sq streamed
    return sum(3 * LINE * cache_lines(i, 4) + i.numel() * (4 + 4 * 4) for i in indices)


def _state_note(opt: MaskedAdamW) -> str:
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    return f"optimizer state {state / 2**20:.1f} MiB"


def _fused(params):
    return torch.optim.AdamW(params, lr=1e-3, fused=True)


def _masked_cases(params, density: float) -> list[Case]:
    n = sum(p.numel() for p in params)
    masks = _masks(params, density)
    shape = f"{len(params)} tensors, N={n / 1e6:.1f}M"
    backend = backend_for("masked_adamw_", params[0].device)
    ltsft_opt = _fused(params)
    fused_opt = _fused(params)
    dense = MaskedAdamW(params, masks, lr=1e-3, mode="dense")
    compact = MaskedAdamW(params, masks, lr=1e-3, mode="compact")
    indices = [compact.state[p]["indices"].long() for p in params]
    exp_avgs = [torch.zeros(i.numel()) for i in indices]
    exp_avg_sqs = [torch.zeros(i.numel()) for i in indices]
    ltsft = ("LT-SFT: grad*mask + fused AdamW", lambda: baselines.ltsft_masked_adamw_step(params, masks, ltsft_opt))
    fused = ("fused AdamW, unmasked", fused_opt.step)
    composite = ("index_select/lerp/index_add_",
                 lambda: baselines.indexed_adamw_step(params, indices, exp_avgs, exp_avg_sqs, step=10))
    dense_bytes, compact_bytes = _dense_bytes(masks), _compact_bytes(indices)
    cases = []
    for name, opt, base, moved in ((("dense", dense, ltsft, dense_bytes)), ("dense", dense, fused, dense_bytes),
                                   ("compact", compact, ltsft, compact_bytes), ("compact", compact, composite, compact_bytes)):
        cases.append(Case(op=f"MaskedAdamW {name}", shape=shape, dtype="float32", density=density, backend=backend,
                          fn=opt.step, baseline=base[1], baseline_name=base[0], bytes=moved, note=_state_note(opt)))
    return cases


def _contiguous_case(n: int, density: float) -> Case:
    """SparseDeltaLinear's case: the trainable values are themselves one K-vector (mask None)."""
    k = int(n * density)
    gen = torch.Generator().manual_seed(2)
    ours = torch.randn(k, generator=gen).requires_grad_()
    theirs = ours.detach().clone().requires_grad_()
    ours.grad = torch.randn(k, generator=gen)
    theirs.grad = ours.grad.clone()
    opt = MaskedAdamW([ours], [None], lr=1e-3)
    ref = _fused([theirs])
    return Case(op="MaskedAdamW, K-vector (mask None)", shape=f"[{k}]", dtype="float32", density=None,
                backend=backend_for("masked_adamw_", ours.device), fn=opt.step, baseline=ref.step,
                baseline_name="fused AdamW on K", bytes=7 * 4 * k)


def _weight_grad_case(quick: bool) -> Case:
    t, o, i, num_ids = (512, 1024, 512, 4) if quick else (2048, 4096, 1024, 4)
    gen = torch.Generator().manual_seed(3)
    grad_out = torch.randn(t, o, generator=gen)
    x = torch.randn(t, i, generator=gen)
    masks = torch.rand(num_ids, o, i, generator=gen) < 0.5
    groups = TokenGroups.build(torch.randint(0, num_ids, (t,), generator=gen), num_ids)
    return Case(op="multi_mask_weight_grad", shape=f"T={t}, {o}x{i}, L={num_ids}", dtype="float32", density=0.5,
                backend=backend_for("multi_mask_weight_grad", x.device),
                fn=lambda: multi_mask_weight_grad(grad_out, x, masks, groups.order, groups.offsets),
                baseline=lambda: baselines.dense_weight_grad(grad_out, x), baseline_name="one dense dYᵀX",
                flops=2 * t * o * i, note="peak MiB: one dense dW is %.0f MiB" % (o * i * 4 / 2**20))


def cases(quick: bool = False) -> list[Case]:
    params = _model(quick)
    n = sum(p.numel() for p in params)
    densities = (0.01, 0.5) if quick else (0.01, 0.05, 0.5)
    out = []
    for d in densities:
        out += _masked_cases(params, d)
    out += [_contiguous_case(n, d) for d in (0.01, 0.05)]
    out.append(_weight_grad_case(quick))
    return out
