"""Masked-gradient update benchmarks (`xlsparse bench --family optim`).

fp32 parameters in the shapes of XLM-R base layers plus an embedding block, N ≈ 32M (7M with
--quick), uniform random masks at 1%, 5% and 50%; beside them the real LT-SFT masks of
multilingual-e5-small's encoder linear weights (benchmarks/real_masks.py), at their real shapes.

The steps are memory-bound. Bytes are counted as 64-byte cache lines touched: at low density each
selected entry of p and g sits on its own line, so a line holding one selected float costs as much
as a line holding sixteen. multi_mask_weight_grad is compute-bound: its minimum work is one
multiply-add per token and entry of the token's language mask.
"""
import torch

from xlsparse.optim import MaskedAdamW
from xlsparse.routing import TokenGroups

from . import baselines, real_masks
from .harness import LINE_BYTES, Case, Target, assert_same, backend_of, cache_lines

FAMILY = "optim"
FLOAT_BYTES = 4
FLOATS_PER_LINE = LINE_BYTES // FLOAT_BYTES
NUM_LANGUAGES = 4
# The checks compare one step's change to within this share of the largest change (see _step_check).
STEP_RTOL = 2e-3


# --- the bytes each step must move -------------------------------------------------------------

def lines_with_selection(mask: torch.Tensor) -> int:
    """Cache lines of a float32 tensor (laid out from a line boundary) that hold a selected entry."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % FLOATS_PER_LINE
    flat = torch.cat([flat, flat.new_zeros(pad)])
    return int(flat.view(-1, FLOATS_PER_LINE).any(1).sum())


def dense_mode_bytes(masks) -> int:
    """The bool mask read once; on every line with a selected entry, p, g, m, v read and p, m, v
    written (7 lines)."""
    return sum(m.numel() + 7 * LINE_BYTES * lines_with_selection(m) for m in masks)


def compact_mode_bytes(indices) -> int:
    """On each touched line p read and written and g read (3 lines); the indices and the K-sized
    exp_avg and exp_avg_sq streamed (index read, m and v read and written)."""
    return sum(3 * LINE_BYTES * cache_lines(i, FLOAT_BYTES) + i.numel() * (i.element_size() + 4 * FLOAT_BYTES)
               for i in indices)


def masked_weight_grad_flops(counts: torch.Tensor, masks: torch.Tensor) -> int:
    """Σ_l 2·T_l·nnz(M_l): one multiply-add per token of language l and entry of its mask. The
    kernel runs whole dense tiles (2·T·O·I in all), so its share of the GEMM rate reads lower than
    a dense product's by the masks' density."""
    return int(2 * (counts.cpu().double() * masks.reshape(masks.shape[0], -1).sum(1).cpu().double()).sum())


def k_vector_bytes(k: int) -> int:
    """A step on a K-vector: p, g, m, v read and p, m, v written."""
    return 7 * FLOAT_BYTES * k


# --- inputs ------------------------------------------------------------------------------------

def _shapes(quick: bool) -> list[tuple[int, ...]]:
    """One XLM-R base layer: q, k, v, o, the FFN pair, their biases and two LayerNorms."""
    h, f = 768, 3072
    layer = [(h, h)] * 4 + [(f, h), (h, f)] + [(h,)] * 4 + [(f,), (h,)] + [(h,)] * 4
    if quick:
        return layer[:6]  # ≈ 7M
    return layer * 4 + [(5376, h)]  # ≈ 32.5M: four layers and a slice of the embedding


def _params(shapes, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    return params


def _uniform_masks(params, density: float, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(p.shape, generator=gen) < density).to(p.device) for p in params]


def _mask_from_indices(idx: torch.Tensor, shape, device) -> torch.Tensor:
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    mask[idx] = True
    return mask.view(shape).to(device)


def _state_note(opt: MaskedAdamW) -> str:
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    return f"optimizer state {state / 2**20:.1f} MiB"


def _fused(params):
    return torch.optim.AdamW(params, lr=1e-3, fused=True)


def _step_check(params, masks, count: int = 3):
    """A check for the masked rows: one step of each way from the same start on copies of the
    first `count` tensors; within the mask every way must give torch's AdamW update (outside it the
    LT-SFT way's weight decay moves entries and the unmasked way trains them: no comparison)."""

    def check():
        start = [p.detach().clone() for p in params[:count]]
        grads = [p.grad.clone() for p in params[:count]]
        sel = masks[:count]

        def fresh():
            out = [s.clone().requires_grad_() for s in start]
            for q, g in zip(out, grads):
                q.grad = g.clone()
            return out

        results = {}
        for mode in ("dense", "compact"):
            ps = fresh()
            MaskedAdamW(ps, sel, lr=1e-3, mode=mode).step()
            results[mode] = ps
        ps = fresh()
        baselines.ltsft_masked_adamw_step(ps, sel, _fused(ps))
        results["ltsft"] = ps
        ps = fresh()
        _fused(ps).step()
        results["fused"] = ps
        ps = fresh()
        compact = MaskedAdamW(fresh(), sel, lr=1e-3, mode="compact")
        idx = [compact.state[q]["indices"] for q in compact.param_groups[0]["params"]]
        baselines.indexed_adamw_step(ps, idx, [torch.zeros(i.numel(), device=i.device) for i in idx],
                                     [torch.zeros(i.numel(), device=i.device) for i in idx], step=1)
        results["composite"] = ps
        # The step's change is compared, not the values: a step moves an entry by about lr (1e-3)
        # and values reach 5, so 1e-5 of the values let a step 2% off, or with half its weight
        # decay, pass. The ways agree to the bit here; 2e-3 leaves room for a rounding of p.
        change = lambda ps: tuple(q.detach()[m] - s0[m] for q, s0, m in zip(ps, start, sel))  # noqa: E731
        for name, got in results.items():
            assert_same(f"MaskedAdamW vs {name} (the step's change at the selected entries)", change(results["compact"]),
                        change(got), rtol=STEP_RTOL)
        for mode in ("dense", "compact"):  # entries outside the mask never move, in either timed mode
            for q, s0, m in zip(results[mode], start, sel):
                if not torch.equal(q.detach()[~m], s0[~m]):
                    raise ValueError(f"check MaskedAdamW {mode}: an entry outside the mask changed")

    return check


