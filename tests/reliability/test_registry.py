"""The op table: one registration line installs a backend, and every reader sees it."""
import pytest
import torch

import xlsparse
from xlsparse.ops import compose as cops, registry

from conftest import cpu_backends


def test_backends_and_the_test_matrix_read_the_table():
    table = xlsparse.backends()
    assert set(table) == set(registry.ops())
    for op in table:
        here = registry.implementations(op)
        assert table[op] == {b: b in here for b in ("cpu", "cuda", "triton")}
        assert cpu_backends(op) == [b for b in registry.BACKENDS if b in here and registry.runs_on(b, torch.device("cpu"))]


def test_one_register_line_installs_a_backend(monkeypatch):
    calls = []

    def my_kernel(dense, indices, values, alpha):
        calls.append(alpha)
        cops.sparse_axpy_reference(dense, indices, values, alpha)

    saved = dict(registry.implementations("sparse_axpy_"))
    try:
        registry.register("sparse_axpy_", "cuda", my_kernel)  # the one line a new backend needs
        monkeypatch.setattr(registry, "runs_on", lambda backend, device: True)
        monkeypatch.setenv("XLSPARSE_BACKEND", "cuda")
        d = torch.zeros(5)
        cops.sparse_axpy_(d, torch.tensor([1, 3]), torch.tensor([1.0, 2.0]), 0.5)
        assert calls == [0.5] and d.tolist() == [0, 0.5, 0, 1.0, 0]
        with pytest.raises(IndexError):  # the checks run before any backend, the new one included
            cops.sparse_axpy_(d, torch.tensor([1, 7]), torch.tensor([1.0, 2.0]), 0.5)
        assert calls == [0.5]
    finally:
        registry._TABLE["sparse_axpy_"].clear()
        registry._TABLE["sparse_axpy_"].update(saved)


def test_selection_rules(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("XLSPARSE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="XLSPARSE_BACKEND"):
        registry.backend_for("sddmm", cpu)
    monkeypatch.setenv("XLSPARSE_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cannot run sddmm"):
        registry.backend_for("sddmm", cpu)
    monkeypatch.setenv("XLSPARSE_BACKEND", "triton")  # merge_deltas has no Triton kernel by design
    assert registry.backend_for("merge_deltas", cpu) == "reference"
    monkeypatch.delenv("XLSPARSE_BACKEND")
    assert registry.backend_for("sddmm", cpu) == ("cpu" if "cpu" in registry.implementations("sddmm") else "reference")
    with pytest.raises(KeyError, match="unknown op"):
        registry.register("no_such_op", "cpu", print)
    with pytest.raises(ValueError, match="backend"):
        registry.register("sddmm", "opencl", print)
