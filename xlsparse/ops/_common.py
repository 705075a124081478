"""Small helpers the op families share."""
import torch

from .checks import indices as check_indices  # noqa: F401  (the name xlsparse.nn imports)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
