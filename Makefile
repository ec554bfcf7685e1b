# nsa-torch developer commands. `make test` is the test command (CI runs it via .ci/run): it
# installs what it needs, builds the extension and the C++ tests, and runs pytest and ctest.
PYTHON ?= python3
JOBS ?= $(shell nproc)
TORCH_VERSION ?= 2.14.1
CPP_BUILD := build/cpp

.PHONY: test deps build cpp-test py-test bench-cpu demo demo-deps generate clean

test: deps build py-test cpp-test

# Python and Debian packages, each installed only where missing (quick when everything is there;
# no network needed then). torch likewise: an installed torch is kept and tested (a CUDA build of
# the user's or a GPU machine's; >= 2.6), a machine without one (CI's) gets TORCH_VERSION.
PY_PACKAGES := ninja pytest numpy transformers tqdm matplotlib
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)"
	@$(PYTHON) -c "import sys, torch; v = torch.__version__; \
	  sys.exit(tuple(map(int, v.split('.')[:2])) < (2, 6) and f'make: nsa-torch needs torch >= 2.6, the installed torch is {v} ({torch.__file__}); upgrade it or use another Python (make PYTHON=...)')"
	@missing=""; for p in $(PY_PACKAGES); do $(PYTHON) -c "import $$p" 2>/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Python packages:$$missing"; $(PYTHON) -m pip install -q $$missing; fi
	@missing=""; dpkg -s catch2 >/dev/null 2>&1 || missing="$$missing catch2"; \
	command -v cmake >/dev/null || missing="$$missing cmake"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@$(PYTHON) -c "import torch; print(f'testing against torch {torch.__version__} ({torch.__file__}), CUDA ' + (torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available: CUDA tests skip'))"

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

# The training demo (examples/train.py): set-up included. The "gpu" preset when CUDA is there,
# else the "cpu" one (a few minutes on two cores). DEMO_ARGS="--attn sdpa" trains the same model
# with full attention; outputs in runs/<attn>-<preset>/.
DEMO_ARGS ?=
# The whole of `make demo` (set-up, build, training, evaluation) ends within DEMO_SECONDS: training
# gets what the set-up leaves (train.py --finish-by), up to its --minutes (8).
DEMO_SECONDS ?= 570
DEMO_START := $(shell date +%s)
# Builds the extension unless this checkout's is there already (not another checkout's, which an
# earlier editable install may still point to), with its CUDA code only when a GPU is visible
# (a CPU-only build takes ~4 minutes on two cores; the CUDA kernels ~10).
demo: demo-deps
	@$(PYTHON) -c "import os, nsa_torch, nsa_torch._C as c; \
	  assert os.path.dirname(c.__file__) == os.path.dirname(nsa_torch.__file__)" 2>/dev/null || \
	  NSA_BUILD_CUDA=$$($(PYTHON) -c "import torch; print(int(torch.cuda.is_available()))") $(MAKE) build
	$(PYTHON) examples/train.py --finish-by $$(( $(DEMO_START) + $(DEMO_SECONDS) )) $(DEMO_ARGS)

# The passkey by generation with a decoding cache (examples/generate.py), NSA against SDPA, from
# the demo's checkpoints of this machine's preset (runs/nsa-<preset>, runs/sdpa-<preset>: those
# there), checked against a full forward; 16k and 64k prompts on a GPU, 512 and 1024 on the CPU.
# GENERATE_ARGS adds arguments (e.g. "--batch 16"); results in examples/results/<gpu or cpu>/.
GENERATE_ARGS ?=
generate:
	@preset=$$($(PYTHON) -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')"); \
	  ck=$$(ls runs/nsa-$$preset/checkpoint.pt runs/sdpa-$$preset/checkpoint.pt 2>/dev/null); \
	  test -n "$$ck" || { echo "make generate: no runs/nsa-$$preset/ or runs/sdpa-$$preset/ checkpoint:" \
	    "run make demo (and make demo DEMO_ARGS='--attn sdpa') first"; exit 1; }; \
	  $(PYTHON) examples/generate.py $$ck --check $(GENERATE_ARGS)

# (an installed torch is kept: the GPU machines bring their own CUDA build)
demo-deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)"
	@$(PYTHON) -c "import tqdm, matplotlib, ninja" 2>/dev/null || $(PYTHON) -m pip install -q ninja tqdm matplotlib

clean:
	rm -rf build *.egg-info nsa_torch/_C*.so
