"""Property suite (hypothesis): random valid inputs to every op agree with the pure-PyTorch
reference on every CPU backend, and random invalid inputs raise the documented error type and
write nothing. Example counts are small and fixed (derandomized) so that CI time is bounded."""
import math

import pytest
import torch
from conftest import assert_bit_identical, cpu_backends
from hypothesis import HealthCheck, given, settings, strategies as st

import xlsparse
from xlsparse.ops import compose as cops, matmul as mops, optim as oops

# use_backend (a function-scoped monkeypatch) sets one env var for the whole test: safe to share
# between examples.
PROPS = settings(max_examples=40, deadline=None, derandomize=True, print_blob=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FLOATS = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
INDEX = st.sampled_from([torch.int32, torch.int64])


def tol(dtype):
    return {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-2),
            torch.float16: (2e-3, 1e-3)}[dtype]


def close(got, want, dtype, what=""):
    rtol, atol = tol(dtype)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=what)


@st.composite
def sparse_support(draw, max_numel=200):
    """(numel, sorted unique indices as a list)."""
    numel = draw(st.integers(1, max_numel))
    k = draw(st.integers(0, numel))
    seed = draw(st.integers(0, 2**31 - 1))
    idx = torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:k].sort().values
    return numel, idx


def rand(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- composition ---

@pytest.mark.parametrize("backend", cpu_backends("sparse_axpy_"))
@PROPS
@given(support=sparse_support(), dtype=FLOATS, index_dtype=INDEX, alpha=st.floats(-4, 4), seed=st.integers(0, 999))
def test_sparse_axpy_matches_reference(backend, use_backend, support, dtype, index_dtype, alpha, seed):
    use_backend(backend)
    numel, idx = support
    dense, vals = rand(numel, dtype, seed), rand(idx.numel(), dtype, seed + 1)
    want = dense.clone()
    cops.sparse_axpy_reference(want, idx.to(index_dtype), vals, alpha)
    got = cops.sparse_axpy_(dense.clone(), idx.to(index_dtype), vals, alpha)
    untouched = torch.ones(numel, dtype=torch.bool)
    untouched[idx] = False
    assert_bit_identical(got[untouched], dense[untouched], "untouched entries")
    close(got, want, dtype)


@st.composite
def bad_indices(draw, numel):
    """Index lists that break exactly one rule, and the error that rule gives."""
    kind = draw(st.sampled_from(["negative", "too big", "unsorted", "duplicate"]))
    k = draw(st.integers(2, 6))
    base = sorted(draw(st.lists(st.integers(0, numel - 1), min_size=k, max_size=k, unique=True)))
    pos = draw(st.integers(0, k - 1))
    if kind == "negative":
        base[0] = -draw(st.integers(1, 2**40))
        return base, IndexError
    if kind == "too big":
        base[-1] = numel + draw(st.sampled_from([0, 1, 2**31, 2**32 + 1, 2**40]))
        return base, IndexError
    if kind == "unsorted":
        base[pos], base[(pos + 1) % k] = base[(pos + 1) % k], base[pos]
        return base, ValueError
    base[pos] = base[(pos + 1) % k]
    return base, ValueError


@pytest.mark.parametrize("backend", cpu_backends("sparse_axpy_"))
@PROPS
@given(data=st.data(), numel=st.integers(8, 100), index_dtype=INDEX)
def test_bad_indices_raise_and_write_nothing(backend, use_backend, data, numel, index_dtype):
    use_backend(backend)
    idx, exc = data.draw(bad_indices(numel))
    if index_dtype == torch.int32 and any(abs(i) >= 2**31 for i in idx):
        index_dtype = torch.int64
    idx = torch.tensor(idx, dtype=index_dtype)
    dense = rand(numel, torch.float32, 0)
    before = dense.clone()
    with pytest.raises(exc, match="indices|sorted|range"):
        cops.sparse_axpy_(dense, idx, torch.ones(idx.numel()))
    with pytest.raises(exc):
        cops.apply_diffs_([dense], [idx], [torch.ones(idx.numel())], [0], [1.0])
    with pytest.raises(exc):
        xlsparse.SparseDelta(idx, torch.ones(idx.numel()), (numel,))
    assert_bit_identical(dense, before, "after rejected calls")


@pytest.mark.parametrize("backend", cpu_backends("apply_diffs_"))
@PROPS
@given(supports=st.lists(sparse_support(60), min_size=1, max_size=4), dtype=FLOATS,
       alphas=st.lists(st.floats(-2, 2), min_size=4, max_size=4), seed=st.integers(0, 999))
def test_apply_matches_reference_and_reverts_exactly(backend, use_backend, supports, dtype, alphas, seed):
    use_backend(backend)
    # tensors of 60 elements; entry e updates tensor e % 2 with its own support
    dense = [rand(60, dtype, seed), rand(60, dtype, seed + 1)]
    idx = [s[1][s[1] < 60] for s in supports]
    vals = [rand(i.numel(), dtype, seed + 2 + e) for e, i in enumerate(idx)]
    target = [e % 2 for e in range(len(idx))]
    al = alphas[: len(idx)]
    want = [d.clone() for d in dense]
    cops.apply_diffs_reference(want, idx, vals, target, al, [torch.empty_like(v) for v in vals])
    got = [d.clone() for d in dense]
    saved = cops.apply_diffs_(got, idx, vals, target, al)
    for g, w in zip(got, want):
        close(g, w, dtype)
    cops.restore_diffs_(got, idx, saved, target)
    for g, d in zip(got, dense):
        assert_bit_identical(g, d, "revert")


@pytest.mark.parametrize("backend", cpu_backends("merge_deltas"))
@PROPS
@given(supports=st.lists(sparse_support(80), min_size=1, max_size=4), dtype=FLOATS, index_dtype=INDEX,
       seed=st.integers(0, 999))
def test_merge_matches_reference_and_dense_sum(backend, use_backend, supports, dtype, index_dtype, seed):
    use_backend(backend)
    numel = 80
    idx = [s[1][s[1] < numel].to(index_dtype) for s in supports]
    vals = [rand(i.numel(), dtype, seed + e) for e, i in enumerate(idx)]
    weights = [0.5 + e for e in range(len(idx))]
    ui, uv = cops.merge_deltas(idx, vals, weights, numel)
    ri, rv = cops.merge_deltas_reference(idx, vals, weights, numel)
    assert torch.equal(ui, ri) and ui.dtype == index_dtype
    close(uv, rv, dtype)
    dense = torch.zeros(numel, dtype=torch.float64)
    for i, v, w in zip(idx, vals, weights):
        dense[i.long()] += w * v.double()
    close(torch.zeros(numel, dtype=torch.float64).index_put_((ui.long(),), uv.double()), dense, dtype)


@pytest.mark.parametrize("backend", cpu_backends("topk_masks"))
@PROPS
@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=4), dtype=FLOATS, levels=st.integers(1, 6),
       data=st.data(), seed=st.integers(0, 999))
