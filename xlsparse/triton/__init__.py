"""Triton kernels, one module per op family. Imported lazily: triton is an optional extra."""
import os

# The interpreter runs each program in numpy, so fewer, larger blocks are much faster there.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
