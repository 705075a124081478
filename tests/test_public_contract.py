"""The public API exactly as DESIGN.md's "Public API" section states it, checked from outside:
names, argument names and defaults, accepted forms, and the documented behaviour on small random
cases against an independent float64 restatement. Fast (tiny tensors and models only)."""
import copy
import inspect
import os
import pathlib
import sys

import numpy as np
import pytest
import torch

import xlsparse
from xlsparse import SparseDelta, SparseDiff, cli

F64 = torch.float64


def _params(fn) -> dict:
    return dict(inspect.signature(fn).parameters)


def _has(fn, *names, **defaults):
    p = _params(fn)
    for n in names:
        assert n in p, f"{fn.__qualname__} lacks argument {n!r}: {list(p)}"
    for n, d in defaults.items():
        assert n in p, f"{fn.__qualname__} lacks argument {n!r}"
        assert p[n].default == d, f"{fn.__qualname__}: {n} defaults to {p[n].default!r}, the contract says {d!r}"


# --- names, arguments and defaults ---

def test_every_contract_name_exists_with_its_arguments():
    assert isinstance(xlsparse.__version__, str) and xlsparse.__version__
    b = xlsparse.backends()
    assert isinstance(b, dict) and b
    for op, table in b.items():
        assert set(table) == {"cpu", "cuda", "triton"}, op
        assert all(isinstance(v, bool) for v in table.values()), op
    _has(SparseDelta, "indices", "values", "shape")
    _has(SparseDelta.from_dense, "t", k=None)
    _has(SparseDiff, "deltas", "dense")
    _has(SparseDiff.from_models, "base", "tuned", k=None, density=None)
    _has(SparseDiff.merge, "diffs", weights=None)
    _has(SparseDiff.save, "path")
    _has(SparseDiff.load, "path")
    _has(SparseDiff.load_composable_sft, "path")
    _has(SparseDiff.apply, "model", alpha=1.0)
    _has(SparseDiff.applied, "model", "alpha")
    _has(xlsparse.apply, "diffs", "model", alphas=None, with_abs=True)
    _has(xlsparse.functional.sparse_delta_linear, "x", "weight", "bias", "indices", "values")
    _has(xlsparse.functional.multi_delta_linear, "x", "weight", "bias", "indices", "values", route=None, gates=None)
    _has(xlsparse.functional.topk_mask, "tensors", "k")
    _has(xlsparse.optim.MaskedAdamW, "params", "masks", "lr", "betas", "eps", "weight_decay", mode="dense",
         l1_to_init=0.0)
    _has(xlsparse.nn.SparseDeltaLinear.from_linear, "linear", k=None, density=None, indices=None)
    _has(xlsparse.nn.MultiDeltaLinear.from_linear, "linear", "deltas")
    _has(xlsparse.nn.SubnetworkLinear.from_linear, "linear", "masks")
    hf = xlsparse.hf
    _has(hf.convert, "model", target_modules=None, density=None, k=None, kind="delta", diffs=None, masks=None,
         modules_to_save=None)
    _has(hf.extract_diff, "model")
    _has(hf.merge, "model")
    _has(hf.route, "model", "language_ids")
    _has(hf.save_pretrained, "model")
    _has(hf.from_pretrained, "base_model")
    _has(hf.merge_and_unload, "model")
    _has(hf.disable, "model")


def test_the_command_line_has_the_contract_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert xlsparse.__version__ in capsys.readouterr().out
    sub = next(a for a in cli.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"bench", "demo", "compose", "info", "convert-composable-sft"} <= set(sub.choices)
    # `xlsparse info` as DESIGN.md lists it, without a DIFF: the install (it was a usage error, exit 2)
    assert cli.main(["info"]) == 0
    printed = capsys.readouterr().out
    assert xlsparse.__version__ in printed and all(f"| {op} |" in printed for op in xlsparse.backends())
    from xlsparse import __main__  # noqa: F401  (`python -m xlsparse`)


# --- data ---

