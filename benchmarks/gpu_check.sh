#!/usr/bin/env bash
# One GPU round in one go, on the GPU machine, from the repository root:
#
#     OUT=/writable/dir bash benchmarks/gpu_check.sh [build] [tests] [sanitize] [profile] [dprofile] [ab]
#         [latency] [bench] [baseline] [layer] [decode]
#
# Stages (default: build tests sanitize bench, in this order; profile, dprofile, ab, latency,
# layer and decode only when named):
#   build     pip install -e . with the CUDA kernels (sm_90a), log in $OUT/build.log
#   tests     pytest -m cuda tests: every CUDA-marked test of the suite (the ops against the
#             float64 reference, kernel variants, errors, non-finite inputs, the layer against CPU
#             float64, ...), log in $OUT/tests.log
#   sanitize  compute-sanitizer memcheck and racecheck on the small CUDA cases (`-k sanitize`:
#             tests/test_cuda_sanitize.py, the CUDA cases of tests/test_gated_sum.py, and the
#             decode step's small ones in tests/test_decode_op.py)
#             (PyTorch's caching allocator off, so that every tensor is its own allocation and an
#             out-of-bounds access is seen), log in $OUT/sanitize.log
#   profile   Nsight Compute on every NSA kernel of one nsa_attention forward + backward
#             (tools/profile_nsa.py; speed of light, occupancy, warp stalls), or of one decode
#             step with NSA_PROFILE_DECODE, log in $OUT/profile.log
#   dprofile  the decode step's timeline over CUDA-graph replays (tools/profile_decode.py: when
#             each kernel ends, what it adds to the step; --trace: when each kernel's thread
#             blocks pass their phases), then Nsight Compute on each
#             decode_attention kernel on its own (time, DRAM and SM throughput, registers;
#             tools/ncu_kernel_times.py), log in $OUT/profile.log, the tables in the summary
#   ab        tools/ab_kernels.py: the kernel kinds of nsa_torch._debug.force side by side
#             (NSA_AB_SWITCHES="fwd bwd", NSA_AB_T=65536, NSA_AB_CONFIGS=g16), log at the head of
#             $OUT/bench.log
#   latency   tools/gpu_latency.cu, compiled with nvcc and run (no build needed): how fast N thread
#             blocks stream into shared memory by ring depth and load kind, dependent L2 loads idle
#             and beside a full stream, a counter hand-off between SMs, cluster barriers and DSMEM
#             loads; its tables in $OUT/bench.log and the summary
#   bench     benchmarks/bench_attention.py, log in $OUT/bench.log, CSV and PNG in $OUT
#   baseline  the no-regression check of a change: the tree before it ($NSA_BASELINE_DIR, default
#             .baseline: e.g. `git archive BASE | tar -x -C .baseline`, carried with the call) is
#             built beside this one during `build`, its bench_attention.py runs in its own process
#             right after this tree's `bench` with the same lengths, configs and arguments, and
#             benchmarks/compare_bench.py compares the two trees' speed-ups over their own cuDNN
#             (fails beyond 3%); log appended to $OUT/bench.log, its CSV as $OUT/baseline.csv
#   layer     benchmarks/bench_layer.py (one NativeSparseAttention layer against the same layer
#             with SDPA, peak memory of both; only when named), log appended to $OUT/bench.log
#   decode    benchmarks/bench_decode.py (one decode step of one layer's attention at 8k..128k,
#             B = 1, 16, 64, against dense decoding and mdy666's NSA decode, CUDA graphs; only
#             when named), log appended to $OUT/bench.log, its CSV in $OUT (not its PNG: redraw it
#             with --plot-only), its table and the issue's targets last in the summary
# Then a summary (stage, status, pytest counts, seconds, the benchmark's table) is printed last
# and written to $OUT/summary.txt. At most 8 files land in $OUT (what the run tool brings back).
#
# Environment:
#   NSA_BUDGET_S=560        seconds for the whole run; each stage gets what is left minus the
#                           minimum reserved for the stages after it, and is stopped at its limit
#   NSA_MIN_S="sanitize=90 decode=30"   those minimums, for smaller selections (defaults: MIN_S)
#   NSA_BUILD_FLOOR_S=240   the build's limit at least (or what is left of the budget), whatever
#                           the later stages' minimums: a stopped build ends the run
#   NSA_LONG_TESTS=1        also run test_long_* (T = 8192, 65536, 131072; minutes)
#   NSA_TEST_ARGS=...       extra pytest arguments for the tests stage (e.g. "-x"; split on
#                           spaces, so no quoted -k here: use NSA_TEST_K)
#   NSA_TEST_K="split or nsa"   pytest -k expression selecting the CUDA tests to run
#   NSA_SANITIZE_TOOLS="memcheck racecheck"   (also: initcheck synccheck)
#   NSA_SANITIZE_K="sanitize or ..."   pytest -k expression of the memcheck (and other tools')
#                           run (default below: the small cases, the decode step's included)
#   NSA_RACECHECK_K="..."   the same for racecheck (slow; default below)
#   NSA_SANITIZE_KERNELS=decode_   only kernels whose name holds this are checked (the others
#                           run unchecked: much faster racecheck of one family)
#   NSA_PROFILE_T=16384 NSA_PROFILE_CONFIG=g16   the profiled call
#   NSA_PROFILE_KERNELS="attn_|slc_|select_topk"   ncu's kernel-name regex (the profiled kernels)
#   NSA_PROFILE_DECODE=65536x1   profile one decode step at this TxB instead (kernels: decode_)
#   NSA_PROFILE_SECTIONS="SpeedOfLight Occupancy LaunchStats WarpStateStats"   ncu's sections
#   NSA_PROFILE_SOURCE=1    also the busiest SASS instructions of each kernel (stall samples;
#                           the SourceCounters section is added), tools/ncu_source_top.py
#   NSA_DPROFILE_SHAPES="65536x1 65536x16 131072x1"   TxB of the dprofile stage
#   NSA_DPROFILE_FORCE="cmp_splits=8 dep_wait=grid"   also the timeline and trace of these plan
#                                                    variants (profile_decode.py --force)
#   NSA_DPROFILE_STALLS=1   the dprofile stage's ncu table adds each kernel's stall reasons (warps
#                           stalled per issued instruction: no instruction, long scoreboard, ...)
#   NSA_DPROFILE_BASELINE=1 the dprofile stage also times the baseline tree's step right after
#                           this one's ($NSA_BASELINE_DIR, built beside this one as for baseline)
#   NSA_BENCH_LENGTHS="65536 32768 16384 8192"   (longest first: the bars are at 64k, and a run
#                           that hits its time budget drops the shortest)
#   NSA_BENCH_CONFIGS="g16 g4 fla"   (any of g16 fla g8 g4 g1 d192; fla last: its Triton
#                           autotuning takes minutes on a fresh machine)
#   NSA_BENCH_ARGS=...      extra arguments of bench_attention.py (e.g. "--no-branches")
#   NSA_DECODE_ARGS=...     arguments of bench_decode.py (e.g. "--quick", "--lengths 65536
#                           --batches 16 --kinds equal", "--impls ours sdpa_flash mdy666")
#   NSA_COMMIT=abc1234      commit written in the benchmark's file names (else git rev-parse)
#   MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0a
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/nsa_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$(date +%s)
BUDGET=${NSA_BUDGET_S:-560}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
rm -f /tmp/compare.txt /tmp/baseline_build.rc /tmp/dprofile.txt /tmp/latency.txt  # (a warm machine keeps /tmp between calls)

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build tests sanitize bench)
for s in "${STAGES[@]}"; do
  case $s in build|tests|sanitize|profile|dprofile|ab|latency|bench|baseline|layer|decode) ;; *) echo "unknown stage '$s' (build tests sanitize profile dprofile ab latency bench baseline layer decode)"; exit 2;; esac
