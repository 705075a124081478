"""Load the compiled library `xlsparse._C` once.

Without it the package still imports: a warning says so once, and every op runs its pure
PyTorch `reference` implementation.
"""
import importlib
import warnings

import torch

_loaded: bool | None = None
_error: str = ""


def loaded() -> bool:
    """True when `xlsparse._C` is importable and its ops are registered."""
    global _loaded, _error
    if _loaded is None:
        try:
            importlib.import_module("xlsparse._C").cpu_capability()  # a bad XLSPARSE_CPU_CAPABILITY raises here
            _loaded = True
        except ImportError as exc:
            _loaded, _error = False, str(exc)
            warnings.warn(
                "xlsparse: the compiled extension xlsparse._C could not be loaded "
                f"({exc}); every op falls back to the slow pure-PyTorch reference. "
                "Reinstall with `pip install --no-build-isolation -e .` to build it.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _loaded


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when `xlsparse::<op>` has a compiled kernel for `dispatch_key` ("CPU" or "CUDA")."""
    return loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"xlsparse::{op}", dispatch_key)


def cpu_capability() -> str | None:
    """The instruction set the `cpu` backend's vector kernels were compiled for and run with here:
    "default" (baseline x86-64), "avx2" (AVX2 + FMA) or "avx512"; None without the extension.

    The best one the CPU runs is chosen once per process; `XLSPARSE_CPU_CAPABILITY` overrides it,
    and a name that is unknown or that this CPU cannot run raises ValueError (at `import xlsparse`).
    """
    return importlib.import_module("xlsparse._C").cpu_capability() if loaded() else None
