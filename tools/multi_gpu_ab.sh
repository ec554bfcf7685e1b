#!/usr/bin/env bash
# Variants of examples/train.py side by side on the GPUs of one host, in one device call:
#
#     OUT=/writable/dir bash tools/multi_gpu_ab.sh STEPS <<'END'
#     1gpu     1 -- --batch 8 --data-shards 2
#     ddp      2 -- --batch 4 --dist ddp
#     ddp-1b   2 -- --batch 4 --dist ddp --bucket-mb 1000
#     ddp-ch4  2 NCCL_MAX_NCHANNELS=4 -- --batch 4 --dist ddp
#     END
#
# Each line: a name, the processes (1: python, more: torchrun), environment assignments, "--",
# train.py arguments (after --attn nsa --no-eval --minutes 1000 --steps STEPS; the gpu preset
# on a GPU). Prints ms/step and tokens/s of each over the steps common to all, against the first
# (examples/multi_gpu_summary.py --compare), into $OUT/ab.md too; each run's log and
# metrics_<name>.json go to $OUT/ab.tgz. A variant that leaves no metrics is left out of the
# table, its log's end printed, and the script fails once the table is out. Builds the
# extension if it is not there.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
STEPS=${1:?usage: OUT=dir bash tools/multi_gpu_ab.sh STEPS < variants}
OUT=${OUT:-/tmp/nsa_multi_gpu_ab}
WORK=$(mktemp -d)   # logs and metrics (packed into ab.tgz)
RUNS=$(mktemp -d)   # train.py's --out of each run (checkpoints: left behind)
mkdir -p "$OUT"
source tools/gpu_run_env.sh
bash tools/build_if_missing.sh || exit 1
names=()
failed=()
while read -r name procs rest; do
  [[ -z ${name:-} || $name == \#* ]] && continue
  envs=${rest%%--*}
  args=${rest#*--}
  [[ $rest == *--* ]] || { echo "multi_gpu_ab: line '$name $procs $rest' has no '--'" >&2; exit 2; }
  if [[ $procs == 1 ]]; then cmd=("$PY" examples/train.py)
  else cmd=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$procs" examples/train.py); fi
  echo "=== $name: $envs ${cmd[*]} $args"
  # shellcheck disable=SC2086
  env $envs "${cmd[@]}" --attn nsa --no-eval --minutes 1000 --steps "$STEPS" $args --out "$RUNS/$name" </dev/null \
    2>&1 | train_log > "$WORK/$name.log"
  tail -1 "$WORK/$name.log"
  if cp "$RUNS/$name/metrics.json" "$WORK/metrics_$name.json" 2>/dev/null; then
    names+=("$name")
  else  # its log's end, and the table goes on without it; the script fails at the end
    echo "multi_gpu_ab: $name left no metrics; the end of its log:" >&2
    tail -20 "$WORK/$name.log" >&2
    failed+=("$name")
  fi
done
tar czf "$OUT/ab.tgz" -C "$WORK" .
[[ ${#names[@]} -gt 0 ]] || exit 1
"$PY" examples/multi_gpu_summary.py --compare "$WORK" "${names[@]}" | tee "$OUT/ab.md"
[[ ${#failed[@]} -eq 0 ]] || { echo "multi_gpu_ab: failed: ${failed[*]}" >&2; exit 1; }