def test_sparse_delta_dense_nnz_density_and_validation():
    d = SparseDelta(torch.tensor([0, 5, 7]), torch.tensor([1.0, 2.0, 3.0]), (3, 4))
    want = torch.zeros(12)
    want[[0, 5, 7]] = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(d.to_dense(), want.view(3, 4))
    assert d.nnz == 3 and d.density == pytest.approx(3 / 12)
    for bad in ([5, 0], [1, 1]):
        with pytest.raises(ValueError):
            SparseDelta(torch.tensor(bad), torch.ones(2), (3, 4))
    for bad in ([0, 12], [-1, 2]):
        with pytest.raises(IndexError):
            SparseDelta(torch.tensor(bad), torch.ones(2), (3, 4))
    t = torch.randn(5, 7, dtype=F64, generator=torch.Generator().manual_seed(0))
    top = SparseDelta.from_dense(t, k=4)
    idx = t.abs().flatten().topk(4).indices.sort().values
    assert torch.equal(top.indices.long(), idx) and torch.equal(top.values, t.flatten()[idx])
    assert tuple(top.shape) == (5, 7)
    t[0, :3] = 0
    assert torch.equal(SparseDelta.from_dense(t).to_dense(), t)  # k=None: every nonzero entry
    assert SparseDelta.from_dense(t).nnz == 32
    # the errors name from_dense and its arguments, not the topk_mask call inside it
    with pytest.raises(ValueError, match=r"^SparseDelta.from_dense: k = 36 is outside \[0, 35\]"):
        SparseDelta.from_dense(t, k=36)
    t[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^SparseDelta.from_dense: t holds NaN"):
        SparseDelta.from_dense(t, k=3)


def _linears(seed=1):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).double()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p))
    return base, tuned


def _dense(diff, like: dict) -> dict:
    out = {n: torch.zeros_like(t) for n, t in like.items()}
    for n, d in diff.deltas.items():
        out[n] = out[n] + d.to_dense().to(F64)
    for n, t in diff.dense.items():
        out[n] = out[n] + t.to(F64)
    return out


def test_from_models_is_a_global_top_k_of_the_difference():
    base, tuned = _linears()
    sb, st = base.state_dict(), tuned.state_dict()
    d = SparseDiff.from_models(base, tuned, k=10)
    assert d.nnz == 10
    thr = torch.cat([(st[n] - sb[n]).abs().flatten() for n in sb]).topk(10).values[-1]
    got = _dense(d, sb)
    for n in sb:
        full = st[n] - sb[n]
        assert torch.allclose(got[n], torch.where(full.abs() >= thr, full, torch.zeros_like(full))), n
    total = sum(p.numel() for p in base.parameters())
    assert abs(SparseDiff.from_models(base, tuned, density=0.25).nnz - 0.25 * total) <= 1


def test_diff_arithmetic_and_merge_match_dense_arithmetic():
    base, tuned = _linears()
    sb = base.state_dict()
    d1, d2 = SparseDiff.from_models(base, tuned, k=10), SparseDiff.from_models(base, tuned, density=0.2)
    d2 = 0.5 * (d2 - d1)  # a different support and sign
    d3 = SparseDiff({"0.weight": SparseDelta(torch.tensor([2, 29]), torch.tensor([1.5, -2.0], dtype=F64), (5, 6))},
                    {"0.bias": torch.arange(5, dtype=F64)})
    A, B, C = _dense(d1, sb), _dense(d2, sb), _dense(d3, sb)
    cases = [(d1 + d2, lambda n: A[n] + B[n]), (d1 - d3, lambda n: A[n] - C[n]), (0.5 * d3, lambda n: 0.5 * C[n]),
             (d3 * 2.0, lambda n: 2.0 * C[n]),
             (SparseDiff.merge([d1, d2, d3], weights=[0.3, 2.0, -1.0]), lambda n: 0.3 * A[n] + 2 * B[n] - C[n]),
             (SparseDiff.merge([d1, d3]), lambda n: A[n] + C[n])]
    for got, want in cases:
        dense = _dense(got, sb)
        for n in sb:
            assert torch.allclose(dense[n], want(n)), n
        for delta in got.deltas.values():
            i = delta.indices.long()
            assert bool((i[1:] > i[:-1]).all())  # union-merge keeps sorted, unique supports


