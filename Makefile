# `make demo` and `make test` do everything on a fresh machine: venv, pinned
# deps, build, run. Re-running is fast: each step is a stamp file that is
# redone only when its inputs change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
CXX ?= g++

.PHONY: all deps build test test-fast test-core lint demo bench clean cuda-build gpu-check nccl gpu-wheels package-check test-asan

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Our own builds treat compiler warnings as errors (DPE_WERROR); a user's pip install only shows them.
$(BUILD_STAMP): $(DEPS_STAMP) $(CSRC) setup.py pyproject.toml
	DPE_WERROR=1 MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

deps: $(DEPS_STAMP)
build: $(BUILD_STAMP)

# The torch-free core, built alone under AddressSanitizer and UBSan.
build/core_tests: $(wildcard csrc/core/*.cpp csrc/core/*.h) tests/core/test_core.cpp
	mkdir -p build
	$(CXX) -std=c++17 -O2 -g -fsanitize=address,undefined -fno-sanitize-recover=all -Icsrc \
		csrc/core/*.cpp tests/core/test_core.cpp -o $@

test-core: build/core_tests
	./build/core_tests

# Everything: the C++ core tests, then every tier of tests/ (unit, distributed, gpu).
test: build test-core
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

# ruff over the Python, clang-format (.clang-format) over the C++; CI runs it before the tests.
lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --style=file --dry-run --Werror $$(find csrc tests/core -name '*.cpp' -o -name '*.h')

# The single-process tier only (tests/unit): no ranks, no training processes;
# well under a minute (about 20 s on a 2-core machine; `make test` runs pytest for about 10 min).
test-fast: build
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/unit

# The transfer and failure tests against an AddressSanitizer build of the extension (not part of `make test`:
# the build alone takes about 6 minutes here). The package's Python files and the sanitized _C go to
# build/asan/pkg, first on PYTHONPATH, so the tests' spawned ranks load them too. libstdc++ is preloaded
# with the ASan runtime: python does not link it, and ASan's interceptor of C++ throws needs it at start.
ASAN_TESTS ?= tests/distributed/test_p2p.py tests/unit/test_executor.py tests/distributed/test_faults.py
test-asan: $(DEPS_STAMP)
	DPE_SANITIZE=address DPE_WERROR=1 MAX_JOBS=2 $(PY) setup.py -q build_ext --build-temp build/asan/temp \
		--build-lib build/asan/lib
	rm -rf build/asan/pkg && mkdir -p build/asan/pkg
	cp -r deepspeed_pipe_ext build/asan/pkg/ && rm -f build/asan/pkg/deepspeed_pipe_ext/_C*.so
	cp build/asan/lib/deepspeed_pipe_ext/_C*.so build/asan/pkg/deepspeed_pipe_ext/
	PYTHONPATH=$(CURDIR)/build/asan/pkg LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -p no:cacheprovider --import-mode=append $(ASAN_TESTS)

demo: build
	OMP_NUM_THREADS=1 $(PY) examples/demo.py

bench: build
	$(PY) benchmarks/bench_partition.py
	$(PY) benchmarks/bench_schedule.py
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_schedules.py
	$(PY) benchmarks/bench_torch_pipelining.py
	$(PY) benchmarks/bench_activation_checkpointing.py
	$(PY) benchmarks/bench_failures.py

# The release artifacts as a user gets them: an sdist, a wheel built from that sdist (so the sdist
# must hold everything the build needs; this is also what `pip install` of the sdist does), installed
# into a fresh venv with the pinned torch and deepspeed, which trains one 2-stage step from outside the
# repository. CI runs it after the tests.
PACKAGE_DIR := build/package
package-check: $(DEPS_STAMP)
	rm -rf $(PACKAGE_DIR) && mkdir -p $(PACKAGE_DIR)
	$(PY) setup.py -q sdist -d $(PACKAGE_DIR)
	MAX_JOBS=2 $(PY) -m pip wheel -q --no-build-isolation --no-deps -w $(PACKAGE_DIR) $(PACKAGE_DIR)/deepspeed_pipe_ext-*.tar.gz
	$(PYTHON) -m venv $(PACKAGE_DIR)/venv
	$(PACKAGE_DIR)/venv/bin/python -m pip install -q $$(grep -E '^(torch|deepspeed|numpy)==' requirements-dev.txt)
	$(PACKAGE_DIR)/venv/bin/python -m pip install -q $(PACKAGE_DIR)/deepspeed_pipe_ext-*.whl
	# Its own dir for DeepSpeed's JIT-built CPU comm op, so the two venvs do not rebuild each other's.
	cd $(PACKAGE_DIR) && OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=$(CURDIR)/$(PACKAGE_DIR)/torch_extensions \
		venv/bin/python $(CURDIR)/.ci/package_smoke.py

# Compile-only check of the CUDA variant (not part of `make test`): its own venv
# with torch 2.14.1, the CUDA 13 build on local disk, and the machine's nvcc;
# warnings are errors. Builds into build/cuda, leaving the CPU build alone.
CUDA_VENV := .venv-cuda
# The machine's toolkit has the compiler; the library headers torch's CUDA headers include
# (cuSPARSE, cuBLAS...) come with torch's nvidia wheels.
CUDA_LIBRARY_HEADERS = $(wildcard $(CURDIR)/$(CUDA_VENV)/lib/python3*/site-packages/nvidia/cu13/include)
$(CUDA_VENV)/.deps-stamp:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q torch==2.14.1 numpy==2.4.6 setuptools==84.2.1 ninja==1.13.2
	touch $@

cuda-build: $(CUDA_VENV)/.deps-stamp
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda-13.0} CPLUS_INCLUDE_PATH=$(CUDA_LIBRARY_HEADERS) \
		DPE_WERROR=1 MAX_JOBS=2 $(CUDA_VENV)/bin/python setup.py -q build_ext --build-temp build/cuda/temp \
		--build-lib build/cuda/lib
	$(CUDA_VENV)/bin/python -c "import sys; sys.path.insert(0, 'build/cuda/lib'); import glob; \
		print('built', glob.glob('build/cuda/lib/deepspeed_pipe_ext/_C*.so'))"

# The GPU check (benchmarks/gpu_check.sh): run on a machine with one NVIDIA GPU. It preloads
# build/nccl/libnccl.so.2.xz when `make nccl` built it. Sections that would start after GPU_CHECK_BUDGET_S
# seconds are skipped (and reported), so that the summary comes back within the GPU machine's 10-minute call.
GPU_CHECK_BUDGET_S ?= 360
gpu-check:
	bash benchmarks/gpu_check.sh --budget-s $(GPU_CHECK_BUDGET_S)

# NCCL 2.30+ for sm_90 only (H100/H200), for the GPU check's sections with several ranks on one GPU:
# about 18 minutes on 2 cores, reused once built; NCCL_REPO=<a clone> where GitHub is out of reach.
nccl:
	bash benchmarks/nccl/build_nccl.sh

# What the GPU machine lacks for the GPU check (deepspeed and its dependencies, as CPython 3.12 wheels) in .whl/.
gpu-wheels: $(DEPS_STAMP)
	PYTHON=$(PY) bash benchmarks/gpu_wheels.sh

clean:
	rm -rf build $(VENV) deepspeed_pipe_ext/*.so *.egg-info
