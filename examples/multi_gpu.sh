#!/usr/bin/env bash
# The training demo on N GPUs of one host against one GPU, for the device tool (one call):
#
#     OUT=/writable/dir bash examples/multi_gpu.sh [steps, default 250] [N, default 2]
#
# Builds the extension if it is not there (tools/build_if_missing.sh), then runs
# examples/train.py (gpu preset, --attn nsa, --no-eval, a fixed number of steps so that the curves
# line up step by step); B sequences per process (env B, default 4, the preset's batch):
#   1gpu       1 GPU with --batch NB --data-shards N (the very rows that ddp and fsdp draw)
#   1gpu-part  1 GPU with --batch B --data-shards 1 (what rank 0 of ddp and fsdp does)
#   ddp, fsdp  torchrun N processes with --batch B each, --dist ddp or fsdp (FSDP2)
#   ddp-weak, fsdp-weak
#              N processes with --batch NB each (1gpu's), WEAK_STEPS steps (default 100)
# ~8 min on two H200s at the defaults. Leaves in $OUT each run's metrics.json (as
# metrics_<run>.json) and multi_gpu.md (examples/multi_gpu_summary.py: tokens/s of each over
# common steps, against 1gpu; the loss curves of the runs on the same rows side by side, and the
# noise between them), and runs.log (every run's output). RUNS="1gpu ddp fsdp" picks runs (1gpu,
# the baseline, is always wanted); PROFILE=N profiles N steps of each (train.py --profile: the
# kernels' share of the wall time is printed, the kernel tables go to runs.log; the profiled
# steps run slower and are left out of the throughput);
# TRAIN_ARGS="..." adds train.py arguments to every run (e.g. "--comm-dtype bf16", as measured in
# examples/results/h200/multi_gpu_5d913a1.md; "--device cpu --seq 128 --preset cpu" for a CPU
# smoke test with gloo).
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
STEPS=${1:-250}
N=${2:-2}
B=${B:-4}  # sequences per process (the gpu preset's batch)
WEAK_STEPS=${WEAK_STEPS:-$(( STEPS < 100 ? STEPS : 100 ))}
OUT=${OUT:-/tmp/nsa_multi_gpu}
mkdir -p "$OUT" runs && rm -f "$OUT"/metrics_*.json "$OUT/runs.log"
source tools/gpu_run_env.sh
# (torchrun gives each process one CPU thread: 16 each measured slower on two H200s, 245 against
# 227 ms/step, examples/results/h200/multi_gpu_5d913a1.md)
bash tools/build_if_missing.sh || exit 1
# shellcheck disable=SC2206
COMMON=(--attn nsa --minutes 1000 --no-eval --profile "${PROFILE:-0}" ${TRAIN_ARGS:-})
RUNS=" ${RUNS:-1gpu 1gpu-part ddp fsdp ddp-weak fsdp-weak} "
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$N" examples/train.py)
run() {  # name, train.py or torchrun command...
  local name=$1; shift
  [[ $RUNS == *" $name "* ]] || return 0
  echo "=== $name: $*" | tee -a "$OUT/runs.log"
  "$@" "${COMMON[@]}" --out "runs/mgpu-$name" 2>&1 | train_log > "runs/mgpu-$name.log"
  cat "runs/mgpu-$name.log" >> "$OUT/runs.log"
  grep "^profile of" "runs/mgpu-$name.log"; tail -2 "runs/mgpu-$name.log"
  cp "runs/mgpu-$name/metrics.json" "$OUT/metrics_$name.json" || return 1
}
run 1gpu "$PY" examples/train.py --steps "$STEPS" --batch $(( N * B )) --data-shards "$N" || exit 1
run 1gpu-part "$PY" examples/train.py --steps "$STEPS" --batch "$B" --data-shards 1
run ddp "${TORCHRUN[@]}" --steps "$STEPS" --batch "$B" --dist ddp
run fsdp "${TORCHRUN[@]}" --steps "$STEPS" --batch "$B" --dist fsdp
run ddp-weak "${TORCHRUN[@]}" --steps "$WEAK_STEPS" --batch $(( N * B )) --dist ddp
run fsdp-weak "${TORCHRUN[@]}" --steps "$WEAK_STEPS" --batch $(( N * B )) --dist fsdp
"$PY" examples/multi_gpu_summary.py "$OUT" | tee "$OUT/multi_gpu.md"
