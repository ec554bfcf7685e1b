#!/usr/bin/env bash
# One GPU run of the training demo and its needle evaluation, for the device tool (one call of at
# most 10 minutes, at most 8 files back under $OUT). From the repository root:
#
#     OUT=/writable/dir bash examples/gpu_demo.sh nsa|sdpa [train minutes, default 7]
#
# Builds the extension if --attn nsa needs it and it is not there (tools/build_if_missing.sh), trains
# examples/train.py's gpu preset with --attn nsa or sdpa for the given minutes, evaluates passkey
# retrieval with examples/needle.py at NEEDLE_LENGTHS (default 4096 8192 16384 32768 65536;
# NEEDLE_SAMPLES rows per cell, default 20, NEEDLE_BATCH rows per forward, default 10), and leaves
# in $OUT: train.log, metrics.json, eval.md, loss.png, needle.md, needle_<attn>.png and
# needle_<attn>.json. NEEDLE_MERGE=examples/results/h200/needle_nsa.json adds an earlier run's
# results to needle.md. Extra training arguments: TRAIN_ARGS="--seq 8192 ...".
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
ATTN=${1:?usage: gpu_demo.sh nsa|sdpa [minutes]}
MIN=${2:-7}
OUT=${OUT:-/tmp/nsa_gpu_demo}
mkdir -p "$OUT"
source tools/gpu_run_env.sh
if [ "$ATTN" = nsa ]; then bash tools/build_if_missing.sh || exit 1; fi
RUN=runs/$ATTN-gpu
# shellcheck disable=SC2086
"$PY" examples/train.py --attn "$ATTN" --minutes "$MIN" --out "$RUN" ${TRAIN_ARGS:-} 2>&1 | train_log > "$OUT/train.log"
rc=${PIPESTATUS[0]}
tail -25 "$OUT/train.log"
[ "$rc" -eq 0 ] || exit "$rc"
for f in metrics.json eval.md loss.png; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"; done
# shellcheck disable=SC2086
"$PY" examples/needle.py "$RUN/checkpoint.pt" --lengths ${NEEDLE_LENGTHS:-4096 8192 16384 32768 65536} \
  --samples "${NEEDLE_SAMPLES:-20}" --batch "${NEEDLE_BATCH:-10}" --out "$OUT" \
  ${NEEDLE_MERGE:+--merge $NEEDLE_MERGE}
