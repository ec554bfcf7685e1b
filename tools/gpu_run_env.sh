# Sourced from the repository root by the GPU scripts (examples/gpu_demo.sh, examples/multi_gpu.sh,
# tools/multi_gpu_ab.sh): the environment of their train.py runs, PY, and train_log.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# (NVLink multicast stays off, as the GPU machines require)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}

# train.py's output (stdin) as a log: the progress bar's redraws ("NN%|...") left out, since
# train.py also prints a plain line each tenth.
train_log() { tr '\r' '\n' | grep -vE '^ *[0-9]+%\|'; }
