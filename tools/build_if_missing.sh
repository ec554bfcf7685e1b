#!/usr/bin/env bash
# Builds the extension with its CUDA kernels (pip install -e ., MAX_JOBS default nproc,
# TORCH_CUDA_ARCH_LIST default 9.0a) unless `import nsa_torch._C` already works, for the GPU
# scripts of examples/. Run from the repository root; the log goes to /tmp/nsa_build.log and
# its tail is printed on failure (exit 1).
PY=${PYTHON:-python3}
"$PY" -c "import nsa_torch._C" 2>/dev/null && exit 0
s=$(date +%s)
MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} NSA_BUILD_CUDA=1 \
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . > /tmp/nsa_build.log 2>&1 \
  || { tail -30 /tmp/nsa_build.log; exit 1; }
echo "built the extension in $(( $(date +%s) - s )) s"
