"""sparse_axpy_ on every CPU-capable backend against the float64 reference."""
import copy

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
@pytest.mark.parametrize("op", ["sparse_axpy_", "apply_diffs_", "restore_diffs_", "masked_sgd_", "spmm_"])
def test_a_direct_call_of_an_in_place_op_bumps_the_versions_of_what_it_writes(op):
    # only the Python wrappers bumped them: a tensor autograd had saved changed unseen, and the
    # backward used the new values (W.grad = 2·W_new)
    w = torch.randn(4, 6, requires_grad=True)
    idx, vals = torch.tensor([1, 7, 20]), torch.randn(3)
    y = (w * w).sum()
    ops = torch.ops.xlsparse
    with torch.no_grad():
        if op == "sparse_axpy_":
            ops.sparse_axpy_(w, idx, vals, 1.0)
        elif op == "apply_diffs_":
            ops.apply_diffs_([w], [idx], [vals], [0], [1.0], [torch.empty(3)])
        elif op == "restore_diffs_":
            ops.restore_diffs_([w], [idx], [vals], [0])
        elif op == "masked_sgd_":
            ops.masked_sgd_([w], [torch.ones(4, 6)], [None], [], [torch.zeros(1)], 0.1, 0.0, 0.0, 0.0, False)
        else:
            ops.spmm_(w, torch.randn(4, 5), torch.tensor([0, 8]), torch.randn(2), None, None, None, False)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


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
@pytest.mark.parametrize("plan", [[(0, 0.4), (0, 0.6), (1, 0.3), (0, 1.0)], [(0, 0.4), (1, 0.3), (0, 0.6)]],
                         ids=["three-on-one", "two-on-one"])
def test_apply_diffs_matches_float64_and_reverts_bit_exactly(backend, dtype, n, index_dtype, plan, use_backend):
    use_backend(backend)
    # (tensor, density) per entry. three-on-one: entries 0, 1 and 3 overlap on tensor 0 (K=N for
    # entry 3); two-on-one: entries 0 and 2 (a language and a task diff, the CPU kernel's one-pass
    # case). The remaining entry is alone on tensor 1 (K=0 when n=1).
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