@pytest.mark.parametrize("as_path", [str, pathlib.Path])
def test_save_load_round_trip(tmp_path, as_path):
    base, tuned = _linears()
    d = SparseDiff.from_models(base, tuned, k=9) + SparseDiff({}, {"1.bias": torch.ones(3, dtype=F64)})
    d.save(as_path(tmp_path / "d.safetensors"))
    back = SparseDiff.load(as_path(tmp_path / "d.safetensors"))
    assert set(back.deltas) == set(d.deltas) and set(back.dense) == set(d.dense)
    for n in d.deltas:
        assert torch.equal(back.deltas[n].indices.long(), d.deltas[n].indices.long())
        assert torch.equal(back.deltas[n].values, d.deltas[n].values)
    assert torch.equal(back.dense["1.bias"], d.dense["1.bias"])


def test_apply_revert_applied_and_many_diffs():
    base, model = _linears()
    sb = base.state_dict()
    d1, d2 = SparseDiff.from_models(base, model, k=10), SparseDiff.from_models(base, model, k=4)
    d3 = SparseDiff({}, {"0.bias": torch.ones(5, dtype=F64)})
    A, B, C = _dense(d1, sb), _dense(d2, sb), _dense(d3, sb)
    before = {n: t.clone() for n, t in model.state_dict().items()}

    def now():
        return model.state_dict()

    h = d1.apply(model, alpha=0.7)
    assert all(torch.allclose(now()[n], before[n] + 0.7 * A[n]) for n in sb)
    h.revert()
    assert all(torch.equal(now()[n], before[n]) for n in sb)
    with d3.applied(model, alpha=2.0):
        assert all(torch.allclose(now()[n], before[n] + 2 * C[n]) for n in sb)
    assert all(torch.equal(now()[n], before[n]) for n in sb)
    h = xlsparse.apply([d1, d2, d3], model, alphas=[1.0, -0.5, 3.0])
    assert all(torch.allclose(now()[n], before[n] + A[n] - 0.5 * B[n] + 3 * C[n]) for n in sb)
    h.revert()
    assert all(torch.equal(now()[n], before[n]) for n in sb)
    with xlsparse.apply([d1, d2], model):  # alphas=None: every weight 1
        assert all(torch.allclose(now()[n], before[n] + A[n] + B[n]) for n in sb)
    assert all(torch.equal(now()[n], before[n]) for n in sb)
    # one number where the list belongs: Python's bare "'float' object is not iterable" named no argument
    with pytest.raises(TypeError, match="apply: alphas must be a list of numbers"):
        xlsparse.apply([d1], model, 0.5)
    with pytest.raises(TypeError, match="merge: weights must be a list of numbers"):
        SparseDiff.merge([d1], weights=0.5)
    assert all(torch.equal(now()[n], before[n]) for n in sb)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_apply_is_as_accurate_as_torch_and_reverts_bit_exactly(dtype):
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Linear(64, 33).to(dtype)
    w0 = m.weight.detach().clone()
    i1, i2 = (torch.randperm(w0.numel(), generator=g)[:k].sort().values for k in (500, 700))
    v1, v2 = torch.randn(500, generator=g), torch.randn(700, generator=g)
    d1 = SparseDiff({"weight": SparseDelta(i1, v1, w0.shape)})
    d2 = SparseDiff({"weight": SparseDelta(i2, v2, w0.shape)})
    h = xlsparse.apply([d1, d2], m, alphas=[0.3, -1.7])
    ref = w0.double().flatten()
    ref[i1] += 0.3 * v1.double()
    ref[i2] -= 1.7 * v2.double()
    plain = w0.clone().flatten()
    plain[i1] += (0.3 * v1).to(dtype)
    plain[i2] += (-1.7 * v2).to(dtype)
    err = (m.weight.detach().double().flatten() - ref).abs().max()
    assert err <= 2 * (plain.double() - ref).abs().max()
    h.revert()
    assert torch.equal(m.weight.detach(), w0)


