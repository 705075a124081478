"""sparse_axpy_ on every CPU-capable backend against the float64 reference."""
import pytest
import torch

from conftest import (
    DTYPES,
    INDEX_DTYPES,
    ODD_SIZES,
    assert_bit_identical,
    assert_matches_reference,
    cpu_backends,
    random_indices,
    seeded,
)
from xlsparse import _ext
from xlsparse.ops.compose import sparse_axpy_

BACKENDS = cpu_backends("sparse_axpy_")


def _case(n, k, dtype, index_dtype, seed):
    gen = seeded(seed)
    dense = torch.randn(n, generator=gen).to(dtype)
    idx = random_indices(n, k, index_dtype, gen)
    vals = torch.randn(k, generator=gen).to(dtype)
    return dense, idx, vals


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_matches_float64_reference(backend, dtype, n, density, index_dtype, use_backend):
    use_backend(backend)
    k = round(n * density)
    dense, idx, vals = _case(n, k, dtype, index_dtype, seed=n * 7 + k)
    alpha = -0.37
    before = dense.clone()
    ref64 = dense.to(torch.float64, copy=True)
    ref64[idx.long()] += alpha * vals.double()
    plain = dense.clone()
    plain[idx.long()] += alpha * vals  # PyTorch in the working dtype

    out = sparse_axpy_(dense, idx, vals, alpha)
    assert out is dense
    touched = torch.zeros(n, dtype=torch.bool)
    touched[idx.long()] = True
    assert_matches_reference(dense[touched], ref64[touched], plain[touched], f"{backend} {dtype}")
    assert_bit_identical(dense[~touched], before[~touched], "untouched entries")


@pytest.mark.parametrize("backend", BACKENDS)
def test_2d_dense_and_large_alpha(backend, use_backend):
    use_backend(backend)
    dense = torch.randn(33, 65, generator=seeded(1))
    idx = random_indices(dense.numel(), 500, torch.int64, seeded(2))
    vals = torch.randn(500, generator=seeded(3))
    expect = dense.clone().view(-1)
    expect[idx] += 3.5 * vals
    sparse_axpy_(dense, idx, vals, 3.5)
    torch.testing.assert_close(dense.view(-1), expect)