@pytest.mark.parametrize("backend", APPLY_BACKENDS)
@pytest.mark.parametrize("n", [9, 2**18 + 3], ids=["small", "several-ranges"])
def test_apply_diffs_sums_shared_positions_in_entry_order(backend, n, use_backend):
    """Where three entries share a position, their shares are summed in the order given, from zero,
    then added to the old value: (1e8 - 1e8) + 1 is 1, while any other order loses the 1 in float32
    (1e8 + 1 rounds to 1e8). Entries also sit alone and two at a time. At the large n the first
    entry also holds every 8th position (about 32770 entries), so the CPU kernel splits the tensor into
    ranges of about 8192 entries and the shared positions fall in different ones."""
    use_backend(backend)
    base = torch.arange(n, dtype=torch.float32) % 7
    shared = torch.tensor([0, 3, n // 2, n - 1])
    only_first = torch.cat([torch.tensor([1, n // 2 + 1]), torch.arange(8, n - 8, 8)]) if n > 9 else torch.tensor([1])
    first_two = torch.tensor([2, n - 2])
    idx = [torch.cat([shared, only_first, first_two]).unique(), torch.cat([shared, first_two]).sort().values, shared]
    vals = [torch.where(torch.isin(i, shared), torch.tensor(big), torch.tensor(0.5)) for i, big in zip(idx, (1e8, -1e8))]
    vals.append(torch.ones(shared.numel()))
    dense = [base.clone()]
    saved = apply_diffs_(dense, idx, vals, [0, 0, 0], [1.0, 1.0, 1.0])
    share = {}  # the documented order, restated one position at a time in float32
    for i, v in zip(idx, vals):
        for j, x in zip(i.tolist(), v):
            share[j] = share.get(j, torch.zeros((), dtype=torch.float32)) + x
    want = base.clone()
    for j, total in share.items():
        want[j] = base[j] + total
    assert_bit_identical(dense[0], want, "shares summed in entry order")
    assert torch.equal(dense[0][shared], base[shared] + 1)
    for s, i in zip(saved, idx):
        assert_bit_identical(s, base[i], "every entry saves the old value")
    restore_diffs_(dense, idx, saved, [0, 0, 0])
    assert_bit_identical(dense[0], base, "after restore")


def _bad_apply_inputs():
    d = [torch.randn(10), torch.randn(6)]
    good_i, good_v = torch.tensor([1, 4]), torch.randn(2)
    return [
        ("out of range", [good_i, torch.tensor([2, 6])], [good_v, good_v], [0, 1], IndexError, r"entry 1 \(dense\[1\]\).*out of range"),
        ("unsorted", [good_i, torch.tensor([3, 2])], [good_v, good_v], [0, 1], ValueError, "entry 1.*sorted and unique"),
        ("target", [good_i, good_i], [good_v, good_v], [0, 2], IndexError, "target"),
        ("target not an int", [good_i, good_i], [good_v, good_v], [0, 1.9], TypeError, r"target\[1\] must be an int"),
        ("target a bool", [good_i, good_i], [good_v, good_v], [0, True], TypeError, r"target\[1\] must be an int"),
        ("value dtype", [good_i, good_i], [good_v, good_v.double()], [0, 1], TypeError, "entry 1.*dtype"),
        ("index dtypes of one tensor", [good_i, good_i.int()], [good_v, good_v], [0, 0], TypeError, "one index dtype"),
        ("lengths", [good_i], [good_v, good_v], [0, 1], ValueError, "one entry each"),
    ], d


@pytest.mark.parametrize("backend", APPLY_BACKENDS)
@pytest.mark.parametrize("case", range(len(_bad_apply_inputs()[0])))
def test_apply_diffs_bad_input_writes_nothing(backend, case, use_backend):
    use_backend(backend)
    cases, dense = _bad_apply_inputs()
    name, idx, vals, target, exc, msg = cases[case]
    before = [d.clone() for d in dense]
    with pytest.raises(exc, match=msg):
        apply_diffs_(dense, idx, vals, target, [1.0] * len(idx))
    for d, b in zip(dense, before):
        assert_bit_identical(d, b, f"{name}: dense after a rejected call")


@pytest.mark.parametrize("backend", APPLY_BACKENDS)
def test_apply_diffs_refuses_dense_tensors_that_share_memory(backend, use_backend):
    # two views of one buffer, both written: the result would depend on the order of the writes
    use_backend(backend)
    buf = torch.randn(16)
    before = buf.clone()
    with pytest.raises(ValueError, match=r"apply_diffs_: dense\[0\] and dense\[2\] share memory"):
        apply_diffs_([buf[:10], torch.randn(3), buf[6:]], [torch.tensor([1]), torch.tensor([2])],
                     [torch.ones(1), torch.ones(1)], [0, 2], [1.0, 1.0])
    assert_bit_identical(buf, before, "dense after a rejected call")


@pytest.mark.parametrize("backend", APPLY_BACKENDS)
def test_disjoint_slices_of_one_buffer_are_applied_and_reverted_as_separate_tensors(backend, use_backend):
    # parameters kept as slices of one flat buffer (a FlatParameter, parameters_to_vector's views)
    # were refused as "share memory", naming restore_diffs_, though no entry is written twice
    use_backend(backend)
    buf = torch.randn(20)
    model = torch.nn.Module()
    model.a, model.b = torch.nn.Parameter(buf[:10].view(2, 5)), torch.nn.Parameter(buf[10:].view(2, 5))
    apart = {"a": buf[:10].view(2, 5).clone(), "b": buf[10:].view(2, 5).clone()}
    diff = SparseDiff({"a": SparseDelta(torch.tensor([1, 9]), torch.randn(2), (2, 5)),
                       "b": SparseDelta(torch.tensor([0, 4]), torch.randn(2), (2, 5))})
    before = buf.clone()
    handle = xlsparse.apply(diff, model)
    for name, t in apart.items():
        d = diff.deltas[name]
        want = t.reshape(-1).clone()
        want[d.indices] += d.values
        assert_bit_identical(getattr(model, name).detach().reshape(-1), want, name)
    handle.revert()
    assert_bit_identical(buf, before, "reverted")


@pytest.mark.parametrize("backend", APPLY_BACKENDS)
def test_apply_and_restore_diffs_name_an_entry_that_is_not_a_tensor(backend, use_backend):
    use_backend(backend)
    dense, idx, vals = [torch.randn(10)], [torch.tensor([1]), torch.tensor([2])], [torch.ones(1), torch.ones(1)]
    before = dense[0].clone()
    with pytest.raises(TypeError, match=r"apply_diffs_: values\[1\] must be a tensor, got list"):
        apply_diffs_(dense, idx, [vals[0], [1.0]], [0, 0], [1.0, 1.0])
    with pytest.raises(TypeError, match=r"apply_diffs_: indices\[0\] must be a tensor, got int"):
        apply_diffs_(dense, [1, idx[1]], vals, [0, 0], [1.0, 1.0])
    with pytest.raises(TypeError, match=r"restore_diffs_: saved\[0\] must be a tensor, got float"):
        restore_diffs_(dense, idx[:1], [0.5], [0])
    assert_bit_identical(dense[0], before, "dense after a rejected call")


def _long_indices_with(defects, index_dtype):
    """6000 sorted unique indices into 20000 (several check blocks and parallel chunks), with
    `defects` {position: value} written over them."""
    idx = torch.arange(6000, dtype=torch.int64) * 3 + 1
    for pos, value in defects.items():
        idx[pos] = value
    return idx.to(index_dtype)


# Where the first bad index lies against the checks' blocks (1024 entries): at a block's first
# entry, inside one, after an earlier good block, and two defects (the first is named).
_LONG_DEFECTS = [
    ("decrease at a block start", {1024: 5}, ValueError, r"position 1024 holds 5 after 3070"),
    ("duplicate inside a block", {2500: 3 * 2499 + 1}, ValueError, r"position 2500 holds 7498 after 7498"),
    ("two defects", {3000: 0, 5000: 0}, ValueError, r"position 3000 holds 0 after 8998"),
    ("out of range last", {5999: 20000}, IndexError, r"out of range"),
    ("negative first", {0: -1}, IndexError, r"out of range"),
]


@pytest.mark.parametrize("backend", APPLY_BACKENDS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("case", range(len(_LONG_DEFECTS)), ids=[c[0] for c in _LONG_DEFECTS])
def test_long_index_lists_name_their_first_bad_position(backend, index_dtype, case, use_backend):
    use_backend(backend)
    _, defects, exc, msg = _LONG_DEFECTS[case]
    dense = [torch.randn(20000), torch.randn(20000)]
    before = [d.clone() for d in dense]
    good, bad = _long_indices_with({}, index_dtype), _long_indices_with(defects, index_dtype)
    vals = torch.randn(6000)
    with pytest.raises(exc, match=msg if exc is ValueError else r"entry 1 \(dense\[1\]\).*" + msg):
        apply_diffs_(dense, [good, bad], [vals, vals], [0, 1], [1.0, 1.0])
    for d, b in zip(dense, before):
        assert_bit_identical(d, b, "dense after a rejected call")
    if backend in BACKENDS:
        use_backend(backend)
        with pytest.raises(exc, match=msg):
            sparse_axpy_(dense[0], bad, vals, 1.0)
        assert_bit_identical(dense[0], before[0], "dense after a rejected sparse_axpy_")
    # the same list without the defects applies
    apply_diffs_(dense, [good, good], [vals, vals], [0, 1], [1.0, 1.0])
    expect = before[1].clone()
    expect[good.long()] += vals
    assert_bit_identical(dense[1], expect, "dense after a good long list")


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


@pytest.mark.parametrize("op", ["sparse_axpy_", "apply_diffs_", "restore_diffs_", "merge_deltas"])
@pytest.mark.parametrize("backend", APPLY_BACKENDS)
def test_compose_ops_refuse_values_that_require_grad(op, backend, use_backend):
    # They have no autograd kernel: the C++ and Triton ones dropped the values' gradient (merge_deltas:
    # None with a warning), the reference one differentiated it. Under no_grad they run.
    use_backend(backend if backend in cpu_backends(op) else "reference")
    dense, idx, vals = torch.randn(6), torch.tensor([1, 4]), torch.randn(2, requires_grad=True)
    call = {"sparse_axpy_": lambda: sparse_axpy_(dense, idx, vals),
            "apply_diffs_": lambda: apply_diffs_([dense], [idx], [vals], [0], [1.0]),
            "restore_diffs_": lambda: restore_diffs_([dense], [idx], [vals], [0]),
            "merge_deltas": lambda: merge_deltas([idx], [vals], [1.0], 6)}[op]
    before = dense.clone()
    with pytest.raises(RuntimeError, match=r"(values|saved)\[?0?\]? requires grad.*no_grad"):
        call()
    assert_bit_identical(dense, before, "written by a refused call")
    with torch.no_grad():
        call()



@pytest.mark.parametrize("op", ["apply_diffs_", "restore_diffs_"])
@pytest.mark.parametrize("backend", APPLY_BACKENDS)
def test_apply_and_restore_diffs_refuse_a_dense_tensor_that_requires_grad(op, backend, use_backend):
    # The compiled kernels have no autograd: restore_diffs_ let the gradient through the entries it
    # overwrites (w.grad 1 there, not 0) and apply_diffs_'s displaced values had none, where the
    # reference differentiated both. Under no_grad they run; sparse_axpy_ (dense + const) still runs.
    use_backend(backend if backend in cpu_backends(op) else "reference")
    w = torch.randn(6, requires_grad=True)
    dense, idx, vals = w * 1, torch.tensor([1, 4]), torch.randn(2)
    call = {"apply_diffs_": lambda: apply_diffs_([dense], [idx], [vals], [0], [1.0]),
            "restore_diffs_": lambda: restore_diffs_([dense], [idx], [vals], [0])}[op]
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match=r"dense\[0\] requires grad.*no_grad"):
        call()
    assert_bit_identical(dense.detach(), before, "written by a refused call")
    with torch.no_grad():
        call()
    y = w * 2
    sparse_axpy_(y, idx, vals)
    y.sum().backward()
    assert torch.equal(w.grad, torch.full((6,), 2.0))


@pytest.mark.parametrize("backend", APPLY_BACKENDS)
def test_sparse_axpy_refuses_a_leaf_that_requires_grad(backend, use_backend):
    # torch (and the reference backend) refuse an in-place write to such a leaf; the kernels wrote it
    use_backend(backend if backend in cpu_backends("sparse_axpy_") else "reference")
    w = torch.nn.Parameter(torch.zeros(6))
    with pytest.raises(RuntimeError, match="leaf"):
        sparse_axpy_(w, torch.tensor([1, 4]), torch.ones(2))
    assert torch.equal(w.detach(), torch.zeros(6))
    with torch.no_grad():
        sparse_axpy_(w, torch.tensor([1, 4]), torch.ones(2))
    assert w.detach().tolist() == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_a_scale_that_requires_grad_is_refused():
    # alpha / alphas / weights are read as numbers: a tensor that requires grad scaled the write
    # and got no gradient (torch only warned). Under no_grad a tensor scale still runs.
    alpha = torch.tensor(2.0, requires_grad=True)
    dense = torch.zeros(4)
    with pytest.raises(TypeError, match="sparse_axpy_: alpha requires grad"):
        sparse_axpy_(dense, torch.tensor([1]), torch.ones(1), alpha)
    assert torch.equal(dense, torch.zeros(4))
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(4))
    diff = SparseDiff({"w": SparseDelta(torch.tensor([1]), torch.ones(1), (4,))})
    with pytest.raises(TypeError, match=r"apply: alphas\[0\] requires grad"):
        xlsparse.apply(diff, model, [alpha])
    assert torch.equal(model.w.detach(), torch.zeros(4))
    with pytest.raises(TypeError, match=r"merge: weights\[0\] requires grad"):
        SparseDiff.merge([diff], [alpha])
    with torch.no_grad():
        sparse_axpy_(dense, torch.tensor([1]), torch.ones(1), alpha)
    assert dense.tolist() == [0.0, 2.0, 0.0, 0.0]

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
    # a lone tensor iterated as its rows: one mask per row, silently
    with pytest.raises(TypeError, match="tensors must be a list of tensors"):
        topk_masks(torch.randn(3, 4), 2)
    with pytest.raises(TypeError, match="tensors must be a list of tensors"):
        topk_mask(torch.randn(3, 4), 2)
    # a dict of scores (as select_masks and all_reduce_scores take) was iterated as its names
    with pytest.raises(TypeError, match="tensors must be a list of tensors, got a dict"):
        topk_mask({"w": torch.randn(3, 4)}, 2)


def test_topk_mask_refuses_an_integer_or_bool_tensor_beside_a_float_one():
    """Mixed *float* dtypes are promoted; an int or bool tensor raises TypeError as it does alone
    (it was promoted too: int64 above 2^24 rounded to float32, so 2^25 + 1 lost to 2^25)."""
    from xlsparse import functional

    for other in (torch.tensor([2**25, 2**25 + 1]), torch.tensor([True, False])):
        with pytest.raises(TypeError, match=r"tensors\[1\] must be floating point"):
            functional.topk_mask([torch.tensor([0.0]), other], 1)
    masks = functional.topk_mask([torch.tensor([1.0009765625], dtype=torch.float16), torch.tensor([1.0], dtype=torch.bfloat16)], 1)
    assert [m.tolist() for m in masks] == [[True], [False]]


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


@needs_ext
def test_torch_compile_counts_a_tensor_given_twice_once():
    """A tied weight given twice to a compiled apply/restore: the traced call had two slots, so the
    second entry saved values holding the first's share and the restore left it in the weight."""
    def apply_restore(w, i1, i2, v1, v2):
        saved = apply_diffs_([w, w], [i1, i2], [v1, v2], [0, 1], [1.0, 1.0])
        applied = w.clone()
        restore_diffs_([w, w], [i1, i2], saved, [0, 1])
        return applied, saved

    w0 = torch.randn(4, 5, dtype=torch.float64, generator=seeded(9))
    i1, i2 = torch.tensor([1, 3, 7, 12]), torch.tensor([3, 4, 12])  # 3 and 12 in both
    v1, v2 = torch.randn(4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    want = w0.clone().view(-1)
    want.index_add_(0, i1, v1).index_add_(0, i2, v2)
    w = w0.clone()
    applied, saved = torch.compile(apply_restore, fullgraph=True, backend="aot_eager")(w, i1, i2, v1, v2)
    torch.testing.assert_close(applied.view(-1), want)
    for idx, s in zip((i1, i2), saved):
        assert torch.equal(s, w0.view(-1)[idx])  # the values before the call, for both entries
    assert torch.equal(w, w0)


# --- the user API: SparseDelta, SparseDiff, xlsparse.apply, files ---

import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402

import xlsparse  # noqa: E402
from xlsparse import SparseDelta, SparseDiff  # noqa: E402
from xlsparse.functional import topk_mask  # noqa: E402


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(17, 9), torch.nn.LayerNorm(9), torch.nn.Linear(9, 3))


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_sparse_delta_validates_and_names_module_and_position():
    d = SparseDelta(torch.tensor([0, 5, 11]), torch.randn(3, dtype=torch.bfloat16), (3, 4))
    assert d.indices.dtype == torch.int32 and d.nnz == 3 and d.density == 0.25 and d.shape == (3, 4)
    dense = d.to_dense()
    assert dense.shape == (3, 4) and torch.equal(dense.view(-1)[[0, 5, 11]], d.values)
    with pytest.raises(ValueError, match=r"delta 'enc.w': indices must be sorted and unique; indices\[2\] = 5"):
        SparseDiff({"enc.w": SparseDelta._trusted(torch.tensor([0, 5, 5]), torch.randn(3), (3, 4))})
    with pytest.raises(IndexError, match=r"delta 'enc.w': indices\[1\] = 12 is outside \[0, 12\)"):
        SparseDelta(torch.tensor([0, 12]), torch.randn(2), (3, 4), name="enc.w")
    with pytest.raises(TypeError, match="floating"):
        SparseDelta(torch.tensor([0]), torch.tensor([1]), (3,))
    with pytest.raises(ValueError, match="2 indices but 3 values"):
        SparseDelta(torch.tensor([0, 1]), torch.randn(3), (3,))
    # Above 2^31 elements the indices are int64; nothing dense is allocated.
    big = SparseDelta(torch.tensor([3, 2**31 + 5]), torch.randn(2), (2**16, 2**16))
    assert big.indices.dtype == torch.int64 and big.indices[1] == 2**31 + 5


def test_sparse_diff_refuses_names_that_are_not_strings(tmp_path):
    # a diff keyed by 1 was built, saved and written as composable-sft, and both loaders then refused the files
    d = SparseDelta(torch.tensor([1]), torch.tensor([1.0]), (2,))
    for kwargs in ({"deltas": {1: d}}, {"dense": {None: torch.zeros(2)}}, {"absolute": {("w",): torch.zeros(2)}}):
        with pytest.raises(TypeError, match="names must be strings"):
            SparseDiff(**kwargs)
    with pytest.raises(TypeError, match=r"deltas must be a dict \{parameter name: ...\}, got list"):
        SparseDiff([("w", d)])
    assert list(SparseDiff({"w": d}).deltas) == ["w"]


def test_from_dense_and_topk_mask():
    t = torch.tensor([[0.0, -3.0, 1.0], [3.0, 0.0, -0.5]])
    d = SparseDelta.from_dense(t)
    assert d.indices.tolist() == [1, 2, 3, 5]
    d2 = SparseDelta.from_dense(t, k=2)
    assert d2.indices.tolist() == [1, 3] and d2.values.tolist() == [-3.0, 3.0]
    masks = topk_mask([t, torch.tensor([3.0, 9.0])], 3)
    assert masks[0].view(-1).nonzero().view(-1).tolist() == [1, 3] and masks[1].tolist() == [False, True]


def test_counts_and_shapes_must_be_ints_not_truncated():
    t = torch.tensor([3.0, -2.0, 1.0])
    for call in (lambda: topk_mask([t], 2.7), lambda: SparseDelta.from_dense(t, k=2.5),
                 lambda: SparseDiff.from_models(_model(0), _model(1), k=10.5)):
        with pytest.raises(TypeError, match="k must be an int, got"):
            call()
    with pytest.raises(TypeError, match="shape must be a sequence of ints"):
        SparseDelta(torch.tensor([0]), torch.randn(1), (2.5, 4))
    with pytest.raises(TypeError, match="from_dense: t must be a floating-point tensor, got torch.int64"):
        SparseDelta.from_dense(torch.tensor([0, 3, 1]))


def test_from_models_ranks_parameters_not_buffers():
    # BatchNorm's running statistics took the whole K budget (and counted in density's total).
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    base, tuned = net(), net()
    with torch.no_grad():
        tuned[0].weight.add_(0.1)
        tuned[1].running_var.add_(1.0)
    with pytest.warns(UserWarning, match=r"buffers \['1.running_var'\] differ"):
        diff = SparseDiff.from_models(base, tuned, k=4)
    assert set(diff.deltas) == {"0.weight", "0.bias", "1.weight", "1.bias"} and diff.deltas["0.weight"].nnz == 4
    with pytest.warns(UserWarning):
        assert SparseDiff.from_models(base, tuned, density=0.5).nnz == round(0.5 * sum(p.numel() for p in base.parameters()))


def test_from_models_refuses_tensors_the_base_lacks():
    # A tuned model of another class (another name prefix) gave an empty diff, silently.
    base, tuned = _model(0), torch.nn.Sequential(_model(1))
    with pytest.raises(ValueError, match=r"from_models: 6 tensors of tuned are not in base, e.g. \['0.0.weight'"):
        SparseDiff.from_models(base, tuned, density=0.1)
    tuned = _model(1)
    tuned.extra = torch.nn.Linear(3, 2)  # a new head, trained in tuned only
    with pytest.raises(ValueError, match=r"\['extra.weight', 'extra.bias'\]"):
        SparseDiff.from_models(base, tuned, density=0.1)
    assert SparseDiff.from_models(base, tuned, density=0.1, exclude=r"^extra\.").nnz == round(0.1 * 210)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_from_models_names_the_parameters_whose_change_cannot_be_ranked(bad):
    # NaN raised topk_masks' "tensors[0] holds NaN", naming no parameter; inf ranked first, selected silently
    base, tuned = _model(0), _model(1)
    with torch.no_grad():
        dict(tuned.named_parameters())["2.weight"][0, 1] = bad
    for size in ({"k": 5}, {"density": 0.1}):
        with pytest.raises(ValueError, match=r"^from_models: tuned − base holds NaN or inf in 1 parameters, e.g. "
                                             r"\['2.weight'\]"):
            SparseDiff.from_models(base, tuned, **size)
    # every change kept as it is: base + diff is tuned, the NaN or inf entry too
    got = SparseDiff.from_models(base, tuned).deltas["2.weight"].to_dense()
    expect = tuned[2].weight.detach() - base[2].weight.detach()
    torch.testing.assert_close(got, expect, equal_nan=True)


def test_from_models_reads_an_inf_that_did_not_change_as_no_change():
    # inf - inf is NaN: an inf entry equal in base and tuned (a state dict's float mask buffer) was a
    # change of NaN, kept by default (applied, base + diff was NaN there) and refused with k
    base = {"w": torch.tensor([[1.0, float("-inf")], [2.0, float("inf")]]), "v": torch.tensor([0.5, 0.25])}
    tuned = {"w": torch.tensor([[1.5, float("-inf")], [2.0, float("inf")]]), "v": torch.tensor([0.5, 1.0])}
    every = SparseDiff.from_models(base, tuned)
    assert every.deltas["w"].indices.tolist() == [0] and every.deltas["w"].values.tolist() == [0.5]
    model = {n: t.clone() for n, t in base.items()}
    every.apply(model)
    assert all(torch.equal(model[n], tuned[n]) for n in tuned)
    top = SparseDiff.from_models(base, tuned, k=1)
    assert top.deltas["v"].indices.tolist() == [1] and top.deltas["w"].nnz == 0


def test_from_models_refuses_a_half_precision_change_that_overflows():
    # float16 40000 - (-40000) is inf: kept as the change, base + diff was inf where tuned holds 40000
    base = {"w": torch.tensor([-40000.0, 1.0], dtype=torch.float16)}
    tuned = {"w": torch.tensor([40000.0, 1.5], dtype=torch.float16)}
    for size in ({}, {"k": 1}):
        with pytest.raises(ValueError, match=r"from_models: tuned − base of 'w' overflows torch.float16"):
            SparseDiff.from_models(base, tuned, **size)
    exact = SparseDiff.from_models({"w": base["w"].float()}, {"w": tuned["w"].float()})
    assert exact.deltas["w"].values.tolist() == [80000.0, 0.5]


@pytest.mark.parametrize("base_dtype, tuned_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
                                                     (torch.bfloat16, torch.float32)])
def test_from_models_takes_differences_in_the_wider_dtype(base_dtype, tuned_dtype):
    # A bfloat16 tuned model minus a float32 base rounded to bfloat16: base + diff was up to 0.0078
    # off tuned at the chosen entries, where the changes were at most 0.009.
    gen = seeded(0)
    base = {"w": (3 * torch.randn(40, 50, generator=gen)).to(base_dtype)}
    tuned = {"w": (base["w"].double() + 1e-3 * torch.randn(40, 50, generator=gen, dtype=torch.float64)).to(tuned_dtype)}
    exact = tuned["w"].double() - base["w"].double()
    diff = SparseDiff.from_models(base, tuned, k=200)
    delta = diff.deltas["w"]
    assert delta.values.dtype == torch.promote_types(base_dtype, tuned_dtype)
    idx = delta.indices.long()
    assert torch.equal(delta.values.double(), exact.reshape(-1)[idx])
    assert torch.equal(idx, torch.sort(exact.reshape(-1).abs(), descending=True, stable=True).indices[:200].sort().values)


def test_diff_arithmetic_takes_values_that_require_grad_as_data():
    values = torch.tensor([1.0, -2.0], requires_grad=True)
    d = SparseDiff({"w": SparseDelta(torch.tensor([1, 4]), values, (6,))})
    assert (0.5 * d).deltas["w"].values.tolist() == [0.5, -1.0]


def test_from_models_refuses_include_patterns_that_match_nothing():
    # a typo in include selected nothing from it: an empty diff when it was the only pattern
    base, tuned = _model(0), _model(1)
    for include in (r"wieght$", [r"weight$", r"^nothing\."]):
        with pytest.raises(ValueError, match="nothing|wieght"):
            SparseDiff.from_models(base, tuned, density=0.5, include=include)
    assert SparseDiff.from_models(base, tuned, density=0.5, include=r"weight$").nnz > 0


def test_from_models_include_matches_any_name_of_a_tied_tensor():
    # A tied tensor is read once, under its first name (emb.weight here, transformer.wte.weight on
    # GPT-2): include="head" matched head.weight, so it passed the check, and selected nothing.
    def net(seed):
        torch.manual_seed(seed)
        m = torch.nn.Module()
        m.emb, m.body, m.head = torch.nn.Embedding(5, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 5, bias=False)
        m.head.weight = m.emb.weight
        return m
    base, tuned = net(0), net(1)
    only = SparseDiff.from_models(base, tuned, include=r"^head\.")
    assert list(only.deltas) == ["emb.weight"] and only.nnz == 15
    # exclude reads the kept name: a body diff keeps the word embeddings its head is tied to
    assert list(SparseDiff.from_models(base, tuned, exclude=r"^head\.").deltas) == ["emb.weight", "body.weight", "body.bias"]
    assert list(SparseDiff.from_models(base, tuned, exclude=r"^emb\.").deltas) == ["body.weight", "body.bias"]


def test_empty_parameters_are_not_one_tied_tensor():
    # Every empty tensor has data_ptr 0: two empty parameters were taken for one tied tensor, so a
    # diff naming both was refused ("names both 'a' and 'b', which are one tied tensor") and
    # from_models and hf.tied_parameters dropped or paired one of them.
    from xlsparse import hf

    m = torch.nn.Module()
    m.a, m.b, m.c = (torch.nn.Parameter(t) for t in (torch.zeros(0, 4), torch.zeros(0, 4), torch.randn(3)))
    m.d = m.c
    diff = SparseDiff({n: SparseDelta.from_dense(p.detach()) for n, p in m.named_parameters()})
    with diff.applied(m, alpha=2.0):
        torch.testing.assert_close(m.c, 3 * diff.deltas["c"].values)
    dense = SparseDiff(dense={n: torch.ones_like(p) for n, p in m.named_parameters() if n != "d"})
    with xlsparse.apply([dense, diff], m):  # a dense and a sparse entry on one empty tensor
        torch.testing.assert_close(m.c, 2 * diff.deltas["c"].values + 1)
    assert list(SparseDiff.from_models(m, m, density=1.0).deltas) == ["a", "b", "c"]
    assert hf.tied_parameters(m) == {"c": ["d"], "d": ["c"]}


def test_from_models_reads_include_and_exclude_given_as_generators():
    # Read once per name: a generator was spent on the first, so include selected every tensor
    # and exclude left out matches of the first name only.
    base = {"a.weight": torch.zeros(3), "a.bias": torch.zeros(3), "LayerNorm.weight": torch.zeros(2)}
    tuned = {n: torch.ones_like(t) for n, t in base.items()}
    assert list(SparseDiff.from_models(base, tuned, include=(p for p in [r"weight$"])).deltas) == [
        "a.weight", "LayerNorm.weight"]
    assert list(SparseDiff.from_models(base, tuned, exclude=iter([r"LayerNorm"])).deltas) == ["a.weight", "a.bias"]


def test_merge_apply_and_division_name_bad_operands():
    d = SparseDiff.from_models(_model(0), _model(1), k=5)
    with pytest.raises(TypeError, match="merge: diffs\\[1\\] is a int, not a SparseDiff"):
        SparseDiff.merge([d, 3])
    for bad in (d, {"de": d}, 3):  # one diff, not in a list, raised a bare "'SparseDiff' object is not iterable"
        with pytest.raises(TypeError, match=f"merge: diffs must be a list of SparseDiff, got a {type(bad).__name__}"):
            SparseDiff.merge(bad)
    with pytest.raises(ZeroDivisionError, match="nonzero"):
        d / 0
    for bad in (float("inf"), float("-inf"), float("nan")):  # d / inf was a silent zero diff
        with pytest.raises(ValueError, match="SparseDiff /: divisor must be finite"):
            d / bad
    a = SparseDiff.from_models(_model(0), _model(1), k=5, base_model="bert-base")
    b = SparseDiff.from_models(_model(0), _model(2), k=5, base_model="gpt2")
    with pytest.warns(UserWarning, match="different base models"):
        assert SparseDiff.merge([a, b]).base_model is None
    assert SparseDiff.merge([a, d]).base_model == "bert-base"  # a diff that names none agrees with any
    model = _model(0)
    model.register_buffer("counter", torch.zeros(4, dtype=torch.long))
    bad = SparseDiff({"counter": SparseDelta(torch.tensor([1]), torch.ones(1), (4,))})
    with pytest.raises(TypeError, match="'counter' is torch.int64; diffs change floating-point tensors only"):
        xlsparse.apply(bad, model)


def test_apply_names_diffs_that_are_not_a_list_of_sparse_diffs():
    # a {language: diff} dict was read as its keys ("diff 0 is a str"); a number raised Python's
    # "'int' object is not iterable"
    d = SparseDiff.from_models(_model(0), _model(1), k=5)
    model = _model(0)
    before = _params(model)
    for bad in ({"de": d}, 3, "de"):
        with pytest.raises(TypeError, match=f"apply: diffs must be a list of SparseDiff, got a {type(bad).__name__}"):
            xlsparse.apply(bad, model)
    with pytest.raises(TypeError, match="apply: diffs\\[1\\] is a dict, not a SparseDiff"):
        xlsparse.apply([d, {"0.weight": d.deltas["0.weight"]}], model)
    assert all(torch.equal(p, before[n]) for n, p in _params(model).items())


@pytest.mark.parametrize("backend", APPLY_BACKENDS)
def test_multi_diff_apply_and_bit_exact_revert(backend, use_backend):
    use_backend(backend)
    base, lang_model, task_model = _model(0), _model(1), _model(2)
    lang = SparseDiff.from_models(base, lang_model, density=0.2, exclude=r"^1\.")
    task = SparseDiff.from_models(base, task_model, k=40, exclude=[r"^1\.", r"^2\.bias"])
    task.dense["2.bias"] = torch.randn(3)
    lang.absolute["1.weight"] = torch.randn(9)  # alpha 1: a replaced value cannot be scaled
    before = _params(base)
    handle = xlsparse.apply([lang, task], base, alphas=[1.0, 0.5])
    got = _params(base)
    for name, p in before.items():
        want = p.double().clone()
        for diff, a in ((lang, 1.0), (task, 0.5)):
            if name in diff.deltas:
                want.view(-1)[diff.deltas[name].indices.long()] += a * diff.deltas[name].values.double()
            if name in diff.dense:
                want += a * diff.dense[name].double()
        if name in lang.absolute:
            want = lang.absolute[name].double()
        torch.testing.assert_close(got[name].double(), want, rtol=0, atol=1e-6)
    handle.revert()
    for name, p in base.named_parameters():
        assert_bit_identical(p.detach(), before[name], name)
    with pytest.raises(RuntimeError, match="already reverted"):
        handle.revert()
    with lang.without_absolute().applied(base, alpha=-2.0):
        assert not torch.equal(base[0].weight.detach(), before["0.weight"])
    for name, p in base.named_parameters():
        assert_bit_identical(p.detach(), before[name], name)
    with lang.applied(base, alpha=-2.0, with_abs=False):  # as apply's: the absolute entry stays out
        assert torch.equal(base[1].weight.detach(), before["1.weight"])
        assert not torch.equal(base[0].weight.detach(), before["0.weight"])
    for name, p in base.named_parameters():
        assert_bit_identical(p.detach(), before[name], name)


@pytest.mark.parametrize("backend", APPLY_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_apply_to_a_half_precision_model_rounds_once(backend, dtype, use_backend):
    """float32 diffs on a bfloat16/float16 tensor: p + Σ α_i v_i is summed in float32 and rounded
    once, for sparse and dense entries alike. Each value was once rounded to half precision before
    the sum, and two diffs that nearly cancel came out up to 5x off."""
    use_backend(backend)
    gen = torch.Generator().manual_seed(5)
    p0 = {"w": (torch.randn(50, generator=gen) * 1e-3).to(dtype), "b": (torch.randn(6, generator=gen) * 1e-3).to(dtype)}
    idx = torch.arange(0, 50, 2)
    v1 = 1 + torch.rand(25, generator=gen)
    v2 = -v1 + 1e-3 * torch.randn(25, generator=gen)  # nearly cancels v1
    t1 = 1 + torch.rand(6, generator=gen)
    d1 = SparseDiff({"w": SparseDelta(idx, v1, (50,))}, {"b": t1})
    d2 = SparseDiff({"w": SparseDelta(idx[:20], v2[:20], (50,))}, {"b": -t1 + 1e-3})
    for diffs, alphas in (([d1, d2], [1.0, 1.0]), ([d1], [0.37]), ([d1], [1.0]), ([d1, d2], [0.5, 0.5])):
        model = {n: t.clone() for n, t in p0.items()}
        handle = xlsparse.apply(diffs, model, alphas=alphas)
        for name, p in p0.items():
            want = p.float()
            for d, a in zip(diffs, alphas):
                if name in d.deltas:
                    want = want.index_add(0, d.deltas[name].indices, a * d.deltas[name].values)
                if name in d.dense:
                    want = want + a * d.dense[name]
            assert torch.equal(model[name], want.to(dtype)), (name, alphas)
        handle.revert()
        for name, p in p0.items():
            assert_bit_identical(model[name], p, name)


@pytest.mark.parametrize("backend", APPLY_BACKENDS)
@pytest.mark.parametrize("dtype,values_dtype", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16),
                                                (torch.float32, torch.float64)])
def test_apply_diffs_wider_than_the_model_round_once(backend, dtype, values_dtype, use_backend):
    """float16 diffs on a bfloat16 model (bfloat16 on float16, float64 on float32): the values were
    rounded to the model's dtype before the sum, so two diffs that nearly cancel lost their sum
    (1.0039 - 1.0 gave 0 on bfloat16, and apply([a, b]) differed from apply([a + b])); dense
    float64 entries on a float32 tensor likewise."""
    use_backend(backend)
    gen = torch.Generator().manual_seed(7)
    p0 = (torch.randn(50, generator=gen) * 1e-3).to(dtype)
    idx = torch.arange(0, 50, 2)
    v1 = (1 + torch.rand(25, generator=gen)).to(values_dtype)
    scale = 1e-2 if dtype.itemsize == 2 else 1e-9  # below the model's resolution near v1
    v2 = (-v1.double() + scale * torch.randn(25, generator=gen, dtype=torch.float64)).to(values_dtype)
    acc = torch.promote_types(torch.float32, values_dtype)
    t1 = torch.rand(50, generator=gen).to(values_dtype)
    t2 = (-t1.double() + scale).to(values_dtype)
    d1 = SparseDiff({"w": SparseDelta(idx, v1, (50,))}, {"b": t1})
    d2 = SparseDiff({"w": SparseDelta(idx, v2, (50,))}, {"b": t2})
    for diffs, alphas in (([d1, d2], [1.0, 1.0]), ([d1], [0.37]), ([d1, d2], [0.5, 0.5])):
        model = {"w": p0.clone(), "b": p0.clone()}
        handle = xlsparse.apply(diffs, model, alphas=alphas)
        want, want_b = p0.to(acc), p0.to(acc)
        for d, a in zip(diffs, alphas):
            want = want.index_add(0, idx, a * d.deltas["w"].values.to(acc))
            want_b = want_b + a * d.dense["b"].to(acc)
        assert torch.equal(model["w"], want.to(dtype)), alphas
        assert torch.equal(model["b"], want_b.to(dtype)), alphas
        handle.revert()
        assert_bit_identical(model["w"], p0, "after revert")
        assert_bit_identical(model["b"], p0, "after revert")


def test_apply_of_wider_values_to_a_model_made_under_inference_mode_and_a_failed_call_writes_nothing(monkeypatch):
    """A model made under torch.inference_mode takes float64 values on float32 tensors (the wide
    path) as it takes float32 ones: indexing in place raised there, after apply_diffs_ had written
    the float32 entries of the call, which the failed apply left in the model. A call that fails
    half way is restored whole."""
    import xlsparse.diff as xdiff

    with torch.inference_mode():
        model = _model(0)
    before = _params(model)
    idx = torch.tensor([0, 5, 40])
    v32, v64 = torch.randn(3), torch.randn(3, dtype=torch.float64)
    diff = SparseDiff({"0.weight": SparseDelta(idx, v32, (9, 17)), "2.weight": SparseDelta(idx[:2], v64[:2], (3, 9))})
    handle = diff.apply(model)
    for name, d in diff.deltas.items():
        want = before[name].double().view(-1).index_add(0, d.indices.long(), d.values.double()).float()
        assert torch.equal(_params(model)[name].view(-1), want), name
    handle.revert()
    for name, t in _params(model).items():
        assert_bit_identical(t, before[name], name)

    real, writes = xdiff._ops.restore_diffs_, []

    def fail_once(*args):  # the wide write, after apply_diffs_ wrote 0.weight; the restore then runs
        writes.append(args)
        if len(writes) == 1:
            raise MemoryError("out of memory")
        return real(*args)
    monkeypatch.setattr(xdiff._ops, "restore_diffs_", fail_once)
    with pytest.raises(MemoryError):
        diff.apply(model)
    for name, t in _params(model).items():
        assert_bit_identical(t, before[name], f"{name} after a failed apply")


def test_apply_to_half_precision_tied_names_and_offloaded_tensors():
    """Two names over one storage (a state dict of tied weights) are one tensor for the float32
    path too: its revert was not bit-exact, or failed half way. A tensor on the meta device
    (offloaded) takes no data path (it failed in merge_deltas)."""
    gen = torch.Generator().manual_seed(6)
    w = (torch.randn(40, generator=gen) * 1e-3).to(torch.bfloat16)
    model = {"emb": w, "dec": w.view(40)}  # two tensor objects, one storage
    idx = torch.arange(0, 40, 3)
    v1, v2 = torch.rand(14, generator=gen), -torch.rand(14, generator=gen)
    before = w.clone()
    handle = xlsparse.apply([SparseDiff({"emb": SparseDelta(idx, v1, (40,))}),
                             SparseDiff({"dec": SparseDelta(idx, v2, (40,))})], model, alphas=[1.0, 0.5])
    assert torch.equal(w, before.float().index_add(0, idx, v1 + 0.5 * v2).to(torch.bfloat16))
    handle.revert()
    assert_bit_identical(w, before, "tied tensor after revert")
    offloaded = torch.nn.Sequential(torch.nn.Linear(17, 9), torch.nn.Linear(9, 3)).bfloat16()
    offloaded[1].to("meta")
    first = offloaded[0].weight.detach().clone()
    d = SparseDiff({"0.weight": SparseDelta(torch.tensor([0, 5]), torch.ones(2), (9, 17)),
                    "1.weight": SparseDelta(torch.tensor([1, 2]), torch.ones(2), (3, 9))})
    with xlsparse.apply([d, d], offloaded, alphas=[1.0, -0.5]):
        assert not torch.equal(offloaded[0].weight, first)
    assert_bit_identical(offloaded[0].weight.detach(), first, "after revert")


def test_apply_calls_the_op_once_per_device_of_a_spread_model(monkeypatch):
    """A model spread over devices (device_map="auto", offloaded layers) gets one fused call per
    device: one call with every tensor would hand a GPU kernel pointers into another device's
    memory. Here the second device is `meta` (no data), the only other one a CPU machine has."""
    import xlsparse.diff as xdiff

    model = _model(0)
    model[2].to("meta")
    diff = SparseDiff({"0.weight": SparseDelta(torch.tensor([0, 5, 40]), torch.ones(3), (9, 17)),
                       "2.weight": SparseDelta(torch.tensor([1, 2]), torch.ones(2), (3, 9))})
    calls = []
    real = xdiff._ops.apply_diffs_
    monkeypatch.setattr(xdiff._ops, "apply_diffs_", lambda dense, *a: calls.append({t.device.type for t in dense})
                        or real(dense, *a))
    before = _params(model)
    handle = diff.apply(model)
    assert sorted(c.pop() for c in calls) == ["cpu", "meta"] and not any(calls)
    want = before["0.weight"].clone()
    want.view(-1)[[0, 5, 40]] += 1
    assert torch.equal(model[0].weight.detach(), want)
    handle.revert()
    assert_bit_identical(model[0].weight.detach(), before["0.weight"], "0.weight")
    # the op itself refuses tensors of two devices (the CUDA kernel would fault)
    dense = [model[0].weight.detach(), model[2].weight.detach()]
    with pytest.raises(ValueError, match="one device"):
        apply_diffs_(dense, [torch.tensor([0]), torch.tensor([0], device="meta")],
                     [torch.ones(1), torch.ones(1, device="meta")], [0, 1], [1.0, 1.0])
    assert_bit_identical(model[0].weight.detach(), before["0.weight"], "0.weight after the refused call")


def test_revert_refuses_a_model_converted_after_apply():
    # model.double() in the block swaps the Parameters' storage: revert restored the old, detached
    # storage, reported success and left the diff in the model.
    diff = SparseDiff({"0.weight": SparseDelta(torch.tensor([0, 5]), torch.ones(2), (9, 17))}, dense={"2.bias": torch.ones(3)})
    model = _model(0)
    handle = diff.apply(model)
    model.double()
    applied = _params(model)
    with pytest.raises(RuntimeError, match=r"revert: '0.weight' is no longer the storage .* now torch.float64"):
        handle.revert()
    assert not handle.reverted
    for name, p in model.named_parameters():
        assert_bit_identical(p.detach(), applied[name], name)
    model = _model(0)
    handle = diff.apply(model)
    model[2].bias.data = model[2].bias.data.clone()  # same dtype and device, another storage
    with pytest.raises(RuntimeError, match="revert: '2.bias' is no longer the storage.*or the tensor was swapped"):
        handle.revert()
    # a deep copy of a handle holds copies of the tensors: it said "converted or moved (model.half())"
    model = _model(0)
    handle = diff.apply(model)
    with pytest.raises(RuntimeError, match="this handle is a copy"):
        copy.deepcopy(handle).revert()
    handle.revert()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), _model(0).parameters()))


