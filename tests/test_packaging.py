"""What a user installs: every subpackage importable, the version, an sdist that can build."""
import importlib
import importlib.util
import os
import pkgutil
import subprocess
import sys
import tarfile

import pytest

from conftest import child_python

import xlsparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_subpackage_imports():
    names = [m.name for m in pkgutil.walk_packages(xlsparse.__path__, "xlsparse.")]
    for sub in ("xlsparse.hf", "xlsparse.hf.lt_sft", "xlsparse.hf.subnetworks", "xlsparse.hf.continual",
                "xlsparse.hf.arithmetic", "xlsparse.hf.xelm", "xlsparse.ops", "xlsparse.triton", "xlsparse.benchmarks"):
        assert importlib.util.find_spec(sub) is not None, sub
    if importlib.util.find_spec("triton") is None:  # the optional `triton` extra: its kernel modules need it
        names = [n for n in names if n != "xlsparse.triton" and not n.startswith("xlsparse.triton.")]
    for name in names:
        importlib.import_module(name)


def test_source_packages_are_all_in_the_distribution():
    """Every folder of the source tree with an __init__.py is a package setup.py ships."""
    if not os.path.exists(os.path.join(ROOT, "setup.py")):
        pytest.skip("not a source tree")
    on_disk = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, files in os.walk(os.path.join(ROOT, "xlsparse"))
               if "__init__.py" in files}
    from setuptools import find_packages
    assert on_disk <= set(find_packages(ROOT, include=["xlsparse", "xlsparse.*"]))


@pytest.mark.parametrize("module", ["xlsparse", "xlsparse.cli"])
def test_version_on_the_command_line(module):
    out = subprocess.run(child_python("-m", module, "--version"), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"xlsparse {xlsparse.__version__}"
    assert xlsparse.__version__ != "0.0.0+unknown"


def test_import_leaves_torch_dynamo_unloaded():
    """`import xlsparse` (and the CLI's startup) does not pay torch._dynamo's import, about 2 s of 4."""
    code = "import sys, xlsparse, xlsparse.hf, xlsparse.cli; print('torch._dynamo' in sys.modules)"
    out = subprocess.run(child_python("-c", code), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_backend_for_carries_torchs_constant_result_mark():
    """torch.compile keeps the backend choice as a constant: backend_for carries every attribute
    that torch.compiler.assume_constant_result sets (it is set by hand, to spare the import)."""
    import torch

    from xlsparse.ops import registry

    def probe():
        return None

    marks = vars(torch.compiler.assume_constant_result(probe))
    assert marks
    assert {k: getattr(registry.backend_for, k, None) for k in marks} == marks


def test_sdist_holds_the_sources_and_headers(tmp_path):
    if not os.path.exists(os.path.join(ROOT, "setup.py")):
        pytest.skip("not a source tree")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    (sdist,) = tmp_path.glob("xlsparse-*.tar.gz")
    members = tarfile.open(sdist).getnames()
    for header in os.listdir(os.path.join(ROOT, "csrc", "include", "xlsparse")):
        assert any(m.endswith(f"csrc/include/xlsparse/{header}") for m in members), header
    assert any(m.endswith("csrc/ops.cpp") for m in members)
    assert any(m.endswith("xlsparse/hf/model.py") for m in members)
