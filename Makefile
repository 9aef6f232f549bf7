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

.PHONY: all deps build test test-core demo bench clean

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(CSRC) setup.py pyproject.toml
	MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
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

test: build test-core
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

demo: build
	OMP_NUM_THREADS=1 $(PY) -m deepspeed_pipe_ext.demo

bench: build
	$(PY) benchmarks/bench_partition.py
	$(PY) benchmarks/bench_schedule.py
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_torch_pipelining.py
	$(PY) benchmarks/bench_checkpointing.py

clean:
	rm -rf build $(VENV) deepspeed_pipe_ext/*.so *.egg-info