def test_revert_refuses_when_the_model_replaced_the_parameter_after_apply():
    # load_state_dict(assign=True) or hf.merge_and_unload put new Parameters into the model: revert
    # wrote into the old tensors, reported success and left the diff in the model.
    diff = SparseDiff({"0.weight": SparseDelta(torch.tensor([0, 5]), torch.ones(2), (9, 17))})
    model = _model(0)
    handle = diff.apply(model)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    applied = _params(model)
    with pytest.raises(RuntimeError, match="revert: the model's '0.weight' is no longer the tensor"):
        handle.revert()
    assert not handle.reverted
    for name, p in model.named_parameters():
        assert_bit_identical(p.detach(), applied[name], name)
    # a module that keeps the Parameter (or its storage) still reverts
    model = _model(0)
    before = _params(model)
    handle = diff.apply(model)
    model[0] = torch.nn.Sequential(model[0])[0]
    handle.revert()
    for name, p in model.named_parameters():
        assert_bit_identical(p.detach(), before[name], name)
    # a module wrapped under a new name (PEFT's base_layer) still holds the tensor: revert works
    model = _model(0)
    handle = diff.apply(model)
    model[0] = torch.nn.Sequential(model[0])
    handle.revert()
    assert_bit_identical(model[0][0].weight.detach(), before["0.weight"], "0.0.weight")


