"""The one table of op implementations: which backends implement each op, and which one runs.

Every op has a `reference` (pure PyTorch) implementation, given when the op is defined. The
compiled C++ library adds `cpu` and `cuda` (the same `torch.ops.xlsparse.<op>`, whose dispatcher
picks the kernel by device). Triton implementations register themselves: `xlsparse/triton/*.py`
call `register(op, "triton", fn)` when imported, and this module imports the `xlsparse.triton`
package lazily, by name, the first time a Triton implementation is looked for. So `ops` never
imports `triton` and `triton` needs only this public module. A new backend of one op is its
kernel plus one `register` line.

Selection, per call, from the device of the op's tensors: `XLSPARSE_BACKEND` if set (an op that
has no kernel of that backend by design, such as `merge_deltas` on Triton, runs its reference);
else CPU tensors run `cpu`, CUDA tensors `cuda`, then `triton`; `reference` when nothing compiled
is there. Meta tensors run the compiled op's fake impl (shapes only).

Why the Triton kernels stay separate `triton_op`s (`xlsparse::triton_sddmm`, ...) rather than
becoming the CUDA kernel of `xlsparse::sddmm`: an op registered with `triton_op` and
`wrap_triton` is transparent to `torch.compile`, which traces into the Triton kernel and can
schedule it with the surrounding Inductor code; a Triton kernel registered as the CUDA kernel of
the C++-defined op would be an opaque call like the CUDA C++ one, and would take the CUDA
dispatch key that the CUDA C++ kernel already holds, so only one of the two could be installed.
Keeping it a separate op also lets the tests run it on CPU tensors under TRITON_INTERPRET=1.
The cost is a second op name per op; this table hides it: callers name the logical op, the
checks (xlsparse/ops/checks.py), fake impls and autograd are the same for both.
"""
import importlib
import os
import warnings
from typing import Callable

import torch

from .. import _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")
# The backends tried, in order, for tensors of each device type when XLSPARSE_BACKEND is unset.
DEFAULT_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
# backend -> the package whose import registers it (imported on first need).
_HOOKS = {"triton": "xlsparse.triton"}

_TABLE: dict[str, dict[str, Callable]] = {}
_DESIGNED: dict[str, tuple[str, ...]] = {}  # op -> the backends that implement it by design
_AUTOGRAD: dict[str, tuple[Callable, Callable]] = {}
_COMPILED: dict[tuple[str, str], Callable] = {}  # (op, backend) -> its kernel from the C++ library
_hooks_run: set[str] = set()


def define(op: str, reference: Callable, *, backends=BACKENDS, backward=None, setup_context=None) -> None:
    """Declare `op` with its reference implementation; register the compiled C++ kernels present.

    `backends` lists the backends that implement the op by design. `backward`/`setup_context`
    give the op's autograd; it is attached to every compiled and Triton implementation."""
    _TABLE[op] = {"reference": reference}
    _DESIGNED[op] = tuple(backends)
    if backward is not None:
        _AUTOGRAD[op] = (backward, setup_context)
        _TABLE[op]["reference"] = _with_backward(reference, backward, setup_context)
    if not _ext.loaded():
        return
    for backend, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        if _ext.has_kernel(op, key):
            _TABLE[op][backend] = getattr(torch.ops.xlsparse, op)
            _COMPILED[op, backend] = _TABLE[op][backend]
    if backward is not None:
        torch.library.register_autograd(f"xlsparse::{op}", backward, setup_context=setup_context)


