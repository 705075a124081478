"""xlsparse: fused kernels for language-specific subnetworks and sparse fine-tuning."""
from importlib.metadata import PackageNotFoundError, version as _version

from . import _ext, functional, hf, nn, ops, optim
from .diff import SparseDelta, SparseDiff, apply
from .ops import backends

try:
    __version__ = _version("xlsparse")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_ext.loaded()

__all__ = ["__version__", "SparseDelta", "SparseDiff", "apply", "backends", "functional", "hf", "nn", "ops", "optim"]
