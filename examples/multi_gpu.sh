#!/usr/bin/env bash
# The training demo on N GPUs of one host against one GPU, for the device tool (one call):
#
#     OUT=/writable/dir bash examples/multi_gpu.sh [steps, default 120] [N, default 2]
#
# Builds the extension if it is not there (tools/build_if_missing.sh), then runs
# examples/train.py (gpu preset, --attn nsa, --no-eval, a fixed number of steps so that the curves
# line up step by step):
#   1 GPU with --batch 4N --data-shards N (the very rows that the N processes below draw), then
#   torchrun N processes with --batch 4 each, --dist ddp, again with --dist fsdp (FSDP2), and
#   with --dist fsdp --fsdp-reshard (FSDP2's default of gathering parameters again for backward).
# Leaves in $OUT the four metrics.json (as metrics_<run>.json) and multi_gpu.md: tokens per
# second of each (scaling = N-GPU tokens/s over the 1-GPU run's at the same global batch) and
# the mean loss over windows of steps for each run side by side. TRAIN_ARGS="..." adds train.py
# arguments to every run (e.g. "--device cpu --seq 128" for a CPU smoke test with gloo);
# RUNS="1gpu ddp fsdp" picks runs (default all four; 1gpu is the baseline, always wanted).
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
STEPS=${1:-120}
N=${2:-2}
OUT=${OUT:-/tmp/nsa_multi_gpu}
mkdir -p "$OUT" && rm -f "$OUT"/metrics_*.json
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# (NVLink multicast stays off, as the GPU machines require)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}
bash tools/build_if_missing.sh || exit 1
# shellcheck disable=SC2206
COMMON=(--attn nsa --steps "$STEPS" --minutes 1000 --no-eval ${TRAIN_ARGS:-})
RUNS=" ${RUNS:-1gpu ddp fsdp fsdp-reshard} "
run() {  # name, command...
  local name=$1; shift
  [[ $RUNS == *" $name "* ]] || return 0
  echo "=== $name: $*"
  "$@" 2>&1 | tr '\r' '\n' | grep -vE '^ *[0-9]+%\|' | tail -3
  cp "runs/mgpu-$name/metrics.json" "$OUT/metrics_$name.json" || return 1
}
run 1gpu "$PY" examples/train.py "${COMMON[@]}" --batch $(( 4 * N )) --data-shards "$N" --out runs/mgpu-1gpu || exit 1
run ddp "$PY" -m torch.distributed.run --standalone --nproc-per-node "$N" examples/train.py \
  "${COMMON[@]}" --batch 4 --dist ddp --out runs/mgpu-ddp
run fsdp "$PY" -m torch.distributed.run --standalone --nproc-per-node "$N" examples/train.py \
  "${COMMON[@]}" --batch 4 --dist fsdp --out runs/mgpu-fsdp
run fsdp-reshard "$PY" -m torch.distributed.run --standalone --nproc-per-node "$N" examples/train.py \
  "${COMMON[@]}" --batch 4 --dist fsdp --fsdp-reshard --out runs/mgpu-fsdp-reshard
"$PY" - "$OUT" <<'PYEOF' | tee "$OUT/multi_gpu.md"
import json, os, sys
out = sys.argv[1]
runs = {n: json.load(open(os.path.join(out, f"metrics_{n}.json")))
        for n in ("1gpu", "ddp", "fsdp", "fsdp-reshard") if os.path.exists(os.path.join(out, f"metrics_{n}.json"))}
base = runs["1gpu"]["tokens_per_second"]
print("| run | processes | global tokens/step | ms/step | tokens/s | scaling |\n|---|---|---|---|---|---|")
for n, m in runs.items():
    print(f"| {n} | {m['processes']} | {m['tokens_per_step']} | "
          f"{m['step_seconds'] * 1000:.0f} | {m['tokens_per_second']} | {m['tokens_per_second'] / base:.2f}x |")
steps = min(len(m["losses"]) for m in runs.values())
w = max(1, steps // 8)
print(f"\nEvery run trains on the same rows (--data-shards). Mean loss over windows of {w} steps:\n")
print("| steps | " + " | ".join(runs) + " |\n|---|" + "---|" * len(runs))
for s in range(0, steps - w + 1, w):
    print(f"| {s + 1}-{s + w} | " + " | ".join(f"{sum(m['losses'][s:s + w]) / w:.3f}" for m in runs.values()) + " |")
# The noise: DDP and FSDP2 compute the same steps (same rows, same per-process batch) and differ
# only in rounding and in the order of reductions, so their difference is the yardstick.
print("\nMean (largest) per-step loss difference between runs; the N-process runs against each other"
      " are the noise:\n")
names = list(runs)
print("| | " + " | ".join(names[1:]) + " |\n|---|" + "---|" * (len(names) - 1))
for i, a in enumerate(names[:-1]):
    cells = []
    for j, b in enumerate(names[1:], 1):
        d = [abs(x - y) for x, y in zip(runs[a]["losses"][:steps], runs[b]["losses"][:steps])]
        cells.append(f"{sum(d) / len(d):.4f} ({max(d):.3f})" if j > i else "")
    print(f"| {a} | " + " | ".join(cells) + " |")
PYEOF
