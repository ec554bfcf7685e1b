"""Per-kernel CUDA time of one decode_attention step (bf16, HQ = 64, H = 4, D = Dv = 128, the
paper's hyper-parameters), from torch.profiler over repeated steps:

    python3 tools/profile_decode.py --shapes 65536x1 65536x16 131072x1

Prints each kernel's mean time per step and the step's total; the plan that ran
(nsa_torch._debug.plans()) beside it. Kernels launched as programmatic dependents overlap their
predecessor, so their profiled times include waits; for each kernel on its own, run this under
ncu (gpu_check.sh's dprofile stage, tools/ncu_kernel_times.py).
"""
import argparse
import collections

import torch

import nsa_torch
from nsa_torch import _debug

HP = dict(block_size=32, block_stride=16, select_size=64, num_selected=16, num_initial=1,
          num_local=2, window_size=512)


def step_inputs(T, B, HQ=64, H=4, D=128, Dv=128, dtype=torch.bfloat16):
    nc = (T - HP["block_size"]) // HP["block_stride"] + 1
    r = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)  # noqa: E731
    q = r(B, 1, HQ, D)
    gates = [torch.sigmoid(r(B, 1, HQ)) for _ in range(3)]
    seqlens = torch.full((B,), T, dtype=torch.int32, device="cuda")
    return (q, r(B, T, H, D), r(B, T, H, Dv), r(B, nc, H, D), r(B, nc, H, Dv), *gates, seqlens)


def profile(T, B, steps, warmup, use_profiler=True):
    x = step_inputs(T, B)
    with _debug.plans() as ran:
        nsa_torch.decode_attention(*x, **HP)
    for _ in range(warmup):
        nsa_torch.decode_attention(*x, **HP)
    torch.cuda.synchronize()
    if not use_profiler:  # under ncu, which owns the profiling interface
        for _ in range(steps):
            nsa_torch.decode_attention(*x, **HP)
        torch.cuda.synchronize()
        print(f"T = {T}, B = {B}: plan {ran[0]}, {steps} steps")
        return
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            nsa_torch.decode_attention(*x, **HP)
        torch.cuda.synchronize()
    per = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name] += e.device_time / steps
    print(f"T = {T}, B = {B}: plan {ran[0]}")
    for name, us in sorted(per.items(), key=lambda kv: -kv[1]):
        print(f"  {us:8.1f} us  {name[:110]}")
    print(f"  {sum(per.values()):8.1f} us  total")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", nargs="+", default=["65536x1", "65536x16", "131072x1"],
                    help="TxB pairs")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10, help="steps before the profiled ones")
    ap.add_argument("--no-profiler", action="store_true",
                    help="only run the steps (for a profiler outside, such as ncu)")
    args = ap.parse_args()
    for s in args.shapes:
        T, B = map(int, s.split("x"))
        profile(T, B, args.steps, args.warmup, not args.no_profiler)


if __name__ == "__main__":
    main()