done
# (sanitize: memcheck ~80 s and racecheck ~120 s on the H200 for their default selections)
BUILD_FLOOR_S=${NSA_BUILD_FLOOR_S:-240}
declare -A MIN_S=([build]=60 [tests]=60 [sanitize]=220 [profile]=60 [dprofile]=60 [ab]=60 [latency]=40 [bench]=90 [baseline]=90 [layer]=60 [decode]=120)
for kv in ${NSA_MIN_S:-}; do  # e.g. "sanitize=90 decode=30": smaller selections need less
  case $kv in *=*) [ -n "${MIN_S[${kv%%=*}]+x}" ] && MIN_S[${kv%%=*}]=${kv#*=} || { echo "NSA_MIN_S: unknown stage in '$kv'"; exit 2; };; *) echo "NSA_MIN_S: expected STAGE=SECONDS, got '$kv'"; exit 2;; esac
done

elapsed() { echo $(( $(date +%s) - T0 )); }
# Seconds the stage $1 may use: what is left, minus the minimum of the selected stages after it.
limit_for() {
  local after=0 seen=0 s
  for s in "${STAGES[@]}"; do
    if [ $seen -eq 1 ]; then after=$(( after + ${MIN_S[$s]} )); fi
    [ "$s" = "$1" ] && seen=1
  done
  echo $(( BUDGET - $(elapsed) - after - 10 ))
}
record() {  # stage status counts seconds
  printf '| %-18s | %-34s | %-44s | %5s |\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"
}
pytest_counts() {  # the counts of pytest's last summary line in log $1
  local line
  line=$(grep -E '[0-9]+ (passed|failed|error|errors|skipped|deselected)' "$1" | grep -E ' in [0-9.]+s' | tail -1)
  [ -z "$line" ] && line=$(grep -E '[0-9]+ (passed|failed)' "$1" | tail -1)
  echo "$line" | grep -oE '[0-9]+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)' | paste -sd, - | sed 's/,/, /g'
}
status_of() {  # rc -> word
  case $1 in 0) echo pass;; 5) echo "none selected";; 124) echo "TIMEOUT (stage limit)";; 137) echo "KILLED";; *) echo "FAIL (rc $1)";; esac
}
# run_stage NAME LOG LIMIT CMD...: tees into LOG, stops the command at LIMIT seconds (SIGINT
# first, so pytest still prints its summary), returns the command's status.
run_stage() {
  local name=$1 log=$2 limit=$3; shift 3
  [ "$limit" -lt 10 ] && limit=10
  echo "=== [$name] $(date +%T) limit ${limit}s: $*" | tee -a "$log"
  timeout -k 20 -s INT "$limit" "$@" 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}
