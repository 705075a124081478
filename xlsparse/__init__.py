"""xlsparse: fused kernels for language-specific subnetworks and sparse fine-tuning."""
from . import _ext, functional, hf, nn, ops, optim
from ._version import __version__
from .diff import SparseDelta, SparseDiff, apply
from .ops import backends

_ext.loaded()

__all__ = ["__version__", "SparseDelta", "SparseDiff", "apply", "backends", "functional", "hf", "nn", "ops", "optim"]