def _bad_inputs():
    d = torch.randn(10)
    i = torch.tensor([1, 4, 7])
    v = torch.randn(3)
    return [
        ("out of range", (d, torch.tensor([1, 4, 10]), v), IndexError, "out of range"),
        ("negative", (d, torch.tensor([-1, 4, 7]), v), IndexError, "out of range"),
        ("unsorted", (d, torch.tensor([4, 1, 7]), v), ValueError, "sorted and unique"),
        ("duplicate", (d, torch.tensor([1, 4, 4]), v), ValueError, "sorted and unique"),
        ("length", (d, i, torch.randn(4)), ValueError, "entries"),
        ("value dtype", (d, i, v.double()), TypeError, "dtype"),
        ("index dtype", (d, i.to(torch.int16), v), TypeError, "int32 or int64"),
        ("int dense", (torch.zeros(10, dtype=torch.int32), i, torch.zeros(3, dtype=torch.int32)), TypeError, "floating"),
        ("2-D indices", (d, i.view(1, 3), v), ValueError, "1-D"),
        ("non-contiguous", (torch.randn(10, 2).t(), i, v), ValueError, "contiguous"),
        ("device", (d, i.to("meta"), v), ValueError, "device"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,args,exc,msg", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_raises_and_writes_nothing(backend, name, args, exc, msg, use_backend):
    use_backend(backend)
    dense = args[0]
    before = dense.clone()
    with pytest.raises(exc, match=msg):
        sparse_axpy_(*args, 1.0)
    assert_bit_identical(dense, before, "dense after a rejected call")


def test_unknown_backend_is_an_error(use_backend):
    use_backend("gpu")
    with pytest.raises(ValueError, match="XLSPARSE_BACKEND"):
        sparse_axpy_(torch.zeros(3), torch.tensor([0]), torch.ones(1))


needs_ext = pytest.mark.skipif(not _ext.loaded(), reason="compiled extension not built")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    dense = torch.randn(64, 3).to(dtype)
    idx = random_indices(dense.numel(), 40, torch.int32, seeded(5))
    vals = torch.randn(40).to(dtype)
    torch.library.opcheck(torch.ops.xlsparse.sparse_axpy_.default, (dense, idx, vals, 0.5))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not usable here")
def test_opcheck_triton():
    import xlsparse.triton.compose  # noqa: F401  (registers the triton ops)

    dense = torch.randn(200)
    idx = random_indices(200, 50, torch.int64, seeded(6))
    # aot_dispatch traces through the kernel, which the CPU interpreter cannot run on functional
    # tensors; it needs a GPU.
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.xlsparse.triton_sparse_axpy_.default, (dense, idx, torch.randn(50), 0.5), test_utils=tests)


@needs_ext
def test_torch_compile_fullgraph():
    def compose(w, idx, vals):
        w = w * 2
        sparse_axpy_(w, idx, vals, 0.5)
        return w.sum(dim=0)

    w = torch.randn(31, 17, generator=seeded(8))
    idx = random_indices(w.numel(), 100, torch.int64, seeded(9))
    vals = torch.randn(100, generator=seeded(10))
    compiled = torch.compile(compose, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(w, idx, vals), compose(w, idx, vals))


# --- apply_diffs_ / restore_diffs_: many deltas on many tensors, one call ---

from xlsparse.ops.compose import apply_diffs_, merge_deltas, restore_diffs_, topk_masks, topk_masks_reference  # noqa: E402

APPLY_BACKENDS = cpu_backends("apply_diffs_")


def _entries(sizes, plan, dtype, index_dtype, seed):
    """Dense tensors of `sizes`; plan lists (target, density) per entry; overlaps are likely."""
    gen = seeded(seed)
    dense = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    indices = [random_indices(sizes[t], round(sizes[t] * d), index_dtype, gen) for t, d in plan]
    values = [torch.randn(i.numel(), generator=gen).to(dtype) for i in indices]
    alphas = [0.75, -1.25, 2.0, 0.5][: len(plan)]
    return dense, indices, values, [t for t, _ in plan], alphas


@pytest.mark.parametrize("backend", APPLY_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_apply_diffs_matches_float64_and_reverts_bit_exactly(backend, dtype, n, index_dtype, use_backend):
    use_backend(backend)
    # Entries 0, 1 and 3 overlap on tensor 0 (K=N for entry 3); entry 2 alone on tensor 1 (K=0 when n=1).
    plan = [(0, 0.4), (0, 0.6), (1, 0.3), (0, 1.0)]
    dense, idx, vals, target, alphas = _entries([n, n + 2], plan, dtype, index_dtype, seed=n)
    before = [d.clone() for d in dense]
    ref64 = [d.to(torch.float64, copy=True) for d in dense]
    plain = [d.clone() for d in dense]
    for i, v, t, a in zip(idx, vals, target, alphas):
        ref64[t][i.long()] += a * v.double()
        plain[t][i.long()] += a * v  # PyTorch in the working dtype, one rounding per delta
    saved = apply_diffs_(dense, idx, vals, target, alphas)
    for t in range(2):
        touched = torch.zeros(dense[t].numel(), dtype=torch.bool)
        for i, tt in zip(idx, target):
            if tt == t:
                touched[i.long()] = True
        assert_matches_reference(dense[t][touched], ref64[t][touched], plain[t][touched], f"{backend} {dtype} tensor {t}")
        assert_bit_identical(dense[t][~touched], before[t][~touched], "untouched entries")
    for s, i, t in zip(saved, idx, target):
        assert_bit_identical(s, before[t][i.long()], "saved values")
    restore_diffs_(dense, idx, saved, target)
    for d, b in zip(dense, before):
        assert_bit_identical(d, b, "after restore")


def _bad_apply_inputs():
    d = [torch.randn(10), torch.randn(6)]
    good_i, good_v = torch.tensor([1, 4]), torch.randn(2)
    return [
        ("out of range", [good_i, torch.tensor([2, 6])], [good_v, good_v], [0, 1], IndexError, r"entry 1 \(dense\[1\]\).*out of range"),
        ("unsorted", [good_i, torch.tensor([3, 2])], [good_v, good_v], [0, 1], ValueError, "entry 1.*sorted and unique"),
        ("target", [good_i, good_i], [good_v, good_v], [0, 2], IndexError, "target"),
        ("value dtype", [good_i, good_i], [good_v, good_v.double()], [0, 1], TypeError, "entry 1.*dtype"),
        ("index dtypes of one tensor", [good_i, good_i.int()], [good_v, good_v], [0, 0], TypeError, "one index dtype"),
        ("lengths", [good_i], [good_v, good_v], [0, 1], ValueError, "one entry each"),
    ], d


@pytest.mark.parametrize("backend", APPLY_BACKENDS)
@pytest.mark.parametrize("case", range(6))
def test_apply_diffs_bad_input_writes_nothing(backend, case, use_backend):
    use_backend(backend)
    cases, dense = _bad_apply_inputs()
    name, idx, vals, target, exc, msg = cases[case]
    before = [d.clone() for d in dense]
    with pytest.raises(exc, match=msg):
        apply_diffs_(dense, idx, vals, target, [1.0] * len(idx))
    for d, b in zip(dense, before):
        assert_bit_identical(d, b, f"{name}: dense after a rejected call")


# --- merge_deltas ---

MERGE_BACKENDS = cpu_backends("merge_deltas")


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_merge_deltas_matches_float64(backend, dtype, n, index_dtype, use_backend):
    use_backend(backend)
    gen = seeded(n + 11)
    idx = [random_indices(n, round(n * d), index_dtype, gen) for d in (0.5, 0.0, 0.7, 1.0)]
    vals = [torch.randn(i.numel(), generator=gen).to(dtype) for i in idx]
    weights = [1.0, 3.0, -0.5, 0.25]
    ref64 = torch.zeros(n, dtype=torch.float64)
    plain = torch.zeros(n, dtype=dtype)
    for i, v, w in zip(idx, vals, weights):
        ref64[i.long()] += w * v.double()
        plain[i.long()] += w * v
    out_i, out_v = merge_deltas(idx, vals, weights, n)
    union = torch.unique(torch.cat([i.long() for i in idx]))
    assert out_i.dtype == index_dtype and out_v.dtype == dtype
    assert torch.equal(out_i.long(), union)
    assert_matches_reference(out_v, ref64[union], plain[union], f"{backend} {dtype}")


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
def test_merge_deltas_rejects_bad_input(backend, use_backend):
    use_backend(backend)
    with pytest.raises(ValueError, match="delta 1.*sorted and unique"):
        merge_deltas([torch.tensor([1, 2]), torch.tensor([2, 2])], [torch.randn(2), torch.randn(2)], [1.0, 1.0], 5)
    with pytest.raises(IndexError, match="delta 0.*out of range"):
        merge_deltas([torch.tensor([1, 5])], [torch.randn(2)], [1.0], 5)
    with pytest.raises(TypeError, match="dtype"):
        merge_deltas([torch.tensor([1]), torch.tensor([2])], [torch.randn(1), torch.randn(1).double()], [1.0, 1.0], 5)


# --- topk_masks: exactly k, deterministic ties ---

TOPK_BACKENDS = cpu_backends("topk_masks")


def _selected_positions(masks):
    return torch.cat([m.reshape(-1) for m in masks]).nonzero().squeeze(1)


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("n", ODD_SIZES)
def test_topk_masks_exactly_k_with_ties_to_lowest_position(backend, dtype, n, use_backend):
    use_backend(backend)
    gen = seeded(n + 3)
    # Few distinct magnitudes, both signs, -0.0 and 0.0: ties everywhere, across tensors.
    tensors = [(torch.randint(-4, 5, (s,), generator=gen).to(dtype) / 4) for s in (n, 7, n + 1)]
    tensors[1][0] = -0.0
    tensors[0] = tensors[0].reshape(1, n)
    total = sum(t.numel() for t in tensors)
    mags = torch.cat([t.reshape(-1).double().abs() for t in tensors])
    for k in sorted({0, 1, total // 3, total // 2, total - 1, total}):
        masks = topk_masks(tensors, k)
        assert [m.shape for m in masks] == [t.shape for t in tensors] and all(m.dtype == torch.bool for m in masks)
        chosen = _selected_positions(masks)
        assert chosen.numel() == k
        # Independent oracle: sort by (-|x|, position).
        order = sorted(range(total), key=lambda p: (-mags[p].item(), p))[:k]
        assert chosen.tolist() == sorted(order), f"k={k}"


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
def test_topk_masks_random_values_match_reference(backend, use_backend):
    use_backend(backend)
    tensors = [torch.randn(s, generator=seeded(s)) for s in (1, 4097, 300, 127)]
    for k in (5, 1000, 4000):
        for m, r in zip(topk_masks(tensors, k), topk_masks_reference(tensors, k)):
            assert torch.equal(m, r)


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
def test_topk_masks_bad_input(backend, use_backend):
    use_backend(backend)
    with pytest.raises(ValueError, match="outside"):
        topk_masks([torch.randn(3), torch.randn(2)], 6)
    with pytest.raises(ValueError, match=r"tensors\[1\] holds NaN"):
        topk_masks([torch.randn(3), torch.tensor([1.0, float("nan")])], 2)
    with pytest.raises(TypeError, match="one floating dtype"):
        topk_masks([torch.randn(3), torch.randn(2).double()], 2)


# --- opcheck and torch.compile of the new ops ---

@needs_ext
def test_opcheck_apply_restore_merge_topk():
    dense = [torch.randn(40), torch.randn(5, 7)]
    idx = [random_indices(40, 10, torch.int32, seeded(1)), random_indices(40, 20, torch.int32, seeded(2)),
           random_indices(35, 9, torch.int32, seeded(3))]
    vals = [torch.randn(i.numel()) for i in idx]
    saved = [torch.randn(i.numel()) for i in idx]
    torch.library.opcheck(torch.ops.xlsparse.apply_diffs_.default, (dense, idx, vals, [0, 0, 1], [0.5, 1.0, -1.0], saved))
    torch.library.opcheck(torch.ops.xlsparse.restore_diffs_.default, (dense, idx, saved, [0, 0, 1]))
    torch.library.opcheck(torch.ops.xlsparse.merge_deltas.default, (idx[:2], vals[:2], [1.0, -1.0], 40),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.xlsparse.topk_masks.default, ([torch.randn(30), torch.randn(4, 3)], 7))


@pytest.mark.skipif("triton" not in APPLY_BACKENDS, reason="triton not usable here")
def test_opcheck_triton_apply():
    import xlsparse.triton.compose  # noqa: F401  (registers the triton ops)

    dense = [torch.randn(40)]
    idx = [random_indices(40, 10, torch.int64, seeded(1)), random_indices(40, 20, torch.int64, seeded(2))]
    vals = [torch.randn(i.numel()) for i in idx]
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.xlsparse.triton_apply_diffs_.default, (dense, idx, vals, [0, 0], [1.0, 2.0], [torch.empty(10), torch.empty(20)]), test_utils=tests)
    torch.library.opcheck(torch.ops.xlsparse.triton_restore_diffs_.default, (dense, idx, vals, [0, 0]), test_utils=tests)


@needs_ext
def test_torch_compile_fullgraph_apply_and_topk():
    def step(w, idx, vals):
        w = w * 1.5
        saved = apply_diffs_([w], idx, vals, [0, 0], [1.0, -0.5])
        (mask,) = topk_masks([w], 20)
        return w.sum() + mask.sum(), saved[0].sum()

    w = torch.randn(13, 11, generator=seeded(4))
    idx = [random_indices(w.numel(), 30, torch.int64, seeded(5)), random_indices(w.numel(), 40, torch.int64, seeded(6))]
    vals = [torch.randn(30, generator=seeded(7)), torch.randn(40, generator=seeded(8))]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(w, idx, vals), step(w, idx, vals)):
        torch.testing.assert_close(got, want)
