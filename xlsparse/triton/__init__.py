"""Triton kernels, one module per op family. Importing this package registers every Triton
implementation in the op table (`xlsparse.ops.registry`); the table imports it lazily, by name,
the first time it looks for one, since triton is an optional extra."""
from . import compose, matmul, optim  # noqa: F401