def test_topk_is_exactly_the_reference(backend, use_backend, sizes, dtype, levels, data, seed):
    use_backend(backend)
    g = torch.Generator().manual_seed(seed)
    # few distinct magnitudes (and both signs): many ties, which must go to the lowest position
    tensors = [(torch.randint(-levels, levels + 1, (n,), generator=g) * 0.25).to(dtype) for n in sizes]
    k = data.draw(st.integers(0, sum(sizes)))
    got = cops.topk_masks(tensors, k)
    want = cops.topk_masks_reference(tensors, k)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert sum(int(m.sum()) for m in got) == k
    with pytest.raises(ValueError, match="k = "):
        cops.topk_masks(tensors, sum(sizes) + data.draw(st.integers(1, 2**40)))


# --- matmul ---

@pytest.mark.parametrize("backend", cpu_backends("sddmm"))
@PROPS
@given(t=st.integers(0, 9), o=st.integers(1, 9), i=st.integers(1, 9), dtype=FLOATS, data=st.data(),
       seed=st.integers(0, 999))
def test_sddmm_and_spmm_match_reference(backend, use_backend, t, o, i, dtype, data, seed):
    use_backend(backend)
    k = data.draw(st.integers(0, o * i))
    idx = torch.randperm(o * i, generator=torch.Generator().manual_seed(seed))[:k].sort().values
    dy, x, vals = rand((t, o), dtype, seed), rand((t, i), dtype, seed + 1), rand(k, dtype, seed + 2)
    close(mops.sddmm(dy, x, idx), mops.sddmm_reference(dy, x, idx), dtype, "sddmm")
    for transpose in (False, True):
        a, b = (dy, x) if transpose else (x, dy)  # out [T, O] from x [T, I], or [T, I] from dy [T, O]
        out = rand(b.shape, dtype, seed + 3)
        want = out.clone()
        mops.spmm_reference(want, a, idx, vals, transpose=transpose)
        close(mops.spmm_(out.clone(), a, idx, vals, transpose=transpose), want, dtype, "spmm")


