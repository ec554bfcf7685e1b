"""Where the time of one decode_attention step goes (bf16, HQ = 64, H = 4, D = Dv = 128, the
paper's hyper-parameters), from torch.profiler over CUDA-graph replays of the step:

    python3 tools/profile_decode.py --shapes 65536x1 65536x16 131072x1

The step is captured in a CUDA graph over R copies of the caches (R steps per replay, R chosen
as bench_decode.py chooses it: a replay reads at least 8x the L2), and the graph replayed under
the profiler. For each kernel it prints when it starts and ends after the step's first kernel
starts (means over the steps) and what it adds to the step: its end minus the previous kernel's
end. Kernels launched as programmatic dependents start early and wait, so a kernel's own span
says little; what it adds is its share of the step's critical path. The last line is the time
from one step's start to the next one's (the step as bench_decode.py times it). --trace adds, per
kernel, when its thread blocks start, get past their wait, end their middle phase and end
(nsa_torch._debug.decode_trace: the GPU's global timer stored by each block).

--force KEY=VALUE[,KEY=VALUE] profiles the step under nsa_torch._debug.force (a plan variant, as
bench_decode.py's --force).

--no-profiler only runs eager steps (for a profiler outside, such as ncu: gpu_check.sh's dprofile
stage, tools/ncu_kernel_times.py).
"""
import argparse
import math
import os
import statistics
import sys
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import bench_decode  # noqa: E402  (its sizes, byte counts, copies rule and graph capture)

import nsa_torch  # noqa: E402
from nsa_torch import _debug  # noqa: E402

HP = bench_decode.PAPER


def step_inputs(T, B, HQ=64, H=4, D=128, Dv=128, dtype=torch.bfloat16, copies=1):
    """(q, gates, seqlens) and `copies` caches (k, v, k_cmp, v_cmp)."""
    nc = bench_decode.num_cmp(T, HP)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)  # noqa: E731
    q = r(B, 1, HQ, D)
    gates = [torch.sigmoid(r(B, 1, HQ)) for _ in range(3)]
    seqlens = torch.full((B,), T, dtype=torch.int32, device="cuda")
    caches = [(r(B, T, H, D), r(B, T, H, Dv), r(B, nc, H, D), r(B, nc, H, Dv)) for _ in range(copies)]
    return q, gates, seqlens, caches


def copies_for(T, B):
    """Copies of the caches cycled through, by bench_decode.py's rule (together the steps read at
    least L2_SWEEP x the L2, as many as fit in memory); (0, why) when not even one fits."""
    cfg = dict(bench_decode.GPU_SIZES, itemsize=2)
    per_copy = B * (T + bench_decode.num_cmp(T, HP)) * cfg["H"] * (cfg["D"] + cfg["Dv"]) * cfg["itemsize"]
    read = bench_decode.step_bytes([T] * B, cfg, nsa=True)
    return bench_decode.copies_for(per_copy, types.SimpleNamespace(device="cuda"), read)


def step_timeline(kernels, first):
    """kernels: (name, start_us, end_us) of the profiled replays, in any order; `first`: the
    name (or a part of it) of a step's first kernel. Returns ([(name, start, end, adds)], step):
    per kernel of a step, in launch order, the means over the complete steps of its start and end
    after the step's first kernel started and of what it adds (its end minus the previous
    kernel's end; the first kernel's end), and the mean time from a step's start to the next's
    (None with a single step)."""
    kernels = sorted(kernels, key=lambda k: k[1])
    steps, cur = [], None
    for k in kernels:
        if first in k[0]:
            cur = [k]
            steps.append(cur)
        elif cur is not None:
            cur.append(k)
    if not steps:
        return [], None
    width = max(len(s) for s in steps)
    full = [s for s in steps if len(s) == width]
    rows = []
    for i in range(width):
        start = statistics.mean(s[i][1] - s[0][1] for s in full)
        end = statistics.mean(s[i][2] - s[0][1] for s in full)
        prev = statistics.mean(s[i - 1][2] - s[0][1] for s in full) if i else 0.0
        rows.append((full[0][i][0], start, end, end - prev))
    starts = [s[0][1] for s in steps]
    step = statistics.mean(b - a for a, b in zip(starts, starts[1:])) if len(starts) > 1 else None
    return rows, step