have() { local st; for st in "${STAGES[@]}"; do [ "$st" = "$1" ] && return 0; done; return 1; }

# ---------------------------------------------------------------- carried wheels and environment
# (.whl, named in the call's carry: fla for bench, FlashInfer from carry_flashinfer.sh for decode)
if ls .whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    echo "wheels from .whl installed into /tmp/site: $(cd .whl && echo *.whl | tr '\n' ' ')"
  else
    echo "WARNING: installing .whl/*.whl failed; their baselines (fla, flashinfer) will be n/a"
  fi
fi
ENV_INFO=$(
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used,memory.total --format=csv 2>&1
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -1
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -1
)
echo "$ENV_INFO"

# ---------------------------------------------------------------- build
BASE_DIR=${NSA_BASELINE_DIR:-.baseline}
BASE_BUILD_PID=
if have build; then
  s=$(date +%s)
  lim=$(limit_for build)
  # A build stopped at its limit ends the run, so the later stages' minimums never cut it below
  # BUILD_FLOOR_S (they get less instead): with a baseline tree beside it, a build takes minutes.
  floor=$(( BUILD_FLOOR_S < BUDGET - $(elapsed) - 10 ? BUILD_FLOOR_S : BUDGET - $(elapsed) - 10 ))
  [ "$lim" -lt "$floor" ] && lim=$floor
  : > "$OUT/build.log"
  jobs=${MAX_JOBS:-16}
  if have baseline || [ -n "${NSA_DPROFILE_BASELINE:-}" ]; then
    # the tree before the change builds in place beside this one, half the jobs each
    jobs=$(( jobs / 2 > 0 ? jobs / 2 : 1 ))
    ( cd "$BASE_DIR" && env MAX_JOBS=$jobs TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" NSA_BUILD_CUDA=1 \
        timeout "$lim" "$PY" setup.py -q build_ext --inplace > /tmp/baseline_build.log 2>&1
      echo $? > /tmp/baseline_build.rc ) &
    BASE_BUILD_PID=$!
  fi
  run_stage build "$OUT/build.log" "$lim" \
    env MAX_JOBS="$jobs" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" NSA_BUILD_CUDA=1 \
    "$PY" -m pip install --no-build-isolation --no-deps -v -e . > /dev/null
  rc=$?
  secs=$(( $(date +%s) - s ))
  echo "[build] $(status_of $rc) in ${secs}s"
  if [ $rc -ne 0 ]; then
    record build "$(status_of $rc)" "see build.log" "$secs"
    echo "---- build failed; tail of $OUT/build.log:"
    tail -60 "$OUT/build.log"
    { echo; echo "| stage | status | counts | s |"; } ; cat "$SUMMARY"
    exit 1
  fi
  "$PY" -c "import nsa_torch; print('nsa_torch._C:', nsa_torch._C.__file__ if nsa_torch._C is not None else nsa_torch._C_ERROR)" 2>&1 | tee -a "$OUT/build.log"
  record build pass "" "$secs"
  if [ -n "$BASE_BUILD_PID" ]; then
    wait "$BASE_BUILD_PID"
    brc=$(cat /tmp/baseline_build.rc 2>/dev/null || echo 1)
    { echo "=== baseline build of $BASE_DIR: rc $brc"; tail -20 /tmp/baseline_build.log; } >> "$OUT/build.log"
    record "build baseline" "$(status_of "$brc")" "$BASE_DIR" "$(( $(date +%s) - s ))"
  fi
  echo "clocks after build: $(nvidia-smi --query-gpu=clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null)"