# --- cases -------------------------------------------------------------------------------------

def _masked_cases(params, masks, density: float, masks_label: str = "uniform", targets: bool = False) -> list[Case]:
    n = sum(p.numel() for p in params)
    shape = f"{len(params)} tensors, N={n / 1e6:.1f}M"
    backend = backend_of("masked_adamw_", params[0].device)
    ltsft_opt = _fused(params)
    fused_opt = _fused(params)
    dense = MaskedAdamW(params, masks, lr=1e-3, mode="dense")
    compact = MaskedAdamW(params, masks, lr=1e-3, mode="compact")
    indices = [compact.state[p]["indices"] for p in params]
    exp_avgs = [torch.zeros(i.numel(), device=i.device) for i in indices]
    exp_avg_sqs = [torch.zeros(i.numel(), device=i.device) for i in indices]
    ltsft = ("LT-SFT: grad*mask + fused AdamW", lambda: baselines.ltsft_masked_adamw_step(params, masks, ltsft_opt))
    fused = ("fused AdamW, unmasked", fused_opt.step)
    composite = ("index_select/lerp/index_add_",
                 lambda: baselines.indexed_adamw_step(params, indices, exp_avgs, exp_avg_sqs, step=10))
    dense_bytes, compact_bytes = dense_mode_bytes(masks), compact_mode_bytes(indices)
    bandwidth = (Target("compact masked AdamW: >= 80% of copy bandwidth (lines touched)", "roofline", 0.80),)
    rows = [("dense", dense, ltsft, dense_bytes, ()), ("dense", dense, fused, dense_bytes, ()),
            ("compact", compact, ltsft, compact_bytes, bandwidth if targets else ()),
            ("compact", compact, composite, compact_bytes, ())]
    check = _step_check(params, masks)
    return [Case(op=f"MaskedAdamW {mode}", shape=shape, dtype="float32", density=density, backend=backend,
                 fn=opt.step, baseline=base[1], baseline_name=base[0], bytes=moved, note=_state_note(opt),
                 masks=masks_label, targets=target, check=check)
            for mode, opt, base, moved, target in rows]


def _contiguous_case(n: int, density: float, device) -> Case:
    """SparseDeltaLinear's case: the trainable values are themselves one K-vector (mask None)."""
    k = int(n * density)
    gen = torch.Generator().manual_seed(2)
    ours = torch.randn(k, generator=gen).to(device).requires_grad_()
    theirs = ours.detach().clone().requires_grad_()
    ours.grad = torch.randn(k, generator=gen).to(device)
    theirs.grad = ours.grad.clone()
    opt = MaskedAdamW([ours], [None], lr=1e-3)
    ref = _fused([theirs])

    def check():  # one step of each from the same start, on copies
        a, b = ours.detach().clone().requires_grad_(), ours.detach().clone().requires_grad_()
        a.grad, b.grad = ours.grad.clone(), ours.grad.clone()
        MaskedAdamW([a], [None], lr=1e-3).step()
        _fused([b]).step()
        start = ours.detach().clone()
        assert_same("MaskedAdamW on a K-vector vs fused AdamW (the step's change)", a.detach() - start,
                    b.detach() - start, rtol=STEP_RTOL)

    return Case(op="MaskedAdamW, K-vector (mask None)", shape=f"[{k}]", dtype="float32", density=None,
                backend=backend_of("masked_adamw_", device), fn=opt.step, baseline=ref.step,
                baseline_name="fused AdamW on K", bytes=k_vector_bytes(k), check=check)


