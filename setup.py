"""Build xlsparse._C: the C++ CPU kernels always, the CUDA kernels when torch and a toolkit allow."""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("XLSPARSE_SKIP_CUDA", "0") == "1":
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    sources = [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))]
    # The C++ standard is left to torch: 2.13 wants C++17, 2.14 C++20.
    cxx = ["-O3", "-fopenmp", "-DPy_LIMITED_API=0x03090000"]
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        sources += [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))]
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-DXLSPARSE_WITH_CUDA"]
        return cpp_extension.CUDAExtension(
            "xlsparse._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DXLSPARSE_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return cpp_extension.CppExtension(
        "xlsparse._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


setup(
    # Every subpackage is found, so a new one cannot be left out of the wheel; the benchmarks
    # ship as xlsparse.benchmarks for `xlsparse bench`.
    packages=find_packages(include=["xlsparse", "xlsparse.*"]) + ["xlsparse.benchmarks"],
    package_dir={"xlsparse.benchmarks": "benchmarks"},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
