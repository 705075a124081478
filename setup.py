"""Build xlsparse._C: the C++ CPU kernels always, the CUDA kernels when torch and a toolkit allow."""
import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def sources(pattern: str) -> list[str]:
    """The files matching csrc/<pattern>, relative to the project (as setuptools wants them)."""
    return [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", pattern)))]


# csrc/cpu/vec/*.cpp are compiled once per CPU capability with ATen's flags (xlsparse/cpu_kernels.h
# says why); other machines than x86-64 build DEFAULT alone.
CPU_CAPABILITIES = {"DEFAULT": []}
if platform.machine() in ("x86_64", "AMD64"):
    CPU_CAPABILITIES["AVX2"] = ["-mavx2", "-mfma"]
    CPU_CAPABILITIES["AVX512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, which also compiles the vec sources once per CPU capability.

    Extensions take flags per extension, not per file: each capability gets its own object folder
    under build_temp (its own ninja file) and its objects are linked in as extra_objects.
    """

    def build_extension(self, ext):
        objects = []
        for name, flags in CPU_CAPABILITIES.items():
            args = dict(ext.extra_compile_args)
            args["cxx"] = args["cxx"] + [f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}"] + flags
            objects += self.compiler.compile(sources("cpu/vec/*.cpp"), output_dir=os.path.join(self.build_temp, name),
                                             macros=ext.define_macros, include_dirs=ext.include_dirs,
                                             extra_postargs=args)
        ext.extra_objects = objects
        ext.depends = objects  # a recompiled object relinks the library
        super().build_extension(ext)


def want_cuda() -> bool:
    if os.environ.get("XLSPARSE_SKIP_CUDA", "0") == "1":
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    files = sources("*.cpp") + sources("cpu/*.cpp")
    # The C++ standard is left to torch: 2.13 wants C++17, 2.14 C++20.
    cxx = ["-O3", "-fopenmp", "-DPy_LIMITED_API=0x03090000"]
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        files += sources("cuda/*.cu")
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-DXLSPARSE_WITH_CUDA"]
        return cpp_extension.CUDAExtension(
            "xlsparse._C",
            files,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DXLSPARSE_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return cpp_extension.CppExtension(
        "xlsparse._C",
        files,
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
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
