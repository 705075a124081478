"""The helpers of tests/conftest.py under a module name of their own.

`from conftest import ...` resolves to whichever conftest pytest imported last (tests/hf has one
too), so these tests load the root conftest by path instead.
"""
import importlib.util
import os
import sys

_NAME = "xlsparse_tests_root_conftest"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, os.path.join(os.path.dirname(__file__), "..", "conftest.py"))
    sys.modules[_NAME] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_NAME])
root = sys.modules[_NAME]
assert_bit_identical = root.assert_bit_identical
cpu_backends = root.cpu_backends
