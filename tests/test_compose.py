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
    ref64 = dense.double()
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
