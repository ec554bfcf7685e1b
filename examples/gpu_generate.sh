#!/usr/bin/env bash
# The demo model generates, in one device call (at most 10 minutes, at most 8 files back under
# $OUT). It builds the extension if that is needed (tools/build_if_missing.sh), trains
# examples/train.py's preset (gpu with CUDA, else cpu) with --attn nsa and with --attn sdpa for
# the given minutes each, then runs examples/generate.py on both checkpoints with --check. From
# the repository root:
#
#     OUT=/writable/dir bash examples/gpu_generate.sh [nsa minutes, default 4] [sdpa minutes, default 3]
#
# Minutes 0 keeps the checkpoint already in runs/<attn>-<preset>/: a warm machine keeps runs/
# between calls, so longer trainings take two calls, e.g. `examples/gpu_demo.sh nsa 7` (which also
# measures the needle) and right after it `examples/gpu_generate.sh 0 6`. The generation runs at GENERATE_LENGTHS (default: generate.py's own, 16k and
# 64k on a GPU), and GENERATE_ARGS adds arguments to it (e.g. "--batch 4 --graphs both").
# TRAIN_ARGS adds arguments to both trainings; RUNS (default runs) holds the checkpoints. Left in
# $OUT: train_nsa.log, train_sdpa.log, generate.log, generate.md and generate.json.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
MIN_NSA=${1:-4}
MIN_SDPA=${2:-3}
OUT=${OUT:-/tmp/nsa_gpu_generate}
mkdir -p "$OUT"
source tools/gpu_run_env.sh
bash tools/build_if_missing.sh || exit 1
PRESET=$("$PY" -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
ckpts=()
for spec in "nsa $MIN_NSA" "sdpa $MIN_SDPA"; do
  set -- $spec
  attn=$1 minutes=$2 run=${RUNS:-runs}/$1-$PRESET
  if [ "$minutes" != 0 ]; then
    # shellcheck disable=SC2086
    "$PY" examples/train.py --attn "$attn" --minutes "$minutes" --out "$run" --no-eval ${TRAIN_ARGS:-} 2>&1 \
      | train_log > "$OUT/train_$attn.log"
    rc=${PIPESTATUS[0]}
    tail -5 "$OUT/train_$attn.log"
    [ "$rc" -eq 0 ] || { echo "training $attn failed (rc $rc)"; exit "$rc"; }
  fi
  [ -f "$run/checkpoint.pt" ] || { echo "no $run/checkpoint.pt (minutes 0 needs an earlier run)"; exit 1; }
  ckpts+=("$run/checkpoint.pt")
done
# shellcheck disable=SC2086
"$PY" examples/generate.py "${ckpts[@]}" --check --out "$OUT" \
  ${GENERATE_LENGTHS:+--lengths $GENERATE_LENGTHS} ${GENERATE_ARGS:-} 2>&1 | tee "$OUT/generate.log"
exit "${PIPESTATUS[0]}"