fi

# ---------------------------------------------------------------- tests
if have tests; then
  s=$(date +%s)
  lim=$(limit_for tests)
  : > "$OUT/tests.log"
  args=(-q -m cuda -p no:cacheprovider --tb=short -rfE --durations=15)
  # One -k expression (pytest keeps only the last -k): NSA_TEST_K narrows the default.
  kexpr=${NSA_TEST_K:-}
  if [ "${NSA_LONG_TESTS:-0}" = "1" ]; then
    export NSA_LONG_TESTS=1
  else
    kexpr=${kexpr:+($kexpr) and }"not long"
  fi
  # A hung kernel must not eat the whole budget: pytest-timeout (in the image) ends the run.
  if $PY -c "import pytest_timeout" 2>/dev/null; then args+=(--timeout=300 --timeout-method=thread); fi
  # shellcheck disable=SC2206
  extra=(${NSA_TEST_ARGS:-})
  files=(tests)  # every CUDA-marked test of the suite
  run_stage tests "$OUT/tests.log" "$lim" "$PY" -m pytest "${args[@]}" ${kexpr:+-k "$kexpr"} "${extra[@]}" "${files[@]}"
  rc=$?
  secs=$(( $(date +%s) - s ))
  record tests "$(status_of $rc)" "$(pytest_counts "$OUT/tests.log")" "$secs"
  echo "[tests] $(status_of $rc) in ${secs}s"
fi

# ---------------------------------------------------------------- sanitize
if have sanitize; then
  : > "$OUT/sanitize.log"
  if ! command -v compute-sanitizer >/dev/null; then
    record sanitize "SKIPPED (no compute-sanitizer)" "" 0
  else
    for tool in ${NSA_SANITIZE_TOOLS:-memcheck racecheck}; do
      s=$(date +%s)
      lim=$(limit_for sanitize)
      # the remaining tools share the stage: give this one its part of what is left
      n_left=$(echo "${NSA_SANITIZE_TOOLS:-memcheck racecheck}" | tr ' ' '\n' | sed -n "/^$tool\$/,\$p" | wc -l)
      # racecheck is the slow one: memcheck takes 2/5 of what is left when racecheck follows
      if [ "$tool" = memcheck ] && [ "$n_left" -gt 1 ]; then lim=$(( lim * 2 / 5 )); else lim=$(( lim / (n_left > 0 ? n_left : 1) )); fi
      if [ "$lim" -lt 20 ]; then record "sanitize $tool" "SKIPPED (no time left)" "" 0; continue; fi
      mark=$(wc -l < "$OUT/sanitize.log")
      # racecheck is ~20x slower than memcheck (290 s did not finish the 13 tests): by default it
      # takes the T = 100 cases, the split path and one of the two many-tile forward cases (the
      # pair took more than the stage's 190 s).
      # (and the decode step's small cases: its kernels' edges, forced splits and bad input)
      kexpr=${NSA_SANITIZE_K:-sanitize or test_cuda_matches_float64 or test_cuda_small_blocks or (test_cuda_forced_splits and not rounds) or test_cuda_bad_lengths}
      [ "$tool" = racecheck ] && kexpr=${NSA_RACECHECK_K:-(sanitize and (T100 or split or d128v128)) or (test_cuda_forced_splits and n16 and not one)}
      run_stage "sanitize $tool" "$OUT/sanitize.log" "$lim" \
        env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 86 --print-limit 50 \
        ${NSA_SANITIZE_KERNELS:+--kernel-name "kns=$NSA_SANITIZE_KERNELS"} \
        "$PY" -m pytest -q -p no:cacheprovider -p no:hypothesispytest --tb=short -k "$kexpr" tests/test_cuda_*.py tests/test_gated_sum.py \
          tests/test_decode_op.py
      rc=$?
      secs=$(( $(date +%s) - s ))
      part=$(tail -n +"$((mark + 1))" "$OUT/sanitize.log")
      errs=$(echo "$part" | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | sed 's/=* *//' | paste -sd';' -)
      counts=$(echo "$part" > "$OUT/.part"; pytest_counts "$OUT/.part"; rm -f "$OUT/.part")
      st=$(status_of $rc); [ $rc -eq 86 ] && st="FAIL (sanitizer errors)"
      record "sanitize $tool" "$st" "${counts}${errs:+; $errs}" "$secs"
      echo "[sanitize $tool] $st in ${secs}s: ${errs:-no summary line}"
    done
  fi
