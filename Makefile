# make test  — fresh virtual environment, torch, build the wheel (CUDA kernels too when nvcc
#              is found), install it, run the test suite against the installed package.
# make demo  — the main job: train Coupled Mamba on the built-in synthetic data (CPU; its
#              own .venv-cpu with a CPU-only torch, the package installed there without
#              CUDA kernels, so .venv-cpu/bin/coupled-mamba works afterwards).
# See docs/building.md for the other targets and the variables.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
# The demo trains on the CPU, so its environment takes torch's CPU-only build (0.9 GB against
# 5.6 GB for the CUDA build `make test` needs). Where no index serves "+cpu" wheels, add
# PyTorch's (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu) or pick another
# DEMO_TORCH_SPEC.
DEMO_VENV ?= .venv-cpu
DEMO_TORCH_SPEC ?= torch==2.13.0+cpu
MAX_JOBS ?= 2
export MAX_JOBS
# torch guesses /usr/local when CUDA_HOME is unset and the link then fails on -lcudart.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
# With no GPU visible, setup.py builds for these archs.
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_PY := $(DEMO_VENV)/bin/python
SOURCES := setup.py pyproject.toml $(shell find csrc include coupled_mamba_ext -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.py' \) 2>/dev/null)

.PHONY: venv wheel install test demo develop cmake-test gpu-check bench clean

venv: $(VENV)/.ready
$(VENV)/.ready:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" numpy pytest tqdm matplotlib ninja setuptools wheel
	touch $@

# Only what the demo runs, and --no-compile: on the 2-core development machine this takes
# 32 s instead of 2 min 8 s for .venv (CPU-only torch: 1 min 15 s; precompiling the
# bytecode of every installed file is 40 s of that, more than a cold import costs the
# demo's two Python processes).
$(DEMO_VENV)/.ready:
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_PY) -m pip install -q --no-compile "$(DEMO_TORCH_SPEC)" numpy tqdm matplotlib ninja setuptools wheel
	touch $@

# The wheel is the unit users install; tests run against it, not the source tree.
wheel: dist/.built
dist/.built: $(VENV)/.ready $(SOURCES)
	rm -rf dist
	$(PIP) wheel --no-build-isolation --no-deps -w dist .
	touch $@

install: $(VENV)/.installed
$(VENV)/.installed: dist/.built
	$(PIP) install -q --force-reinstall --no-deps dist/*.whl
	touch $@

# The pytest script (unlike python -m pytest) keeps the source tree off sys.path, so the
# tests import the installed wheel; the expectations below are checked by the tests.
test: install
	COUPLED_MAMBA_EXPECT_INSTALLED=1 $(if $(CUDA_HOME),COUPLED_MAMBA_EXPECT_ARCHS="$(TORCH_CUDA_ARCH_LIST)") \
	  $(VENV)/bin/pytest -q -rs tests

# The demo runs on the CPU, so it installs the package into .venv-cpu without the CUDA
# kernels (one CPU-only build, under a minute on 2 cores instead of three) against the
# CPU-only torch; `make test` builds and installs the wheel on its own. The previous demo's
# output is replaced.
demo: $(DEMO_VENV)/.ready
	FORCE_CUDA=0 $(DEMO_PY) -m pip install -q --no-build-isolation --no-deps --no-compile .
	rm -rf runs/demo
	$(DEMO_VENV)/bin/coupled-mamba train --data synthetic --out runs/demo --device cpu
	@echo
	@echo "Outputs in runs/demo/: report.md (metrics, learning curves, configuration), results.json, metrics.csv (per epoch), best.pt."
	@echo "Run it again, or on your own MMSA pickle (options: $(DEMO_VENV)/bin/coupled-mamba train --help):"
	@echo "  $(DEMO_VENV)/bin/coupled-mamba train --data /path/to/mosei.pkl --out runs/mosei --device cpu"

# In-place build for working on the code: PYTHONPATH=. then imports the source tree.
develop: $(VENV)/.ready
	$(PY) setup.py build_ext --inplace

cmake-test: $(VENV)/.ready
	cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release
	cmake --build build-cmake -j$(MAX_JOBS)
	ctest --test-dir build-cmake --output-on-failure

gpu-check:
	bash bench/gpu_check.sh

bench: install
	$(VENV)/bin/python bench/bench_scan.py --device cpu

clean:
	rm -rf build dist build-cmake *.egg-info coupled_mamba_ext/_C*.so $(VENV)/.installed