def test_revert_looks_up_the_changed_names_only(monkeypatch):
    # the check that the model still holds the changed tensors walked every parameter and buffer
    # of the model on each revert (8x a revert's cost on a 124M GPT-2): LT-SFT reverts every step
    diff = SparseDiff({"1.weight": SparseDelta(torch.tensor([0, 5]), torch.ones(2), (9, 17))})
    model = torch.nn.Sequential(*[torch.nn.Linear(17, 9) for _ in range(4)])
    handle = diff.apply(model)
    walks = []
    for name in ("named_parameters", "named_buffers", "named_modules", "parameters", "modules"):
        def walk(self, *args, _orig=getattr(torch.nn.Module, name), _name=name, **kwargs):
            walks.append(_name)
            return _orig(self, *args, **kwargs)
        monkeypatch.setattr(torch.nn.Module, name, walk)
    handle.revert()
    assert walks == []


def test_an_apply_handle_pickles_and_deep_copies_with_its_model():
    # the handle's weak reference to the model made pickling any object holding a handle raise
    import copy
    import pickle

    diff = SparseDiff({"0.weight": SparseDelta(torch.tensor([0, 5]), torch.ones(2), (9, 17))})
    model = _model(0)
    handle = diff.apply(model)
    for twin_model, twin in (pickle.loads(pickle.dumps((model, handle))), copy.deepcopy((model, handle))):
        assert twin._model() is twin_model
    handle.revert()