def _composable_sft_encoding(shape, row_major: torch.Tensor, values: torch.Tensor) -> dict:
    """composable-sft's encoding, written from its description: column-major flat indices
    (first dimension fastest), sorted, delta-encoded with the first step absolute."""
    coords = np.array(np.unravel_index(row_major.numpy(), shape), dtype=np.int64)
    col = (np.cumprod([1] + list(shape)[:-1], dtype=np.int64)[:, None] * coords).sum(0)
    perm = np.argsort(col)
    col = col[perm]
    return {"size": torch.Size(shape), "index_steps": [np.int64(col[0])] + (col[1:] - col[:-1]).tolist(),
            "values": values[torch.from_numpy(perm)]}


def test_load_composable_sft_reads_column_major_delta_encoded_indices(tmp_path):
    g = torch.Generator().manual_seed(2)
    shapes = {"a.weight": (5, 7), "b.weight": (3, 4, 2)}
    want, enc = {}, {}
    for n, shape in shapes.items():
        n_el = int(np.prod(shape))
        idx = torch.randperm(n_el, generator=g)[:6].sort().values
        v = torch.randn(6, generator=g)
        want[n] = torch.zeros(n_el).index_put_((idx,), v).view(shape)
        enc[n] = _composable_sft_encoding(shape, idx, v)
    head = torch.randn(2, 3, generator=g)
    torch.save({"diffs": enc, "abs": {"head.weight": head}}, tmp_path / "pytorch_diff.bin")
    for path in (tmp_path / "pytorch_diff.bin", tmp_path):  # the file or its folder
        d = SparseDiff.load_composable_sft(str(path))
        for n in shapes:
            assert torch.equal(d.deltas[n].to_dense(), want[n]), n
        assert torch.equal(d.absolute["head.weight"], head)


# --- functional ---

def _delta_dense(o, i, idx, val):
    return torch.zeros(o * i, dtype=val.dtype).index_put((idx,), val).view(o, i)


def test_sparse_delta_linear_forward_and_backward():
    g = torch.Generator().manual_seed(3)
    T, O, I = 7, 5, 6
    x, W, b = (torch.randn(*s, dtype=F64, generator=g).requires_grad_() for s in ((T, I), (O, I), (O,)))
    idx = torch.tensor([0, 4, 9, 17, 29])
    val = torch.randn(5, dtype=F64, generator=g).requires_grad_()
    y = xlsparse.functional.sparse_delta_linear(x, W, b, idx, val)
    ref = x @ (W + _delta_dense(O, I, idx, val)).T + b
    assert torch.allclose(y, ref)
    dy = torch.randn_like(y)
    for a, r in zip(torch.autograd.grad(y, [x, W, b, val], dy), torch.autograd.grad(ref, [x, W, b, val], dy)):
        assert torch.allclose(a, r)
    x3 = torch.randn(2, 3, I, dtype=F64, generator=g)
    assert torch.allclose(xlsparse.functional.sparse_delta_linear(x3, W, None, idx, val),
                          x3 @ (W + _delta_dense(O, I, idx, val)).T)


def test_multi_delta_linear_hard_routes_and_soft_gates():
    g = torch.Generator().manual_seed(4)
    T, O, I = 7, 5, 6
    x, W, b = (torch.randn(*s, dtype=F64, generator=g).requires_grad_() for s in ((T, I), (O, I), (O,)))
    idxs = [torch.tensor([0, 4, 9]), torch.tensor([], dtype=torch.long), torch.tensor([1, 2, 3, 28, 29])]
    vals = [torch.randn(len(i), dtype=F64, generator=g).requires_grad_() for i in idxs]

    def deltas():
        return [_delta_dense(O, I, i, v) for i, v in zip(idxs, vals)]

    route = torch.tensor([0, 2, -1, 1, 2, 0, -1])
    y = xlsparse.functional.multi_delta_linear(x, W, b, idxs, vals, route=route)
    D = deltas()
    ref = torch.stack([x[t] @ (W + (D[route[t]] if route[t] >= 0 else 0)).T + b for t in range(T)])
    assert torch.allclose(y, ref)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, W, b, *vals], dy)
    want = torch.autograd.grad(ref, [x, W, b, *vals], dy, allow_unused=True)
    for a, r in zip(got, want):
        assert torch.allclose(a, torch.zeros_like(a) if r is None else r)
    gates = torch.randn(T, 3, dtype=F64, generator=g).requires_grad_()
    y = xlsparse.functional.multi_delta_linear(x, W, b, idxs, vals, gates=gates)
    D = deltas()
    ref = x @ W.T + b + sum(gates[:, e:e + 1] * (x @ D[e].T) for e in range(3))
    assert torch.allclose(y, ref)
    for a, r in zip(torch.autograd.grad(y, [x, gates, *vals], dy), torch.autograd.grad(ref, [x, gates, *vals], dy)):
        assert torch.allclose(a, r)
    x3 = torch.randn(2, 3, I, dtype=F64, generator=g)
    r3 = torch.tensor([[0, 1, -1], [2, 2, 0]])
    y3 = xlsparse.functional.multi_delta_linear(x3, W, b, idxs, vals, route=r3)
    D = deltas()
    for i in range(2):
        for j in range(3):
            e = int(r3[i, j])
            assert torch.allclose(y3[i, j], x3[i, j] @ (W + (D[e] if e >= 0 else 0)).T + b)


