"""Builds deepspeed_pipe_ext._C against the installed torch.

CppExtension by default: the runtime's device code (streams and events for
host-staged transfers) uses torch's device-generic c10 API, so one build runs
on the CPU and on CUDA. CUDAExtension (adding csrc/cuda/*.cu, defining
DPE_WITH_CUDA) only when there are CUDA kernels, torch has CUDA and nvcc is
found; there are none so far (none has yet been measured to pay).
Build with `pip install --no-build-isolation -e .` so the installed torch is
used. Warnings are on (-Wall); DPE_WERROR=1 makes them errors (make build, make cuda-build).
DPE_SANITIZE=address builds under AddressSanitizer (make test-asan).
"""
import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


cpp_sources = sources("csrc/bindings/*.cpp") + sources("csrc/core/*.cpp") + sources("csrc/runtime/*.cpp")
cuda_sources = sources("csrc/cuda/*.cu")
use_cuda = (torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)
            and os.environ.get("DPE_NO_CUDA", "0") != "1")

# No -std: torch's BuildExtension picks the standard its headers need (C++20 from torch 2.14).
cxx_flags = ["-O3", "-fno-fast-math", "-ffp-contract=off", "-fvisibility=hidden", "-Wall"]
nvcc_flags = ["-O3"]
if os.environ.get("DPE_WERROR", "0") == "1":  # make build, make cuda-build and CI
    cxx_flags += ["-Werror"]
    nvcc_flags += ["-Werror", "all-warnings"]
extra_link_args = []
if os.environ.get("DPE_SANITIZE"):  # make test-asan: an AddressSanitizer build of the whole extension
    cxx_flags += [f"-fsanitize={os.environ['DPE_SANITIZE']}", "-fno-omit-frame-pointer"]
    extra_link_args += [f"-fsanitize={os.environ['DPE_SANITIZE']}"]
define_macros = []
if use_cuda and cuda_sources:
    define_macros.append(("DPE_WITH_CUDA", "1"))
    extension = CUDAExtension(
        "deepspeed_pipe_ext._C",
        cpp_sources + cuda_sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=extra_link_args,
    )
else:
    extension = CppExtension(
        "deepspeed_pipe_ext._C",
        cpp_sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=extra_link_args,
    )

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