def test_revert_out_of_order_refuses_when_a_later_apply_changed_the_same_entries():
    # composable-sft swaps languages by reverting the language SFT under the task SFT. Restoring
    # the language's displaced values silently dropped the task's change on shared entries and
    # left the language's change in after the task's revert.
    base = torch.randn(4, dtype=torch.float64)
    lang = SparseDiff({"w": SparseDelta(torch.tensor([0, 1]), torch.tensor([1.0, 1.0], dtype=torch.float64), (4,))})
    task = SparseDiff({"w": SparseDelta(torch.tensor([1, 2]), torch.tensor([10.0, 10.0], dtype=torch.float64), (4,))})
    model = {"w": base.clone()}
    h_lang, h_task = lang.apply(model), task.apply(model)
    both = model["w"].clone()
    with pytest.raises(RuntimeError, match=r"revert: \['w'\] were changed again by a later apply"):
        h_lang.revert()
    assert not h_lang.reverted
    assert_bit_identical(model["w"], both, "w after the refused revert")
    h_task.revert()
    h_lang.revert()  # reverse order: bit-exact
    assert_bit_identical(model["w"], base, "w after both reverts")
    # a later dense entry covers every entry of the tensor
    dense = SparseDiff(dense={"w": torch.ones(4, dtype=torch.float64)})
    h_lang, h_dense = lang.apply(model), dense.apply(model)
    with pytest.raises(RuntimeError, match="later apply"):
        h_lang.revert()
    h_dense.revert(), h_lang.revert()
    assert_bit_identical(model["w"], base, "w after the dense case")
    # disjoint supports revert in any order, and a dropped handle (never reverted) blocks nothing
    a = SparseDiff({"w": SparseDelta(torch.tensor([0]), torch.tensor([1.0], dtype=torch.float64), (4,))})
    b = SparseDiff({"w": SparseDelta(torch.tensor([3]), torch.tensor([5.0], dtype=torch.float64), (4,))})
    ha, hb = a.apply(model), b.apply(model)
    ha.revert()
    expect = base.clone()
    expect[3] += 5.0
    assert_bit_identical(model["w"], expect, "w after the out-of-order disjoint revert")
    hb.revert()
    task.apply(model)  # kept: the task is now part of the model
    h_lang = lang.apply(model)
    h_lang.revert()
    expect = base.clone()
    expect[1:3] += 10.0
    assert_bit_identical(model["w"], expect, "w after a revert over a dropped handle")


def test_revert_refuses_under_a_later_apply_whose_handle_was_dropped():
    # a dropped handle leaves its diff in the model for good: the earlier apply's revert restored
    # the values before both, so apply(d) held, apply(d) dropped, revert gave base, not base + d
    import gc

    base = torch.randn(4, dtype=torch.float64)
    d = SparseDiff({"w": SparseDelta(torch.tensor([0, 1]), torch.tensor([1.0, 2.0], dtype=torch.float64), (4,))})
    model = {"w": base.clone()}
    held = d.apply(model)
    d.apply(model)  # dropped
    gc.collect()
    twice = model["w"].clone()
    with pytest.raises(RuntimeError, match="whose handle was dropped"):
        held.revert()
    assert not held.reverted
    assert_bit_identical(model["w"], twice, "w after the refused revert")
    # what the dropped apply left is forgotten with the last apply before it: nothing accumulates
    del held
    gc.collect()
    h = d.apply(model)
    h.revert()
    assert_bit_identical(model["w"], twice, "w after an apply and revert on top")
    assert [len(refs) for key, refs in xlsparse.diff._in_place.items()
            if key == xlsparse.diff._storage_key(model["w"])] in ([], [0])


def test_the_registry_keeps_no_tensor_of_a_dropped_apply_alive():
    # what a dropped apply wrote is remembered (the test above), but not the tensors themselves:
    # holding them kept a deleted model's weights alive, every weight a diff touched
    import gc

    def applied_twice_then_dropped():
        model = torch.nn.Linear(64, 48)
        d = SparseDiff({"weight": SparseDelta(torch.arange(0, 3072, 7), torch.ones(439), (48, 64))})
        held = xlsparse.apply(d, model)
        xlsparse.apply(d, model)  # dropped: stays for good, and blocks held's revert
        with pytest.raises(RuntimeError, match="whose handle was dropped"):
            held.revert()
        return model.weight.untyped_storage().data_ptr()

    ptr = applied_twice_then_dropped()
    gc.collect()
    alive = [t for t in gc.get_objects() if type(t) in (torch.Tensor, torch.nn.Parameter) and t.shape == (48, 64)
             and t.untyped_storage().data_ptr() == ptr]
    assert alive == [], "a deleted model's weight is still alive"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_apply_rounds_once_where_a_sparse_and_a_dense_entry_meet(dtype):
    # A parameter changed by one diff's sparse delta and another's dense entry was stored twice
    # (sparse, then dense on top): 1 ulp off the sum rounded once, and off apply([A + B]).
    sparse = SparseDiff({"w": SparseDelta(torch.tensor([0]), torch.tensor([0.004]), (2,))})
    dense = SparseDiff(dense={"w": torch.tensor([0.004, 0.0])})
    base = torch.ones(2, dtype=dtype)
    exact = (base.double() + torch.tensor([0.008, 0.0], dtype=torch.float64)).to(dtype)
    for diffs in ([sparse, dense], [sparse + dense]):
        model = {"w": base.clone()}
        handle = xlsparse.apply(diffs, model)
        assert_bit_identical(model["w"], exact, f"w after apply of {len(diffs)} diffs")
        handle.revert()
        assert_bit_identical(model["w"], base, "w after revert")


def test_apply_reads_diff_tensors_that_view_the_model_as_they_were_before_the_call():
    """A dense, absolute or delta tensor of a diff that views a tensor the same apply writes is read
    as it was before the call: read after the sparse writes, absolute={"b": a} copied the changed a."""
    gen = torch.Generator().manual_seed(3)
    model = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(3, 4, generator=gen)}
    a0, b0 = model["a"].clone(), model["b"].clone()
    idx = torch.tensor([0, 5])
    bump = SparseDelta(idx, torch.tensor([100.0, -100.0]), (3, 4))
    ones = torch.ones(3, 4)
    folded = b0 + ones.view(-1).index_add(0, idx, a0.view(-1)[:2]).view(3, 4)
    for diffs, want in [
        ([SparseDiff({"a": bump}, absolute={"b": model["a"]})], a0),
        ([SparseDiff({"a": bump}, dense={"b": model["a"]})], b0 + a0),
        # a delta folded into a dense entry of its tensor
        ([SparseDiff({"a": bump, "b": SparseDelta(idx, model["a"].view(-1)[:2], (3, 4))}), SparseDiff(dense={"b": ones})],
         folded),
    ]:
        handle = xlsparse.apply(diffs, model)
        assert torch.equal(model["b"], want)
        handle.revert()
        assert_bit_identical(model["a"], a0, "a after revert")
        assert_bit_identical(model["b"], b0, "b after revert")


