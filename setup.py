"""Builds deepspeed_pipe_ext._C against the installed torch.

CppExtension by default; CUDAExtension (adding csrc/cuda/*.cu) only when the
installed torch has CUDA and nvcc is found. Build with
`pip install --no-build-isolation -e .` so the installed torch is used.
"""
import glob
import os
import shutil

from setuptools import setup
import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

HERE = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


cpp_sources = sources("csrc/bindings.cpp") + sources("csrc/core/*.cpp") + sources("csrc/runtime/*.cpp")
cuda_sources = sources("csrc/cuda/*.cu")
use_cuda = (torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)
            and os.environ.get("DPE_NO_CUDA", "0") != "1")

cxx_flags = ["-O3", "-std=c++17", "-fno-fast-math", "-ffp-contract=off"]
define_macros = []
if use_cuda and cuda_sources:
    define_macros.append(("DPE_WITH_CUDA", "1"))
    extension = CUDAExtension(
        "deepspeed_pipe_ext._C",
        cpp_sources + cuda_sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
    )
else:
    extension = CppExtension(
        "deepspeed_pipe_ext._C",
        cpp_sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
    )

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
