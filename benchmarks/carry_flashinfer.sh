#!/usr/bin/env bash
# Puts into .whl/ what bench_decode.py's FlashInfer rows need on the GPU machine, which fetches
# no packages and takes at most 64 MiB with a call:
#   - flashinfer-python and apache-tvm-ffi for that machine's Python. FlashInfer compiles its
#     kernels on first use, so a version whose wheel ships no kernels (0.5.3: 7 MB) travels;
#     its imports need nothing else that the machine lacks.
#   - the kernel module the benchmark runs (paged decode on tensor cores, i.e. FlashInfer's
#     prefill kernel with one query row per sequence; bf16, head dim 128), compiled here for
#     sm_90a and packed as a flashinfer_jit_cache wheel, the ahead-of-time channel FlashInfer
#     loads before it would compile, so the call spends no time on it.
#
#     bash benchmarks/carry_flashinfer.sh        # FLASHINFER_VERSION=0.5.3 TARGET_PY=3.12
#
# Then name .whl in the call's carry; gpu_check.sh installs .whl/*.whl into /tmp/site. Needs nvcc
# here (the module takes a minute or two on two cores) and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
FI=${FLASHINFER_VERSION:-0.5.3}
TVM=${TVM_FFI_VERSION:-0.1.15.post2}
TARGET_PY=${TARGET_PY:-3.12}
PY=${PYTHON:-python3}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p .whl
rm -f .whl/flashinfer_python-*.whl .whl/apache_tvm_ffi-*.whl .whl/flashinfer_jit_cache-*.whl

# 1. the wheels for the GPU machine's Python
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  -d .whl "flashinfer-python==$FI" "apache-tvm-ffi==$TVM"

# 2. the same versions for this Python, to compile the module with
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WORK/local" "apache-tvm-ffi==$TVM"
"$PY" -m pip install -q --no-deps --target "$WORK/site" .whl/flashinfer_python-*.whl \
  "$WORK"/local/apache_tvm_ffi-*.whl
# FlashInfer links with -lcuda; this machine has no driver, so a stub of libcuda stands in (the
# module then resolves the driver's symbols where they are loaded).
mkdir -p "$WORK/stubs"
echo "" | gcc -shared -Wl,-soname,libcuda.so.1 -o "$WORK/stubs/libcuda.so" -x c -

# 3. compile the module and pack it
PYTHONPATH="$WORK/site" FLASHINFER_WORKSPACE_BASE="$WORK/ws" FLASHINFER_CUDA_ARCH_LIST=9.0a \
  CUDA_HOME="$CUDA_HOME" LIBRARY_PATH="$WORK/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}" \
  MAX_JOBS=${MAX_JOBS:-2} "$PY" - "$FI" <<'EOF'
import base64, hashlib, io, sys, zipfile
import torch
from flashinfer.jit.attention.modules import gen_batch_prefill_module

version = sys.argv[1]
bf = torch.bfloat16
# The arguments bench_decode.py's wrapper.plan() passes with tensor cores (decode.py,
# get_batch_prefill_module): q, kv and o bf16, int32 indices, head dims 128, no rotary, no
# sliding window, no soft cap, no fp16 reduction.
specs = [gen_batch_prefill_module("fa2", bf, bf, bf, torch.int32, 128, 128, 0, False, False, False)]
files = {"flashinfer_jit_cache/__init__.py": (
    f'"""FlashInfer {version} modules for sm_90a, made by nsa-torch\'s '
    'benchmarks/carry_flashinfer.sh."""\n'
    "import os\n\n"
    f'__version__ = "{version}+sm90a"\n\n\n'
    "def get_jit_cache_dir():\n"
    "    return os.path.dirname(os.path.abspath(__file__))\n").encode()}
for spec in specs:
    print("compiling", spec.name, flush=True)
    spec.build(verbose=False)
    files[f"flashinfer_jit_cache/{spec.name}/{spec.name}.so"] = spec.jit_library_path.read_bytes()
name = f"flashinfer_jit_cache-{version}+sm90a"
info = f"flashinfer_jit_cache-{version}+sm90a.dist-info"
files[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: flashinfer-jit-cache\n"
                             f"Version: {version}+sm90a\n").encode()
files[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: nsa-torch\nRoot-Is-Purelib: true\n"
                          b"Tag: py3-none-any\n")
record = "".join(
    f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b'=').decode()},"
    f"{len(b)}\n" for p, b in files.items()) + f"{info}/RECORD,,\n"
files[f"{info}/RECORD"] = record.encode()
with zipfile.ZipFile(f".whl/{name}-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as z:
    for p, b in files.items():
        z.writestr(p, b)
EOF
ls -la .whl
du -sh .whl