def test_apply_rejects_unknown_or_misshaped_parameter():
    model = _model(0)
    with pytest.raises(KeyError, match="diff 0.*'enc.w'"):
        SparseDiff({"enc.w": SparseDelta(torch.tensor([1]), torch.randn(1), (4,))}).apply(model)
    with pytest.raises(ValueError, match="diff 1: '0.bias' has shape"):
        xlsparse.apply([SparseDiff(), SparseDiff({"0.bias": SparseDelta(torch.tensor([1]), torch.randn(1), (4,))})], model)


def test_apply_refuses_an_absolute_entry_and_another_change_of_its_tensor():
    # The absolute value would override the other change, or not, by diff order (merge refuses it too).
    model = _model(0)
    before = _params(model)
    sparse = SparseDiff({"0.bias": SparseDelta(torch.tensor([1]), torch.ones(1), (9,))})
    dense = SparseDiff(dense={"0.bias": torch.ones(9)})
    head, head2 = (SparseDiff(absolute={"0.bias": torch.full((9,), v)}) for v in (7.0, -1.0))
    for pair in ([sparse, head], [head, sparse], [dense, head], [head, dense], [head, head2]):
        with pytest.raises(ValueError, match="'0.bias' is changed by diffs 0 and 1, and one of them is an absolute entry"):
            xlsparse.apply(pair, model)
    for name, p in model.named_parameters():
        assert_bit_identical(p.detach(), before[name], name)
    tied = torch.zeros(3)
    with pytest.raises(ValueError, match=r"'emb' \(tied to 'dec'\) is changed by diffs 0 and 1"):
        xlsparse.apply([SparseDiff(dense={"emb": torch.ones(3)}), SparseDiff(absolute={"dec": torch.ones(3)})],
                       {"emb": tied, "dec": tied})
    assert not tied.any()
    with xlsparse.apply([sparse, dense, head], model, with_abs=False):  # without the head: two sums
        torch.testing.assert_close(model[0].bias[1], before["0.bias"][1] + 2)


def test_absolute_entries_refuse_a_weight_or_alpha_other_than_one():
    # A replaced value has no scaled version: ignoring the weight made -d, 0 * d, d1 - d2 and alpha=0 install the head.
    model = _model(0)
    before = _params(model)
    d = SparseDiff({"0.bias": SparseDelta(torch.tensor([1]), torch.ones(1), (9,))}, absolute={"1.weight": torch.randn(9)})
    plain = SparseDiff({"0.bias": SparseDelta(torch.tensor([2]), torch.ones(1), (9,))})
    for make in (lambda: -d, lambda: 0 * d, lambda: d / 2, lambda: plain - d, lambda: SparseDiff.merge([plain, d], [1, .5])):
        with pytest.raises(ValueError, match=r"merge: weights\[\d\] = .*, but diff \d has absolute entries \['1.weight'\].*"
                                             r"with_abs=False"):
            make()
    for call in (lambda: d.apply(model, alpha=0.0), lambda: xlsparse.apply([plain, d], model, alphas=[1.0, -1.0])):
        with pytest.raises(ValueError, match=r"apply: alphas\[\d\] = .*cannot be scaled"):
            call()
    for name, p in model.named_parameters():
        assert_bit_identical(p.detach(), before[name], name)
    assert torch.equal((d - plain).absolute["1.weight"], d.absolute["1.weight"])  # weight 1 keeps the head
    assert not SparseDiff.merge([d], [-1.0], with_abs=False).absolute  # without heads any weight goes
    with xlsparse.apply([d], model, alphas=[0.0], with_abs=False):
        for name, p in model.named_parameters():
            assert_bit_identical(p.detach(), before[name], name)


def test_with_abs_must_be_a_bool():
    # with_abs="no" (or "False") is truthy: the heads were applied (and kept by merge) when they were refused
    from xlsparse.hf import arithmetic

    model = _model(0)
    before = _params(model)
    d = SparseDiff({"0.bias": SparseDelta(torch.tensor([1]), torch.ones(1), (9,))}, absolute={"1.weight": torch.randn(9)})
    for flag in ("no", "False", 0, None):
        for call in (lambda: xlsparse.apply([d], model, with_abs=flag), lambda: d.apply(model, with_abs=flag)):
            with pytest.raises(TypeError, match="apply: with_abs must be a bool"):
                call()
        with pytest.raises(TypeError, match="merge: with_abs must be a bool"):
            SparseDiff.merge([d], with_abs=flag)
        for helper in ("combine", "ties_merge"):
            args = ([d], [1.0]) if helper == "combine" else ([d], None, 0.5)
            with pytest.raises(TypeError, match=f"{helper}: with_abs must be a bool"):
                getattr(arithmetic, helper)(*args, with_abs=flag)
    for name, p in model.named_parameters():
        assert_bit_identical(p.detach(), before[name], name)


@pytest.mark.parametrize("op", ["apply_diffs_", "merge_deltas"])
def test_the_scale_ops_read_no_bool_string_or_graph_tensor_as_a_number(op):
    # float() ran before the checks: True scaled by 1, "0.5" by 0.5, and a weight that requires grad
    # (a learned mixing weight) scaled the result and got no gradient, silently; merge_deltas' int()
    # read numel 5.7 as 5. sparse_axpy_, xlsparse.apply and SparseDiff.merge refuse the same
    name = "alphas" if op == "apply_diffs_" else "weights"
    dense = torch.zeros(6)

    def run(scale, numel=6):
        if op == "apply_diffs_":
            return apply_diffs_([dense], [torch.tensor([1, 4])], [torch.ones(2)], [0], [scale])
        return merge_deltas([torch.tensor([1, 4])], [torch.ones(2)], [scale], numel)
    for bad in ("0.5", True, torch.tensor(True)):
        with pytest.raises(TypeError, match=rf"{op}: {name}\[0\] must be a number"):
            run(bad)
    with pytest.raises(TypeError, match=rf"{op}: {name}\[0\] requires grad"):
        run(torch.tensor(2.0, requires_grad=True))
    assert torch.equal(dense, torch.zeros(6))
    if op == "merge_deltas":
        with pytest.raises(TypeError, match="merge_deltas: numel must be an int"):
            run(1.0, numel=5.7)
    with torch.no_grad():  # a tensor scale is read as its number where no gradient is asked
        run(torch.tensor(2.0, requires_grad=True))
        run(torch.tensor(0.5))


def test_merge_and_apply_refuse_non_finite_weights_of_any_diff():
    # merge_deltas checked the weights of sparse deltas only: d * nan on a dense-only diff went through.
    dense = SparseDiff(dense={"0.bias": torch.ones(9)})
    head = SparseDiff(absolute={"1.weight": torch.ones(9)})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^SparseDiff \*: scale must be finite"):
            dense * bad
        with pytest.raises(ValueError, match=r"merge: weights\[1\] must be finite"):
            SparseDiff.merge([dense, head], [1.0, bad])
    with pytest.raises(TypeError, match=r"merge: weights\[0\] must be a number"):
        SparseDiff.merge([dense], ["x"])
    # float() read "0.5" as 0.5 and True (a bool tensor too) as 1.0
    for bad in ("0.5", True, torch.tensor(True)):
        with pytest.raises(TypeError, match=r"merge: weights\[0\] must be a number"):
            SparseDiff.merge([dense], [bad])
        with pytest.raises(TypeError, match=r"apply: alphas\[0\] must be a number"):
            xlsparse.apply([dense], _model(0), alphas=[bad])
    # the operator named, not merge's "weights[0]", a list the caller never gave
    for product in (lambda: dense * True, lambda: True * dense):
        with pytest.raises(TypeError, match=r"^SparseDiff \*: scale must be a number, got bool"):
            product()
    with pytest.raises(TypeError, match=r"^SparseDiff /: divisor must be a number, got bool"):
        dense / False
    model = _model(0)
    before = _params(model)
    with pytest.raises(ValueError, match=r"apply: alphas\[1\] must be finite, got -inf"):
        xlsparse.apply([dense, dense], model, alphas=[1.0, float("-inf")])
    for name, p in model.named_parameters():
        assert_bit_identical(p.detach(), before[name], name)


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
def test_diff_arithmetic_matches_dense(backend, use_backend):
    use_backend(backend)
    base = _model(0)
    d1 = SparseDiff.from_models(base, _model(1), density=0.3, exclude=r"^1\.")
    d2 = SparseDiff.from_models(base, _model(2), density=0.1, include=[r"^0\.", r"^2\.weight"])
    d2.dense["2.bias"] = torch.randn(3)
    d1.absolute["1.weight"] = torch.randn(9)

    def dense_of(diff, name):
        if name in diff.deltas:
            return diff.deltas[name].to_dense().double()
        return diff.dense[name].double() if name in diff.dense else torch.zeros_like(base.state_dict()[name]).double()

    for got, (w1, w2) in ((d1 + d2, (1, 1)), (d1 - d2, (1, -1)), (SparseDiff.merge([d1, d2], [1.0, -1.7]), (1.0, -1.7))):
        for name in set(d1.deltas) | set(d2.deltas) | set(d2.dense):
            out = got.deltas[name].to_dense() if name in got.deltas else got.dense[name]
            torch.testing.assert_close(out.double(), w1 * dense_of(d1, name) + w2 * dense_of(d2, name), rtol=1e-6, atol=1e-6)
        assert torch.equal(got.absolute["1.weight"], d1.absolute["1.weight"])
    half = 0.5 * d2
    for name, d in d2.deltas.items():
        assert torch.equal(half.deltas[name].indices, d.indices)
        torch.testing.assert_close(half.deltas[name].values, 0.5 * d.values)
    with pytest.raises(ValueError, match="absolute entry '1.weight' is in more than one diff"):
        d1 + d1


def test_from_models_exact_k_deterministic_ties_and_patterns():
    base = {"emb.weight": torch.zeros(4, 3), "layer.weight": torch.zeros(5), "LayerNorm.weight": torch.zeros(2)}
    tuned = {"emb.weight": torch.ones(4, 3), "layer.weight": torch.tensor([1.0, 2.0, 1.0, 0.0, -2.0]),
             "LayerNorm.weight": torch.full((2,), 5.0)}
    diff = SparseDiff.from_models(base, tuned, k=4, exclude=[r"LayerNorm"])
    assert set(diff.deltas) == {"emb.weight", "layer.weight"} and diff.nnz == 4
    # |Δ|: layer 2 at positions 1, 4; then ties of 1.0 go to emb positions 0 and 1 (earlier tensor).
    assert diff.deltas["layer.weight"].indices.tolist() == [1, 4]
    assert diff.deltas["emb.weight"].indices.tolist() == [0, 1]
    assert SparseDiff.from_models(base, tuned, density=1.0).nnz == 19
    every = SparseDiff.from_models(base, tuned)  # no budget: every changed entry (layer position 3 did not change)
    assert every.nnz == 18 and every.deltas["layer.weight"].indices.tolist() == [0, 1, 2, 4]
    assert torch.equal(every.deltas["layer.weight"].values, torch.tensor([1.0, 2.0, 1.0, -2.0]))
    with pytest.raises(ValueError, match="exactly one of k or density"):
        SparseDiff.from_models(base, tuned, k=3, density=0.5)


