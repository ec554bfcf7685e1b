"""One nsa_attention forward + backward (bf16, CUDA) for a profiler to watch.

    ncu --kernel-name regex:'attn_|slc_|select_topk' python3 tools/profile_nsa.py --T 16384 --config g16

Inputs and hyper-parameters are those of benchmarks/bench_attention.py's configuration.
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

from bench_attention import CONFIGS, grad_of, make_inputs  # noqa: E402

import nsa_torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--config", default="g16", choices=list(CONFIGS))
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    x = make_inputs(args.T, cfg)
    leaves = [x[n] for n in ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_swa")]
    o = nsa_torch.nsa_attention(*leaves, **cfg["hp"])
    torch.autograd.grad(o, leaves, grad_of(o, 1))
    torch.cuda.synchronize()
    print(f"profiled one forward + backward: T = {args.T}, config {args.config}")


if __name__ == "__main__":
    main()
