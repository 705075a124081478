"""What the Triton families share: interpreter-aware block sizes and the accumulation type."""
import os

import torch
import triton.language as tl

# The interpreter runs each program in numpy, so fewer, larger blocks are much faster there.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def acc_type(dtype: torch.dtype):
    """Triton accumulation type: float64 stays float64, half types and float32 use float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32
