"""The torch ops of xlsparse, one module per family: reference, fake impl, dispatch, autograd.

`registry` holds the one table of implementations; `checks` every argument rule."""
from . import compose  # noqa: F401
from . import optim  # noqa: F401
from . import matmul  # noqa: F401
from .registry import backends  # noqa: F401