def _saved_diff():
    base = _model(0)
    diff = SparseDiff.from_models(base, _model(1), density=0.25, exclude=[r"^1\.", r"^2\.bias"])
    diff.dense["2.bias"] = torch.randn(3)
    diff.absolute["1.weight"] = torch.randn(9, dtype=torch.bfloat16)
    return diff


def _assert_same_diff(a, b):
    assert list(a.deltas) == list(b.deltas)
    for name in a.deltas:
        assert_bit_identical(a.deltas[name].indices, b.deltas[name].indices, name)
        assert_bit_identical(a.deltas[name].values, b.deltas[name].values, name)
        assert a.deltas[name].shape == b.deltas[name].shape


def test_save_load_round_trip(tmp_path):
    diff = _saved_diff()
    path = str(tmp_path / "lang.safetensors")
    diff.save(path, base_model="xlm-roberta-base")
    back = SparseDiff.load(path)
    _assert_same_diff(diff, back)
    assert back.base_model == "xlm-roberta-base"
    assert torch.equal(back.dense["2.bias"], diff.dense["2.bias"]) and torch.equal(back.absolute["1.weight"], diff.absolute["1.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["lang.safetensors"]  # no temporary file left


def test_save_writes_the_index_dtype_load_expects(tmp_path):
    # A delta xlsparse built from int64 indices below 2^31 (extract_diff of a SparseDeltaLinear made
    # with torch.tensor indices) was saved as int64, and load refused its own file.
    values = torch.randn(3)
    diff = SparseDiff._trusted({"w": SparseDelta._trusted(torch.tensor([0, 5, 7]), values, (3, 4))})
    path = str(tmp_path / "d.safetensors")
    diff.save(path)
    back = SparseDiff.load(path).deltas["w"]
    assert back.indices.dtype == torch.int32 and back.indices.tolist() == [0, 5, 7] and torch.equal(back.values, values)


def test_load_reads_int64_indices_that_older_saves_wrote(tmp_path):
    # Until 2026-12-01 save wrote such a delta's indices as int64 (recorded as such), and load
    # refused the file ("index dtype torch.int64 is not torch.int32 for its shape").
    values = torch.randn(3)
    path = str(tmp_path / "old.safetensors")
    SparseDiff._trusted({"w": SparseDelta._trusted(torch.tensor([0, 5, 7]), values, (3, 4))}).save(path)

    def as_older_saves(meta):
        meta["deltas"][0]["index_dtype"] = "torch.int64"
    _rewrite(path, as_older_saves, lambda t: t.__setitem__("delta.0.indices", t["delta.0.indices"].long()))
    back = SparseDiff.load(path).deltas["w"]
    assert back.indices.dtype == torch.int32 and back.indices.tolist() == [0, 5, 7] and torch.equal(back.values, values)


def test_save_writes_entries_that_share_memory(tmp_path):
    # One support for two deltas (int32 indices are kept as given) or one tensor for two dense
    # entries: safetensors raised "Some tensors share memory" and nothing was saved.
    idx, shift = torch.tensor([0, 2], dtype=torch.int32), torch.randn(3)
    diff = SparseDiff({"a": SparseDelta(idx, torch.randn(2), (3,)), "b": SparseDelta(idx, torch.randn(2), (3,)),
                       "e": SparseDelta(idx[:0], torch.zeros(0), (3,)), "f": SparseDelta(idx[:0], torch.zeros(0), (3,))},
                      {"c": shift, "d": shift}, absolute={"h": shift})
    path = str(tmp_path / "shared.safetensors")
    diff.save(path)
    back = SparseDiff.load(path)
    _assert_same_diff(diff, back)
    assert all(torch.equal(back.dense[n], shift) for n in "cd") and torch.equal(back.absolute["h"], shift)


def _rewrite(path, edit_meta=None, edit_tensors=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["xlsparse"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, path, metadata={"xlsparse": json.dumps(meta)})


def _unsort(t):
    t["delta.0.indices"] = t["delta.0.indices"].flip(0).contiguous()


def _huge(m):
    m["deltas"][0]["shape"] = [2**40, 2**40]


@pytest.mark.parametrize("how,exc,msg", [
    ("truncated", ValueError, "truncated or corrupt"),
    ("garbage", ValueError, "truncated or corrupt"),
    ("unsorted", ValueError, r"delta '0.weight': indices must be sorted and unique; indices\[1\]"),
    ("out of range", IndexError, r"delta '0.weight': indices\[\d+\] = 10000"),
    ("huge shape", ValueError, "more than int64 can index"),
    ("wrong dtype", ValueError, "dtype"),
    ("missing tensor", ValueError, "missing"),
    ("name in two kinds", ValueError, r"parameters \['2.bias'\] appear in more than one"),
    ("not xlsparse", ValueError, "no 'xlsparse' metadata"),
    ("missing", FileNotFoundError, r"d\.safetensors: no such file$"),  # was "truncated or corrupt?"
    ("a folder", FileNotFoundError, "not a file"),
])
def test_load_rejects_malformed_files(tmp_path, how, exc, msg):
    path = str(tmp_path / "d.safetensors")
    _saved_diff().save(path)
    if how == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) - 10])
    elif how == "garbage":
        open(path, "wb").write(os.urandom(64))
    elif how == "unsorted":
        _rewrite(path, edit_tensors=_unsort)
    elif how == "out of range":
        _rewrite(path, edit_tensors=lambda t: t["delta.0.indices"].__setitem__(-1, 10000))
    elif how == "huge shape":
        _rewrite(path, edit_meta=_huge)
    elif how == "wrong dtype":
        _rewrite(path, edit_meta=lambda m: m["deltas"][0].__setitem__("dtype", "torch.float16"))
    elif how == "missing tensor":
        _rewrite(path, edit_tensors=lambda t: t.pop("dense.0"))
    elif how == "name in two kinds":
        _rewrite(path, edit_meta=lambda m: m["deltas"][0].__setitem__("name", "2.bias"))
    elif how == "not xlsparse":
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, path)
    elif how == "missing":
        os.remove(path)
    elif how == "a folder":
        os.remove(path)
        os.mkdir(path)
    with pytest.raises(exc, match=msg) as info:
        SparseDiff.load(path)
    # the file is named: an index out of range or order named the entry only, and compose with
    # several DIFFs could not tell which file was corrupt
    assert path in str(info.value)