def test_topk_mask_is_global_over_the_tensors():
    g = torch.Generator().manual_seed(5)
    ts = [torch.randn(4, 5, dtype=F64, generator=g), torch.randn(3, dtype=F64, generator=g),
          torch.randn(2, 2, 2, dtype=F64, generator=g)]
    masks = xlsparse.functional.topk_mask(ts, 9)
    assert isinstance(masks, list) and len(masks) == 3
    thr = torch.cat([t.abs().flatten() for t in ts]).topk(9).values[-1]
    for m, t in zip(masks, ts):
        assert m.dtype == torch.bool and m.shape == t.shape
        assert torch.equal(m, t.abs() >= thr)
    assert sum(int(m.sum()) for m in xlsparse.functional.topk_mask(ts, 0)) == 0
    assert all(bool(m.all()) for m in xlsparse.functional.topk_mask(ts, 31))


# --- optim ---

def _adamw(p0, mask, grads, lr, betas, eps, wd, l1):
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for step, g in enumerate(grads, 1):
        g = g + l1 * torch.sign(p - p0)
        m2, v2 = betas[0] * m + (1 - betas[0]) * g, betas[1] * v + (1 - betas[1]) * g * g
        p2 = p * (1 - lr * wd) - lr * (m2 / (1 - betas[0] ** step)) / ((v2 / (1 - betas[1] ** step)).sqrt() + eps)
        p, m, v = torch.where(mask, p2, p), torch.where(mask, m2, m), torch.where(mask, v2, v)
    return p


@pytest.mark.parametrize("mode", ["dense", "compact"])
@pytest.mark.parametrize("form", ["bool", "indices", "dict"])
def test_masked_adamw_matches_adamw_on_the_mask_only(mode, form):
    g = torch.Generator().manual_seed(6)
    p0s = [torch.randn(4, 5, dtype=F64, generator=g), torch.randn(7, dtype=F64, generator=g)]
    masks = [torch.rand(4, 5, generator=g) < 0.5, torch.rand(7, generator=g) < 0.5]
    grads = [[torch.randn(p.shape, dtype=F64, generator=g) for p in p0s] for _ in range(3)]
    ps = [torch.nn.Parameter(p.clone()) for p in p0s]
    given = {"bool": masks, "indices": [m.flatten().nonzero().flatten() for m in masks],
             "dict": {ps[0]: masks[0], ps[1]: masks[1]}}[form]
    opt = xlsparse.optim.MaskedAdamW(ps, given, lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, mode=mode,
                                     l1_to_init=0.3)
    for gs in grads:
        for p, gr in zip(ps, gs):
            p.grad = gr.clone()
        opt.step()
    for i in range(2):
        want = _adamw(p0s[i], masks[i], [gs[i] for gs in grads], 0.01, (0.8, 0.9), 1e-6, 0.1, 0.3)
        assert torch.allclose(ps[i].detach(), want)
        assert torch.equal(ps[i].detach()[~masks[i]], p0s[i][~masks[i]])  # bit-identical outside the mask
    if mode == "compact":  # state of size K, not N
        for p, m in zip(ps, masks):
            assert opt.state[p]["exp_avg"].numel() == int(m.sum())


