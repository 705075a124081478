"""Multi-mask gated matmuls: SDDMM, SpMM, sparse_delta_linear, multi_delta_linear and
ensemble mixing on every CPU-capable backend, against float64 references."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import (
    DTYPES,
    INDEX_DTYPES,
    assert_bit_identical,
    assert_close_to_float64 as check,
    assert_matches_reference,
    cpu_backends,
    random_indices,
    seeded,
    slow_on_triton,
)
import xlsparse
from xlsparse import _ext, functional, routing
from xlsparse import nn as xnn
from xlsparse.ops import matmul as ops
from xlsparse.routing import TokenGroups

MM_BACKENDS = cpu_backends("sddmm")
ENS_BACKENDS = cpu_backends("ensemble_logprobs")
ALL_DTYPES = DTYPES + [torch.float64]
needs_ext = pytest.mark.skipif(not _ext.loaded(), reason="compiled extension not built")

# (T, O, I): odd sizes; the 4097-token case is skipped under the slow Triton interpreter.
SHAPES = [(1, 3, 5), (3, 17, 1), (127, 33, 29), (4097, 7, 9)]


# K = 0 and K = N over all tokens; a partial delta under each token selection.
DENSITY_MODES = [(0.0, "all"), (1.0, "all"), (0.3, "all"), (0.3, "routed"), (0.3, "scaled")]


def _skip_slow(backend, tokens):
    if backend == "triton" and tokens > 1000:
        pytest.skip("large token counts are slow under the Triton interpreter")


def _selection(mode, tokens, gen):
    """(token_index, token_bounds, token_scale, the selected token ids, the per-token scale)."""
    if mode == "all":
        return None, None, None, torch.arange(tokens), torch.ones(tokens)
    if mode == "scaled":
        s = torch.rand(tokens, generator=gen) * 2 - 0.5
        return None, None, s, torch.arange(tokens), s
    order = torch.randperm(tokens, generator=gen)
    lo, hi = tokens // 4, tokens - tokens // 5
    return order, torch.tensor([lo, hi]), None, order[lo:hi], torch.ones(tokens)


# --- SDDMM ---


@pytest.mark.parametrize("backend", MM_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density,mode", DENSITY_MODES)
def test_sddmm_matches_float64(backend, dtype, shape, density, mode, use_backend):
    t, o, i = shape
    _skip_slow(backend, t)
    use_backend(backend)
    gen = seeded(t + o + i)
    dy, x = torch.randn(t, o, generator=gen).to(dtype), torch.randn(t, i, generator=gen).to(dtype)
    k = round(o * i * density)
    idx = random_indices(o * i, k, INDEX_DTYPES[k % 2], gen)
    ti, tb, ts, sel, scale = _selection(mode, t, gen)
    out = ops.sddmm(dy, x, idx, ti, tb, ts)
    w = torch.zeros(t, dtype=torch.float64)
    w[sel] = scale[sel].double()
    ref64 = ((dy.double() * w[:, None]).T @ x.double()).view(-1)[idx.long()]
    plain = ((dy * w[:, None].to(dtype)).T @ x).view(-1)[idx.long()]
    assert out.dtype == dtype and out.shape == (k,)
    check(out, ref64, plain, f"sddmm {backend} {dtype}")


@needs_ext
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("mode", ["all", "routed", "scaled"])
@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_sddmm_row_blocks_and_token_parts(dtype, mode, threads):
    """The CPU kernel's layout: rows in blocks of 256 (some empty, one dense, one with 1 entry),
    tokens split between threads in chunks of 256 with ragged tails, columns not a whole vector."""
    gen = seeded(11)
    t, o, i = 700, 1300, 37
    dy, x = torch.randn(t, o, generator=gen).to(dtype), torch.randn(t, i, generator=gen).to(dtype)
    dense_row = torch.arange(600 * i, 601 * i)  # row 600: every column
    scattered = torch.randint(1030 * i, 1300 * i, (400,), generator=gen)  # rows 1030+, skipping 257..599
    idx = torch.cat([torch.tensor([3 * i + 5]), dense_row, scattered]).unique().sort().values
    ti, tb, ts, sel, scale = _selection(mode, t, gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.ops.xlsparse.sddmm(dy, x, idx, ti, tb, ts)
    finally:
        torch.set_num_threads(before)
    w = torch.zeros(t, dtype=torch.float64)
    w[sel] = scale[sel].double()
    ref64 = ((dy.double() * w[:, None]).T @ x.double()).view(-1)[idx]
    plain = ((dy * w[:, None].to(dtype)).T @ x).view(-1)[idx]
    check(out, ref64, plain, f"cpu sddmm {dtype} {mode} {threads} threads")


# Entries per row: each group size of the dot kernels (1-12 in one kernel, longer rows eight at a
# time first) and the edges between them; one row full, one empty.
ROW_LENGTHS = [0, 1, 7, 8, 9, 11, 12, 13, 16, 17, 20, 24, 25, 300]


@needs_ext
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_sddmm_wide_and_tall_rows_of_every_length_match_float64(dtype, layout, threads):
    """Both orientations of the CPU kernel (more columns than rows: a and b swap roles, entries taken
    column by column), rows of every length, inputs transposed or strided, T = 1, T not a whole
    chunk and T over one token part, every token selection."""
    gen = seeded(31)
    rows, cols = len(ROW_LENGTHS), 300
    wide = torch.cat([r * cols + torch.randperm(cols, generator=gen)[:n].sort().values
                      for r, n in enumerate(ROW_LENGTHS)])
    tall = (wide % cols * rows + wide // cols).sort().values  # the same entries of the transposed weight

    def operand(t, n):
        if layout == "transposed":
            return torch.randn(n, t, generator=gen).to(dtype).T
        if layout == "strided":
            return torch.randn(t, 2 * n, generator=gen).to(dtype)[:, 1::2]
        return torch.randn(t, n, generator=gen).to(dtype)

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for t in (1, 261, 1100):
            for (o, i, idx) in ((rows, cols, wide), (cols, rows, tall)):
                dy, x = operand(t, o), operand(t, i)
                for mode in ("all", "routed", "scaled"):
                    ti, tb, ts, sel, scale = _selection(mode, t, gen)
                    out = torch.ops.xlsparse.sddmm(dy, x, idx, ti, tb, None if ts is None else ts.to(dtype))
                    w = torch.zeros(t, dtype=torch.float64)
                    w[sel] = scale[sel].to(dtype).double()
                    ref64 = ((dy.double() * w[:, None]).T @ x.double()).reshape(-1)[idx]
                    plain = ((dy * w[:, None].to(dtype)).T @ x).reshape(-1)[idx]
                    check(out, ref64, plain, f"cpu sddmm {dtype} {layout} T={t} {o}x{i} {mode} {threads} threads")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.01, 0.6])
def test_sparse_delta_linear_dvalues_path_follows_the_timed_choice(dtype, density, monkeypatch):
    """On a CPU, dvalues of a bfloat16 delta above the density floor whose timing chose the dense
    way is one dense dYᵀX and a gather; fp32 and fp16 always take SDDMM (no O x I buffer), so does
    a delta below the floor (untimed); both paths match float64."""
    monkeypatch.setattr(ops, "_dense_dw_choice", {})
    monkeypatch.setattr(ops, "time_dense_dw", lambda *a: True)  # as if the dense way ran faster
    monkeypatch.delenv("XLSPARSE_DENSE_DW_MIN_DENSITY", raising=False)
    gen = seeded(21)
    o, i, t = 48, 40, ops.DENSE_DW_TIMED_MIN_TOKENS
    x, w, b, idx, vals = _linear_case(t, o, i, round(o * i * density), dtype, gen)
    vals.requires_grad_()
    calls = []
    real = ops.sddmm
    monkeypatch.setattr(ops, "sddmm", lambda *a: calls.append(1) or real(*a))
    gy = torch.randn(t, o, generator=gen).to(dtype)
    (dval,) = torch.autograd.grad(functional.sparse_delta_linear(x, w, b, idx, vals), [vals], gy)
    dense = density == 0.6 and dtype == torch.bfloat16
    assert bool(calls) != dense
    ref64 = (gy.double().T @ x.double()).view(-1)[idx.long()]
    plain = (gy.T @ x).view(-1)[idx.long()]
    check(dval, ref64, plain, f"dvalues {dtype} at {density}")


def test_dvalues_gathers_from_dw0_when_the_base_weight_trains(monkeypatch):
    """With W0 requiring grad, dW0 = dYᵀX is computed anyway: dvalues is its gather, no SDDMM (fp32,
    1%), and both gradients match float64."""
    gen = seeded(22)
    x, w, b, idx, vals = _linear_case(64, 48, 40, 19, torch.float32, gen)
    w.requires_grad_()
    vals.requires_grad_()
    monkeypatch.setattr(ops, "sddmm", lambda *a: pytest.fail("SDDMM ran beside a dense dW0"))
    gy = torch.randn(64, 48, generator=gen)
    dw, dval = torch.autograd.grad(functional.sparse_delta_linear(x, w, b, idx, vals), [w, vals], gy)
    ref64 = gy.double().T @ x.double()
    check(dw, ref64, gy.T @ x, "dW0")
    check(dval, ref64.view(-1)[idx.long()], (gy.T @ x).view(-1)[idx.long()], "dvalues")


class _Clock:
    """perf_counter for `time_dense_dw`: each timed run of way w lasts durations[w] (the next of its
    list)."""

    def __init__(self, dense, sparse):
        self.runs = {0: list(dense), 1: list(sparse)}
        self.now, self.calls = 0.0, 0

    def perf_counter(self):
        way, end = divmod(self.calls, 2)  # start, end of dense; start, end of SDDMM; ...
        self.calls += 1
        if end:
            self.now += self.runs[way % 2].pop(0)
        return self.now


@pytest.mark.parametrize("dense_s, sparse_s, want", [
    ([1e-3] * 3, [2e-3] * 3, True),
    ([2e-3] * 3, [1e-3] * 3, False),
    ([1e-3, 9.0, 9.0], [2e-3, 1.5e-3, 9.0], True),   # the fastest run of each way counts
    ([9.0, 9.0, 2e-3], [1e-3, 9.0, 9.0], False),
])
def test_timed_choice_compares_each_ways_fastest_run(dense_s, sparse_s, want, monkeypatch):
    """The dense way wins when its fastest of the alternating runs is no slower than SDDMM's."""
    clock = _Clock(dense_s, sparse_s)
    monkeypatch.setattr(ops.time, "perf_counter", clock.perf_counter)
    gen = seeded(23)
    dy, x = torch.randn(8, 6, generator=gen), torch.randn(8, 5, generator=gen)
    assert ops.time_dense_dw(dy, x, torch.arange(0, 30, 3)) is want
    assert clock.calls == 12 and not clock.runs[0] and not clock.runs[1]


def test_choice_is_timed_once_per_delta_shape_and_can_be_pinned(monkeypatch):
    """The first bfloat16 backward of a (shape, K) above the density floor with enough tokens times
    the two ways, once per power of two of the token count; later calls reuse it; fewer tokens keep SDDMM without setting the choice; other
    dtypes and sparser deltas never take the dense way; XLSPARSE_DENSE_DW_MIN_DENSITY pins the
    choice (a bad value raises, naming the variable)."""
    monkeypatch.delenv("XLSPARSE_DENSE_DW_MIN_DENSITY", raising=False)
    monkeypatch.setattr(ops, "_dense_dw_choice", {})
    timed = []
    monkeypatch.setattr(ops, "time_dense_dw", lambda dy, x, idx: timed.append((dy.shape[0], idx.numel())) or True)

    def pays(k, tokens=ops.DENSE_DW_TIMED_MIN_TOKENS, dtype=torch.bfloat16, shape=(100, 100)):
        dy, x = torch.zeros(tokens, shape[0], dtype=dtype), torch.zeros(tokens, shape[1], dtype=dtype)
        return ops.dense_dw_pays(dy, x, torch.arange(k), shape)

    floor = round(ops.MIN_DENSE_DW_DENSITY * 100 * 100)
    assert not pays(floor - 1) and not timed
    assert not pays(500, tokens=ops.DENSE_DW_TIMED_MIN_TOKENS - 1) and not timed
    t = ops.DENSE_DW_TIMED_MIN_TOKENS
    assert pays(500) and pays(500) and pays(500, tokens=2 * t - 1) and timed == [(t, 500)]
    assert pays(500, tokens=2 * t) and timed[-1] == (2 * t, 500)  # another power of two of the tokens
    assert pays(floor) and len(timed) == 3
    assert pays(500, shape=(50, 200)) and len(timed) == 4
    assert not pays(10000, dtype=torch.float32) and not pays(10000, dtype=torch.float16) and len(timed) == 4
    monkeypatch.setenv("XLSPARSE_DENSE_DW_MIN_DENSITY", "0.5")
    assert not pays(4999) and pays(5000) and not pays(500)
    monkeypatch.setenv("XLSPARSE_DENSE_DW_MIN_DENSITY", "inf")
    assert not pays(10000)
    for bad in ("-1", "0", "nan", "many"):
        monkeypatch.setenv("XLSPARSE_DENSE_DW_MIN_DENSITY", bad)
        with pytest.raises(ValueError, match="XLSPARSE_DENSE_DW_MIN_DENSITY"):
            pays(10)
    assert len(timed) == 4


def test_a_dense_way_out_of_memory_while_timing_keeps_sddmm(monkeypatch):
    """The timing runs the dense way, whose O x I product may not fit: SDDMM is then chosen (and
    kept) instead of the backward failing."""
    monkeypatch.delenv("XLSPARSE_DENSE_DW_MIN_DENSITY", raising=False)
    monkeypatch.setattr(ops, "_dense_dw_choice", {})
    calls = []

    def out_of_memory(*args):
        calls.append(1)
        torch.empty(2**46)  # 256 TB, past any address space: what torch's CPU allocator raises

    monkeypatch.setattr(ops, "time_dense_dw", out_of_memory)
    t = ops.DENSE_DW_TIMED_MIN_TOKENS
    dy, x = torch.zeros(t, 100, dtype=torch.bfloat16), torch.zeros(t, 100, dtype=torch.bfloat16)
    assert not ops.dense_dw_pays(dy, x, torch.arange(5000), (100, 100))
    assert not ops.dense_dw_pays(dy, x, torch.arange(5000), (100, 100)) and calls == [1]
    monkeypatch.setattr(ops, "_dense_dw_choice", {})
    monkeypatch.setattr(ops, "time_dense_dw", lambda *a: torch.zeros(2) @ torch.zeros(3))  # another error
    with pytest.raises(RuntimeError, match="size mismatch|shapes cannot be multiplied|inconsistent"):
        ops.dense_dw_pays(dy, x, torch.arange(5000), (100, 100))