def _weight_grad_case(tokens: int, masks: torch.Tensor, device, masks_label: str = "uniform",
                      targets: bool = False) -> Case:
    from xlsparse.ops.optim import multi_mask_weight_grad

    num_ids, out_f, in_f = masks.shape
    gen = torch.Generator().manual_seed(3)
    grad_out = torch.randn(tokens, out_f, generator=gen).to(device)
    x = torch.randn(tokens, in_f, generator=gen).to(device)
    masks = masks.to(device)
    groups = TokenGroups.build(torch.randint(0, num_ids, (tokens,), generator=gen).to(device), num_ids)
    target = (Target(f"multi_mask_weight_grad, {num_ids} languages: >= 0.95x one dense dYᵀX", "speedup", 0.95),)

    def check():  # Σ_l M_l ⊙ (dY_lᵀ X_l), each language's dense product over its own tokens
        route = torch.empty(tokens, dtype=torch.long, device=grad_out.device)
        route[groups.order.long()] = torch.repeat_interleave(torch.arange(num_ids, device=grad_out.device),
                                                             groups.counts.long())
        want = sum(masks[l] * baselines.dense_weight_grad(grad_out[route == l], x[route == l]) for l in range(num_ids))
        assert_same("multi_mask_weight_grad vs per-language masked dYᵀX",
                    multi_mask_weight_grad(grad_out, x, masks, groups.order, groups.offsets), want)

    return Case(op="multi_mask_weight_grad", shape=f"T={tokens}, {out_f}x{in_f}, L={num_ids}", dtype="float32",
                density=float(masks.float().mean()), backend=backend_of("multi_mask_weight_grad", device),
                fn=lambda: multi_mask_weight_grad(grad_out, x, masks, groups.order, groups.offsets),
                baseline=lambda: baselines.dense_weight_grad(grad_out, x), baseline_name="one dense dYᵀX",
                flops=masked_weight_grad_flops(groups.counts, masks),
                note="one dense dW is %.0f MiB" % (out_f * in_f * 4 / 2**20),
                masks=masks_label, targets=target if targets else (), check=check)


def _real_mask_cases(quick: bool, device) -> list[Case]:
    """The e5-small encoder's linear weights with their real 5% masks (the last two layers with
    --quick), and multi_mask_weight_grad with the FFN-in masks of the last four layers as four
    languages' masks."""
    masks = real_masks.load()
    if masks is None:
        return []
    names = real_masks.weights(masks, quick)
    params = _params([masks[n][1] for n in names], device, seed=5)
    bool_masks = [_mask_from_indices(masks[n][0], masks[n][1], device) for n in names]
    k = sum(masks[n][0].numel() for n in names)
    n_all = sum(p.numel() for p in params)
    found = _masked_cases(params, bool_masks, k / n_all, f"{real_masks.LABEL} ({len(names)} weights)")
    group = real_masks.same_shape_group(masks, real_masks.skewed_ffn(masks), NUM_LANGUAGES)
    stacked = torch.stack([_mask_from_indices(masks[n][0], masks[n][1], "cpu") for n in group])
    label = f"{real_masks.LABEL}: {', '.join(n.split('.')[2] for n in group)} FFN-in as languages"
    found.append(_weight_grad_case(512 if quick else 2048, stacked, device, label))
    return found


def cases(quick: bool = False, device: str = "cpu") -> list[Case]:
    params = _params(_shapes(quick), device)
    n = sum(p.numel() for p in params)
    densities = (0.01, 0.5) if quick else (0.01, 0.05, 0.5)
    out = []
    for d in densities:
        out += _masked_cases(params, _uniform_masks(params, d), d, targets=d == 0.01)
    out += [_contiguous_case(n, d, device) for d in (0.01, 0.05)]
    tokens, out_f, in_f = (512, 1024, 512) if quick else (2048, 4096, 1024)
    gen = torch.Generator().manual_seed(4)
    out.append(_weight_grad_case(tokens, torch.rand(NUM_LANGUAGES, out_f, in_f, generator=gen) < 0.5, device,
                                 targets=True))
    return out + _real_mask_cases(quick, device)