def short_name(name):
    return name.split("(")[0].split("<")[0].replace("void ", "").split("::")[-1]


def profile(T, B, steps, warmup, use_profiler=True, trace=False):
    copies, why = copies_for(T, B) if use_profiler else (1, "")
    if not copies:
        print(f"T = {T}, B = {B}: {why}")
        return
    q, gates, seqlens, caches = step_inputs(T, B, copies=copies)

    def call():
        for k, v, kc, vc in caches:
            nsa_torch.decode_attention(q, k, v, kc, vc, *gates, seqlens, **HP)

    with _debug.plans() as ran:
        call()
    torch.cuda.synchronize()
    if not use_profiler:  # under ncu, which owns the profiling interface
        for _ in range(warmup + steps):
            call()
        torch.cuda.synchronize()
        print(f"T = {T}, B = {B}: plan {ran[0]}, {warmup + steps} steps")
        return
    g = bench_decode.graph_of(call)
    replays = max(1, math.ceil(steps / copies))
    for _ in range(warmup):
        g.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    # every device activity of the replays (any kernel or memset besides the step's six shows up)
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    first = "decode_reset_kernel"  # kernel Z, which zeroes the step's counters
    rows, step = step_timeline(kernels, first)
    print(f"T = {T}, B = {B}: plan {ran[0]}; {copies} cache copies, {replays} replays")
    print("| kernel | starts (us) | ends (us) | adds (us) |")
    print("|---|---|---|---|")
    for name, start, end, adds in rows:
        print(f"| {short_name(name)} | {start:.1f} | {end:.1f} | {adds:.1f} |")
    if step is not None:
        print(f"step start to next step start: {step:.1f} us")
    if trace:
        # The same step captured again with the phase trace on; the buffer keeps the last step.
        blocks = 1 << 14
        with _debug.decode_trace(blocks) as buf:
            gt = bench_decode.graph_of(call)
            for _ in range(max(1, warmup)):
                gt.replay()
            torch.cuda.synchronize()
        print(f"T = {T}, B = {B}: phases of the last step of a replay (_debug.decode_trace; us after the "
              f"step's first block starts; min / median / max over thread blocks)")
        print("| kernel | " + " | ".join(_debug.TRACE_EVENTS) + " |")
        print("|---|" + "---|" * len(_debug.TRACE_EVENTS))
        for kernel, row in _debug.trace_summary(buf).items():
            cells = [" / ".join(f"{x:.1f}" for x in row[e]) if e in row else "-" for e in _debug.TRACE_EVENTS]
            print(f"| {kernel} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["65536x1", "65536x16", "131072x1"],
                    help="TxB pairs")
    ap.add_argument("--steps", type=int, default=200, help="profiled steps (about)")
    ap.add_argument("--warmup", type=int, default=10, help="replays (or steps) before the profiled ones")
    ap.add_argument("--trace", action="store_true",
                    help="also each kernel's phases per thread block (nsa_torch._debug.decode_trace)")
    ap.add_argument("--no-profiler", action="store_true",
                    help="only run eager steps (for a profiler outside, such as ncu)")
    ap.add_argument("--force", default="", metavar="KEY=VALUE[,KEY=VALUE]",
                    help="profile the step under nsa_torch._debug.force with these plan choices")
    args = ap.parse_args()
    force = bench_decode.parse_force(args.force) if args.force else {}
    with _debug.force(**force):
        for s in args.shapes:
            T, B = map(int, s.split("x"))
            profile(T, B, args.steps, args.warmup, not args.no_profiler, args.trace)


if __name__ == "__main__":
    main()