@pytest.mark.parametrize("backend", cpu_backends("ensemble_nll"))
@PROPS
@given(e=st.integers(1, 3), t=st.integers(0, 5), v=st.integers(1, 7), space=st.sampled_from([True, False]),
       seed=st.integers(0, 999), data=st.data())
def test_ensemble_matches_reference(backend, use_backend, e, t, v, space, seed, data):
    use_backend(backend)
    z = rand((e, t, v), torch.float32, seed)
    lw = torch.log_softmax(rand((t, e), torch.float32, seed + 1), -1)
    y = torch.randint(0, v, (t,), generator=torch.Generator().manual_seed(seed))
    close(mops.ensemble_logprobs_op(z, lw, space)[0], mops.ensemble_logprobs_reference(z, lw, space)[0], torch.float32)
    close(mops.ensemble_nll_op(z, lw, y, space)[0], mops.ensemble_nll_reference(z, lw, y, space)[0], torch.float32)
    if t:
        bad = y.clone()
        bad[data.draw(st.integers(0, t - 1))] = data.draw(st.sampled_from([-1, v, v + 2**33]))
        with pytest.raises(IndexError, match="targets"):
            mops.ensemble_nll_op(z, lw, bad, space)


# --- optimizer steps ---

@st.composite
def selection(draw, numel):
    kind = draw(st.sampled_from(["all", "mask", "indices"]))
    if kind == "all":
        return None
    k = draw(st.integers(0, numel))
    idx = torch.randperm(numel, generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))[:k].sort().values
    if kind == "indices":
        return idx.to(draw(INDEX))
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[idx] = True
    return mask


@pytest.mark.parametrize("backend", cpu_backends("masked_adamw_"))
@PROPS
@given(numel=st.integers(1, 70), data=st.data(), dtype=FLOATS, own_step=st.booleans(), wd=st.sampled_from([0.0, 0.1]),
       sgd=st.booleans(), seed=st.integers(0, 999))
def test_masked_steps_match_reference(backend, use_backend, numel, data, dtype, own_step, wd, sgd, seed):
    use_backend(backend)
    sel = data.draw(selection(numel))
    n_state = sel.numel() if sel is not None and sel.dtype != torch.bool else numel
    p, g = rand(numel, dtype, seed), rand(numel, dtype, seed + 1)
    m, v = rand(n_state, dtype, seed + 2), rand(n_state, dtype, seed + 3).abs()
    step = (torch.randint(0, 5, (n_state,), dtype=torch.int32, generator=torch.Generator().manual_seed(seed))
            if own_step else torch.tensor(float(seed % 7)))
    args = lambda: ([p.clone()], [g], [sel], [m.clone()], [v.clone()], [step.clone()])  # noqa: E731
    kw = dict(lr=0.05, weight_decay=wd)
    runs = []
    for fn in ((oops.masked_sgd_, oops.masked_sgd_reference) if sgd else (oops.masked_adamw_, oops.masked_adamw_reference)):
        ps, gs, ss, ms, vs, steps = args()
        if sgd:
            if fn is oops.masked_sgd_:
                fn(ps, gs, ss, ms, steps, momentum=0.9, **kw)
            else:
                fn(ps, gs, ss, ms, steps, 0.05, 0.9, 0.0, wd, False)
        else:
            if fn is oops.masked_adamw_:
                fn(ps, gs, ss, ms, vs, [], steps, [], beta1=0.9, beta2=0.99, eps=1e-8, **kw)
            else:
                fn(ps, gs, ss, ms, vs, [], steps, [], 0.05, 0.9, 0.99, 1e-8, wd, 0.0, False)
        runs.append((ps[0], ms[0], vs[0], steps[0]))
    (p1, m1, v1, s1), (p2, m2, v2, s2) = runs
    close(p1, p2, dtype, "param")
    close(m1, m2, dtype, "state")
    assert torch.equal(s1, s2)
    if sel is not None:
        untouched = ~sel if sel.dtype == torch.bool else torch.ones(numel, dtype=torch.bool).index_fill_(0, sel.long(), False)
        assert_bit_identical(p1[untouched], p[untouched], "entries outside the mask")


