"""The CPU kernels compiled per instruction set: every set this CPU runs passes the float64 op
tests, and XLSPARSE_CPU_CAPABILITY refuses a set that is unknown or beyond the CPU."""
import os
import platform
import subprocess

import pytest

from conftest import child_python
from xlsparse import _ext

pytestmark = pytest.mark.skipif(not _ext.loaded(), reason="needs the compiled extension")

HERE = os.path.dirname(os.path.abspath(__file__))
# /proc/cpuinfo flags each set needs: setup.py's compiler flags, cpu_capability.cpp's check.
NEEDS = {"default": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def runs_here(capability: str) -> bool:
    x86 = platform.machine() in ("x86_64", "AMD64")
    return capability == "default" or (x86 and NEEDS[capability] <= cpu_flags())


def child_env(capability: str) -> dict[str, str]:
    return {**os.environ, "XLSPARSE_CPU_CAPABILITY": capability}


def test_the_default_choice_is_the_best_set_the_cpu_runs():
    best = next(c for c in ("avx512", "avx2", "default") if runs_here(c))
    env = {k: v for k, v in os.environ.items() if k != "XLSPARSE_CPU_CAPABILITY"}
    out = subprocess.run(child_python("-c", "from xlsparse import _ext; print(_ext.cpu_capability())"), env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == [best]


@pytest.mark.parametrize("capability", list(NEEDS))
def test_each_set_matches_float64(capability):
    """The op tests that compare the cpu backend with float64 (and gradcheck, the double loops),
    run in a child process on one kernel set."""
    if not runs_here(capability):
        pytest.skip(f"this CPU cannot run the {capability} kernels")
    if capability == _ext.cpu_capability():
        pytest.skip("the rest of the suite runs this set, in this process")
    tests = [os.path.join(HERE, f) for f in ("test_matmul.py", "test_optim.py")]
    cmd = child_python("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests,
                       "-k", "cpu and (float64 or gradcheck or matches_torch or per_language)")
    chosen = subprocess.run(child_python("-c", "from xlsparse import _ext; print(_ext.cpu_capability())"),
                            env=child_env(capability), capture_output=True, text=True, check=True).stdout
    assert chosen.split() == [capability]
    run = subprocess.run(cmd, env=child_env(capability), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


@pytest.mark.parametrize("value,says", [("avx9000", "is unknown"), ("sse", "is unknown")]
                         + [(c, "lacks the instructions") for c in NEEDS if not runs_here(c)])
def test_refused_value_names_the_variable(value, says):
    run = subprocess.run(child_python("-c", "import xlsparse"), env=child_env(value), capture_output=True, text=True)
    assert run.returncode != 0
    assert "ValueError" in run.stderr and f"XLSPARSE_CPU_CAPABILITY={value}" in run.stderr and says in run.stderr
