"""Multi-mask gated matmul benchmarks (`xlsparse bench --family matmul`).

T = 2048 tokens; layers 4096 x 1024 and 1024 x 4096; delta densities 0.5%, 1%, 5%; fp32 and bf16
(--quick: T = 256, layers 1024 x 256 and 256 x 1024, 1% only). FLOPs count the work the op must
do (2·T·O·I per dense product, 2·T·K per SDDMM/SpMM), so the table's GFLOP/s is the useful rate
against the fp32 GEMM ceiling.
"""
import torch

from xlsparse import functional
from xlsparse.benchmarks import baselines
from xlsparse.benchmarks.harness import Case
from xlsparse.ops.registry import backend_for
from xlsparse.ops.matmul import SparseDeltaLinearFunction, sddmm
from xlsparse.routing import TokenGroups

FAMILY = "matmul"
LANGUAGES = 4


def _inputs(tokens, out_f, in_f, density, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_f, generator=gen).to(dtype)
    w = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).to(dtype)
    b = torch.randn(out_f, generator=gen).to(dtype)
    k = int(out_f * in_f * density)
    idx = torch.randperm(out_f * in_f, generator=gen)[:k].sort().values
    vals = (0.01 * torch.randn(k, generator=gen)).to(dtype)
    gy = torch.randn(tokens, out_f, generator=gen).to(dtype)
    return x, w, b, idx, vals, gy


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _delta_linear_cases(tokens, out_f, in_f, density, dtype) -> list[Case]:
    x, w, b, idx, vals, gy = _inputs(tokens, out_f, in_f, density, dtype)
    k = idx.numel()
    xg, vg = x.clone().requires_grad_(True), vals.clone().requires_grad_(True)

    def ours():
        y = functional.sparse_delta_linear(xg, w, b, idx, vg)
        return torch.autograd.grad(y, [xg, vg], gy)

    def spiel():
        y = baselines.spiel_delta_linear(xg, w, b, idx, vg)
        return torch.autograd.grad(y, [xg, vg], gy)

    def ours_spmm_path():  # the other forward, for the choice `merge_pays` makes
        y = SparseDeltaLinearFunction.apply(xg, w, b, idx, vg, None)
        return torch.autograd.grad(y, [xg, vg], gy)

    shape = f"T={tokens} {out_f}x{in_f}"
    dense = 2 * tokens * out_f * in_f
    path = "merged" if functional.merge_pays(tokens, k, w.numel()) else "spmm"
    dy = gy
    spmm_rows = [] if density != 0.01 else [
        Case("sparse_delta_linear fwd+bwd, SpMM path", shape, _name(dtype), ours_spmm_path, spiel, "SpIEL", density,
             backend_for("spmm_", x.device), flops=2 * dense + 6 * tokens * k, note="forward: spmm (forced)")]
    return spmm_rows + [
        Case("sparse_delta_linear fwd+bwd", shape, _name(dtype), ours, spiel, "SpIEL (clone+scatter_add, dense dW, gather)",
             density, backend_for("sddmm", x.device), flops=2 * dense + 2 * tokens * k, note=f"forward: {path}"),
        Case("sddmm", shape, _name(dtype), lambda: sddmm(dy, x, idx), lambda: baselines.gather_sddmm(dy, x, idx),
             "torch gather SDDMM", density, backend_for("sddmm", x.device), flops=2 * tokens * k),
    ]