# --- nn ---

def test_nn_layers_from_linear():
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    lin = torch.nn.Linear(6, 5).double()
    x = torch.randn(4, 6, dtype=F64, generator=g)
    for kw in (dict(k=7), dict(density=0.2), dict(indices=torch.tensor([0, 3, 29])),
               dict(indices=torch.rand(5, 6, generator=g) < 0.3)):
        layer = xlsparse.nn.SparseDeltaLinear.from_linear(copy.deepcopy(lin), **kw)
        assert torch.allclose(layer(x), lin(x))  # a new delta starts at zero
    assert len(layer.indices) == int(kw["indices"].sum())  # a bool mask gives its True entries
    deltas = {"de": SparseDelta(torch.tensor([1, 4, 9]), torch.randn(3, dtype=F64, generator=g), (5, 6)),
              "fr": SparseDelta(torch.tensor([0, 29]), torch.randn(2, dtype=F64, generator=g), (5, 6))}
    multi = xlsparse.nn.MultiDeltaLinear.from_linear(copy.deepcopy(lin), deltas)
    W = {0: lin.weight + deltas["de"].to_dense(), 1: lin.weight + deltas["fr"].to_dense(), -1: lin.weight}
    route = torch.tensor([1, 0, -1, 1])
    want = torch.stack([x[t] @ W[int(route[t])].T + lin.bias for t in range(4)])
    assert torch.allclose(multi(x, route=route), want)
    with xlsparse.hf.route(multi, ["fr", "de", None, "fr"]):  # names index the dict's insertion order
        assert torch.allclose(multi(x), want)
    masks = {"de": torch.rand(5, 6, generator=g) < 0.5, "fr": torch.rand(5, 6, generator=g) < 0.5}
    sub = xlsparse.nn.SubnetworkLinear.from_linear(copy.deepcopy(lin), masks)
    assert torch.allclose(sub(x, language_ids=route), lin(x))
    dy = torch.randn(4, 5, dtype=F64, generator=g)
    sub(x, language_ids=route).backward(dy)
    mk = list(masks.values())
    want = sum(mk[lang].double() * (dy[route == lang].T @ x[route == lang]) for lang in (0, 1))
    assert torch.allclose(sub.weight.grad, want)  # dW = Σ_l M_l ⊙ (dY_lᵀ X_l); id −1 adds nothing
    assert torch.allclose(sub.bias.grad, dy[route >= 0].sum(0))


# --- Hugging Face layer ---

try:
    import transformers
except ImportError:  # the checks above still run
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="transformers is not installed")


def _tiny():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "hf"))
    import tiny_models
    return tiny_models


def _out(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def _close(a, b):
    return torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@needs_hf
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_hf_delta_convert_train_extract_save_reload_unload(arch, tmp_path):
    hf, t = xlsparse.hf, _tiny()
    base, x = t.tiny(arch), t.batch()
    model = hf.convert(copy.deepcopy(base), k=200)
    y0 = _out(base, x)
    assert _close(_out(model, x), y0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(8)) * 0.3)
    y1 = _out(model, x)
    assert not _close(y1, y0)
    diff = hf.extract_diff(model)
    assert isinstance(diff, SparseDiff) and diff.nnz <= 200
    other = copy.deepcopy(base)
    diff.apply(other)
    assert _close(_out(other, x), y1)
    with hf.disable(model):
        assert _close(_out(model, x), y0)
    hf.save_pretrained(model, str(tmp_path / "sft"))
    assert _close(_out(hf.from_pretrained(copy.deepcopy(base), str(tmp_path / "sft")), x), y1)
    merged = copy.deepcopy(model)
    hf.merge(merged)
    assert _close(_out(merged, x), y1)
    plain = hf.merge_and_unload(copy.deepcopy(model))
    assert set(plain.state_dict()) == set(base.state_dict())
    assert _close(_out(plain, x), y1)


