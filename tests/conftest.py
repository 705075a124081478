"""Helpers every test file shares: the dtype and shape matrix, backend selection, the float64
reference comparison (flash-attention's rule), and bit-level checks for untouched entries."""
import os
import subprocess
import sys

import pytest
import torch

# Triton kernels run under the interpreter on machines with no GPU; set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import xlsparse  # noqa: E402
from xlsparse import _ext  # noqa: E402
from xlsparse.ops import registry  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ODD_SIZES = [1, 3, 127, 4097]
INDEX_DTYPES = [torch.int32, torch.int64]

_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def child_python(*args: str) -> list[str]:
    """The command line of a child Python that imports the *installed* xlsparse. `-P` keeps the
    working directory (the source tree, which holds no built `_C` after a non-editable install)
    off the child's sys.path."""
    return [sys.executable, "-P", *args]


def torchrun(template: str, tmp_path, port: int, timeout: int = 300, **fields) -> None:
    """Write `template`, formatted with `out` (tmp_path) and `fields`, as a script in tmp_path and
    run it as 2 processes of one thread each (torch.distributed.run on `port`); fails the test
    with the end of its stderr if it fails."""
    script = tmp_path / "torchrun_script.py"
    script.write_text(template.format(out=str(tmp_path), **fields))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(child_python("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                                       str(port), str(script)), env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def cpu_backends(op: str) -> list[str]:
    """Backends that can run `op` on CPU tensors in this process (read from the op table)."""
    return registry.usable(op, torch.device("cpu"))


def slow_on_triton(backends: list[str]) -> list:
    """`backends` as parametrize values, the Triton one marked slow: a test that launches many
    kernels takes seconds per case under the Triton interpreter, and CI runs it."""
    return [pytest.param(b, marks=pytest.mark.slow) if b == "triton" else b for b in backends]


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend(name) forces XLSPARSE_BACKEND for the rest of the test."""

    def force(name: str) -> None:
        monkeypatch.setenv("XLSPARSE_BACKEND", name)

    return force


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_indices(n: int, k: int, dtype=torch.int64, gen=None) -> torch.Tensor:
    """k sorted, unique flat indices drawn from range(n)."""
    return torch.randperm(n, generator=gen)[:k].sort().values.to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a tensor, for exact (NaN-safe) equality."""
    return t.contiguous().view(_INT_VIEW[t.dtype]) if t.is_floating_point() else t


def assert_bit_identical(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    diff = (bits(a) != bits(b)).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.shape[0]} entries differ, first at {diff[0].tolist()}"


def poison(t: torch.Tensor) -> torch.Tensor:
    """A same-shaped tensor full of NaN: an output entry a kernel forgets to write stays NaN."""
    return torch.full_like(t, float("nan"))


def assert_matches_reference(out: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor, what: str = "") -> None:
    """Flash-attention's rule: |out - ref64| <= 2 |plain - ref64| + one ulp of the largest value.

    ref64 is the op computed in float64; plain is plain PyTorch computed in out's dtype.
    """
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not out.isnan().any(), f"{what}: output has NaN (an entry was not written?)"
    if out.numel() == 0:
        return
    ref = ref64.double()
    kernel_err = (out.double() - ref).abs().max().item()
    plain_err = (plain.double() - ref).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * max(1.0, ref.abs().max().item())
    assert kernel_err <= 2 * plain_err + ulp, f"{what}: error {kernel_err:.3g} > 2 x PyTorch's {plain_err:.3g} + {ulp:.3g}"


def assert_close_to_float64(out, ref64, plain, what="", extra_ulps=0.0, ulp_dtype=None) -> None:
    """The flash-attention rule (`assert_matches_reference`); in float64 (where plain PyTorch *is*
    the reference) a relative 1e-10 of the largest value absorbs a different summation order.
    `extra_ulps` widens the allowance for reductions whose order differs from autograd's
    (ensemble gradients), in ulps of `ulp_dtype` (default: out's)."""
    if extra_ulps and out.dtype != torch.float64:
        ulp = torch.finfo(ulp_dtype or out.dtype).eps * max(1.0, ref64.abs().max().item())
        plain_err = (plain.double() - ref64.double()).abs().max().item()
        err = (out.double() - ref64.double()).abs().max().item()
        assert not out.isnan().any(), what
        assert err <= 2 * plain_err + (1 + extra_ulps) * ulp, f"{what}: error {err:.3g}, PyTorch's {plain_err:.3g}, ulp {ulp:.3g}"
    elif out.dtype == torch.float64:
        assert out.shape == ref64.shape, what
        scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
        torch.testing.assert_close(out, ref64, rtol=0, atol=1e-10 * scale, msg=what)
    else:
        assert_matches_reference(out, ref64, plain, what)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("XLSPARSE_SLOW", "0") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set XLSPARSE_SLOW=1 (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    # A test run that silently fell back to the reference ops would pass while testing no kernel.
    if not _ext.loaded() and os.environ.get("XLSPARSE_ALLOW_NO_EXT", "0") != "1":
        raise pytest.UsageError(
            f"xlsparse._C is not loaded ({xlsparse.__file__}): the tests would check only the reference "
            "ops. Install the package (README), or set XLSPARSE_ALLOW_NO_EXT=1 to test the reference alone.")


def pytest_report_header(config):
    return f"xlsparse {xlsparse.__version__}, backends {xlsparse.backends()}, threads {torch.get_num_threads()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