def _multi_cases(tokens, out_f, in_f, density, dtype) -> list[Case]:
    x, w, b, _, _, gy = _inputs(tokens, out_f, in_f, density, dtype)
    deltas = [_inputs(1, out_f, in_f, density, dtype, seed=1 + e)[3:5] for e in range(LANGUAGES)]
    idx = [d[0] for d in deltas]
    vals = [d[1].clone().requires_grad_(True) for d in deltas]
    gen = torch.Generator().manual_seed(7)
    route = torch.randint(0, LANGUAGES, (tokens,), generator=gen)
    groups = TokenGroups.build(route, LANGUAGES)  # built once per batch, shared by every layer
    xg = x.clone().requires_grad_(True)
    k = sum(i.numel() for i in idx)
    shape = f"T={tokens} {out_f}x{in_f} E={LANGUAGES}"
    dense = 2 * tokens * out_f * in_f
    backend = backend_for("spmm_", x.device)

    def ours_train():
        y = functional.multi_delta_linear(xg, w, b, idx, vals, route=groups)
        return torch.autograd.grad(y, [xg, *vals], gy)

    def peft_train():
        y = baselines.peft_mixed_batch(xg, w, b, idx, vals, route)
        return torch.autograd.grad(y, [xg, *vals], gy)

    @torch.no_grad()
    def ours_forward():
        return functional.multi_delta_linear(x, w, b, idx, vals, route=groups)

    @torch.no_grad()
    def peft_forward():
        return baselines.peft_mixed_batch(x, w, b, idx, vals, route)

    gates = torch.softmax(torch.randn(tokens, LANGUAGES, generator=gen), -1).to(dtype)
    merged = [w.reshape(-1).scatter_add(0, i, v.detach()).view(w.shape) for i, v in zip(idx, vals)]

    @torch.no_grad()
    def ours_gated():
        return functional.multi_delta_linear(x, w, b, idx, vals, gates=gates)

    @torch.no_grad()
    def dense_gated():
        return baselines.merged_ensemble(x, merged, b, gates)

    # Hard routing: each token meets one delta (2·T·K/E); soft gates: every token meets all.
    return [
        Case("multi_delta_linear hard fwd+bwd", shape, _name(dtype), ours_train, peft_train,
             "PEFT mixed batch (merge, index_select, linear, index_copy, dense dW)", density, backend,
             flops=2 * dense + 4 * tokens * k // LANGUAGES),
        Case("multi_delta_linear hard fwd", shape, _name(dtype), ours_forward, peft_forward, "PEFT mixed batch, forward",
             density, backend, flops=dense + 2 * tokens * k // LANGUAGES),
        Case("multi_delta_linear gates fwd", shape, _name(dtype), ours_gated, dense_gated,
             f"{LANGUAGES} merged dense forwards", density, backend, flops=dense + 2 * tokens * k),
    ]


def _ensemble_cases(tokens, vocab, dtype) -> list[Case]:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(LANGUAGES, tokens, vocab, generator=gen).to(dtype)
    lw = torch.log_softmax(torch.randn(tokens, LANGUAGES, generator=gen), -1).to(dtype)
    y = torch.randint(0, vocab, (tokens,), generator=gen)
    shape = f"E={LANGUAGES} T={tokens} V={vocab}"
    moved = z.numel() * z.element_size() + tokens * vocab * z.element_size()
    backend = backend_for("ensemble_logprobs", z.device)
    return [
        Case("ensemble_logprobs prob", shape, _name(dtype), lambda: functional.ensemble_logprobs(z, lw),
             lambda: baselines.composite_ensemble_logprobs(z, lw), "torch composite (stack log_softmax, logsumexp)",
             None, backend, bytes=moved),
        Case("ensemble_nll prob", shape, _name(dtype), lambda: functional.ensemble_nll(z, lw, y),
             lambda: -baselines.composite_ensemble_logprobs(z, lw).gather(1, y[:, None]),
             "torch composite, then gather", None, backend, bytes=z.numel() * z.element_size()),
    ]


def cases(quick: bool = False) -> list[Case]:
    tokens = 256 if quick else 2048
    layers = [(1024, 256), (256, 1024)] if quick else [(4096, 1024), (1024, 4096)]
    densities = [0.01] if quick else [0.005, 0.01, 0.05]
    found = []
    for dtype in (torch.float32, torch.bfloat16):
        for out_f, in_f in layers:
            for density in densities:
                found += _delta_linear_cases(tokens, out_f, in_f, density, dtype)
            found += _multi_cases(tokens, out_f, in_f, 0.01, dtype)
        found += _ensemble_cases(64 if quick else 256, 32000, dtype)
    return found