@needs_hf
def test_hf_multi_route_by_ids_names_and_tokens(tmp_path):
    hf, t = xlsparse.hf, _tiny()
    base, x = t.tiny("bert"), t.batch(b=3)
    d_de, d_fr = t.random_diff(base, 5, 0.3, 1), t.random_diff(base, 5, 0.3, 2)
    model = hf.convert(copy.deepcopy(base), kind="multi", diffs={"de": d_de, "fr": d_fr})
    refs = []
    for d in (d_de, d_fr):
        other = copy.deepcopy(base)
        d.apply(other)
        refs.append(_out(other, x))
    y0 = _out(base, x)

    def same(y):
        return _close(y[0], refs[0][0]) and _close(y[1], refs[1][1]) and _close(y[2], y0[2])

    for ids in ([0, 1, -1], ["de", "fr", None], torch.tensor([0, 1, -1]),
                torch.tensor([[0] * 7, [1] * 7, [-1] * 7]), [["de"] * 7, ["fr"] * 7, [None] * 7]):
        with hf.route(model, ids):
            assert same(_out(model, x)), ids
    with pytest.raises(ValueError):
        with hf.route(model, [0, 1]):
            _out(model, x)
    hf.save_pretrained(model, str(tmp_path / "m"))
    again = hf.from_pretrained(copy.deepcopy(base), str(tmp_path / "m"))
    with hf.route(again, ["de", "fr", None]):
        assert same(_out(again, x))
    for i, lang in enumerate(("de", "fr")):
        assert _close(_out(hf.merge_and_unload(copy.deepcopy(model), language=lang), x), refs[i])


@needs_hf
def test_hf_subnetwork_updates_only_the_routed_language_mask():
    hf, t = xlsparse.hf, _tiny()
    base, x = t.tiny("bert"), t.batch(b=2)
    names = [f"{n}.weight" for n in hf.model.target_names(base)][:4]
    g = torch.Generator().manual_seed(5)
    masks = {lang: {n: torch.rand(base.get_parameter(n).shape, generator=g) < 0.3 for n in names}
             for lang in ("de", "fr")}
    model = hf.convert(copy.deepcopy(base), kind="subnetwork", masks=masks).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with hf.route(model, ["fr", -1]):
        model(input_ids=x, labels=x).loss.backward()
    ref = copy.deepcopy(base).train()
    for m in ref.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    params = dict(ref.named_parameters())
    frozen = {n: p.detach() for n, p in params.items()}
    logits = torch.cat([torch.func.functional_call(ref, params, (x[:1],)).logits,   # example 0 trains
                        torch.func.functional_call(ref, frozen, (x[1:],)).logits])  # example 1 (−1) does not
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1)).backward()
    got = dict(model.named_parameters())
    for n in names:
        assert torch.allclose(got[n].grad, params[n].grad * masks["fr"][n], atol=1e-6), n


# --- command line ---

@needs_hf
def test_cli_convert_info_compose(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16)
    base = transformers.BertForMaskedLM(cfg)
    base.save_pretrained(tmp_path / "base")
    sd = base.state_dict()
    g = torch.Generator().manual_seed(1)
    names = ["bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.output.dense.weight"]
    enc, step = {}, {}
    for n in names:
        idx = torch.randperm(sd[n].numel(), generator=g)[:7].sort().values
        v = torch.randn(7, generator=g)
        enc[n] = _composable_sft_encoding(tuple(sd[n].shape), idx, v)
        step[n] = torch.zeros(sd[n].numel()).index_put_((idx,), v).view(sd[n].shape)
    os.makedirs(tmp_path / "sft")
    torch.save({"diffs": enc, "abs": {}}, tmp_path / "sft" / "pytorch_diff.bin")
    out = str(tmp_path / "conv.safetensors")
    assert cli.main(["convert-composable-sft", str(tmp_path / "sft"), out]) == 0
    assert cli.main(["info", out]) == 0
    printed = capsys.readouterr().out
    assert all(n in printed for n in names)
    assert cli.main(["compose", str(tmp_path / "base"), str(tmp_path / "sft"), out, "--alpha", "0.5", "0.25",
                     "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.BertForMaskedLM.from_pretrained(tmp_path / "merged").state_dict()
    for n in sd:
        want = sd[n] + 0.75 * step[n] if n in step else sd[n]
        assert torch.allclose(merged[n], want, atol=1e-6), n