def test_real_timed_choice_gives_float64_dvalues_and_is_kept(monkeypatch):
    """On this machine's kernels: a 50% bfloat16 delta's first backward times the two ways, keeps the
    choice for its shape, and its dvalues match float64 whichever way won."""
    monkeypatch.delenv("XLSPARSE_DENSE_DW_MIN_DENSITY", raising=False)
    monkeypatch.setattr(ops, "_dense_dw_choice", {})
    gen = seeded(24)
    t, o, i = ops.DENSE_DW_TIMED_MIN_TOKENS, 64, 48
    x, w, b, idx, vals = _linear_case(t, o, i, o * i // 2, torch.bfloat16, gen)
    vals.requires_grad_()
    gy = torch.randn(t, o, generator=gen).to(torch.bfloat16)
    (dval,) = torch.autograd.grad(functional.sparse_delta_linear(x, w, b, idx, vals), [vals], gy)
    assert list(ops._dense_dw_choice) == [(torch.bfloat16, o, i, idx.numel(), t.bit_length())]
    check(dval, (gy.double().T @ x.double()).view(-1)[idx.long()], (gy.T @ x).view(-1)[idx.long()], "dvalues")


# --- SpMM ---


@pytest.mark.parametrize("backend", MM_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
def test_spmm_keeps_the_bits_of_unselected_tokens_and_unreached_columns(backend, dtype, transpose, use_backend):
    """Elements that no selected token and reached column meet keep their bits, −0.0 and NaN
    included, on every backend (a GPU kernel once added a zero buffer to all of out)."""
    use_backend(backend)
    gen = seeded(31)
    t, o, i = 40, 24, 10
    x = torch.randn(t, i if not transpose else o, generator=gen).to(dtype)
    rows = torch.tensor([1, 4, 5, 9])  # the delta's output groups: the other columns are unreached
    groups = i if transpose else o
    width = o if transpose else i
    flat = (rows[:, None] * width + torch.randint(0, width, (1, 3), generator=gen)).reshape(-1).unique()
    idx = ((flat % width) * groups + flat // width).sort().values if transpose else flat  # [O, I] layout
    vals = torch.randn(idx.numel(), generator=gen).to(dtype)
    token_index = torch.randperm(t, generator=gen)
    bounds = torch.tensor([5, 30])  # tokens token_index[5:30] are selected
    out = torch.randn(t, groups, generator=gen).to(dtype)
    out[:, [0, 7]] = -0.0
    out[:, 8] = float("nan")
    out[token_index[:5], 4] = -0.0  # a reached column, unselected tokens
    expect = out.clone()
    ops.spmm_reference(expect, x, idx, vals, token_index, bounds, None, transpose)
    got = out.clone()
    ops.spmm_(got, x, idx, vals, token_index, bounds, None, transpose)
    selected = torch.zeros(t, dtype=torch.bool)
    selected[token_index[5:30]] = True
    reached = torch.zeros(groups, dtype=torch.bool)
    reached[rows] = True
    keep = ~(selected[:, None] & reached[None, :])
    assert_bit_identical(got[keep], out[keep], f"spmm_ {backend} {dtype}: untouched elements")
    torch.testing.assert_close(got, expect, equal_nan=True, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("bounds", [None, (3, 200)], ids=["all tokens", "bounded"])
def test_triton_spmm_loops_over_token_blocks_past_the_grid_cap(bounds, monkeypatch):
    """More token blocks than the grid's second axis allows (65535 on CUDA) run whole: each program
    strides over them. The cap is lowered to 2 here, so that each program loops over several
    token blocks."""
    if "triton" not in MM_BACKENDS:
        pytest.skip("triton not usable here")
    import xlsparse.triton.matmul as tm

    monkeypatch.setattr(tm, "MAX_GRID_1", 2)
    gen = seeded(41)
    t, o, i = 1100, 6, 5  # 1100 tokens: 5 blocks of 256 under the interpreter, 2 programs
    x = torch.randn(t, i, generator=gen)
    idx = random_indices(o * i, 9, torch.int64, gen)
    vals = torch.randn(9, generator=gen)
    token_index = torch.randperm(t, generator=gen)
    tb = None if bounds is None else torch.tensor(bounds)
    out = torch.randn(t, o, generator=gen)
    expect = out.clone()
    ops.spmm_reference(expect, x, idx, vals, token_index, tb, None, False)
    got = out.clone()
    tm.triton_spmm_(got, x, idx, vals, token_index, tb, None, False)
    torch.testing.assert_close(got, expect)


@needs_ext
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_spmm_blocks_and_untouched_columns(dtype, threads):
    """The CPU kernel's layout: output columns in blocks of 128 (one empty, ragged last), tokens in
    chunks of 256 with a ragged tail. Columns without entries keep their bits: -0.0 and NaN stay,
    in the empty block, beside used columns, and in the last block's partial vector."""
    gen = seeded(12)
    t, o, i = 300, 300, 37
    x = torch.randn(t, i, generator=gen).to(dtype)
    rows = torch.cat([torch.arange(0, 100), torch.arange(260, 291)])  # columns 100..259 and 291.. get nothing
    idx = (rows[:, None] * i + torch.randint(0, i, (1, 3), generator=gen)).reshape(-1).unique()
    vals = torch.randn(idx.numel(), generator=gen).to(dtype)
    out = torch.randn(t, o, generator=gen).to(dtype)
    for col in (110, 150, 295):
        out[:, col] = -0.0
        out[:, col + 1] = float("nan")
    expect64 = out.double() + x.double() @ torch.zeros(o * i, dtype=torch.float64).index_put_((idx,), vals.double()).view(o, i).T
    plain = out + x @ torch.zeros(o * i, dtype=dtype).index_put_((idx,), vals).view(o, i).T
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = out.clone()
        torch.ops.xlsparse.spmm_(got, x, idx, vals, None, None, None, False)
    finally:
        torch.set_num_threads(before)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    untouched = torch.cat([torch.arange(100, 260), torch.arange(291, 300)])
    assert torch.equal(got[:, untouched].view(bits), out[:, untouched].view(bits))
    used = rows
    check(got[:, used], expect64[:, used], plain[:, used], f"cpu spmm {dtype} {threads} threads")


@pytest.mark.parametrize("backend", MM_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density,mode", DENSITY_MODES)
@pytest.mark.parametrize("transpose", [False, True])
def test_spmm_matches_float64(backend, dtype, shape, density, mode, transpose, use_backend):
    t, o, i = shape
    _skip_slow(backend, t)
    use_backend(backend)
    gen = seeded(3 * t + o + i)
    k = round(o * i * density)
    idx = random_indices(o * i, k, INDEX_DTYPES[k % 2], gen)
    vals = torch.randn(k, generator=gen).to(dtype)
    x = torch.randn(t, o if transpose else i, generator=gen).to(dtype)
    out = torch.randn(t, i if transpose else o, generator=gen).to(dtype)
    before = out.clone()
    ti, tb, ts, sel, scale = _selection(mode, t, gen)
    delta64 = torch.zeros(o * i, dtype=torch.float64)
    delta64[idx.long()] = vals.double()
    delta64 = delta64.view(o, i)
    w = torch.zeros(t, dtype=torch.float64)
    w[sel] = scale[sel].double()
    prod64 = (x.double() * w[:, None]) @ (delta64 if transpose else delta64.T)
    ref64 = before.double() + prod64
    delta = delta64.to(dtype)
    plain = before + (x * w[:, None].to(dtype)) @ (delta if transpose else delta.T)

    assert ops.spmm_(out, x, idx, vals, ti, tb, ts, transpose) is out
    reached = torch.zeros(out.shape[1], dtype=torch.bool)
    reached[(idx.long() % i) if transpose else (idx.long() // i)] = True
    touched = torch.zeros(out.shape, dtype=torch.bool)
    touched[sel[:, None], reached[None, :].nonzero()[:, 1][None, :]] = True
    check(out[touched], ref64[touched], plain[touched], f"spmm_ {backend} {dtype}")
    assert_bit_identical(out[~touched], before[~touched], "entries no delta entry or token reaches")


@pytest.mark.parametrize("backend", MM_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("experts", [1, 3])
@pytest.mark.parametrize("transpose", [False, True])
def test_spmm_gated_matches_float64(backend, dtype, shape, experts, transpose, use_backend):
    """E soft-gated deltas added in one call (the CPU kernel's single pass; elsewhere one spmm_
    per delta): out + Σ_e g_e ⊙ x Δ_eᵀ in float64, one delta empty and the index dtypes mixed;
    columns that no delta reaches keep their bits."""
    t, o, i = shape
    _skip_slow(backend, t)
    use_backend(backend)
    gen = seeded(5 * t + o + i + experts)
    x = torch.randn(t, o if transpose else i, generator=gen).to(dtype)
    out = torch.randn(t, i if transpose else o, generator=gen).to(dtype)
    before = out.clone()
    gates = torch.rand(t, experts, generator=gen).to(dtype)
    idx, vals, deltas64 = [], [], []
    for e in range(experts):
        k = 0 if e == 1 else round(o * i * (0.2 + 0.3 * e / experts))
        idx.append(random_indices(o * i, k, INDEX_DTYPES[e % 2], gen))
        vals.append(torch.randn(k, generator=gen).to(dtype))
        d = torch.zeros(o * i, dtype=torch.float64)
        d[idx[e].long()] = vals[e].double()
        deltas64.append(d.view(o, i))
    ref64, plain = before.double(), before.clone()
    for e, d in enumerate(deltas64):
        d = d if transpose else d.T
        ref64 = ref64 + (x.double() * gates[:, e : e + 1].double()) @ d
        plain = plain + (x * gates[:, e : e + 1]) @ d.to(dtype)

    assert ops.spmm_gated_(out, x, idx, vals, gates, transpose) is out
    reached = torch.zeros(out.shape[1], dtype=torch.bool)
    for ix in idx:
        reached[(ix.long() % i) if transpose else (ix.long() // i)] = True
    check(out[:, reached], ref64[:, reached], plain[:, reached], f"spmm_gated_ {backend} {dtype}")
    assert_bit_identical(out[:, ~reached], before[:, ~reached], "columns no delta reaches")


def test_the_op_level_switches_must_be_bools():
    """spmm_'s transpose and the ensemble ops' prob_space were read with bool(): transpose="False"
    ran x Δ for x Δᵀ, and prob_space="logit" (the functional API's word) ran prob space, silently."""
    gen = seeded(34)
    x, out = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    idx, vals = torch.tensor([1, 5]), torch.randn(2, generator=gen)
    before = out.clone()
    for flag in ("False", 0, None):
        with pytest.raises(TypeError, match="spmm_: transpose must be a bool"):
            ops.spmm_(out, x, idx, vals, transpose=flag)
        with pytest.raises(TypeError, match="spmm_gated_: transpose must be a bool"):
            ops.spmm_gated_(out, x, [idx], [vals], torch.rand(4, 1, generator=gen), flag)
    assert torch.equal(out, before)
    z = torch.randn(2, 4, 5, generator=gen)
    lw = torch.log_softmax(torch.randn(4, 2, generator=gen), -1)
    y = torch.randint(0, 5, (4,), generator=gen)
    with pytest.raises(TypeError, match="ensemble_logprobs: prob_space must be a bool"):
        ops.ensemble_logprobs_op(z, lw, "logit")
    with pytest.raises(TypeError, match="ensemble_nll: prob_space must be a bool"):
        ops.ensemble_nll_op(z, lw, y, "logit")
    out, lse = ops.ensemble_logprobs_op(z, lw, False)
    with pytest.raises(TypeError, match="ensemble_logprobs_backward: prob_space must be a bool"):
        ops.ensemble_logprobs_backward(torch.ones_like(out), z, lw, out, lse, "logit")
    nll, lse = ops.ensemble_nll_op(z, lw, y, False)
    with pytest.raises(TypeError, match="ensemble_nll_backward: prob_space must be a bool"):
        ops.ensemble_nll_backward(torch.ones_like(nll), z, lw, y, nll, lse, "logit")


@pytest.mark.parametrize("backend", MM_BACKENDS)
def test_spmm_gated_refuses_bad_arguments_and_writes_nothing(backend, use_backend):
    """Where spmm_gated_ runs one spmm_ per delta (Triton, CUDA), a bad later delta once raised
    only after the good ones before it were added to out."""
    use_backend(backend)
    x, out = torch.randn(4, 3), torch.randn(4, 5)
    idx, vals = [torch.tensor([0, 7])], [torch.randn(2)]
    before = out.clone()
    with pytest.raises(ValueError, match="gates must have shape"):
        ops.spmm_gated_(out, x, idx, vals, torch.rand(4, 2))
    with pytest.raises(ValueError, match="1 index tensors but 2 value tensors"):
        ops.spmm_gated_(out, x, idx, vals * 2, torch.rand(4, 1))
    with pytest.raises(TypeError, match="values dtype"):
        ops.spmm_gated_(out, x, idx, [vals[0].double()], torch.rand(4, 1))
    with pytest.raises(IndexError):
        ops.spmm_gated_(out, x, [torch.tensor([0, 15])], vals, torch.rand(4, 1))
    for bad, exc in ((torch.tensor([0, 15]), IndexError), (torch.tensor([3, 1]), ValueError)):
        with pytest.raises(exc, match="spmm_gated_"):
            ops.spmm_gated_(out, x, idx + [bad], vals + [torch.randn(2)], torch.rand(4, 2))
    assert torch.equal(out, before)


@pytest.mark.parametrize("backend", MM_BACKENDS)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("alias", ["x", "gates"])
def test_spmm_gated_reads_inputs_sharing_out_as_they_were(backend, transpose, alias, use_backend):
    """x or gates viewing out are read as before the call on every backend: one spmm_ per delta
    (Triton, CUDA) once read them after the first deltas were added (0.6-3.9 off at 6 x 6)."""
    use_backend(backend)
    gen = seeded(41)
    out = torch.randn(6, 6, generator=gen)
    x, gates = torch.randn(6, 6, generator=gen), torch.rand(6, 2, generator=gen)
    idx = [torch.tensor([0, 7, 14, 35]), torch.tensor([1, 8, 20, 30], dtype=torch.int32)]
    vals = [torch.randn(4, generator=gen) for _ in idx]
    if alias == "x":
        x = out
    else:
        gates = out[:, :2]
    ref64, reached = out.double(), torch.zeros(6, dtype=torch.bool)
    for e, (ix, v) in enumerate(zip(idx, vals)):
        d = torch.zeros(36, dtype=torch.float64)
        d[ix.long()] = v.double()
        d = d.view(6, 6)
        ref64 = ref64 + gates[:, e : e + 1].double() * (x.double() @ (d if transpose else d.T))
        reached[(ix.long() % 6) if transpose else (ix.long() // 6)] = True
    ops.spmm_gated_(out, x, idx, vals, gates, transpose)
    torch.testing.assert_close(out[:, reached].double(), ref64[:, reached], rtol=1e-5, atol=1e-5)


# --- sparse_delta_linear ---


def _dense64(weight, idx, vals):
    return weight.double().reshape(-1).index_add(0, idx.long(), vals.double()).view(weight.shape)


def _linear_case(tokens, o, i, k, dtype, gen, lead=None):
    shape = (lead, tokens // lead, i) if lead else (tokens, i)
    x = torch.randn(*shape, generator=gen).to(dtype)
    w = (torch.randn(o, i, generator=gen) / i**0.5).to(dtype)
    b = torch.randn(o, generator=gen).to(dtype)
    idx = random_indices(o * i, k, INDEX_DTYPES[k % 2], gen)
    vals = torch.randn(k, generator=gen).to(dtype)
    return x, w, b, idx, vals


def _grads(y, inputs, gy):
    need = [t for t in inputs if t.requires_grad]
    got = iter(torch.autograd.grad(y, need, gy, allow_unused=True))
    return [next(got) if t.requires_grad else None for t in inputs]


@pytest.mark.parametrize("backend", MM_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 5), (6, 17, 1), (127, 33, 29)], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("merged", [True, False], ids=["merged", "spmm"])
@pytest.mark.parametrize("train_weight", [False, True])
def test_sparse_delta_linear_matches_float64(backend, dtype, shape, density, merged, train_weight, use_backend,
                                             monkeypatch):
    t, o, i = shape
    use_backend(backend)
    monkeypatch.setattr(functional, "merge_pays", lambda *a: merged)
    gen = seeded(t * o + i)
    lead = 2 if t % 2 == 0 else None
    x, w, b, idx, vals = _linear_case(t, o, i, round(o * i * density), dtype, gen, lead)
    gy = torch.randn(*x.shape[:-1], o, generator=gen).to(dtype)

    def run(x, w, b, vals, dense):
        x, w, b, vals = (v.detach().requires_grad_(True) for v in (x, w, b, vals))
        w.requires_grad_(train_weight)
        if dense:
            full = w.reshape(-1).index_add(0, idx.long(), vals).view(o, i)
            y = torch.nn.functional.linear(x, full, b)
        else:
            y = functional.sparse_delta_linear(x, w, b, idx, vals)
        return [y, *_grads(y, [x, w, b, vals], gy.to(y.dtype))]

    got = run(x, w, b, vals, dense=False)
    ref = run(*(v.double() for v in (x, w, b, vals)), dense=True)
    plain = run(x, w, b, vals, dense=True)
    for name, g, r, p in zip(["y", "dx", "dw", "db", "dvalues"], got, ref, plain):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == dtype, name
        check(g, r, p, f"{name} {backend} {dtype}")


class _LargeAllocations(TorchDispatchMode):
    """Records every new tensor an op returns with at least `limit` elements (views and in-place
    results share an input's storage and are not allocations)."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.limit and t.untyped_storage().data_ptr() not in inputs:
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("backend", [b for b in MM_BACKENDS if b != "reference"])
@pytest.mark.parametrize("merged", [True, False], ids=["merged", "spmm"])
def test_forward_and_backward_allocate_no_dense_weight(backend, merged, use_backend, monkeypatch):
    """Neither a merged O x I copy nor a dense gradient; the in-place path ("merged") leaves the
    base weight bit-identical, its version counter included."""
    use_backend(backend)
    monkeypatch.setattr(functional, "merge_pays", lambda *a: merged)
    o, i, t = 96, 80, 8  # O x I = 7680 elements, every other tensor below 800
    x, w, b, idx, vals = _linear_case(t, o, i, 700, torch.float32, seeded(4))
    vals.requires_grad_(True)
    x.requires_grad_(True)
    before, version = w.clone(), w._version
    with _LargeAllocations(o * i) as probe:
        y = functional.sparse_delta_linear(x, w, b, idx, vals)
        assert torch.equal(w, before)
        y.sum().backward()
    assert probe.seen == [], f"allocated O x I tensors: {probe.seen}"
    assert_bit_identical(w, before, "base weight")
    assert w._version == version
    assert vals.grad.shape == (700,)
    # The probe does see a dense weight gradient when one is asked for.
    w.requires_grad_(True)
    y = functional.sparse_delta_linear(x, w, b, idx, vals)
    with _LargeAllocations(o * i) as probe:
        y.sum().backward()
    assert probe.seen


def test_a_merged_weight_that_requires_grad_raises():
    """merged_weight gets no gradient (dW0 and dvalues carry it): a trainable one got None, silently."""
    x, w, b, idx, vals = _linear_case(3, 6, 5, 4, torch.float64, seeded(6))
    merged = w.reshape(-1).index_add(0, idx.long(), vals).view_as(w).requires_grad_(True)
    with pytest.raises(ValueError, match="merged_weight requires grad"):
        functional.sparse_delta_linear(x, w, b, idx, vals, merged_weight=merged)
    y = functional.sparse_delta_linear(x, w, b, idx, vals, merged_weight=merged.detach())
    torch.testing.assert_close(y, torch.nn.functional.linear(x, merged.detach(), b))
    with torch.no_grad():  # no gradient asked for: accepted
        functional.sparse_delta_linear(x, w, b, idx, vals, merged_weight=merged)


def test_inference_never_writes_the_base_weight(monkeypatch):
    """Without grad (inference, perhaps on threads sharing the model) W0 is only read."""
    x, w, b, idx, vals = _linear_case(2 * functional.MERGE_MIN_TOKENS, 16, 12, 40, torch.float32, seeded(5))

    def refuse(*args):
        raise AssertionError("wrote into the base weight")

    monkeypatch.setattr(ops, "write_delta_", refuse)
    with torch.no_grad():
        y = functional.sparse_delta_linear(x, w, b, idx, vals)
    dense = w.reshape(-1).index_add(0, idx.long(), vals).view_as(w)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, dense, b))
    with pytest.raises(AssertionError, match="base weight"):  # with grad, the write path is taken
        functional.sparse_delta_linear(x, w, b, idx, vals.requires_grad_(True))


def test_threads_training_one_layer_take_turns_on_the_base_weight():
    """Writes of Δ into one W0 from several threads take turns: each result equals the one-thread
    result, and W0 ends bit-identical."""
    import threading

    x, w, b, idx, vals = _linear_case(4 * functional.MERGE_MIN_TOKENS, 64, 48, 600, torch.float32, seeded(6))
    before = w.clone()
    vals.requires_grad_(True)

    def run():
        y = functional.sparse_delta_linear(x, w, b, idx, vals)
        return [y.detach(), *torch.autograd.grad(y.square().sum(), [vals])]

    want = run()
    got = [None] * 4

    def worker(i):
        got[i] = [run() for _ in range(20)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for results in got:
        for result in results:
            for g, r in zip(result, want):
                torch.testing.assert_close(g, r)
    assert_bit_identical(w, before, "base weight")


# --- multi_delta_linear ---


def _deltas(num, o, i, dtype, gen, sizes=None):
    sizes = sizes or [round(o * i * f) for f in (0.3, 0.0, 1.0, 0.1)[:num]]
    idx = [random_indices(o * i, k, INDEX_DTYPES[n % 2], gen) for n, k in enumerate(sizes)]
    vals = [torch.randn(k, generator=gen).to(dtype) for k in sizes]
    return idx, vals


@pytest.mark.parametrize("backend", MM_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 5), (8, 9, 4), (127, 33, 29)], ids=str)
@pytest.mark.parametrize("kind", ["route", "groups", "gates", "route merged", "groups merged"])
def test_multi_delta_linear_matches_float64(backend, dtype, shape, kind, use_backend, monkeypatch):
    """"merged": every routed group by its own W0 + Δ_e (`_times_merged_groups`), whatever its size."""
    t, o, i = shape
    use_backend(backend)
    kind, _, merged = kind.partition(" ")
    monkeypatch.setattr(functional, "merge_pays", lambda *a: bool(merged))
    gen = seeded(7 * t + o)
    num = 3
    x, w, b, _, _ = _linear_case(t, o, i, 0, dtype, gen)
    idx, vals = _deltas(num, o, i, dtype, gen)
    ids = torch.randint(-1, num, (t,), generator=gen)
    gates = torch.rand(t, num, generator=gen).to(dtype)
    gy = torch.randn(t, o, generator=gen).to(dtype)

    def run(x, b, vals, gates, dense):
        x, b, gates = (v.detach().requires_grad_(True) for v in (x, b, gates))
        vals = [v.detach().requires_grad_(True) for v in vals]
        if dense:
            y = torch.nn.functional.linear(x, w.to(x.dtype), b)
            for e in range(num):
                full = torch.zeros(o * i, dtype=x.dtype).index_add(0, idx[e].long(), vals[e]).view(o, i)
                s = gates[:, e : e + 1] if kind == "gates" else (ids == e).to(x.dtype)[:, None]
                y = y + s * (x @ full.T)
        else:
            route = {"route": ids, "groups": TokenGroups.build(ids, num), "gates": None}[kind]
            y = functional.multi_delta_linear(x, w, b, idx, vals, route=route, gates=gates if kind == "gates" else None)
        return [y, *_grads(y, [x, b, gates if kind == "gates" else gates.detach(), *vals], gy.to(y.dtype))]

    got = run(x, b, vals, gates, dense=False)
    ref = run(x.double(), b.double(), [v.double() for v in vals], gates.double(), dense=True)
    plain = run(x, b, vals, gates, dense=True)
    names = ["y", "dx", "db", "dgates"] + [f"dvalues[{e}]" for e in range(num)]
    # Under hard routing a delta that owns no token gets no gradient (the dense oracle gives zeros).
    unrouted = {f"dvalues[{e}]" for e in range(num) if kind != "gates" and not (ids == e).any()}
    for name, g, r, p in zip(names, got, ref, plain):
        if r is None or name in unrouted:
            assert g is None, name
            continue
        check(g, r, p, f"{name} {backend} {dtype} {kind}")


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_multi_delta_linear_merges_large_groups_without_changing_the_base_weight(grad, monkeypatch):
    """Groups of at least MERGE_MIN_TOKENS tokens each multiply by W0 + Δ_e: written into W0 while
    training (restored bit-exactly, version counter included), into a copy without grad (W0 only
    read, as inference on threads sharing a model needs). A smaller group keeps the SpMM way."""
    num, o, i = 3, 24, 20
    per = functional.MERGE_MIN_TOKENS
    gen = seeded(41)
    x, w, b, _, _ = _linear_case(3 * per + 5, o, i, 0, torch.float32, gen)
    idx, vals = _deltas(num, o, i, torch.float32, gen)
    ids = torch.tensor([0] * per + [-1] * 5 + [2] * per + [1] * per)[torch.randperm(3 * per + 5, generator=gen)]
    before, version = w.clone(), w._version
    writes, spmms = [], []
    write, spmm = ops.write_delta_, ops.spmm_
    monkeypatch.setattr(ops, "write_delta_", lambda t, *a: writes.append(t.untyped_storage().data_ptr()) or write(t, *a))
    monkeypatch.setattr(ops, "spmm_", lambda *a, **k: spmms.append(1) or spmm(*a, **k))

    def run(ids, dense=False):
        xs, vs = x.detach().double().requires_grad_(grad), [v.detach().double().requires_grad_(grad) for v in vals]
        if dense:
            full = [torch.zeros(o * i, dtype=torch.float64).index_add(0, idx[e].long(), vs[e]).view(o, i) for e in range(num)]
            y = torch.stack([xs[t] @ (w.double() + (full[e] if e >= 0 else 0)).T for t, e in enumerate(ids.tolist())])
            y = y + b.double()
        else:
            xs, vs = xs.float().detach().requires_grad_(grad), [v.float().detach().requires_grad_(grad) for v in vs]
            with torch.set_grad_enabled(grad):
                y = functional.multi_delta_linear(xs, w, b, idx, vs, route=ids)
        return [y, *(torch.autograd.grad(y.square().sum(), [xs, *vs]) if grad else [])]

    got, ref = run(ids), run(ids, dense=True)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)
    assert_bit_identical(w, before, "base weight")
    assert w._version == version
    assert spmms == [] and len(writes) == (6 if grad else 3)  # per group: forward, and dX when training
    assert (w.untyped_storage().data_ptr() in writes) == grad
    writes.clear()
    ids[ids == 1] = torch.tensor([1] * (per - 1) + [-1])  # one group below the threshold: SpMM terms
    got, ref = run(ids), run(ids, dense=True)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)
    assert writes == [] and spmms


@pytest.mark.parametrize("backend", MM_BACKENDS)
def test_mixed_batch_equals_each_language_alone(backend, use_backend):
    use_backend(backend)
    gen = seeded(11)
    o, i, num = 21, 13, 4
    lin = torch.nn.Linear(i, o)
    idx, vals = _deltas(num, o, i, torch.float32, gen, sizes=[30, 0, 50, 273])
    deltas = {f"lang{e}": type("Delta", (), dict(indices=idx[e], values=vals[e], shape=(o, i)))() for e in range(num)}
    layer = xnn.MultiDeltaLinear.from_linear(lin, deltas)
    x = torch.randn(3, 10, i, generator=gen)
    ids = torch.randint(-1, num, (3, 10), generator=gen)
    gy = torch.randn(3, 10, o, generator=gen)
    with routing.use(ids, num):
        y = layer(x)
    y.backward(gy)
    for e in range(-1, num):
        sel = ids == e
        if e < 0:
            alone = lin(x[sel])
        else:
            v = vals[e].clone().requires_grad_(True)
            alone = functional.sparse_delta_linear(x[sel], lin.weight.detach(), lin.bias.detach(), idx[e], v)
            alone.backward(gy[sel])
            torch.testing.assert_close(layer.delta_values[e].grad, v.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[sel], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["route", "gates"])
def test_route_and_gates_must_follow_the_tokens_shape(how):
    """A sequence-major [S, B] route (or [S, B, E] gates) for x [B, S, I] has the right count but
    sends tokens to the wrong deltas: refused. [B, S] and flat [B·S] are taken."""
    gen = seeded(33)
    x = torch.randn(2, 3, 4, generator=gen)
    w, b = torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen)
    idx, vals = _deltas(2, 5, 4, torch.float32, gen, sizes=[7, 9])
    ids = torch.randint(0, 2, (2, 3), generator=gen)
    arg = ids if how == "route" else torch.nn.functional.one_hot(ids, 2).float()

    def run(a):
        return functional.multi_delta_linear(x, w, b, idx, vals, **{how: a})

    torch.testing.assert_close(run(arg.reshape(6, *arg.shape[2:])), run(arg))
    with pytest.raises(ValueError, match=how):
        run(arg.transpose(0, 1))


def test_a_delta_with_no_routed_token_gets_no_gradient():
    gen = seeded(19)
    x, w, b, _, _ = _linear_case(6, 5, 4, 0, torch.float64, gen)
    idx, vals = _deltas(2, 5, 4, torch.float64, gen, sizes=[7, 9])
    ids = torch.tensor([0, -1, 0, 0, -1, 0])  # no token of language 1

    def grads(fn, **how):
        v = [t.detach().requires_grad_(True) for t in vals]
        fn(x, v[0], v[1], **how).sum().backward()
        return [t.grad for t in v]

    def mdl(x, v0, v1, **how):
        return functional.multi_delta_linear(x, w, b, idx, [v0, v1], **how)

    for route in (ids, TokenGroups.build(ids, 2)):
        d0, d1 = grads(mdl, route=route)
        assert d0 is not None and d0.abs().sum() > 0 and d1 is None
    # Soft gates: every delta gets a gradient, zeros for a gate of 0.
    d0, d1 = grads(mdl, gates=torch.nn.functional.one_hot(ids.clamp(min=0), 2).double())
    assert d0 is not None and d1 is not None and not d1.any()
    # Under torch.compile the groups have no host counts: the documented zeros, not None.
    d0, d1 = grads(torch.compile(mdl, fullgraph=True, backend="aot_eager"), route=ids)
    torch.testing.assert_close(d0, grads(mdl, route=ids)[0])
    assert d1 is not None and not d1.any()


def test_adamw_steps_each_language_only_on_its_own_batches():
    """Three AdamW steps with weight decay on single-language batches (0, 1, 0) equal, per
    language, plain torch stepping that language's delta on its own batches only."""
    gen = seeded(20)
    o, i, tokens = 6, 5, 4
    lin = torch.nn.Linear(i, o).double()
    idx, vals = _deltas(2, o, i, torch.float64, gen, sizes=[8, 11])
    deltas = {n: type("Delta", (), dict(indices=idx[e], values=vals[e], shape=(o, i)))() for e, n in enumerate("ab")}
    layer = xnn.MultiDeltaLinear.from_linear(lin, deltas)
    batches = [(lang, torch.randn(tokens, i, generator=gen, dtype=torch.float64),
                torch.randn(tokens, o, generator=gen, dtype=torch.float64)) for lang in (0, 1, 0)]
    hyper = dict(lr=0.05, weight_decay=0.01)
    opt = torch.optim.AdamW(layer.delta_values.parameters(), **hyper)
    for lang, x, target in batches:
        opt.zero_grad()
        with routing.use(torch.full((tokens,), lang), 2):
            (layer(x) - target).square().mean().backward()
        opt.step()
    for lang in (0, 1):  # the restatement: one plain parameter and optimizer per language
        v = vals[lang].clone().requires_grad_(True)
        own = torch.optim.AdamW([v], **hyper)
        for _, x, target in (b for b in batches if b[0] == lang):
            own.zero_grad()
            weight = lin.weight.detach().flatten().index_put((idx[lang].long(),), v, accumulate=True).view(o, i)
            (x @ weight.T + lin.bias.detach() - target).square().mean().backward()
            own.step()
        torch.testing.assert_close(layer.delta_values[lang].detach(), v.detach(), rtol=1e-12, atol=1e-12)


def test_subnetwork_set_masks_that_raises_changes_nothing_and_can_add_bias_masks():
    # set_masks replaced the languages and masks before checking bias_masks, so a call that raised
    # on them left the layer with the new masks; and a layer made without bias_masks raised
    # KeyError ("attribute 'bias_masks' already exists") when given some, after the swap.
    lin = torch.nn.Linear(4, 3)
    masks = {"de": torch.rand(3, 4) < 0.5, "fr": torch.rand(3, 4) < 0.5}
    layer = xnn.SubnetworkLinear.from_linear(lin, masks)
    new = {"x": torch.ones(3, 4, dtype=torch.bool), "y": torch.ones(3, 4, dtype=torch.bool)}
    for bias_masks in ({"x": torch.ones(2, dtype=torch.bool), "y": torch.ones(3, dtype=torch.bool)},
                       {"x": torch.ones(3, dtype=torch.bool)}):
        with pytest.raises(ValueError, match="bias_masks"):
            layer.set_masks(new, bias_masks)
        assert layer.languages == ["de", "fr"] and layer.bias_masks is None
        assert torch.equal(layer.masks, torch.stack(list(masks.values())))
    no_bias = xnn.SubnetworkLinear.from_linear(torch.nn.Linear(4, 3, bias=False), masks)
    with pytest.raises(ValueError, match="bias_masks"):
        no_bias.set_masks(new, {"x": torch.ones(3, dtype=torch.bool), "y": torch.ones(3, dtype=torch.bool)})
    assert no_bias.languages == ["de", "fr"]
    bias_masks = {"de": torch.tensor([True, False, False]), "fr": torch.tensor([False, False, True])}
    layer.set_masks(masks, bias_masks)
    x, grad_y = torch.randn(2, 4), torch.randn(2, 3)
    layer(x, language_ids=torch.tensor([0, 1])).backward(grad_y)
    torch.testing.assert_close(lin.bias.grad, torch.stack([grad_y[0, 0], grad_y.new_zeros(()), grad_y[1, 2]]))


def test_subnetwork_set_masks_without_bias_masks_keeps_the_layers_own():
    # set_masks(masks) on a layer with per-language bias masks dropped them: the bias became
    # shared, trained by every language's tokens, with nothing said.
    lin = torch.nn.Linear(4, 3)
    gen = seeded(5)
    masks = {"de": torch.rand(3, 4, generator=gen) < 0.5, "fr": torch.rand(3, 4, generator=gen) < 0.5}
    bias_masks = {"de": torch.tensor([True, False, False]), "fr": torch.tensor([False, False, True])}
    layer = xnn.SubnetworkLinear.from_linear(lin, masks, bias_masks)
    reselected = {lang: torch.rand(3, 4, generator=gen) < 0.5 for lang in masks}
    layer.set_masks(reselected)  # the same languages: the bias masks stay
    assert torch.equal(layer.bias_masks, torch.stack(list(bias_masks.values())))
    assert torch.equal(layer.masks, torch.stack(list(reselected.values())))
    x, grad_y = torch.randn(2, 4, generator=gen), torch.randn(2, 3, generator=gen)
    layer(x, language_ids=torch.tensor([0, 1])).backward(grad_y)
    # de's token reaches bias row 0 only, fr's row 2 only
    torch.testing.assert_close(lin.bias.grad, torch.stack([grad_y[0, 0], grad_y.new_zeros(()), grad_y[1, 2]]))
    for other in ({"fr": masks["fr"], "de": masks["de"]}, {"de": masks["de"], "it": masks["fr"]}):
        with pytest.raises(ValueError, match="bias_masks"):  # other languages (or order): say which bias
            layer.set_masks(other)
        assert layer.languages == ["de", "fr"] and layer.bias_masks is not None
    layer.set_masks({"de": masks["de"], "it": masks["fr"]}, None)  # None: shared, explicitly
    assert layer.languages == ["de", "it"] and layer.bias_masks is None
    layer.set_masks(masks)  # a shared bias stays shared
    assert layer.bias_masks is None


@pytest.mark.parametrize("kind", ["multi", "subnetwork"])
def test_eval_mode_checkpointing_needs_the_forwards_routing(kind):
    # A checkpoint's recomputation after the routing has ended ran the layer unrouted (the base
    # only), silently: the grads were the base's, or zero.
    from torch.utils.checkpoint import checkpoint

    gen = seeded(13)
    lin = torch.nn.Linear(6, 5)
    if kind == "multi":
        idx, vals = _deltas(2, 5, 6, torch.float32, gen, sizes=[7, 9])
        deltas = {n: type("Delta", (), dict(indices=idx[e], values=vals[e], shape=(5, 6)))() for e, n in enumerate("ab")}
        layer = xnn.MultiDeltaLinear.from_linear(lin, deltas).eval()
        params = list(layer.delta_values)
    else:
        layer = xnn.SubnetworkLinear.from_linear(lin, {n: torch.rand(5, 6, generator=gen) < 0.5 for n in "ab"}).eval()
        params = [layer.weight]
    x = torch.randn(2, 4, 6, generator=gen, requires_grad=True)
    ids = torch.tensor([1, 0])

    def grads(run):
        for p in params + [x]:
            p.grad = None
        with routing.use(ids, 2):
            y = run()
        y.square().sum().backward()
        return [p.grad.clone() for p in params + [x]]

    plain = grads(lambda: layer(x))
    assert all(g.abs().sum() > 0 for g in plain[:-1])
    replayed = grads(lambda: checkpoint(layer, x, use_reentrant=False, context_fn=routing.checkpoint_context))
    for a, b in zip(replayed, plain):
        torch.testing.assert_close(a, b)
    for reentrant in (False, True):
        with pytest.raises(RuntimeError, match="recomputed by gradient checkpointing"):
            grads(lambda: checkpoint(layer, x, use_reentrant=reentrant))
    with torch.no_grad():  # outside a recomputation: the subnetwork's output needs no ids, the deltas' do
        if kind == "multi":
            with pytest.raises(RuntimeError, match="would run as the base model"):
                layer(x)
        else:
            torch.testing.assert_close(layer(x), lin(x))


def test_multi_delta_layer_routing_sources():
    gen = seeded(12)
    lin = torch.nn.Linear(6, 5)
    idx, vals = _deltas(2, 5, 6, torch.float32, gen, sizes=[7, 9])
    deltas = {n: type("Delta", (), dict(indices=idx[e], values=vals[e], shape=(5, 6)))() for e, n in enumerate("ab")}
    layer = xnn.MultiDeltaLinear.from_linear(lin, deltas)
    x = torch.randn(2, 4, 6, generator=gen)
    with pytest.raises(RuntimeError, match="would run as the base model.*-1"):
        layer.eval()(x)  # it ran the base for every language, silently; the base is asked for by -1
    with routing.use(torch.tensor([-1, -1]), 2):
        torch.testing.assert_close(layer(x), lin(x))
    with pytest.raises(RuntimeError, match="no language routing"):
        layer.train()(x)  # training without routing would train nothing
    per_example = torch.tensor([1, 0])
    with routing.use(per_example, 2):
        y = layer(x)
    torch.testing.assert_close(y, layer(x, route=per_example.repeat_interleave(4).view(2, 4)))
    onehot = torch.nn.functional.one_hot(per_example.repeat_interleave(4), 2).float()
    torch.testing.assert_close(y, layer(x, gates=onehot.view(2, 4, 2)), rtol=1e-5, atol=1e-6)
    with routing.use(torch.tensor([1, 3]), 4), pytest.raises(ValueError, match="route has 4 ids but the layer has 2"):
        layer(x)


def test_expert_embedding_refuses_a_route_of_another_size():
    embedding = torch.nn.Embedding(5, 3)
    layer = xnn.ExpertEmbedding(embedding, [torch.ones(5, 3), None])
    ids = torch.tensor([[1, 2], [3, 4]])
    with routing.use(torch.tensor([0, 1]), 2):
        torch.testing.assert_close(layer(ids), embedding(ids) + torch.tensor([1.0, 0.0]).view(2, 1, 1))
    with routing.use(torch.tensor([0, 3]), 4), pytest.raises(ValueError, match="route has 4 ids but the layer has 2 experts"):
        layer(ids)  # expert 3 would have run as the base alone
    with pytest.raises(RuntimeError, match="would run as the base model"):
        layer.eval()(ids)  # no routing: it ran the base embedding, silently



def test_expert_embedding_checks_a_sparse_deltas_indices_and_values():
    # A delta with .indices, .values and .shape was taken as given: unsorted indices put the
    # entries on the wrong rows ([5, 1] on a [7, 3] table added nothing to row 1 and both values
    # to row 0), an index past the table was dropped, and extra values were ignored, all silently.
    embedding = torch.nn.Embedding(7, 3)
    for indices, values, exc, match in [([5, 1], [1.0, 2.0], ValueError, "sorted"),
                                        ([1, 1], [1.0, 2.0], ValueError, "sorted"),
                                        ([1, 30], [1.0, 2.0], IndexError, "out of range"),
                                        ([1, 2], [1.0, 2.0, 3.0], ValueError, "2 indices but 3 values")]:
        delta = SimpleNamespace(indices=torch.tensor(indices), values=torch.tensor(values), shape=(7, 3))
        with pytest.raises(exc, match=rf"ExpertEmbedding: delta 1\b.*{match}"):
            xnn.ExpertEmbedding(embedding, [None, delta])
    delta = SimpleNamespace(indices=torch.tensor([1, 5]), values=torch.tensor([1.0, 2.0]), shape=(7, 3))
    layer = xnn.ExpertEmbedding(embedding, [delta])
    want = embedding.weight.detach().clone()
    want.view(-1)[[1, 5]] += torch.tensor([1.0, 2.0])
    with routing.use(torch.tensor([0]), 1):
        torch.testing.assert_close(layer(torch.tensor([[0, 1, 2]])), want[[0, 1, 2]][None])

def test_duck_typed_deltas_refuse_values_that_are_not_floating_point():
    # MultiDeltaLinear and ExpertEmbedding cast int or bool values (a mask passed as values) to the
    # weight's dtype silently; SparseDelta and set_support refuse them
    delta = SimpleNamespace(indices=torch.tensor([1, 5]), values=torch.tensor([True, True]), shape=(7, 3))
    with pytest.raises(TypeError, match=r"MultiDeltaLinear: delta 'a'.*values must be floating point"):
        xnn.MultiDeltaLinear.from_linear(torch.nn.Linear(3, 7), {"a": delta})
    with pytest.raises(TypeError, match=r"ExpertEmbedding: delta 0.*values must be floating point"):
        xnn.ExpertEmbedding(torch.nn.Embedding(7, 3), [delta])
    layer = xnn.SparseDeltaLinear.from_linear(torch.nn.Linear(3, 7), k=2)
    with pytest.raises(TypeError, match=r"set_support.*values must be floating point"):
        layer.set_support(torch.tensor([1, 5]), torch.tensor([1, 2]))


def test_multi_delta_linear_refuses_a_dense_delta_by_name():
    # a tensor has .indices and .values (methods, for sparse tensors): it failed with
    # "'builtin_function_or_method' object has no attribute 'to'"
    with pytest.raises(TypeError, match=r"MultiDeltaLinear: delta 'a' is a dense tensor; give a SparseDelta"):
        xnn.MultiDeltaLinear.from_linear(torch.nn.Linear(3, 7), {"a": torch.zeros(7, 3)})


# --- ensemble mixing ---


def _ensemble64(z, lw, space):
    if space == "prob":
        return torch.logsumexp(lw.T[:, :, None] + torch.log_softmax(z, -1), 0)
    return torch.log_softmax((lw.T.exp()[:, :, None] * z).sum(0), -1)


@pytest.mark.parametrize("backend", ENS_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 4, 1031), (3, 5, 127), (2, 3, 4097)], ids=str)  # E = 1: unmixed
@pytest.mark.parametrize("space", ["prob", "logit"])
@pytest.mark.parametrize("nll", [False, True], ids=["logprobs", "nll"])
@pytest.mark.parametrize("weights_fp32", [False, True], ids=["lw_as_logits", "lw_fp32"])
def test_ensemble_matches_float64(backend, dtype, shape, space, nll, weights_fp32, use_backend):
    """Log-weights come in the logits' dtype or in float32 (X-ELM's bf16 ensembles: three uniform
    weights rounded to bf16 summed to 0.997); the gradient comes back in the weights' dtype."""
    if weights_fp32 and dtype not in (torch.float16, torch.bfloat16):
        pytest.skip("float32 weights are for half-precision logits")
    e, t, v = shape
    use_backend(backend)
    gen = seeded(e * t + v)
    z = (3 * torch.randn(e, t, v, generator=gen)).to(dtype)
    lw = torch.log_softmax(torch.randn(t, e, generator=gen), -1).to(torch.float32 if weights_fp32 else dtype)
    y = torch.randint(0, v, (t,), generator=gen)
    gy = torch.randn(t, generator=gen) if nll else torch.randn(t, v, generator=gen)

    def run(z, lw, ours):
        z, lw = z.detach().requires_grad_(True), lw.detach().requires_grad_(True)
        if ours:
            out = functional.ensemble_nll(z, lw, y, space) if nll else functional.ensemble_logprobs(z, lw, space)
        else:
            out = _ensemble64(z, lw, space)
            out = -out.gather(1, y[:, None])[:, 0] if nll else out
        return [out, *torch.autograd.grad(out, [z, lw], gy.to(out.dtype))]

    got = run(z, lw, True)
    ref = run(z.double(), lw.double(), False)
    plain = run(z, lw.to(dtype), False)  # PyTorch in the logits' dtype: the bar in both cases
    # Gradients reduce over V classes (and E experts) in another order than autograd, and the CPU
    # kernel's exp/log are polynomial (within ~2 ulp): allow sqrt(V) ulp more on the gradients.
    for name, g, r, p in zip(["out", "dlogits", "dlog_weights"], got, ref, plain):
        assert g.dtype == (lw.dtype if name == "dlog_weights" else dtype)
        # float32 weights' gradient: as precise as the output in the logits' dtype that the backward reads
        check(g, r, p, f"{name} {backend} {dtype} {space}", extra_ulps=0 if name == "out" else v**0.5, ulp_dtype=dtype)


@pytest.mark.parametrize("backend", slow_on_triton(ENS_BACKENDS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights_fp32", [False, True], ids=["lw_as_logits", "lw_fp32"])
def test_ensemble_nll_prob_gradient_reads_nll_in_float32(backend, dtype, weights_fp32, use_backend):
    """The prob-space backward's posterior exp(lw + z[y] − lse + nll) is as precise as the nll it
    reads. Saved in bf16, an nll near 14 sits on a 0.0625 grid and the gradient was ~3% (4 ulps) off;
    the op now returns nll in float32 and the public function rounds only its own output. Checked
    against float64 autograd of the mixture of the same rounded inputs, to 2 ulps of the gradient's
    dtype (a float32 gradient of the weights: to 1e-4 relative)."""
    use_backend(backend)
    gen = seeded(33)
    e, t, v = 3, 64, 257  # nll up to ~14
    z = (3 * torch.randn(e, t, v, generator=gen)).to(dtype)
    lw = torch.log_softmax(torch.randn(t, e, generator=gen), -1).to(torch.float32 if weights_fp32 else dtype)
    y = torch.randint(0, v, (t,), generator=gen)
    gy = torch.randn(t, generator=gen).to(dtype)
    nll, _ = ops.ensemble_nll_op(z, lw, y, True)
    assert nll.dtype == torch.float32

    z1, lw1 = z.clone().requires_grad_(True), lw.clone().requires_grad_(True)
    out = functional.ensemble_nll(z1, lw1, y, "prob")
    assert out.dtype == dtype
    got = torch.autograd.grad(out, [z1, lw1], gy)
    z2, lw2 = z.double().requires_grad_(True), lw.double().requires_grad_(True)
    ref = -_ensemble64(z2, lw2, "prob").gather(1, y[:, None])[:, 0]
    assert ref.max() > 8, "the case must reach nll values where the half-precision grid is coarse"
    want = torch.autograd.grad(ref, [z2, lw2], gy.double())
    for name, g, r in zip(["dlogits", "dlog_weights"], got, want):
        assert g.dtype == (lw.dtype if name == "dlog_weights" else dtype)
        fi = torch.finfo(g.dtype)
        tol = (1e-4 if g.dtype == torch.float32 else 2 * fi.eps) * (r.abs() + fi.tiny)  # tiny: subnormal outputs
        err = (g.double() - r).abs()
        assert (err <= tol).all(), f"{name} {backend} {dtype}: {(err / tol).max().item():.2f}x the allowance"


@pytest.mark.parametrize("backend", slow_on_triton(ENS_BACKENDS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("space", ["prob", "logit"])
@pytest.mark.parametrize("weights_fp32", [False, True], ids=["lw_as_logits", "lw_fp32"])
def test_ensemble_logprobs_gradient_recomputes_out_in_float32(backend, dtype, space, weights_fp32, use_backend):
    """The backward's posterior exp(lw + z − lse − out) (prob) and softmax exp(out) (logit) are as
    precise as the log-probs they use. Read from the saved output, bf16 log-probs near −16 sit on a
    0.0625 grid: the gradients were ~1-4% of their largest value off (fp16: ~0.2%). The backward now
    recomputes the log-probs in float32 from the logits, the weights and the float32 lse (no wider
    copy is saved). Checked against float64 autograd of the same rounded inputs, to 2 ulps of the
    gradient's dtype (a float32 gradient of the weights: 1e-4 relative plus 1e-6 of its largest)."""
    use_backend(backend)
    gen = seeded(34)
    e, t, v = 3, 32, 257  # log-probs down to ~−16
    z = (3 * torch.randn(e, t, v, generator=gen)).to(dtype)
    lw = torch.log_softmax(torch.randn(t, e, generator=gen), -1).to(torch.float32 if weights_fp32 else dtype)
    gy = torch.randn(t, v, generator=gen).to(dtype)

    z1, lw1 = z.clone().requires_grad_(True), lw.clone().requires_grad_(True)
    out = functional.ensemble_logprobs(z1, lw1, space)
    assert out.dtype == dtype and out.min() < -12, "the case must reach log-probs where the half grid is coarse"
    got = torch.autograd.grad(out, [z1, lw1], gy)
    z2, lw2 = z.double().requires_grad_(True), lw.double().requires_grad_(True)
    want = torch.autograd.grad(_ensemble64(z2, lw2, space), [z2, lw2], gy.double())
    for name, g, r in zip(["dlogits", "dlog_weights"], got, want):
        assert g.dtype == (lw.dtype if name == "dlog_weights" else dtype)
        fi = torch.finfo(g.dtype)
        if g.dtype == torch.float32:
            tol = 1e-4 * r.abs() + 1e-6 * r.abs().max()
        else:
            tol = 2 * fi.eps * (r.abs() + fi.tiny)  # tiny: subnormal outputs
        err = (g.double() - r).abs()
        assert (err <= tol).all(), f"{name} {backend} {dtype} {space}: {(err / tol).max().item():.2f}x the allowance"


@pytest.mark.parametrize("backend", ENS_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("space", ["prob", "logit"])
def test_ensemble_logprobs_backward_does_not_read_out(backend, dtype, space, use_backend):
    """The backward op checks `out`'s shape and dtype but takes the log-probs from the logits,
    the weights and lse (recomputed as the forward computed them): any out of the right kind gives
    the same gradients, including those of classes every expert bans (posterior 0, finite)."""
    use_backend(backend)
    gen = seeded(35)
    z = torch.randn(3, 4, 9, generator=gen).to(dtype)
    z[:, :, 2] = float("-inf")  # every expert bans class 2
    lw = torch.log_softmax(torch.randn(4, 3, generator=gen), -1)
    gy = torch.randn(4, 9, generator=gen).to(dtype)
    gy[:, 2] = 0
    out, lse = ops.ensemble_logprobs_op(z, lw, space == "prob")
    first = ops.ensemble_logprobs_backward(gy, z, lw, out, lse, space == "prob")
    again = ops.ensemble_logprobs_backward(gy, z, lw, torch.full_like(out, float("nan")), lse, space == "prob")
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert torch.isfinite(first[0]).all() and torch.isfinite(first[1]).all()
    assert (first[0][:, :, 2] == 0).all()


@needs_ext
def test_ensemble_extra_memory_is_one_output():
    """The kernel's outputs are the [T, V] log-probs and an [E, T] logsumexp: nothing E x T x V."""
    z, lw = torch.randn(4, 8, 301), torch.log_softmax(torch.randn(8, 4), -1)
    with _LargeAllocations(8 * 301 + 1) as probe:
        functional.ensemble_logprobs(z, lw)
        functional.ensemble_nll(z, lw, torch.zeros(8, dtype=torch.long))
    assert probe.seen == []


# --- the layers ---


def test_sparse_delta_layer_starts_as_the_original_and_trains():
    gen = seeded(13)
    lin = torch.nn.Linear(9, 7)
    x = torch.randn(4, 5, 9, generator=gen)
    for how in (dict(k=10), dict(density=0.5), dict(indices=torch.tensor([0, 5, 62])),
                dict(indices=torch.rand(7, 9, generator=gen) > 0.5)):
        layer = xnn.SparseDeltaLinear.from_linear(lin, **how)
        assert_bit_identical(layer(x), lin(x), f"fresh layer {how}")
        assert not layer.weight.requires_grad and layer.delta_values.requires_grad
    opt = torch.optim.SGD([layer.delta_values], lr=0.1)
    first = layer(x).detach()
    layer(x).square().sum().backward()
    opt.step()  # bumps the values' version: the cached merged weight must be rebuilt
    second = layer(x).detach()
    expect = functional.sparse_delta_linear(x, layer.weight, layer.bias, layer.delta_indices, layer.delta_values.detach())
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, expect)
    before = layer.weight.detach().clone()
    layer.merge()
    with torch.no_grad():  # a merged layer does not train (its forward with grad in training mode raises)
        torch.testing.assert_close(layer(x), expect)
    layer.unmerge()
    assert_bit_identical(layer.weight.detach(), before, "weight after unmerge")


def test_a_trainable_bias_stays_the_optimizers_parameter():
    """from_linear keeps the linear's bias Parameter itself: an optimizer built over the linear
    before the conversion still trains it (a new Parameter over the same storage got the gradients
    and the optimizer's stayed unchanged)."""
    gen = seeded(26)
    lin = torch.nn.Linear(9, 7)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    layer = xnn.SparseDeltaLinear.from_linear(lin, k=10)
    assert layer.bias is lin.bias and not layer.weight.requires_grad
    x = torch.randn(5, 9, generator=gen)
    before = lin.bias.detach().clone()
    layer(x).sum().backward()
    opt.step()
    torch.testing.assert_close(layer.bias.detach(), before - 0.1 * 5, rtol=0, atol=1e-6)


def _layer_with_delta(seed, linear=None):
    gen = seeded(seed)
    layer = xnn.SparseDeltaLinear.from_linear(linear or torch.nn.Linear(9, 7), density=0.3)
    with torch.no_grad():
        layer.delta_values.copy_(torch.randn(layer.delta_values.shape, generator=gen))
    return layer, torch.randn(70, 9, generator=gen)  # 70 tokens: the write-into-W0 path


def _by_hand(layer, base):
    """x ↦ x (W0 + Δ)ᵀ + b restated with a dense Δ."""
    delta = base.new_zeros(base.numel()).index_put_((layer.delta_indices.long(),), layer.delta_values.detach())
    return lambda x: torch.nn.functional.linear(x, base + delta.view_as(base), layer.bias.detach())


def test_a_new_support_reaches_no_tensor_the_layer_was_built_from():
    indices = torch.tensor([0, 5, 62])
    a = xnn.SparseDeltaLinear.from_linear(torch.nn.Linear(9, 7), indices=indices)
    b = xnn.SparseDeltaLinear.from_linear(torch.nn.Linear(9, 7), indices=indices)
    emb = xnn.SparseDeltaEmbedding.from_embedding(torch.nn.Embedding(9, 7), indices=indices)
    a.set_support(torch.tensor([1, 2, 3]))
    emb.set_support(torch.tensor([4, 5, 6]))
    assert indices.tolist() == b.delta_indices.tolist() == [0, 5, 62]


def test_a_new_support_size_trains_after_a_backward():
    """set_support with a new K after a step, while the last step's loss is still referenced (a
    training loop's `loss = ...` rebinds it only after the next forward): the backward raised
    "returned an invalid gradient ... expected shape compatible with [old K]"."""
    torch.manual_seed(0)
    layer = xnn.SparseDeltaLinear.from_linear(torch.nn.Linear(5, 4), k=6)
    emb = xnn.SparseDeltaEmbedding.from_embedding(torch.nn.Embedding(6, 4), k=6)
    x, ids = torch.randn(3, 5), torch.tensor([1, 2, 1])
    loss = layer(x).square().sum() + emb(ids).square().sum()
    loss.backward()
    new, values = torch.tensor([1, 3, 7]), torch.randn(3)
    layer.set_support(new, values)
    emb.set_support(new + 1, values)
    layer.delta_values.grad = emb.delta_values.grad = None
    loss = layer(x).square().sum() + emb(ids).square().sum()
    loss.backward()
    w = layer.weight.detach().double().clone()
    w.view(-1)[new] += values.double()
    y = torch.nn.functional.linear(x.double(), w, layer.bias.detach().double())
    torch.testing.assert_close(layer.delta_values.grad.double(), (2 * y.T @ x.double()).view(-1)[new])
    table = emb.weight.detach().double().clone()
    table.view(-1)[new + 1] += values.double()
    dtable = torch.zeros_like(table).index_add_(0, ids, 2 * table[ids])
    torch.testing.assert_close(emb.delta_values.grad.double(), dtable.view(-1)[new + 1])


def test_a_merged_layer_saves_and_loads_as_the_unmerged_one():
    layer, x = _layer_with_delta(21)
    base = layer.weight.detach().clone()
    expect = _by_hand(layer, base)(x)
    layer.eval()
    layer.merge()
    state = layer.state_dict()
    assert_bit_identical(state["weight"], base, "saved weight is W0")
    fresh = xnn.SparseDeltaLinear.from_linear(torch.nn.Linear(9, 7), density=0.3)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), expect)
    other, _ = _layer_with_delta(22)
    other.eval()
    other.merge()
    other.load_state_dict(state)  # into a merged layer: the loaded W0 and Δ, unmerged
    assert not other.merged
    torch.testing.assert_close(other(x), expect)


def test_a_merged_layer_run_with_another_weight_refuses():
    # torch.func.functional_call(layer, layer.state_dict()) swaps in W0, which a state dict holds:
    # the merged layer multiplied by it alone and dropped Δ, silently
    layer, x = _layer_with_delta(24)
    layer.eval()
    expect = _by_hand(layer, layer.weight.detach().clone())(x)
    layer.merge()
    state = layer.state_dict()
    with pytest.raises(RuntimeError, match="functional_call"):
        torch.func.functional_call(layer, state, (x,))
    # its own Parameters (a functional_call of named_parameters()) and a copy of the layer still run
    torch.testing.assert_close(torch.func.functional_call(layer, dict(layer.named_parameters()), (x,)), expect)
    torch.testing.assert_close(copy.deepcopy(layer).double()(x.double()), expect.double(), rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(torch.func.functional_call(layer, state, (x,)), expect)


def test_a_merged_layer_refuses_a_stale_delta_and_converts_with_the_model():
    layer, x = _layer_with_delta(23)
    layer.eval()
    layer.merge()
    with torch.no_grad():
        layer.delta_values.mul_(2)
    with pytest.raises(RuntimeError, match="stale"):
        layer(x)
    layer.unmerge()
    layer.merge()
    layer.double()  # the displaced entries follow the weight's dtype
    layer.unmerge()
    assert layer.weight.dtype == torch.float64 and not layer.merged


def _diff_on(layer, entries, values):
    """A diff of layer 0 of a Sequential holding `layer`: `values` at the flat `entries` of its weight."""
    import xlsparse

    return xlsparse.SparseDiff({"0.weight": xlsparse.SparseDelta(entries, values, tuple(layer.weight.shape))})


def test_unmerge_refuses_when_a_later_apply_changed_the_merged_entries():
    # merge(); apply(diff); unmerge() restored the base over the diff's change at the delta's
    # entries, and the diff's revert then left W0 + Δ in the base: Δ counted twice, silently.
    import xlsparse

    layer, x = _layer_with_delta(25)
    layer.eval()
    base = layer.weight.detach().clone()
    model = torch.nn.Sequential(layer)
    shared = int(layer.delta_indices[0])
    diff = _diff_on(layer, torch.tensor([shared]), torch.tensor([10.0]))
    layer.merge()
    handle = xlsparse.apply([diff], model)
    merged_and_applied = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="unmerge: an xlsparse.apply made after merge"):
        layer.unmerge()
    assert layer.merged and torch.equal(layer.weight, merged_and_applied)
    handle.revert()
    layer.unmerge()  # in order: the base comes back bit-exactly
    assert torch.equal(layer.weight, base)


@pytest.mark.parametrize("value", [0.0, -0.0])
def test_unmerge_refuses_a_later_apply_that_wrote_the_same_bits(value):
    # an apply of +0 leaves the merged entries' bits as they were, but its revert would put
    # W0 + Δ back into the restored base: the bit comparison alone cannot see it
    import xlsparse

    layer, _ = _layer_with_delta(25)
    base = layer.weight.detach().clone()
    model = torch.nn.Sequential(layer)
    entries = layer.delta_indices[:3].long()
    diff = _diff_on(layer, entries, torch.full((3,), value))
    layer.merge()
    handle = xlsparse.apply([diff], model)
    with pytest.raises(RuntimeError, match="unmerge: an xlsparse.apply made after merge"):
        layer.unmerge()
    handle.revert()
    layer.unmerge()
    assert torch.equal(layer.weight, base)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_merged_layer_still_refuses_unmerge_under_a_later_apply(how):
    # the registry holds tensors by storage: a deep-copied or unpickled merged layer must register
    # its own merge, or unmerge() let a later +0 apply through and its revert put W0 + Δ in the base
    import copy
    import pickle

    import xlsparse

    layer, _ = _layer_with_delta(25)
    layer.merge()
    model = torch.nn.Sequential(layer)
    model = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    twin = model[0]
    base = twin.base_weight().clone()
    handle = xlsparse.apply([_diff_on(twin, twin.delta_indices[:3].long(), torch.zeros(3))], model)
    with pytest.raises(RuntimeError, match="unmerge: an xlsparse.apply made after merge"):
        twin.unmerge()
    handle.revert()
    twin.unmerge()
    assert torch.equal(twin.weight, base)


def test_reverting_an_apply_made_before_merge_refuses_while_merged():
    # apply(diff); merge(); revert() wrote the pre-apply base over W0 + Δ at the shared entries,
    # and only unmerge() noticed, with the revert already written
    import xlsparse

    layer, _ = _layer_with_delta(25)
    base = layer.weight.detach().clone()
    model = torch.nn.Sequential(layer)
    shared = layer.delta_indices[:2].long()
    diff = _diff_on(layer, shared, torch.tensor([3.0, 4.0]))
    handle = xlsparse.apply([diff], model)
    layer.merge()
    merged = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"later apply \(or SparseDeltaLinear.merge\)"):
        handle.revert()
    assert torch.equal(layer.weight, merged) and not handle.reverted  # nothing written
    layer.unmerge()
    handle.revert()
    assert torch.equal(layer.weight, base)
    # disjoint entries still revert while merged
    off = torch.ones(layer.weight.numel(), dtype=torch.bool)
    off[layer.delta_indices.long()] = False
    elsewhere = off.nonzero().flatten()[:2]
    handle = xlsparse.apply([_diff_on(layer, elsewhere, torch.ones(2))], model)
    layer.merge()
    handle.revert()
    layer.unmerge()
    assert torch.equal(layer.weight, base)


def test_gradients_of_a_merged_layer_in_eval_mode_reach_the_delta():
    layer, x = _layer_with_delta(24)
    reference = layer.delta_values.detach().clone().requires_grad_()
    delta = torch.zeros(layer.weight.numel()).index_put(
        (layer.delta_indices.long(),), reference).view_as(layer.weight)
    torch.nn.functional.linear(x, layer.weight.detach() + delta, layer.bias.detach()).square().sum().backward()
    layer.eval()
    layer.merge()
    layer(x).square().sum().backward()
    torch.testing.assert_close(layer.delta_values.grad, reference.grad, rtol=1e-5, atol=1e-5)


def test_a_strided_base_weight_multiplies_by_its_merged_copy():
    weight = torch.randn(9, 7).t()  # [7, 9], not contiguous
    linear = torch.nn.Linear(9, 7)
    linear.weight = torch.nn.Parameter(weight)
    layer, x = _layer_with_delta(25, linear)
    expect = _by_hand(layer, weight.detach().contiguous())(x)
    torch.testing.assert_close(layer(x), expect)


@needs_ext
def test_a_merged_layer_compiles_with_fullgraph():
    layer, x = _layer_with_delta(28)
    layer.eval()
    layer.merge()
    expect = layer(x).detach()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expect)
    compiled(x).sum().backward()
    assert layer.delta_values.grad is not None


@needs_ext
def test_a_compiled_merged_layer_refuses_a_delta_changed_after_merge():
    """A graph took the version counter at tracing as a constant: after Δ changed, the compiled
    merged layer kept running x (W0 + old Δ)ᵀ + b without a word."""
    layer, x = _layer_with_delta(29)
    layer.eval()
    layer.merge()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        compiled(x)
        merged = layer.delta_values.clone()
        layer.delta_values.add_(1.0)
        with pytest.raises(RuntimeError, match="changed after merge"):
            compiled(x)
        layer.delta_values.copy_(merged)  # the merged bits again: the merge is current
        torch.testing.assert_close(compiled(x), _by_hand(layer, layer.base_weight())(x))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("tokens", [3, 100])  # an SpMM term, and Δ written into W0
@pytest.mark.parametrize("op", ["sparse_delta_linear", "routed", "gated", "subnetwork"])
def test_a_layer_of_no_input_features_gives_its_bias_as_nn_linear_does(op, tokens):
    # x.reshape(-1, 0) cannot tell the token count: a layer of in_features 0 raised a raw RuntimeError
    x = torch.randn(2, tokens, 0, requires_grad=True)
    linear = torch.nn.Linear(0, 5)
    empty = torch.zeros(0, dtype=torch.long)
    if op == "sparse_delta_linear":
        y = xnn.SparseDeltaLinear.from_linear(linear, k=0)(x)
    elif op == "subnetwork":
        y = xnn.SubnetworkLinear.from_linear(linear, {"a": torch.zeros(5, 0, dtype=torch.bool)})(
            x, language_ids=torch.zeros(2, dtype=torch.long))
    else:
        how = {"route": torch.zeros(2, tokens, dtype=torch.long)} if op == "routed" else {"gates": torch.ones(2, tokens, 1)}
        y = functional.multi_delta_linear(x, linear.weight, linear.bias, [empty], [torch.zeros(0)], **how)
    torch.testing.assert_close(y, linear(x))
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("op", ["sparse_delta_linear", "multi_delta_linear"])
@pytest.mark.parametrize("incoming", ["y²", "y"])
def test_double_backward_raises(op, incoming):
    """Also when the incoming gradient is a constant (a gradient penalty on grad(y.sum(), x)): the
    gradients depend on the weight and values, and once came back as constants, dropping every
    second-order term without a word."""
    layer, x = _layer_with_delta(26)
    x.requires_grad_()
    if op == "sparse_delta_linear":
        y = layer(x)
    else:
        y = functional.multi_delta_linear(x, layer.weight, layer.bias, [layer.delta_indices], [layer.delta_values],
                                          route=torch.zeros(x.shape[0], dtype=torch.long))
    (gx,) = torch.autograd.grad(y.square().sum() if incoming == "y²" else y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.square().sum().backward()


@pytest.mark.parametrize("op", ["sparse_delta_linear", "routed", "gated", "ensemble_logprobs"])
def test_a_second_order_term_reaching_only_the_values_raises(op):
    """A gradient penalty differentiated for the values alone (torch.autograd.grad(loss, values)):
    the backward then reaches no error node through x's fresh gradient, and returned the
    first-order term alone, silently. The second-order term is nonzero here: d/dΔ of |dy (W0 + Δ)|²."""
    layer, x = _layer_with_delta(27)
    x.requires_grad_()
    values, tokens = layer.delta_values, x.shape[0]
    if op == "sparse_delta_linear":
        y = layer(x)
    elif op == "ensemble_logprobs":
        x = torch.randn(2, 3, 5, generator=seeded(27), requires_grad=True)
        values = torch.log_softmax(torch.randn(3, 2, generator=seeded(28)), -1).requires_grad_()
        y = functional.ensemble_logprobs(x, values, "logit")
    else:
        how = ({"route": torch.zeros(tokens, dtype=torch.long)} if op == "routed"
               else {"gates": torch.full((tokens, 1), 0.5)})
        y = functional.multi_delta_linear(x, layer.weight, layer.bias, [layer.delta_indices], [values], **how)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(y.sum() + gx.square().sum(), values)


@pytest.mark.parametrize("backend", ENS_BACKENDS)
@pytest.mark.parametrize("nll", [False, True], ids=["logprobs", "nll"])
@pytest.mark.parametrize("space", ["prob", "logit"])
def test_ensemble_double_backward_raises(backend, space, nll, use_backend):
    """The compiled backward has no autograd of its own (its double backward gave zeros)."""
    use_backend(backend)
    gen = seeded(31)
    z = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    lw = torch.log_softmax(torch.randn(3, 2, generator=gen, dtype=torch.float64), -1).requires_grad_()
    out = functional.ensemble_nll(z, lw, torch.tensor([0, 4, 2]), space) if nll else functional.ensemble_logprobs(z, lw, space)
    gz, glw = torch.autograd.grad(out.sum(), [z, lw], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (gz.square().sum() + glw.square().sum()).backward()


def test_an_input_viewing_the_weight_is_read_as_it_is():
    """With 64+ tokens and grad on, W0 + Δ is written into the weight's own memory for the call:
    an x (or bias) viewing that memory was read as W0 + Δ too."""
    gen = seeded(32)
    w = torch.randn(64, 64, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = random_indices(64 * 64, 300, torch.int64, gen)
    vals = torch.randn(300, generator=gen, dtype=torch.float64, requires_grad=True)
    delta = torch.zeros(64 * 64, dtype=torch.float64).index_put_((idx,), vals.detach()).view(64, 64)
    for x, bias in ((w, None), (w[:, :64], w[0])):
        y = functional.sparse_delta_linear(x, w, bias, idx, vals)
        want = x.detach() @ (w.detach() + delta).t() + (0 if bias is None else bias.detach())
        torch.testing.assert_close(y, want, rtol=0, atol=1e-10)


def test_autocast_leaves_float64_layers_in_float64():
    layer, x = _layer_with_delta(27)
    layer.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _by_hand(layer, layer.weight.detach())(x.double()), rtol=0, atol=1e-12)


@needs_ext
def test_torch_compile_fullgraph_module():
    gen = seeded(14)
    model = torch.nn.Sequential(
        xnn.SparseDeltaLinear.from_linear(torch.nn.Linear(12, 16), k=40), torch.nn.GELU(),
        xnn.SparseDeltaLinear.from_linear(torch.nn.Linear(16, 5), density=0.3))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.delta_values.normal_(generator=gen)
    x = torch.randn(3, 12, generator=gen)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    grads = [model[0].delta_values.grad.clone(), model[2].delta_values.grad.clone()]
    model.zero_grad()
    ref = model(x)
    ref.sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(grads[0], model[0].delta_values.grad)
    torch.testing.assert_close(grads[1], model[2].delta_values.grad)


# --- opcheck and gradcheck ---


def _op_samples(dtype):
    gen = seeded(15)
    dy, x = torch.randn(9, 7, generator=gen).to(dtype), torch.randn(9, 5, generator=gen).to(dtype)
    idx = random_indices(35, 12, torch.int32, gen)
    vals = torch.randn(12, generator=gen).to(dtype)
    order = torch.randperm(9, generator=gen)
    bounds = torch.tensor([2, 7])
    scale = torch.rand(9, generator=gen)
    z = torch.randn(3, 4, 11, generator=gen).to(dtype)
    lw = torch.log_softmax(torch.randn(4, 3, generator=gen), -1).to(dtype)
    y = torch.randint(0, 11, (4,), generator=gen)
    out, lse = ops.ensemble_logprobs_reference(z, lw, True)
    nll, nlse = ops.ensemble_nll_reference(z, lw, y, True)
    return [
        ("sddmm", (dy, x, idx, None, None, None)),
        ("sddmm", (dy, x, idx, order, bounds, scale)),
        ("spmm_", (torch.randn(9, 7).to(dtype), x, idx, vals, order, bounds, None, False)),
        ("spmm_", (torch.randn(9, 5).to(dtype), dy, idx, vals, None, None, scale, True)),
        ("ensemble_logprobs", (z, lw, True)),
        ("ensemble_logprobs", (z, lw, False)),
        ("ensemble_logprobs_backward", (torch.randn(4, 11).to(dtype), z, lw, out, lse, True)),
        ("ensemble_nll", (z, lw, y, True)),
        ("ensemble_nll", (z.clone().requires_grad_(dtype != torch.bfloat16), lw, y, True)),  # AOT dispatch traces it
        ("ensemble_nll_backward", (torch.randn(4).to(nll.dtype), z, lw, y, nll, nlse, True)),  # nll's grad: nll's dtype
    ]


@needs_ext
def test_a_token_listed_twice_counts_twice_in_every_backend():
    # the C++ kernels added it twice, the spmm_ reference once (its indexed write kept one of them)
    gen = seeded(4)
    x, dy = torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)
    idx, vals, ti = torch.tensor([1, 6, 9]), torch.randn(3, generator=gen, dtype=torch.float64), torch.tensor([1, 1, 3])
    delta = torch.zeros(12, dtype=torch.float64).index_put_((idx,), vals).view(3, 4)
    want = torch.zeros(5, 3, dtype=torch.float64)
    for t in ti.tolist():
        want[t] += x[t] @ delta.t()
    for spmm in (torch.ops.xlsparse.spmm_, ops.spmm_reference):
        out = torch.zeros(5, 3, dtype=torch.float64)
        spmm(out, x, idx, vals, ti, None, None, False)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    sddmm = sum(dy[t, idx // 4] * x[t, idx % 4] for t in ti.tolist())
    for op in (torch.ops.xlsparse.sddmm, ops.sddmm_reference):
        torch.testing.assert_close(op(dy, x, idx, ti, None, None), sddmm, rtol=0, atol=1e-12)


@needs_ext
def test_functional_ops_run_on_fake_tensors_with_the_real_shapes():
    # the data checks read fake tensors (FakeTensorMode, AOT tracing): DataDependentOutputException
    from torch._subclasses.fake_tensor import FakeTensorMode

    def calls(gen):
        x, w, b = torch.randn(70, 5, generator=gen), torch.randn(6, 5, generator=gen), torch.randn(6, generator=gen)
        idx, vals = torch.tensor([0, 4, 7]), torch.randn(3, generator=gen, requires_grad=True)
        z, lw = torch.randn(3, 4, 7, generator=gen, requires_grad=True), torch.randn(4, 3, generator=gen)
        return [functional.sparse_delta_linear(x, w, b, idx, vals),
                functional.multi_delta_linear(x, w, b, [idx], [vals], gates=torch.ones(70, 1)),
                functional.ensemble_nll(z, lw, torch.tensor([0, 1, 2, 6])), *functional.topk_mask([w, b], 4)]

    real = calls(seeded(3))
    with FakeTensorMode():
        fake = calls(None)
    assert [(r.shape, r.dtype, r.stride()) for r in real] == [(f.shape, f.dtype, f.stride()) for f in fake]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    for name, args in _op_samples(dtype):
        torch.library.opcheck(getattr(torch.ops.xlsparse, name).default, args)
    # spmm_gated_ has only a CPU kernel, so it is not among the samples that Triton repeats
    gen = seeded(17)
    x, gates = torch.randn(9, 5, generator=gen).to(dtype), torch.rand(9, 2, generator=gen).to(dtype)
    idx = [random_indices(35, 12, torch.int32, gen), random_indices(35, 4, torch.int64, gen)]
    vals = [torch.randn(i.numel(), generator=gen).to(dtype) for i in idx]
    for transpose, xin in ((False, x), (True, torch.randn(9, 7, generator=gen).to(dtype))):
        out = torch.randn(9, 5 if transpose else 7, generator=gen).to(dtype)
        torch.library.opcheck(torch.ops.xlsparse.spmm_gated_.default, (out, xin, idx, vals, gates, transpose))


@needs_ext
def test_soft_gated_layer_compiles_with_fullgraph():
    """Soft gates go through spmm_gated_ on a CPU, forward and dX, inside a traced graph too."""
    gen = seeded(18)
    x = torch.randn(6, 5, generator=gen, requires_grad=True)
    w, b = torch.randn(7, 5, generator=gen), torch.randn(7, generator=gen)
    idx = [random_indices(35, 9, torch.int32, gen), random_indices(35, 14, torch.int32, gen)]
    vals = [torch.randn(i.numel(), generator=gen, requires_grad=True) for i in idx]
    gates = torch.rand(6, 2, generator=gen)

    def f(x, v0, v1):
        return functional.multi_delta_linear(x, w, b, idx, [v0, v1], gates=gates)

    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, *vals)
    grads = torch.autograd.grad(y.square().sum(), [x, *vals])
    ref = f(x, *vals)
    expect = torch.autograd.grad(ref.square().sum(), [x, *vals])
    torch.testing.assert_close(y, ref)
    for got, want in zip(grads, expect):
        torch.testing.assert_close(got, want)


@pytest.mark.skipif("triton" not in MM_BACKENDS, reason="triton not usable here")
def test_opcheck_triton():
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    for name, args in _op_samples(torch.float32):
        torch.library.opcheck(getattr(torch.ops.xlsparse, "triton_" + name).default, args, test_utils=tests)


# gradcheck launches hundreds of kernels: about 2 minutes under the Triton interpreter.
@pytest.mark.parametrize("backend", slow_on_triton(MM_BACKENDS))
def test_gradcheck(backend, use_backend, monkeypatch):
    use_backend(backend)
    gen = seeded(16)
    x, w, b, idx, vals = _linear_case(5, 4, 3, 6, torch.float64, gen, lead=None)
    args = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), vals.requires_grad_()]
    for merged in (True, False):
        monkeypatch.setattr(functional, "merge_pays", lambda *a, m=merged: m)
        assert torch.autograd.gradcheck(lambda x, w, b, v: functional.sparse_delta_linear(x, w, b, idx, v), args)
    idx2, vals2 = _deltas(2, 4, 3, torch.float64, gen, sizes=[5, 12])
    vals2 = [v.requires_grad_() for v in vals2]
    ids = torch.tensor([1, -1, 0, 1, 0])
    gates = torch.rand(5, 2, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, v0, v1: functional.multi_delta_linear(x, w, b, idx2, [v0, v1], route=ids), [x, *vals2])
    assert torch.autograd.gradcheck(
        lambda x, g, v0, v1: functional.multi_delta_linear(x, w, b, idx2, [v0, v1], gates=g), [x, gates, *vals2])
    z = torch.randn(3, 4, 7, dtype=torch.float64, generator=gen).requires_grad_()
    lw = torch.log_softmax(torch.randn(4, 3, dtype=torch.float64, generator=gen), -1).requires_grad_()
    y = torch.randint(0, 7, (4,), generator=gen)
    for space in ("prob", "logit"):
        assert torch.autograd.gradcheck(lambda z, lw: functional.ensemble_logprobs(z, lw, space), [z, lw])
        assert torch.autograd.gradcheck(lambda z, lw: functional.ensemble_nll(z, lw, y, space), [z, lw])


@pytest.mark.parametrize("backend", slow_on_triton(MM_BACKENDS))
def test_gradcheck_wide_weight_and_transposed_input(backend, use_backend):
    """More input columns than output rows (the CPU SDDMM swaps its operands) and x transposed in
    memory; rows of 0, 9 and 13 entries."""
    use_backend(backend)
    gen = seeded(17)
    o, i = 3, 13
    x = torch.randn(i, 5, dtype=torch.float64, generator=gen).T.requires_grad_()
    w = torch.randn(o, i, dtype=torch.float64, generator=gen).requires_grad_()
    idx = torch.cat([i + torch.randperm(i, generator=gen)[:9].sort().values, torch.arange(2 * i, 3 * i)])
    vals = torch.randn(idx.numel(), dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, v: functional.sparse_delta_linear(x, w, None, idx, v), [x, w, vals])


# --- bad inputs ---


def _bad_op_calls():
    x, dy = torch.randn(4, 3), torch.randn(4, 5)
    idx, vals = torch.tensor([0, 4, 9]), torch.randn(3)
    return [
        ("sddmm out of range", lambda: ops.sddmm(dy, x, torch.tensor([0, 15])), IndexError, "out of range"),
        ("sddmm unsorted", lambda: ops.sddmm(dy, x, torch.tensor([4, 0])), ValueError, "sorted and unique"),
        ("sddmm duplicate", lambda: ops.sddmm(dy, x, torch.tensor([4, 4])), ValueError, "sorted and unique"),
        ("sddmm tokens", lambda: ops.sddmm(dy, x[:3], idx), ValueError, "token counts"),
        ("sddmm dtype", lambda: ops.sddmm(dy.double(), x, idx), TypeError, "dtypes differ"),
        ("sddmm index dtype", lambda: ops.sddmm(dy, x, idx.short()), TypeError, "int32 or int64"),
        ("sddmm token id", lambda: ops.sddmm(dy, x, idx, torch.tensor([0, 9])), IndexError, "token"),
        ("sddmm bounds", lambda: ops.sddmm(dy, x, idx, torch.tensor([0, 1]), torch.tensor([0, 3])), IndexError, "token_bounds"),
        ("sddmm scale shape", lambda: ops.sddmm(dy, x, idx, None, None, torch.rand(3)), ValueError, "token_scale"),
        ("sddmm device", lambda: ops.sddmm(dy, x, idx.to("meta")), ValueError, "device"),
        ("spmm values", lambda: ops.spmm_(dy.clone(), x, idx, torch.randn(2)), ValueError, "values"),
        ("spmm values dtype", lambda: ops.spmm_(dy.clone(), x, idx, vals.double()), TypeError, "values dtype"),
        ("spmm K > N", lambda: ops.spmm_(dy.clone(), x, torch.arange(16), torch.randn(16)), IndexError, "out of range"),
        ("spmm out", lambda: ops.spmm_(dy.t().contiguous().t(), x, idx, vals), ValueError, "contiguous"),
        # no autograd of their own: the compiled backends returned results whose gradient was lost
        ("sddmm grad", lambda: ops.sddmm(dy, x.detach().requires_grad_(), idx), RuntimeError, "x requires grad"),
        ("spmm grad", lambda: ops.spmm_(dy.clone(), x, idx, vals.detach().requires_grad_()), RuntimeError, "values requires grad"),
    ]


@pytest.mark.parametrize("backend", MM_BACKENDS)
@pytest.mark.parametrize("name,call,exc,msg", _bad_op_calls(), ids=[c[0] for c in _bad_op_calls()])
def test_bad_op_input_raises(backend, name, call, exc, msg, use_backend):
    use_backend(backend)
    with pytest.raises(exc, match=msg):
        call()


@pytest.mark.parametrize("index,bounds,exc,msg", [
    ([0, 9], None, IndexError, "token_index holds token 9, outside \\[0, 4\\)"),
    ([-1, 2], None, IndexError, "token_index holds token -1, outside"),
    ([3, 1, 3], None, ValueError, "lists a token more than once"),
    ([3, 1, 3], [0, 3], ValueError, "lists a token more than once"),
    ([7, 1, 2, 9], [1, 3], None, None),  # tokens outside the bounds are not selected: not checked
    ([3, 1, 3], [1, 3], None, None),  # the repeat lies outside the bounds
    ([2, 1], [2, 1], IndexError, "token_bounds \\[2, 1\\) do not fit token_index of 2 entries"),
    ([2, 1], [0, 3], IndexError, "token_bounds \\[0, 3\\)"),
    ([2, 1], [-1, 1], IndexError, "token_bounds"),
    ([], [0, 0], None, None),
    ([2, 2], [1, 1], None, None),  # nothing selected
], ids=str)
def test_token_selection_rules(index, bounds, exc, msg):
    """The selected tokens token_index[lo:hi] must fit the bounds, lie in [0, T) and appear once,
    read back in one host sync: only the selected positions count."""
    dy, x, idx = torch.randn(4, 5), torch.randn(4, 3), torch.tensor([0, 4, 9])
    ti = torch.tensor(index, dtype=torch.long)
    tb = None if bounds is None else torch.tensor(bounds)
    if exc is None:
        ops.sddmm(dy, x, idx, ti, tb)
        return
    with pytest.raises(exc, match=msg):
        ops.sddmm(dy, x, idx, ti, tb)


@needs_ext
@pytest.mark.parametrize("index,bounds,msg", [
    ([0, 9], None, "token_index holds ids outside \\[0, 4\\)"),
    ([-1, 2], None, "token_index holds ids outside"),
    ([7, 1, 2, 9], [1, 3], None),  # only the selected positions are read
    ([2, 1], [2, 1], "token_bounds \\[2, 1\\) do not fit token_index of 2 entries"),
    ([2, 1], [0, 3], "token_bounds \\[0, 3\\)"),
    ([2, 1], [-1, 1], "token_bounds"),
    ([], [0, 0], None),
    ([], [0, 1], "token_bounds \\[0, 1\\) do not fit token_index of 0 entries"),
    ([9, 9], [1, 1], None),  # nothing selected
], ids=str)
def test_compiled_ops_check_the_token_selection_themselves(index, bounds, msg):
    """The C++ ops (called raw, past the Python checks) read the bounds and the selection's range
    back in one go, and refuse a bad one before computing."""
    dy, x, idx = torch.randn(4, 5), torch.randn(4, 3), torch.tensor([0, 4, 9])
    ti = torch.tensor(index, dtype=torch.long)
    tb = None if bounds is None else torch.tensor(bounds)
    for call in (lambda: torch.ops.xlsparse.sddmm(dy, x, idx, ti, tb, None),
                 lambda: torch.ops.xlsparse.spmm_(dy.clone(), x, idx, torch.randn(3), ti, tb, None, False)):
        if msg is None:
            call()
        else:
            with pytest.raises(IndexError, match=msg):
                call()


def test_spmm_rejected_call_writes_nothing():
    out = torch.randn(4, 5)
    before = out.clone()
    with pytest.raises(ValueError):
        ops.spmm_(out, torch.randn(4, 3), torch.tensor([3, 1]), torch.randn(2))
    assert_bit_identical(out, before, "out after a rejected call")


def _bad_layer_calls():
    x, w, b = torch.randn(2, 3), torch.randn(4, 3), torch.randn(4)
    idx, vals = torch.tensor([1, 7]), torch.randn(2)
    lin = torch.nn.Linear(3, 4)
    z, lw = torch.randn(2, 3, 5), torch.randn(3, 2)
    return [
        ("features", lambda: functional.sparse_delta_linear(torch.randn(2, 4), w, b, idx, vals), ValueError, "features"),
        ("x dtype", lambda: functional.sparse_delta_linear(x.double(), w, b, idx, vals), TypeError, "dtype"),
        ("values dtype", lambda: functional.sparse_delta_linear(x, w, b, idx, vals.half()), TypeError, "values dtype"),
        ("bias", lambda: functional.sparse_delta_linear(x, w, torch.randn(3), idx, vals), ValueError, "bias"),
        ("lengths", lambda: functional.sparse_delta_linear(x, w, b, idx, torch.randn(3)), ValueError, "one length"),
        ("K > N", lambda: functional.sparse_delta_linear(x, w, b, torch.arange(13), torch.randn(13)), ValueError, "exceed"),
        ("route and gates", lambda: functional.multi_delta_linear(x, w, b, [idx], [vals], route=torch.tensor([0, 0]),
                                                                   gates=torch.rand(2, 1)), ValueError, "not both"),
        ("route id", lambda: functional.multi_delta_linear(x, w, b, [idx], [vals], route=torch.tensor([0, 1])), IndexError, "ids"),
        ("route length", lambda: functional.multi_delta_linear(x, w, b, [idx], [vals], route=torch.tensor([0])), ValueError, "ids for"),
        ("gates shape", lambda: functional.multi_delta_linear(x, w, b, [idx], [vals], gates=torch.rand(2, 2)), ValueError, "gates"),
        ("delta lists", lambda: functional.multi_delta_linear(x, w, b, [idx], [], route=None), ValueError, "value tensors"),
        ("k and density", lambda: xnn.SparseDeltaLinear.from_linear(lin, k=2, density=0.1), ValueError, "exactly one"),
        ("k too big", lambda: xnn.SparseDeltaLinear.from_linear(lin, k=13), ValueError, "k = 13 is outside"),
        ("mask shape", lambda: xnn.SparseDeltaLinear.from_linear(lin, indices=torch.ones(3, 4, dtype=torch.bool)), ValueError, "mask"),
        ("bad indices", lambda: xnn.SparseDeltaLinear.from_linear(lin, indices=torch.tensor([3, 3])), ValueError, "sorted"),
        ("space", lambda: functional.ensemble_logprobs(z, lw, space="log"), ValueError, "space"),
        ("weights shape", lambda: functional.ensemble_logprobs(z, lw.T), ValueError, "log_weights"),
        ("weights dtype", lambda: functional.ensemble_logprobs(z, lw.double()), TypeError, "dtype"),
        ("target range", lambda: functional.ensemble_nll(z, lw, torch.tensor([0, 1, 5])), IndexError, "targets"),
        ("target dtype", lambda: functional.ensemble_nll(z, lw, torch.tensor([0, 1, 2]).int()), TypeError, "int64"),
    ]


@pytest.mark.parametrize("backend", MM_BACKENDS)
@pytest.mark.parametrize("name,call,exc,msg", _bad_layer_calls(), ids=[c[0] for c in _bad_layer_calls()])
def test_bad_layer_input_raises(backend, name, call, exc, msg, use_backend):
    use_backend(backend)
    with pytest.raises(exc, match=msg):
        call()


@pytest.mark.parametrize("backend", ENS_BACKENDS)
def test_ensemble_logprobs_of_very_unlikely_classes(backend, use_backend):
    """Classes every expert gives probability ~e^-200 (an underflow for float32 sums) stay exact."""
    use_backend(backend)
    z = torch.zeros(3, 4, 50)
    z[:, :, 7] = 200.0
    z[1, :, 9] = 150.0
    lw = torch.log_softmax(torch.randn(4, 3, generator=seeded(17)), -1)
    z1, lw1 = z.clone().requires_grad_(True), lw.clone().requires_grad_(True)
    out = functional.ensemble_logprobs(z1, lw1)
    z2, lw2 = z.double().requires_grad_(True), lw.double().requires_grad_(True)
    ref = _ensemble64(z2, lw2, "prob")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    # the backward recomputes these log-probs (the CPU kernel through its exact per-class path)
    gy = torch.randn(out.shape, generator=seeded(18))
    got, want = torch.autograd.grad(out, [z1, lw1], gy), torch.autograd.grad(ref, [z2, lw2], gy.double())
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ENS_BACKENDS)
def test_ensemble_logprobs_gradient_of_a_large_grad_over_an_unlikely_class(backend, use_backend):
    """A class of mixture probability 3e-30 (just above the CPU kernel's exact-path threshold) with
    an incoming grad of 1e10: the CPU backward's g / s (3e39) overflowed float32 and made dz NaN
    and dlw inf, where the posterior times g is 5e9."""
    use_backend(backend)
    z = torch.zeros(2, 1, 8)
    z[:, :, 3] = -66.0
    lw = torch.full((1, 2), 0.5).log()
    gy = torch.zeros(1, 8)
    gy[0, 0], gy[0, 3] = 1.0, 1e10
    z1, lw1 = z.clone().requires_grad_(True), lw.clone().requires_grad_(True)
    got = torch.autograd.grad(functional.ensemble_logprobs(z1, lw1), [z1, lw1], gy)
    z2, lw2 = z.double().requires_grad_(True), lw.double().requires_grad_(True)
    want = torch.autograd.grad(_ensemble64(z2, lw2, "prob"), [z2, lw2], gy.double())
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("backend", ENS_BACKENDS)
@pytest.mark.parametrize("space", ["prob", "logit"])
def test_ensemble_with_a_leading_block_of_banned_classes(backend, space, use_backend):
    """The kernels' logsumexp runs over blocks of classes (8192 in the Triton interpreter, 2048 on
    a GPU); a first block whose classes every expert bans (−inf) once made every result NaN."""
    use_backend(backend)
    e, t, v = 2, 3, 8192 + 5
    gen = seeded(29)
    z = torch.randn(e, t, v, generator=gen)
    z[:, :, :8192] = float("-inf")
    lw = torch.log_softmax(torch.randn(t, e, generator=gen), -1)
    y = torch.tensor([8192, 8194, 8196])
    ref = _ensemble64(z.double(), lw.double(), space)
    zg = z.clone().requires_grad_(True)
    out = functional.ensemble_logprobs(zg, lw, space)
    torch.testing.assert_close(out[:, 8192:].double(), ref[:, 8192:], rtol=1e-5, atol=1e-5)
    assert (out[:, :8192] == float("-inf")).all()
    (dz,) = torch.autograd.grad(out[:, 8192:].sum(), zg)
    assert torch.isfinite(dz[:, :, 8192:]).all() and (dz[:, :, :8192] == 0).all()
    nll = functional.ensemble_nll(z, lw, y, space)
    torch.testing.assert_close(nll.double(), -ref.gather(1, y[:, None])[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ENS_BACKENDS)
def test_ensemble_logit_mixture_leaves_out_an_expert_of_weight_zero(backend, use_backend):
    """An expert of weight 0 (log-weight −inf: top-k dropped it) adds nothing to Σ_e w_e z_e, even
    where its logits are ±inf (a class it bans, an fp16 overflow): 0 · inf made the whole row NaN.
    The result is the mixture of the other experts, and the dropped one's gradients are zeros."""
    use_backend(backend)
    e, t, v = 3, 4, 37
    gen = seeded(31)
    z = torch.randn(e, t, v, generator=gen)
    z[1, :, 5], z[1, 0, 7] = float("-inf"), float("inf")
    lw = torch.log_softmax(torch.randn(t, e, generator=gen), -1)
    lw[:, 1] = float("-inf")
    y = torch.randint(0, v, (t,), generator=gen)
    gy, gn = torch.randn(t, v, generator=gen), torch.randn(t, generator=gen)
    kept = [0, 2]

    def run(z, lw, ours):
        z, lw = z.detach().requires_grad_(True), lw.detach().requires_grad_(True)
        out = functional.ensemble_logprobs(z, lw, "logit") if ours else _ensemble64(z, lw, "logit")
        nll = functional.ensemble_nll(z, lw, y, "logit") if ours else -out.gather(1, y[:, None])[:, 0]
        return [out, nll, *torch.autograd.grad(out, [z, lw], gy.to(out.dtype), retain_graph=True),
                *torch.autograd.grad(nll, [z, lw], gn.to(out.dtype))]

    got = run(z, lw, True)
    want = run(z[kept].double(), lw[:, kept].double(), False)
    for name, g, w in zip(["out", "nll"], got[:2], want[:2]):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5, msg=name)
    for dz, dlw, (wz, wlw) in ((got[2], got[3], want[2:4]), (got[4], got[5], want[4:6])):
        torch.testing.assert_close(dz[kept].double(), wz, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dlw[:, kept].double(), wlw, rtol=1e-5, atol=1e-5)
        assert (dz[1] == 0).all() and (dlw[:, 1] == 0).all()


class _RouterLinear(torch.nn.Linear):
    """A linear subclass that computes more than x Wᵀ + b (as MoE routers and scaled heads do)."""

    def forward(self, x):
        return 2.0 * super().forward(x).softmax(-1)


class FalconLinear(torch.nn.Linear):  # the same math as nn.Linear under a forward of its own (transformers' Falcon)
    def forward(self, x):
        return super().forward(x)


def test_from_linear_refuses_a_subclass_with_a_forward_of_its_own():
    """from_linear took any nn.Linear subclass's weight and computed x Wᵀ + b: a fresh
    SparseDeltaLinear made from _RouterLinear gave other outputs than the layer it replaced
    (hf.convert refused such targets; the nn constructors did not)."""
    torch.manual_seed(0)
    router = _RouterLinear(5, 4)
    with pytest.raises(TypeError, match="_RouterLinear"):
        xnn.SparseDeltaLinear.from_linear(router, k=3)
    with pytest.raises(TypeError, match="_RouterLinear"):
        xnn.MultiDeltaLinear.from_linear(router, {"en": xlsparse.SparseDelta.from_dense(torch.zeros(4, 5))})
    with pytest.raises(TypeError, match="_RouterLinear"):
        xnn.SubnetworkLinear.from_linear(router, {"en": torch.ones(4, 5, dtype=torch.bool)})
    x = torch.randn(3, 5)
    same = FalconLinear(5, 4)
    torch.testing.assert_close(xnn.SparseDeltaLinear.from_linear(same, k=3)(x), same(x))
    # a module that is no nn.Linear: Conv1d failed with a bare unpacking error, an Embedding's weight was taken
    for other in (torch.nn.Conv1d(5, 4, 3), torch.nn.Embedding(4, 5)):
        with pytest.raises(TypeError, match=f"linear must be an nn.Linear, got {type(other).__name__}"):
            xnn.SparseDeltaLinear.from_linear(other, k=3)


def test_merge_or_unmerge_between_forward_and_backward_is_refused_as_an_in_place_change():
    # merge()/unmerge() wrote the weight that the forward saved without bumping its version: the
    # backward computed dX with W0 + 2Δ (merge after the forward) or W0 (unmerge), silently
    gen = seeded(21)
    layer = xnn.SparseDeltaLinear.from_linear(torch.nn.Linear(24, 16), k=50)
    with torch.no_grad():
        layer.delta_values.copy_(torch.randn(50, generator=gen))
    for tokens in (8, 100):  # both forward paths (SpMM, and Δ written into W0 for the product)
        x = torch.randn(tokens, 24, generator=gen, requires_grad=True)
        y = layer(x)
        layer.merge()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
        layer.unmerge()
    layer.eval()
    layer.merge()
    x = torch.randn(100, 24, generator=gen, requires_grad=True)
    y = layer(x)
    layer.unmerge()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("how", ["data", "vector_to_parameters", "data_in_place"])
def test_a_merged_layer_whose_delta_storage_was_swapped_refuses_to_run(how):
    # `p.data = new` and torch's vector_to_parameters replace the storage and keep the version
    # counter, which alone decided that Δ had not changed: the merged layer ran the old Δ; a write
    # in place through `p.data` bumps no counter of the Parameter at all
    gen = seeded(22)
    layer = xnn.SparseDeltaLinear.from_linear(torch.nn.Linear(24, 16), k=50).eval()
    with torch.no_grad():
        layer.delta_values.copy_(torch.randn(50, generator=gen))
    layer.merge()
    x = torch.randn(4, 24, generator=gen)
    layer(x)
    if how == "data":
        layer.delta_values.data = torch.zeros(50)
    elif how == "data_in_place":
        layer.delta_values.data.mul_(2)
    else:
        torch.nn.utils.vector_to_parameters(torch.zeros(50), [layer.delta_values])
    with pytest.raises(RuntimeError, match="merge"):
        layer(x)


@pytest.mark.parametrize("bad", [[9, 3, 1, 2], [1, 2, 3, 40]])
def test_loaded_delta_indices_are_checked_before_the_layer_loads(bad):
    # a SparseDeltaEmbedding loaded unsorted or out-of-range indices unchecked: its binary search
    # added the values to other entries (or none), silently
    torch.manual_seed(0)
    emb = xnn.SparseDeltaEmbedding.from_embedding(torch.nn.Embedding(10, 4), k=4)
    lin = xnn.SparseDeltaLinear.from_linear(torch.nn.Linear(8, 5), k=4)
    multi = xnn.MultiDeltaLinear.from_linear(torch.nn.Linear(8, 5), {"a": lin, "b": lin})
    for layer, key in [(emb, "delta_indices"), (lin, "delta_indices"), (multi, "delta_indices_1")]:
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        sd = dict(before)
        sd[key] = torch.tensor(bad)
        with pytest.raises((ValueError, IndexError), match=key):
            layer.load_state_dict(sd)
        assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    sd = emb.state_dict()
    sd["delta_indices"] = sd["delta_indices"].float()
    with pytest.raises(TypeError, match="int32 or int64"):
        emb.load_state_dict(sd)


@pytest.mark.parametrize("bad", [[9, 3, 1, 2], [1, 3, 3, 5], [1, 2, 3, 40]])
def test_sparse_delta_embedding_checks_the_indices_it_is_built_with(bad):
    # the constructor took them unchecked (from_embedding, set_support and load_state_dict check):
    # the binary-search lookup put the values on other entries, or dropped them, silently
    with pytest.raises((ValueError, IndexError), match="SparseDeltaEmbedding: indices"):
        xnn.SparseDeltaEmbedding(torch.zeros(10, 4), torch.tensor(bad))
    layer = xnn.SparseDeltaEmbedding(torch.zeros(10, 4), torch.tensor(sorted(set(bad) - {40})))
    with torch.no_grad():
        layer.delta_values.copy_(torch.arange(1.0, layer.delta_values.numel() + 1))
    want = torch.zeros(40).index_put_((layer.delta_indices.long(),), layer.delta_values.detach()).view(10, 4)
    assert torch.equal(layer(torch.arange(10)), want)


def test_sparse_delta_embedding_refuses_values_of_another_dtype_than_its_base_as_the_linear_does():
    # index_put raised a raw RuntimeError ("Index put requires the source and destination dtypes match")
    emb = xnn.SparseDeltaEmbedding.from_embedding(torch.nn.Embedding(6, 4).bfloat16(), k=6)
    lin = xnn.SparseDeltaLinear.from_linear(torch.nn.Linear(4, 6).bfloat16(), k=6)
    for layer, x in ((emb, torch.tensor([1, 2])), (lin, torch.randn(2, 4, dtype=torch.bfloat16))):
        layer.delta_values.data = layer.delta_values.data.float()
        with pytest.raises(TypeError, match="values dtype torch.float32 does not match weight dtype torch.bfloat16"):
            layer(x)
    emb.float()
    torch.testing.assert_close(emb(torch.tensor([1, 2])), emb.weight[[1, 2]])  # zero delta


def test_sparse_delta_embedding_refuses_max_norm_zero_and_keeps_padding_rows_without_gradient():
    # max_norm=0.0 (nn.Embedding renormalises rows to zero) was taken for "not set"; a base made
    # trainable got a gradient in its padding row, which nn.Embedding never gives
    with pytest.raises(ValueError, match="max_norm"):
        xnn.SparseDeltaEmbedding.from_embedding(torch.nn.Embedding(10, 4, max_norm=0.0), k=5)
    emb = torch.nn.Embedding(10, 4, padding_idx=0)
    layer = xnn.SparseDeltaEmbedding.from_embedding(emb, k=5)
    layer.weight.requires_grad_(True)
    ids = torch.tensor([0, 0, 3])
    layer(ids).sum().backward()
    ref = torch.nn.Embedding(10, 4, padding_idx=0)
    ref(ids).sum().backward()
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=0, atol=0)