def _with_backward(forward: Callable, backward: Callable, setup_context: Callable) -> Callable:
    """`forward` (plain PyTorch) differentiated by the op's own backward, as the kernels are, rather
    than by autograd through its ops: every backend then has the same gradients (and the same
    handling of −inf)."""

    class Differentiable(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return forward(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    return Differentiable.apply


def register(op: str, backend: str, fn: Callable) -> None:
    """Install `fn` as the `backend` implementation of `op` (a Triton launcher, a new kernel...)."""
    if op not in _TABLE:
        raise KeyError(f"register: unknown op {op!r}; known: {sorted(_TABLE)}")
    if backend not in BACKENDS:
        raise ValueError(f"register: backend must be one of {BACKENDS}, got {backend!r}")
    _TABLE[op][backend] = fn
    if op in _AUTOGRAD and hasattr(fn, "register_autograd"):
        backward, setup_context = _AUTOGRAD[op]
        fn.register_autograd(backward, setup_context=setup_context)


def _run_hooks() -> None:
    for backend, module in _HOOKS.items():
        if backend in _hooks_run:
            continue
        _hooks_run.add(backend)
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - triton is an optional extra; a broken install is absent
            warnings.warn(f"xlsparse: the {backend} kernels are unavailable ({type(exc).__name__}: {exc})",
                          RuntimeWarning, stacklevel=3)


def ops(backend: str | None = None) -> list[str]:
    """Every op name in the table, or those that `backend` implements by design."""
    return [op for op in _TABLE if backend is None or backend in _DESIGNED[op]]


def implementations(op: str, hooks: bool = True) -> dict[str, Callable]:
    """{backend: fn} of the implementations of `op` installed in this process (with `hooks`, after
    importing the lazily registered backends)."""
    if hooks:
        _run_hooks()
    return _TABLE[op]


def runs_on(backend: str, device: torch.device) -> bool:
    """Whether `backend` can run tensors of `device` at all in this process."""
    if backend == "reference":
        return True
    if backend in ("cpu", "cuda"):
        return device.type == backend
    # Triton runs CUDA tensors, and CPU tensors under its interpreter.
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")


def usable(op: str, device: torch.device) -> list[str]:
    """The backends that can run `op` on `device` here (the tests' backend matrix)."""
    return [b for b in BACKENDS if b in implementations(op) and runs_on(b, device)]


def backend_for(op: str, device: torch.device) -> str:
    """The backend that runs `op` on `device`: XLSPARSE_BACKEND if set, else the fastest present."""
    forced = os.environ.get("XLSPARSE_BACKEND", "").strip().lower()
    # CPU tensors never default to Triton: they do not pay its import unless it is asked for.
    table = implementations(op, hooks=forced == "triton" or device.type == "cuda")
    if device.type == "meta":
        return "cpu" if "cpu" in table else "reference"
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"XLSPARSE_BACKEND={forced!r} is not one of {BACKENDS}")
        if forced not in _DESIGNED[op]:
            return "reference"
        if forced not in table or not runs_on(forced, device):
            raise RuntimeError(f"XLSPARSE_BACKEND={forced} cannot run {op} on {device.type} tensors here "
                               f"(installed for this op: {sorted(table)}; Triton on CPU needs TRITON_INTERPRET=1)")
        return forced
    for backend in DEFAULT_ORDER.get(device.type, ()):
        if backend in table:
            return backend
    return "reference"


# torch.compile evaluates the choice once while tracing and keeps it as a constant. The mark is
# the attribute torch.compiler.assume_constant_result sets (tests/test_packaging.py checks that it
# is the same): calling the decorator imports torch._dynamo, 2 of `import xlsparse`'s 4 s.
backend_for._dynamo_marked_constant = True


def compiled(op: str, device: torch.device) -> bool:
    """Whether `op` runs a compiled C++ kernel on `device` here. Those check their indices
    (sorted, unique, in range) themselves, in one parallel pass, before any write, so the wrappers
    skip the same pass in Python (8 ms of a 75 ms apply at XLM-R size)."""
    backend = backend_for(op, device)
    return (op, backend) in _COMPILED and _TABLE[op][backend] is _COMPILED[op, backend]


def call(op: str, device: torch.device, *args):
    """Run `op` on the backend chosen for `device`. The tensors an op writes in place have their
    version counters bumped by the dispatcher (csrc/ops.cpp's ADInplaceOrView kernels; Triton's
    ops by their mutates_args), so autograd sees an in-place change of a saved tensor."""
    backend = backend_for(op, device)
    return _TABLE[op][backend](*args)  # backend_for ran the hooks it needed


def backends() -> dict[str, dict[str, bool]]:
    """For every op, which compiled backends this install has: {op: {"cpu", "cuda", "triton"}}."""
    return {op: {b: b in implementations(op) for b in ("cpu", "cuda", "triton")} for op in _TABLE}
