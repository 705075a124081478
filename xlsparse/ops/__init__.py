"""The torch ops of xlsparse, one module per family: reference, fake impl, dispatch, autograd."""
from . import compose  # noqa: F401
from . import optim  # noqa: F401
from . import matmul  # noqa: F401
from ._common import backends  # noqa: F401
