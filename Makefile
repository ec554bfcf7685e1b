# nsa-torch developer commands. `make test` is the test command (CI runs it via .ci/run): it
# installs what it needs, builds the extension and the C++ tests, and runs pytest and ctest.
PYTHON ?= python3
JOBS ?= $(shell nproc)
TORCH_VERSION ?= 2.14.1
CPP_BUILD := build/cpp

.PHONY: test deps build cpp-test py-test bench-cpu clean

test: deps build py-test cpp-test

# Python and Debian packages (idempotent: quick when everything is there).
deps:
	$(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)" ninja pytest numpy
	@missing=""; for p in catch2 cmake; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# The extension (CPU kernels, plus the CUDA part when nvcc and a CUDA torch are present).
build:
	MAX_JOBS=$(JOBS) $(PYTHON) -m pip install --no-build-isolation --no-deps -e . 

py-test:
	$(PYTHON) -m pytest -q -ra tests

# Catch2 tests of the torch-free kernels and of the ops through the C++ dispatcher.
cpp-test:
	cmake -S . -B $(CPP_BUILD) -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(CPP_BUILD) -j $(JOBS)
	ctest --test-dir $(CPP_BUILD) --output-on-failure

bench-cpu:
	$(PYTHON) benchmarks/bench_cpu.py

clean:
	rm -rf build *.egg-info nsa_torch/_C*.so