@pytest.mark.parametrize("backend", cpu_backends("multi_mask_weight_grad"))
@PROPS
@given(t=st.integers(0, 12), o=st.integers(1, 6), i=st.integers(1, 6), langs=st.integers(1, 3), dtype=FLOATS,
       seed=st.integers(0, 999))
def test_multi_mask_weight_grad_matches_reference(backend, use_backend, t, o, i, langs, dtype, seed):
    use_backend(backend)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, langs, (t,), generator=gen)
    groups = xlsparse.routing.TokenGroups.build(ids, langs)
    masks = torch.rand(langs, o, i, generator=gen) > 0.5
    dy, x = rand((t, o), dtype, seed), rand((t, i), dtype, seed + 1)
    got = oops.multi_mask_weight_grad(dy, x, masks, groups.order, groups.offsets)
    want = oops.multi_mask_weight_grad_reference(dy, x, masks, groups.order, groups.offsets)
    close(got, want, dtype)
    assert torch.equal(got[~masks.any(0)], torch.zeros_like(got[~masks.any(0)]))


# --- the data classes ---

@PROPS
@given(shape=st.lists(st.integers(0, 6), min_size=1, max_size=3),
       raw=st.lists(st.integers(-5, 300), max_size=12), index_dtype=INDEX)
def test_sparse_delta_accepts_exactly_the_valid_supports(shape, raw, index_dtype):
    numel = math.prod(shape)
    idx = torch.tensor(raw, dtype=index_dtype)
    vals = torch.ones(len(raw))
    if any(r < 0 or r >= numel for r in raw):
        with pytest.raises(IndexError):
            xlsparse.SparseDelta(idx, vals, shape)
    elif any(a >= b for a, b in zip(raw, raw[1:])):
        with pytest.raises(ValueError, match="sorted and unique"):
            xlsparse.SparseDelta(idx, vals, shape)
    else:
        d = xlsparse.SparseDelta(idx, vals, shape)
        assert d.nnz == len(raw) and d.to_dense().shape == tuple(shape)


@PROPS
@given(supports=st.lists(sparse_support(40), min_size=1, max_size=3), weights=st.lists(st.floats(-3, 3), min_size=3,
       max_size=3), seed=st.integers(0, 999))
def test_diff_arithmetic_equals_dense_arithmetic(supports, weights, seed):
    diffs = []
    for e, (numel, idx) in enumerate(supports):
        idx = idx[idx < 40]
        diffs.append(xlsparse.SparseDiff({"w": xlsparse.SparseDelta(idx, rand(idx.numel(), torch.float64, seed + e), (40,))}))
    merged = xlsparse.SparseDiff.merge(diffs, weights[: len(diffs)])
    want = sum(w * d.deltas["w"].to_dense() for d, w in zip(diffs, weights))
    torch.testing.assert_close(merged.deltas["w"].to_dense(), want)
    torch.testing.assert_close((diffs[0] - diffs[0]).deltas["w"].to_dense(), torch.zeros(40, dtype=torch.float64))
