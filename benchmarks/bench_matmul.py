"""Multi-mask gated matmul benchmarks (`xlsparse bench --family matmul`).

T = 2048 tokens; layers 4096 x 1024 and 1024 x 4096; delta densities 0.5%, 1%, 5%; fp32, and bf16
where the hardware multiplies bf16 (--quick: T = 256, layers 1024 x 256 and 256 x 1024, 1% only).
Beside the uniform random supports, rows with real LT-SFT masks (benchmarks/real_masks.py): the
skewed last-layer FFN matrix, a typical attention matrix, and four FFN matrices as four experts.

The GFLOP/s is the useful work the op must do (the functions below) against the GEMM rate. The
SDDMM rows also carry the bytes they must move: at 0.5-1% density an SDDMM does 2-8 flops per byte
of dY and X it reads, below the machine's balance, so it is judged against the copy bandwidth.
"""
import torch

from xlsparse import functional
from xlsparse.routing import TokenGroups

from . import baselines, real_masks
from .harness import Case, Target, assert_same, backend_of, bf16_in_hardware

FAMILY = "matmul"
LANGUAGES = 4


# --- the work each op must do (useful flops) ---------------------------------------------------

def dense_flops(tokens: int, out_f: int, in_f: int) -> int:
    """One dense product T x I by I x O (a forward, a dX or a dW)."""
    return 2 * tokens * out_f * in_f


def sddmm_flops(tokens: int, nnz: int) -> int:
    """dval[n] = Σ_t dY[t, r_n] X[t, c_n]: one multiply-add per token and entry."""
    return 2 * tokens * nnz


def sddmm_bytes(tokens: int, out_f: int, in_f: int, nnz: int, element_size: int, index_size: int) -> int:
    """dY [T, O] and X [T, I] read once; the indices read and the values written once."""
    return tokens * (out_f + in_f) * element_size + nnz * (index_size + element_size)


def delta_linear_train_flops(tokens: int, out_f: int, in_f: int, nnz: int) -> int:
    """Forward and dX through W0 + Δ (one dense product each, the delta merged), plus the SDDMM."""
    return 2 * dense_flops(tokens, out_f, in_f) + sddmm_flops(tokens, nnz)


def hard_routed_train_flops(tokens: int, out_f: int, in_f: int, tokens_per_delta: list[int],
                            nnz_per_delta: list[int]) -> int:
    """Forward and dX (each token group through its own merged weight), plus each delta's SDDMM
    over its own tokens."""
    sddmms = sum(sddmm_flops(t, k) for t, k in zip(tokens_per_delta, nnz_per_delta))
    return 2 * dense_flops(tokens, out_f, in_f) + sddmms


def gated_forward_flops(tokens: int, out_f: int, in_f: int, nnz_per_delta: list[int]) -> int:
    """X W0ᵀ once, plus every token through every delta (soft gates cannot be merged per group)."""
    return dense_flops(tokens, out_f, in_f) + sum(sddmm_flops(tokens, k) for k in nnz_per_delta)


# --- inputs ------------------------------------------------------------------------------------

def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dense_inputs(tokens, out_f, in_f, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_f, generator=gen).to(device, dtype)
    w = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).to(device, dtype)
    b = torch.randn(out_f, generator=gen).to(device, dtype)
    gy = torch.randn(tokens, out_f, generator=gen).to(device, dtype)
    return x, w, b, gy


def _uniform_indices(out_f, in_f, density, seed) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(out_f * in_f, generator=gen)[: int(out_f * in_f * density)].sort().values