fi

# ---------------------------------------------------------------- profile
if have profile; then
  s=$(date +%s)
  lim=$(limit_for profile)
  : > "$OUT/profile.log"
  if ! command -v ncu >/dev/null; then
    record profile "SKIPPED (no ncu)" "" 0
  else
    sections=()
    for sec in ${NSA_PROFILE_SECTIONS:-SpeedOfLight Occupancy LaunchStats WarpStateStats}; do
      sections+=(--section "$sec")
    done
    rep=()
    if [ "${NSA_PROFILE_SOURCE:-0}" = "1" ]; then
      rep=(--export /tmp/nsa_profile --force-overwrite)
      # the source page has stall samples per instruction only with this section
      [[ " ${sections[*]} " == *" SourceCounters "* ]] || sections+=(--section SourceCounters)
    fi
    if [ -n "${NSA_PROFILE_DECODE:-}" ]; then  # one decode step at that TxB instead
      kernels=${NSA_PROFILE_KERNELS:-decode_}
      call=("$PY" tools/profile_decode.py --shapes "$NSA_PROFILE_DECODE" --warmup 1 --steps 1 --no-profiler)
    else
      kernels=${NSA_PROFILE_KERNELS:-attn_|slc_|select_topk}
      call=("$PY" tools/profile_nsa.py --T "${NSA_PROFILE_T:-16384}" --config "${NSA_PROFILE_CONFIG:-g16}")
    fi
    run_stage profile "$OUT/profile.log" "$lim" \
      ncu --target-processes all --kernel-name "regex:$kernels" "${sections[@]}" "${rep[@]}" "${call[@]}"
    rc=$?
    if [ ${#rep[@]} -gt 0 ] && [ -f /tmp/nsa_profile.ncu-rep ]; then
      # With --export ncu prints nothing: the sections from the report, then the busiest SASS
      # instructions (warp-stall samples) of each kernel.
      ncu --import /tmp/nsa_profile.ncu-rep >> "$OUT/profile.log" 2>&1
      ncu --import /tmp/nsa_profile.ncu-rep --page source --csv --print-source sass > /tmp/nsa_source.csv 2>&1
      "$PY" tools/ncu_source_top.py /tmp/nsa_source.csv >> "$OUT/profile.log" 2>&1
    fi
    secs=$(( $(date +%s) - s ))
    record profile "$(status_of $rc)" "$(grep -c '^  [a-z_].*(.*)x(.*)' "$OUT/profile.log") kernels" "$secs"
  fi
fi

# ---------------------------------------------------------------- dprofile
# (each decode kernel on its own under ncu: no dependent launch; caches as the previous kernel
# left them and clocks not locked, as in a step; one ncu process per shape, the first launch of
# each kernel left out)
if have dprofile; then
  s=$(date +%s)
  lim=$(limit_for dprofile)
  rc=0
  shapes=(${NSA_DPROFILE_SHAPES:-65536x1 65536x16 131072x1})
  # First the step's timeline over graph replays (torch.profiler: when each kernel ends, what it
  # adds to the step), then each kernel alone under ncu.
  # The SM clock is sampled meanwhile: short kernels are chains of memory round trips, whose
  # time follows the clock.
  rm -f /tmp/dtimeline.txt /tmp/dclocks.txt
  clk_pid=
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=clocks.sm --format=csv,noheader,nounits -lms 20 > /tmp/dclocks.txt 2>/dev/null &
    clk_pid=$!
  fi
  run_stage "dprofile timeline" /tmp/dtimeline.txt $(( lim / 4 )) \
    "$PY" tools/profile_decode.py --trace --shapes "${shapes[@]}" > /dev/null || rc=$?
  [ -n "$clk_pid" ] && kill "$clk_pid" 2>/dev/null
  for spec in ${NSA_DPROFILE_FORCE:-}; do  # plan variants' timelines and traces
    echo "variant --force $spec:" >> /tmp/dtimeline.txt
    run_stage "dprofile timeline $spec" /tmp/dtimeline.txt $(( lim / 8 )) \
      "$PY" tools/profile_decode.py --trace --force "$spec" --shapes "${shapes[@]}" > /dev/null || rc=$?
  done
  if [ -n "${NSA_DPROFILE_BASELINE:-}" ]; then
    # The same timeline from the baseline tree's own script and build, right after, on this GPU.
    if [ "$(cat /tmp/baseline_build.rc 2>/dev/null)" = 0 ] && [ -f "$BASE_DIR/tools/profile_decode.py" ]; then
      echo "baseline tree ($BASE_DIR):" >> /tmp/dtimeline.txt
      run_stage "dprofile baseline timeline" /tmp/dtimeline.txt $(( lim / 4 )) env \
        PYTHONPATH="$PWD/$BASE_DIR${PYTHONPATH:+:$PYTHONPATH}" \
        "$PY" "$BASE_DIR/tools/profile_decode.py" --shapes "${shapes[@]}" > /dev/null || rc=$?
    else
      echo "baseline tree ($BASE_DIR): no build or no tools/profile_decode.py" >> /tmp/dtimeline.txt
    fi
  fi
  { echo "decode step timeline (graph replays, torch.profiler):"; grep -E '^(T = |\||step |baseline tree|variant )' /tmp/dtimeline.txt
    [ -s /tmp/dclocks.txt ] && sort -n /tmp/dclocks.txt | awk '{v[NR] = $1} END {
      printf "SM clock while it ran (MHz, %d samples every 20 ms): min %s, median %s, max %s\n", NR, v[1], v[int((NR + 1) / 2)], v[NR]}'
  } >> /tmp/dprofile.txt
  cat /tmp/dtimeline.txt >> "$OUT/profile.log"
  if ! command -v ncu >/dev/null; then
    echo "(no ncu: no per-kernel times)" >> /tmp/dprofile.txt
  else
    per=$(( (lim - ($(date +%s) - s)) / ${#shapes[@]} ))
    stalls=""
    if [ -n "${NSA_DPROFILE_STALLS:-}" ]; then
      for r in no_instruction long_scoreboard barrier wait short_scoreboard membar; do
        stalls="$stalls,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"
      done
    fi
    for shape in "${shapes[@]}"; do
      rm -f /tmp/dprofile.csv
      run_stage "dprofile $shape" "$OUT/profile.log" "$per" \
        ncu --csv --print-units base --cache-control none --clock-control none --log-file /tmp/dprofile.csv --kernel-name regex:decode_ \
        --metrics "gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread$stalls" \
        "$PY" tools/profile_decode.py --shapes "$shape" --warmup 1 --steps 2 --no-profiler || rc=$?
      { echo "decode kernels at TxB = $shape (ncu, each on its own):"
        "$PY" tools/ncu_kernel_times.py /tmp/dprofile.csv --skip 1; } 2>&1 | tee -a "$OUT/profile.log" >> /tmp/dprofile.txt
    done
  fi
  secs=$(( $(date +%s) - s ))
  record dprofile "$(status_of $rc)" "${#shapes[@]} shapes" "$secs"
fi

# ---------------------------------------------------------------- ab
# (its output goes to bench.log, ahead of the benchmark's: $OUT brings back at most 8 files)
: > "$OUT/bench.log"
if have ab; then
  s=$(date +%s)
  lim=$(limit_for ab)
  # shellcheck disable=SC2206
  switches=(${NSA_AB_SWITCHES:-fwd bwd})
  run_stage ab "$OUT/bench.log" "$lim" "$PY" tools/ab_kernels.py "${switches[@]}" --T "${NSA_AB_T:-65536}" \
    --configs ${NSA_AB_CONFIGS:-g16}
  rc=$?
  secs=$(( $(date +%s) - s ))
  record ab "$(status_of $rc)" "$(grep -c ' ms' "$OUT/bench.log") timings" "$secs"
fi

# ---------------------------------------------------------------- latency
# (tools/gpu_latency.cu, compiled here: streaming rates by blocks, ring depth and loads, chains of
# dependent loads, a counter hand-off, cluster barriers; its tables go to bench.log and the summary)
if have latency; then
  s=$(date +%s)
  lim=$(limit_for latency)
  mark=$(wc -l < "$OUT/bench.log")
  rm -f /tmp/gpu_latency
  run_stage latency "$OUT/bench.log" "$lim" bash -c "nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a \
    -o /tmp/gpu_latency tools/gpu_latency.cu && /tmp/gpu_latency"
  rc=$?
  tail -n +"$((mark + 2))" "$OUT/bench.log" > /tmp/latency.txt
  secs=$(( $(date +%s) - s ))
  record latency "$(status_of $rc)" "$(grep -c '^| ' /tmp/latency.txt) rows" "$secs"
fi

# ---------------------------------------------------------------- bench
if have bench; then
  s=$(date +%s)
  lim=$(limit_for bench)
  if [ "$lim" -lt 30 ]; then
    record bench "SKIPPED (no time left)" "" 0
  else
    # shellcheck disable=SC2206
    lengths=(${NSA_BENCH_LENGTHS:-65536 32768 16384 8192})
    # shellcheck disable=SC2206
    configs=(${NSA_BENCH_CONFIGS:-g16 g4 fla})
    # shellcheck disable=SC2206
    extra=(${NSA_BENCH_ARGS:-})
    # the script stops starting measurements 30 s before its limit, then writes CSV, plot, table
    mark=$(wc -l < "$OUT/bench.log")
    run_stage bench "$OUT/bench.log" "$lim" "$PY" benchmarks/bench_attention.py --out-dir "$OUT" \
      --lengths "${lengths[@]}" --configs "${configs[@]}" --time-budget $(( lim - 30 )) "${extra[@]}"
    rc=$?
    secs=$(( $(date +%s) - s ))
    n=$(tail -n +"$((mark + 1))" "$OUT/bench.log" | grep -cE ' ms ?' || true)
    na=$(tail -n +"$((mark + 1))" "$OUT/bench.log" | grep -cE ' n/a ' || true)
    record bench "$(status_of $rc)" "$n timed, $na n/a or skipped" "$secs"
  fi
fi

# ---------------------------------------------------------------- baseline
if have baseline; then
  s=$(date +%s)
  lim=$(limit_for baseline)
  if [ "$(cat /tmp/baseline_build.rc 2>/dev/null)" != 0 ] || [ "$lim" -lt 30 ]; then
    record baseline "SKIPPED (no baseline build or no time left)" "" 0
  else
    # the same measurements as the bench stage, from the baseline tree's own script and build
    # shellcheck disable=SC2206
    lengths=(${NSA_BENCH_LENGTHS:-65536 32768 16384 8192}); configs=(${NSA_BENCH_CONFIGS:-g16 g4 fla})
    # shellcheck disable=SC2206
    extra=(${NSA_BENCH_ARGS:-})
    mark=$(wc -l < "$OUT/bench.log")
    run_stage baseline "$OUT/bench.log" "$lim" env PYTHONPATH="$PWD/$BASE_DIR${PYTHONPATH:+:$PYTHONPATH}" \
      NSA_COMMIT=baseline "$PY" "$BASE_DIR/benchmarks/bench_attention.py" --out-dir /tmp/baseline_out \
      --lengths "${lengths[@]}" --configs "${configs[@]}" --time-budget $(( lim - 30 )) "${extra[@]}"
    rc=$?
    base_csv=$(ls /tmp/baseline_out/bench_*.csv 2>/dev/null | head -1)
    new_csv=$(ls "$OUT"/bench_*.csv 2>/dev/null | head -1)
    cmp_rc=1
    if [ -n "$base_csv" ] && [ -n "$new_csv" ]; then
      cp "$base_csv" "$OUT/baseline.csv"
      "$PY" benchmarks/compare_bench.py "$base_csv" "$new_csv" | tee -a "$OUT/bench.log" > /tmp/compare.txt
      cmp_rc=${PIPESTATUS[0]}
    fi
    secs=$(( $(date +%s) - s ))
    record baseline "$(status_of $rc); compare $( [ $cmp_rc -eq 0 ] && echo within || echo OUTSIDE) 3%" \
      "$(tail -1 /tmp/compare.txt 2>/dev/null)" "$secs"
  fi
fi

# ---------------------------------------------------------------- layer
# (benchmarks/bench_layer.py: one NativeSparseAttention layer against the same layer with SDPA;
# its log goes to bench.log after the benchmark's)
if have layer; then
  s=$(date +%s)
  lim=$(limit_for layer)
  # shellcheck disable=SC2206
  lengths=(${NSA_LAYER_LENGTHS:-65536 32768 16384 8192})
  mark=$(wc -l < "$OUT/bench.log")
  run_stage layer "$OUT/bench.log" "$lim" "$PY" benchmarks/bench_layer.py --out-dir "$OUT" \
    --lengths "${lengths[@]}" --time-budget $(( lim - 30 ))
  rc=$?
  secs=$(( $(date +%s) - s ))
  n=$(tail -n +"$((mark + 1))" "$OUT/bench.log" | grep -cE ' ms ?' || true)
  record layer "$(status_of $rc)" "$n timed" "$secs"
fi

# ---------------------------------------------------------------- decode
# (benchmarks/bench_decode.py: one decode step against dense decoding and mdy666's; its log goes
# to bench.log after the others, its CSV into $OUT)
if have decode; then
  s=$(date +%s)
  lim=$(limit_for decode)
  if [ "$lim" -lt 30 ]; then
    record decode "SKIPPED (no time left)" "" 0
  else
    # shellcheck disable=SC2206
    extra=(${NSA_DECODE_ARGS:-})
    mark=$(wc -l < "$OUT/bench.log")
    run_stage decode "$OUT/bench.log" "$lim" "$PY" benchmarks/bench_decode.py --out-dir "$OUT" \
      --time-budget $(( lim - 30 )) "${extra[@]}"
    rc=$?
    secs=$(( $(date +%s) - s ))
    n=$(tail -n +"$((mark + 1))" "$OUT/bench.log" | grep -cE '^  T=.*[0-9] us' || true)
    na=$(tail -n +"$((mark + 1))" "$OUT/bench.log" | grep -cE '^  T=.* (n/a|absent|skipped)' || true)
    record decode "$(status_of $rc)" "$n timed, $na n/a or skipped" "$secs"
  fi
fi

# ---------------------------------------------------------------- summary
{
  echo
  echo "==== gpu_check summary ($(elapsed)s total)"
  echo "$ENV_INFO"
  echo "| stage              | status                             | counts                                       |     s |"
  echo "|--------------------|------------------------------------|----------------------------------------------|-------|"
  cat "$SUMMARY"
  if [ -f "$OUT/tests.log" ] && grep -qE '^(FAILED|ERROR) ' "$OUT/tests.log"; then
    echo
    echo "failed tests (first 25):"
    grep -E '^(FAILED|ERROR) ' "$OUT/tests.log" | head -25
  fi
  [ -f /tmp/dprofile.txt ] && { echo; cat /tmp/dprofile.txt; }
  [ -s /tmp/latency.txt ] && { echo; echo "GPU latencies and streaming rates (tools/gpu_latency.cu):"; cat /tmp/latency.txt; }
  if [ -f "$OUT/bench.log" ]; then
    if grep -q ' force [a-z_]*=' "$OUT/bench.log"; then
      echo
      echo "kernel kinds side by side (tools/ab_kernels.py):"
      grep ' force [a-z_]*=' "$OUT/bench.log"
    fi
    echo
    sed -n '/^### nsa-bench table begin/,/^### nsa-bench table end/p' "$OUT/bench.log" | grep -v '^### nsa-bench'
    [ -f /tmp/compare.txt ] && { echo; echo "speed-up over cuDNN, baseline tree against this one:"; cat /tmp/compare.txt; }
    if grep -q '^### nsa-decode table begin' "$OUT/bench.log"; then
      echo
      echo "decode step (benchmarks/bench_decode.py):"
      sed -n '/^### nsa-decode table begin/,/^### nsa-decode table end/p' "$OUT/bench.log" | grep -v '^### nsa-decode'
    fi
  fi
} > "$OUT/.summary"
mv "$OUT/.summary" "$SUMMARY"
cat "$SUMMARY"