@pytest.mark.parametrize("device", ["cuda", "nonsense", "meta"])
def test_load_names_a_device_it_cannot_use(tmp_path, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is usable here")
    path = str(tmp_path / "d.safetensors")
    _saved_diff().save(path)
    with pytest.raises(ValueError, match=f"SparseDiff.load: device='{device}' is not usable here"):
        SparseDiff.load(path, device=device)


def test_composable_sft_round_trip(tmp_path):
    diff = _saved_diff()
    diff.save_composable_sft(str(tmp_path))
    raw = torch.load(tmp_path / "pytorch_diff.bin", weights_only=True)
    assert set(raw) == {"diffs", "abs"} and set(raw["abs"]) == {"1.weight"}
    enc = raw["diffs"]["0.weight"]
    # Column-major, delta-encoded: decoding gives the row-major indices back.
    col = np.cumsum(enc["index_steps"])
    rows, cols = enc["size"]
    row_major = sorted((c % rows) * cols + c // rows for c in col.tolist())
    assert row_major == diff.deltas["0.weight"].indices.tolist()
    back = SparseDiff.load_composable_sft(str(tmp_path))
    _assert_same_diff(diff, SparseDiff({n: back.deltas[n] for n in diff.deltas}))
    torch.testing.assert_close(back.deltas["2.bias"].to_dense(), diff.dense["2.bias"])  # dense written as a full diff
    assert torch.equal(back.absolute["1.weight"], diff.absolute["1.weight"])


def test_composable_sft_save_to_a_new_path_makes_a_folder_and_refuses_a_file(tmp_path):
    # composable-sft's SFT.save and HF's save_pretrained take a folder; a path that did not exist
    # became a file "de", which nothing reading a composable-sft folder could find
    diff = _saved_diff()
    diff.save_composable_sft(str(tmp_path / "out" / "de"))
    assert sorted(os.listdir(tmp_path / "out" / "de")) == ["pytorch_diff.bin"]
    back = SparseDiff.load_composable_sft(str(tmp_path / "out" / "de"))
    assert torch.equal(back.deltas["0.weight"].values, diff.deltas["0.weight"].values)
    taken = tmp_path / "taken"
    taken.write_bytes(b"kept")
    with pytest.raises(FileExistsError, match="existing file"):
        diff.save_composable_sft(str(taken))
    assert taken.read_bytes() == b"kept" and sorted(os.listdir(tmp_path)) == ["out", "taken"]
    diff.save_composable_sft(str(tmp_path / "sft.bin"))  # a .bin path names the file itself
    assert os.path.isfile(tmp_path / "sft.bin")


def test_saves_and_loads_refuse_an_empty_path_or_a_non_path_naming_the_argument(tmp_path, monkeypatch):
    # save("") wrote a temporary file beside the working folder and failed as "'<tmp>' -> ''";
    # save_composable_sft("") wrote pytorch_diff.bin into the working folder; save(None) raised
    # os.path's "expected str, bytes or os.PathLike object"
    diff = _saved_diff()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match="SparseDiff.save: path: an empty path"):
        diff.save("")
    with pytest.raises(ValueError, match="save_composable_sft: path: an empty path"):
        diff.save_composable_sft("")
    for bad in (None, 3):
        with pytest.raises(TypeError, match=f"SparseDiff.save: path must be a str or os.PathLike, got {type(bad).__name__}"):
            diff.save(bad)
        with pytest.raises(TypeError, match="save_composable_sft: path must be a str or os.PathLike"):
            diff.save_composable_sft(bad)
    assert os.listdir(tmp_path) == ["work"] and os.listdir(work) == []
    # the loads alike: load(3) asked os.path.isfile about file descriptor 3, None raised os.stat's error
    for load in (SparseDiff.load, SparseDiff.load_composable_sft):
        with pytest.raises(ValueError, match="load.*: path: an empty path"):
            load("")
        for bad in (None, 3):
            with pytest.raises(TypeError, match=f"load.*: path must be a str or os.PathLike, got {type(bad).__name__}"):
                load(bad)


def test_composable_sft_file_as_written_by_composable_sft_and_above_2_31(tmp_path):
    # composable-sft stores the first step as a numpy int64 and the rest as Python ints.
    shape = torch.Size([2**20, 2**12])  # 2^32 elements
    rows = torch.tensor([5, 2**20 - 1])
    cols = torch.tensor([2**12 - 1, 2**12 - 1])
    column = (rows + cols * shape[0]).tolist()
    steps = [np.int64(column[0])] + [column[1] - column[0]]
    values = torch.tensor([1.5, -2.5])
    torch.save({"diffs": {"w": {"size": shape, "index_steps": steps, "values": values}}, "abs": {}}, tmp_path / "pytorch_diff.bin")
    diff = SparseDiff.load_composable_sft(str(tmp_path / "pytorch_diff.bin"))
    d = diff.deltas["w"]
    assert d.indices.dtype == torch.int64
    assert d.indices.tolist() == (rows * shape[1] + cols).tolist() and torch.equal(d.values, values)
    out = tmp_path / "again"
    out.mkdir()
    diff.save_composable_sft(str(out))
    _assert_same_diff(diff, SparseDiff.load_composable_sft(str(out)))


def test_composable_sft_file_written_under_numpy_1(tmp_path):
    """numpy 1.x (every SFT composable-sft released) pickles the np.int64 first step as
    numpy.core.multiarray.scalar, numpy 2 as numpy._core.multiarray.scalar; the allowlist held
    only the running numpy's name and refused the other. Both names are rebuilt here from one file."""
    import zipfile

    torch.save({"diffs": {"w": {"size": torch.Size([4, 5]), "index_steps": [np.int64(3), 2, 5],
                                "values": torch.tensor([1.0, 2.0, 3.0])}}, "abs": {}}, tmp_path / "src.bin")
    want = torch.zeros(4, 5)
    want[3, 0], want[1, 1], want[2, 2] = 1.0, 2.0, 3.0  # column-major 3, 5, 10
    for old, new in ((b"numpy._core.multiarray", b"numpy.core.multiarray"), (b"numpy.core.multiarray", b"numpy._core.multiarray")):
        path = tmp_path / "pytorch_diff.bin"
        with zipfile.ZipFile(tmp_path / "src.bin") as zin, zipfile.ZipFile(path, "w") as zout:
            for n in zin.namelist():
                data = zin.read(n)
                zout.writestr(n, data.replace(old, new) if n.endswith("data.pkl") else data)
        assert torch.equal(SparseDiff.load_composable_sft(str(path)).deltas["w"].to_dense(), want), new


@pytest.mark.parametrize("bad,msg", [
    ({"diffs": {"w": {"size": torch.Size([4]), "index_steps": [1, 0], "values": torch.randn(2)}}}, r"index_steps\[1\] = 0"),
    ({"diffs": {"w": {"size": torch.Size([4]), "index_steps": [1, 3], "values": torch.randn(2)}}}, "outside"),
    ({"diffs": {"w": {"size": torch.Size([4]), "index_steps": [1], "values": torch.randn(2)}}}, "one entry per index step"),
    ({"weights": {}}, "expected a dict with keys"),
    # read as int64, a float or bool step was truncated to another index, silently
    ({"diffs": {"w": {"size": torch.Size([4]), "index_steps": [0.5, 1.7], "values": torch.randn(2)}}}, "integers"),
    ({"diffs": {"w": {"size": torch.Size([4]), "index_steps": torch.tensor([0.0, 2.0]), "values": torch.randn(2)}}},
     "integers"),
    ({"diffs": {"w": {"size": torch.Size([4]), "index_steps": torch.tensor([True]), "values": torch.randn(1)}}}, "integers"),
    # torch.as_tensor([True, 2]) is int64
    ({"diffs": {"w": {"size": torch.Size([4]), "index_steps": [True, 2], "values": torch.randn(2)}}}, "integers"),
    ({"diffs": {"w": {"size": torch.Size([4]), "index_steps": [1], "values": torch.randn(1)}},
      "abs": {"w": torch.randn(4)}}, r"parameters \['w'\] appear in more than one"),
])
def test_composable_sft_rejects_malformed(tmp_path, bad, msg):
    path = tmp_path / "pytorch_diff.bin"
    torch.save(bad, path)
    with pytest.raises((ValueError, IndexError), match=msg) as info:
        SparseDiff.load_composable_sft(str(path))
    assert str(path) in str(info.value)  # a name in "diffs" and "abs" alike named the entry only
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        SparseDiff.load_composable_sft(str(path))


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
def test_topk_masks_many_equal_keys(backend, use_backend):
    # Over 4M equal magnitudes share the top radix digit: the CPU kernel's full radix path.
    use_backend(backend)
    tensors = [torch.full((3, 5), -2.0), torch.ones(2**22 + 5), torch.full((7,), 3.0)]
    masks = topk_masks(tensors, 30)
    assert masks[0].all() and masks[2].all()
    assert masks[1][:8].all() and int(masks[1].sum()) == 8


@pytest.mark.parametrize("where", ["delta", "dense", "absolute", "to"])
def test_float8_values_are_refused_where_a_diff_is_made(where):
    # float8 deltas were taken by SparseDelta, SparseDiff and save, but refused by merge (and d + d)
    # and broke apply's promotion: refused at construction, as the README's table says.
    f8 = torch.float8_e4m3fn
    vals = torch.tensor([0.5, 1.5])
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        if where == "delta":
            SparseDelta(torch.tensor([1, 3]), vals.to(f8), (2, 3))
        elif where == "to":
            SparseDiff({"w": SparseDelta(torch.tensor([1, 3]), vals, (2, 3))}).to(dtype=f8)
        else:
            SparseDiff(**{where: {"w": torch.ones(2, 3).to(f8)}})


def test_from_models_of_two_bfloat16_models_is_exact_through_float32_copies():
    # Two bfloat16 tensors' difference is rounded to bfloat16: base + diff is 1 ulp off tuned at
    # some entries, as from_models' docstring says; its float32 copies (.float() keeps ties) give
    # float32 values, and apply rounds base + value once, to tuned.
    torch.manual_seed(0)
    base = torch.nn.Linear(300, 300).to(torch.bfloat16)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.weight.add_(torch.randn_like(tuned.weight) * 0.05)
    rounded = copy.deepcopy(base)
    xlsparse.apply(xlsparse.SparseDiff.from_models(base, tuned), rounded)
    assert (rounded.weight != tuned.weight).any()  # the documented rounding: this test sees it
    exact = copy.deepcopy(base)
    diff = xlsparse.SparseDiff.from_models(copy.deepcopy(base).float(), copy.deepcopy(tuned).float())
    assert diff.deltas["weight"].values.dtype == torch.float32
    xlsparse.apply(diff, exact)
    assert torch.equal(exact.weight, tuned.weight) and torch.equal(exact.bias, tuned.bias)


def test_merge_sums_a_dense_entry_in_the_widest_dtype_of_its_parts():
    # A float32 dense part merged with a float64 part: the float64 result was off by float32's
    # rounding of 0.1 * x (9e-9), since the float32 part was weighted in float32 before the sum.
    torch.manual_seed(0)
    dense = torch.randn(50)
    sparse = SparseDelta.from_dense(torch.randn(50, dtype=torch.float64))
    want = 0.1 * dense.double() + 0.3 * sparse.to_dense()
    for diffs, weights in (([SparseDiff(dense={"w": dense}), SparseDiff({"w": sparse})], [0.1, 0.3]),
                           ([SparseDiff({"w": sparse}), SparseDiff(dense={"w": dense})], [0.3, 0.1])):
        got = SparseDiff.merge(diffs, weights).dense["w"]
        assert got.dtype == torch.float64 and torch.equal(got, want)


def test_apply_sums_dense_entries_in_the_widest_dtype_of_the_call():
    # A float32 dense entry (alpha 0.1) and a float64 one on a float32 tensor: the float32 entry
    # was weighted in float32 before the float64 sum, and 76 of 1000 entries came out 1 ulp off
    # float32(w + 0.1 * d1 + 0.3 * d2); so were float64 sparse values folded into a float32 sum.
    torch.manual_seed(0)
    w, d1, d2 = torch.randn(1000), torch.randn(1000), torch.randn(1000, dtype=torch.float64) * 1e-3
    want = (w.double() + 0.1 * d1.double() + 0.3 * d2).float()
    for second in (SparseDiff(dense={"w": d2}), SparseDiff({"w": SparseDelta.from_dense(d2)})):
        model = {"w": w.clone()}
        handle = xlsparse.apply([SparseDiff(dense={"w": d1}), second], model, [0.1, 0.3])
        assert torch.equal(model["w"], want)
        handle.revert()
        assert torch.equal(model["w"], w)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_merge_refuses_a_half_precision_sum_that_overflows(kind):
    """40000 + 40000 in float16 is inf (65504 is its largest finite value): merge raised nothing and
    the diff held inf. Inf terms stay the caller's (not refused here); float32 merges the same."""
    big = torch.tensor([40000.0, 1.0, 0.0, 2.0], dtype=torch.float16)

    def diff(values):
        return SparseDiff({"w": SparseDelta.from_dense(values)}) if kind == "sparse" else SparseDiff(dense={"w": values})

    with pytest.raises(ValueError, match=r"weighted sum of 'w' overflows torch.float16 .*65504"):
        SparseDiff.merge([diff(big), diff(big)])
    ok = SparseDiff.merge([diff(big), diff(big)], [0.5, 0.5])  # the same values, no overflow
    got = ok.deltas["w"].to_dense() if kind == "sparse" else ok.dense["w"]
    assert torch.equal(got, big)
    wide = SparseDiff.merge([diff(big).to(dtype=torch.float32)] * 2)
    assert (wide.deltas["w"].to_dense() if kind == "sparse" else wide.dense["w"])[0] == 80000
    inf = big.clone()
    inf[1] = float("inf")
    SparseDiff.merge([diff(inf), diff(big)])  # an inf term is the caller's value, merged as given


@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("dtype,big", [(torch.float16, 40000.0), (torch.bfloat16, 2e38)])
def test_apply_refuses_a_half_precision_entry_that_overflows(kind, dtype, big):
    """W + diff in float16 (largest finite 65504) or bfloat16 (3.4e38) became inf with no error:
    now a ValueError names the parameter and every tensor of the model keeps its bits. Entries that
    were inf before, or diffs that hold inf, stay the caller's values, written as given."""
    def diff(values):
        values = values.to(dtype)
        return SparseDiff({"w": SparseDelta.from_dense(values)}) if kind == "sparse" else SparseDiff(dense={"w": values})

    w = torch.tensor([big, 1.0, -3.0, 2.0], dtype=dtype)
    other = torch.randn(8, dtype=dtype)
    step = torch.tensor([big, 0.5, 0.0, 1.0])
    model = {"other": other.clone(), "w": w.clone()}
    other_diff = SparseDiff({"other": SparseDelta.from_dense(torch.ones(8, dtype=dtype))})
    with pytest.raises(ValueError, match=rf"apply: 'w' plus the diffs overflows {dtype}"):
        xlsparse.apply([other_diff, diff(step)], model)
    assert torch.equal(model["w"], w) and torch.equal(model["other"], other)
    with pytest.raises(ValueError, match="overflows"):  # two finite halves whose sum with W overflows
        xlsparse.apply([diff(step / 2), diff(step / 2)], model)
    assert torch.equal(model["w"], w)
    handle = xlsparse.apply(diff(step), model, [0.25])  # scaled down: no overflow, applied
    assert torch.isfinite(model["w"]).all() and not torch.equal(model["w"], w)
    handle.revert()
    assert torch.equal(model["w"], w)
    inf_step = step.clone()
    inf_step[1] = float("inf")
    with xlsparse.apply(diff(inf_step), model):  # an inf in the diff is the caller's value
        assert model["w"][1] == float("inf")
    model["w"][2] = float("-inf")  # an entry already inf is not an overflow of this call
    with xlsparse.apply(diff(torch.tensor([0.0, 0.5, -1.0, 1.0])), model):
        assert model["w"][2] == float("-inf")