def _values(k, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (0.01 * torch.randn(k, generator=gen)).to(device, dtype)


# --- cases -------------------------------------------------------------------------------------

def _delta_linear_cases(tokens, out_f, in_f, idx, dtype, device, masks="uniform", targets=False,
                        torch_sddmm_row=False) -> list[Case]:
    """sparse_delta_linear fwd+bwd against SpIEL's way (on CUDA both its dense-dW hook path and its
    SDDMM path, fp32) and a frozen linear; the SDDMM against a dense dYᵀX (and torch's
    sparse.sampled_addmm, fp32)."""
    x, w, b, gy = _dense_inputs(tokens, out_f, in_f, dtype, device)
    idx = idx.to(device)
    k = idx.numel()
    vals = _values(k, dtype, device)
    xg, vg = x.clone().requires_grad_(True), vals.clone().requires_grad_(True)

    # Each fwd+bwd gives Y, dX and dvalues, so that a row's check compares all three.
    def ours():
        y = functional.sparse_delta_linear(xg, w, b, idx, vg)
        return (y.detach(), *torch.autograd.grad(y, [xg, vg], gy))

    def spiel():
        y = baselines.spiel_delta_linear(xg, w, b, idx, vg)
        return (y.detach(), *torch.autograd.grad(y, [xg, vg], gy))

    # SpIEL's CPU build has only the dense-dW path. On CUDA its normal step takes dvalues from its
    # SDDMM kernel, and the dense dW is its regrowth-step (hook) path.
    on_cuda = torch.device(device).type == "cuda"
    # torch.sparse.sampled_addmm stands in for both SDDMMs; on CPU it takes no bf16, so fp32 only.
    use_sampled = dtype == torch.float32 and (torch_sddmm_row or on_cuda)
    support = baselines.support_csr(idx, (out_f, in_f), dtype) if use_sampled else None

    def spiel_sddmm():
        y = baselines.spiel_sddmm_delta_linear(xg, w, b, idx, vg, support)
        return (y.detach(), *torch.autograd.grad(y, [xg, vg], gy))

    def frozen():
        y = torch.nn.functional.linear(xg, w, b)
        return torch.autograd.grad(y, [xg], gy)

    from xlsparse.ops.matmul import sddmm

    density = k / (out_f * in_f)
    shape = f"T={tokens} {out_f}x{in_f}"
    flops = delta_linear_train_flops(tokens, out_f, in_f, k)
    backend = backend_of("sddmm", device)
    note = f"W0+Δ: {'written into W0 per call' if functional.merge_pays(tokens) else 'SpMM term'}"
    weight_bytes = out_f * in_f * w.element_size()
    moved = sddmm_bytes(tokens, out_f, in_f, k, x.element_size(), idx.element_size())
    pick = (lambda *t: t) if targets else (lambda *t: ())
    # The target goes to the first row: SpIEL's normal step where it has one.
    spiel_rows = [(spiel, "SpIEL (hook path: dense dW)" if on_cuda else "SpIEL (clone+scatter_add, dense dW, gather)")]
    if on_cuda and support is not None:
        spiel_rows.insert(0, (spiel_sddmm, "SpIEL (normal step: re-merge, SDDMM dv by sampled_addmm)"))
    spiel_target = pick(Target("sparse_delta_linear fwd+bwd, 1%: >= 1.5x SpIEL's way", "speedup", 1.5))
    if dtype == torch.bfloat16:  # issue 14: bf16 is never slower than SpIEL's way, at any density or shape
        spiel_target = (Target("bf16 sparse_delta_linear fwd+bwd: >= 1.0x SpIEL's way", "speedup", 1.0),)
    def same(fn, name):  # ours and the baseline give the same Y, dX and dvalues on the row's inputs
        return lambda: assert_same(f"sparse_delta_linear vs {name}", ours(), fn())

    def same_sddmm():  # the SDDMM's values are the dense dYᵀX at the delta's entries
        assert_same("sddmm vs dense dYᵀX", sddmm(gy, x, idx), baselines.dense_weight_grad(gy, x).reshape(-1)[idx])

    cases = [Case("sparse_delta_linear fwd+bwd", shape, _name(dtype), ours, fn, name, density, backend, flops=flops,
                  note=note, masks=masks, targets=spiel_target if i == 0 else (), check=same(fn, name))
             for i, (fn, name) in enumerate(spiel_rows)]
    cases += [
        Case("sparse_delta_linear fwd+bwd", shape, _name(dtype), ours, frozen, "frozen linear fwd+dX", density,
             backend, flops=flops, note=note, masks=masks,
             targets=pick(Target("sparse_delta_linear fwd+bwd, 1%: >= 0.97x frozen linear fwd+dX", "speedup", 0.97),
                          Target("sparse_delta_linear fwd+bwd, 1%: extra memory over the frozen linear <= 0.25 O x I",
                                 "extra_memory", 0.25, weight_bytes))),
        Case("sddmm", shape, _name(dtype), lambda: sddmm(gy, x, idx), lambda: baselines.dense_weight_grad(gy, x),
             "dense dYᵀX", density, backend, flops=sddmm_flops(tokens, k), bytes=moved, masks=masks,
             targets=pick(Target("SDDMM, 1%: >= 20x dense dYᵀX", "speedup", 20.0)), check=same_sddmm),
    ]
    if torch_sddmm_row and support is not None:
        cases.append(Case("sddmm", shape, _name(dtype), lambda: sddmm(gy, x, idx),
                          lambda: baselines.torch_sddmm(gy, x, support), "torch SDDMM (sparse.sampled_addmm)", density,
                          backend, flops=sddmm_flops(tokens, k), bytes=moved, masks=masks,
                          check=lambda: assert_same("sddmm vs torch SDDMM", sddmm(gy, x, idx),
                                                    baselines.torch_sddmm(gy, x, support))))
    return cases


def _multi_cases(tokens, out_f, in_f, idx: list, dtype, device, masks="uniform", targets=False) -> list[Case]:
    """multi_delta_linear with hard routing (train and forward) against each language's merged
    weight over its own tokens, and with soft gates against E merged dense forwards."""
    x, w, b, gy = _dense_inputs(tokens, out_f, in_f, dtype, device)
    idx = [i.to(device) for i in idx]
    vals = [_values(i.numel(), dtype, device, seed=10 + e).requires_grad_(True) for e, i in enumerate(idx)]
    gen = torch.Generator().manual_seed(7)
    route = torch.randint(0, LANGUAGES, (tokens,), generator=gen).to(device)
    groups = TokenGroups.build(route, LANGUAGES)  # built once per batch, shared by every layer
    xg = x.clone().requires_grad_(True)
    nnz = [i.numel() for i in idx]
    density = sum(nnz) / (len(nnz) * out_f * in_f)
    shape = f"T={tokens} {out_f}x{in_f} E={LANGUAGES}"
    backend = backend_of("spmm_", device)

    # Y as well as the gradients, so that the row's check compares all it times (dX and dvalues
    # do not depend on the forward's output: a Y without its deltas or bias had passed)
    def ours_train():
        y = functional.multi_delta_linear(xg, w, b, idx, vals, route=groups)
        return (y.detach(), *torch.autograd.grad(y, [xg, *vals], gy))

    def merged_train():
        y = baselines.merged_per_language(xg, w, b, idx, vals, route)
        return (y.detach(), *torch.autograd.grad(y, [xg, *vals], gy))

    @torch.no_grad()
    def ours_forward():
        return functional.multi_delta_linear(x, w, b, idx, vals, route=groups)

    # Forward only (no_grad) is inference: the deltas do not change between calls, so the merged
    # way keeps its merged weights, made once, as the soft-gated baseline below does (merging them
    # per call, 4 clones of W0 and their scatters, was work a user of that way does not do).
    merged = [w.reshape(-1).scatter_add(0, i, v.detach()).view(w.shape) for i, v in zip(idx, vals)]

    @torch.no_grad()
    def merged_forward():
        return baselines.merged_per_language(x, w, b, idx, vals, route, merged=merged)

    gates = torch.softmax(torch.randn(tokens, LANGUAGES, generator=gen), -1).to(device, dtype)

    @torch.no_grad()
    def ours_gated():
        return functional.multi_delta_linear(x, w, b, idx, vals, gates=gates)

    @torch.no_grad()
    def dense_gated():
        return baselines.merged_ensemble(x, merged, b, gates)

    per_delta = groups.counts.tolist()
    def same(ours, theirs, what):
        return lambda: assert_same(f"multi_delta_linear {what}", ours(), theirs())

    gate_target = (Target(f"soft-gated multi_delta_linear, {LANGUAGES} experts: >= 3x {LANGUAGES} merged dense "
                          "passes", "speedup", 3.0),) if targets else ()
    return [
        Case("multi_delta_linear hard fwd+bwd", shape, _name(dtype), ours_train, merged_train,
             "merged W per language on its tokens (index_select, linear, index_copy_, dense dW)", density, backend,
             flops=hard_routed_train_flops(tokens, out_f, in_f, per_delta, nnz), masks=masks,
             check=same(ours_train, merged_train, "hard fwd+bwd")),
        Case("multi_delta_linear hard fwd", shape, _name(dtype), ours_forward, merged_forward,
             "merged W per language (made once) on its tokens, forward", density, backend,
             flops=dense_flops(tokens, out_f, in_f), masks=masks, check=same(ours_forward, merged_forward, "hard fwd")),
        Case("multi_delta_linear gates fwd", shape, _name(dtype), ours_gated, dense_gated,
             f"{LANGUAGES} merged dense forwards", density, backend,
             flops=gated_forward_flops(tokens, out_f, in_f, nnz), masks=masks, targets=gate_target,
             check=same(ours_gated, dense_gated, "gates fwd")),
    ]


def _ensemble_cases(tokens, vocab, dtype, device) -> list[Case]:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(LANGUAGES, tokens, vocab, generator=gen).to(device, dtype)
    lw = torch.log_softmax(torch.randn(tokens, LANGUAGES, generator=gen), -1).to(device, dtype)
    y = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    shape = f"E={LANGUAGES} T={tokens} V={vocab}"
    # Memory-bound: the E logits read once, the [T, V] output written once.
    moved = z.numel() * z.element_size() + tokens * vocab * z.element_size()
    backend = backend_of("ensemble_logprobs", device)

    def same_logprobs():
        assert_same("ensemble_logprobs", functional.ensemble_logprobs(z, lw), baselines.composite_ensemble_logprobs(z, lw))

    def same_nll():
        assert_same("ensemble_nll", functional.ensemble_nll(z, lw, y), baselines.composite_ensemble_nll(z, lw, y))

    return [
        Case("ensemble_logprobs prob", shape, _name(dtype), lambda: functional.ensemble_logprobs(z, lw),
             lambda: baselines.composite_ensemble_logprobs(z, lw), "torch: logsumexp_E(log_softmax + log w)",
             None, backend, bytes=moved, check=same_logprobs),
        Case("ensemble_nll prob", shape, _name(dtype), lambda: functional.ensemble_nll(z, lw, y),
             lambda: baselines.composite_ensemble_nll(z, lw, y),
             "torch: logsumexp_E(z[y] - logsumexp_V + log w)", None, backend, bytes=z.numel() * z.element_size(),
             check=same_nll),
    ]


def _real_mask_cases(tokens, device) -> list[Case]:
    """fp32 rows on real LT-SFT supports: the skewed FFN matrix and a typical attention matrix,
    and the FFN-in supports of the last four layers as four experts."""
    masks = real_masks.load()
    if masks is None:
        return []
    found = []
    for name in (real_masks.skewed_ffn(masks), real_masks.typical_attention(masks)):
        idx, (out_f, in_f) = masks[name]
        label = f"{real_masks.LABEL}: {name.replace('encoder.', '').replace('.weight', '')}"
        found += _delta_linear_cases(tokens, out_f, in_f, idx, torch.float32, device, masks=label)
    group = real_masks.same_shape_group(masks, real_masks.skewed_ffn(masks), LANGUAGES)
    out_f, in_f = masks[group[0]][1]
    label = f"{real_masks.LABEL}: {', '.join(n.split('.')[2] for n in group)} as experts"
    found += _multi_cases(tokens, out_f, in_f, [masks[n][0] for n in group], torch.float32, device, masks=label)
    return found


def cases(quick: bool = False, device: str = "cpu") -> list[Case]:
    tokens = 256 if quick else 2048
    layers = [(1024, 256), (256, 1024)] if quick else [(4096, 1024), (1024, 4096)]
    densities = [0.01] if quick else [0.005, 0.01, 0.05]
    found = []
    # Without bf16 in hardware torch's bf16 GEMM is a scalar loop (0.8 GFLOP/s on a 2-core Zen 3,
    # against 104 in fp32): one row's dense dW would take 20 s a call, and the table hours.
    gemm_dtypes = (torch.float32, torch.bfloat16) if bf16_in_hardware(device) else (torch.float32,)
    if len(gemm_dtypes) == 1:
        print("note: bf16 matmul rows skipped: this CPU has no bf16 in hardware (AVX-512-BF16 or AMX), "
              "and torch's emulated bf16 GEMM is about 100x slower than its fp32 one", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        for li, (out_f, in_f) in enumerate(layers if dtype in gemm_dtypes else []):
            for density in densities:
                # The issue's targets are judged on fp32, the first layer, 1%.
                issue_case = dtype == torch.float32 and li == 0 and density == 0.01
                idx = _uniform_indices(out_f, in_f, density, seed=2)
                found += _delta_linear_cases(tokens, out_f, in_f, idx, dtype, device, targets=issue_case,
                                             torch_sddmm_row=density == 0.01)
            deltas = [_uniform_indices(out_f, in_f, 0.01, seed=20 + e) for e in range(LANGUAGES)]
            found += _multi_cases(tokens, out_f, in_f, deltas, dtype, device,
                                  targets=dtype == torch.float32 and li == 0)
        found += _ensemble_cases(64 if quick else 256, 32000, dtype, device)
    return found + _real_mask_cases(tokens, device)
