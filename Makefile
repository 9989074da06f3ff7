# make test  — fresh virtual environment, torch, build the wheel (CUDA kernels too when nvcc
#              is found), install it, run the test suite against the installed package.
# make demo  — the main job: train Coupled Mamba on the built-in synthetic data (CPU; its
#              own .venv-cpu with a CPU-only torch, the extension built in place without
#              CUDA kernels).
# See docs/building.md for the other targets and the variables.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
# The demo trains on the CPU, so its environment takes torch's CPU-only build: 1.1 GB that
# install in about 1 min 20 s on the 2-core development machine, against 5.6 GB and 2 min 10 s
# for the CUDA build `make test` needs. Where no index serves "+cpu" wheels, add PyTorch's
# (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu) or pick another DEMO_TORCH_SPEC.
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

# $(call new_venv,DIR,TORCH_SPEC): a virtual environment with that torch and what the
# package, its build and its tests need.
define new_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q "$(2)" numpy pytest tqdm matplotlib ninja setuptools wheel
	touch $(1)/.ready
endef

venv: $(VENV)/.ready
$(VENV)/.ready:
	$(call new_venv,$(VENV),$(TORCH_SPEC))

$(DEMO_VENV)/.ready:
	$(call new_venv,$(DEMO_VENV),$(DEMO_TORCH_SPEC))

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

# The demo runs on the CPU, so it builds the extension in place without the CUDA kernels
# (under a minute on 2 cores instead of three) against the CPU-only torch and runs it from
# the source tree; `make test` builds and installs the wheel on its own. One OpenMP thread:
# on a 2-core machine two threads per op run slower than one here (docs/training.md). The
# previous demo's output is replaced.
demo: $(DEMO_VENV)/.ready
	FORCE_CUDA=0 $(DEMO_PY) setup.py -q build_ext --inplace
	rm -rf runs/demo
	OMP_NUM_THREADS=1 PYTHONPATH=. $(DEMO_PY) -m coupled_mamba_ext train --data synthetic --out runs/demo --device cpu

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
