"""Times the selected branch's forward and forward + backward with both CUDA kernel kinds
(NSA_CUDA_SLC_KERNEL=union / warp) on the benchmark's inputs.

    python3 tools/ab_slc.py --T 65536 --configs g16 g4
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
from triton.testing import do_bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--configs", nargs="+", default=["g16", "g4"])
    args = ap.parse_args()
    for name in args.configs:
        cfg = CONFIGS[name]
        hp = cfg["hp"]
        x = make_inputs(args.T, cfg)
        q, k, v, k_cmp = x["q"], x["k"], x["v"], x["k_cmp"]
        with torch.no_grad():
            _, lse = nsa_torch.compressed_attention(q, k_cmp, x["v_cmp"], block_size=hp["block_size"],
                                                    block_stride=hp["block_stride"])
            idx = nsa_torch.select_blocks(q, k_cmp, lse, **{k_: hp[k_] for k_ in (
                "block_size", "block_stride", "select_size", "num_selected", "num_initial", "num_local")})

        def slc():
            return nsa_torch.selected_attention(q, k, v, idx, select_size=hp["select_size"])

        dout = grad_of(slc(), 3)
        outs = {}
        for kind in ("union", "warp"):
            os.environ["NSA_CUDA_SLC_KERNEL"] = kind
            fwd = do_bench(slc, warmup=25, rep=100)
            fb = do_bench(lambda: torch.autograd.grad(slc(), (q, k, v), dout), warmup=25, rep=100)
            outs[kind] = [slc().float()] + [g.float() for g in torch.autograd.grad(slc(), (q, k, v), dout)]
            print(f"{name} T={args.T} slc {kind:5s}: fwd {fwd:8.3f} ms  fwd+bwd {fb:8.3f} ms", flush=True)
        diff = [(a - b).abs().max().item() for a, b in zip(outs["union"], outs["warp"])]
        print(f"{name} max |union - warp| o, dq, dk, dv: " + ", ".join(f"{d:.2e}" for d in diff), flush=True)
        os.environ.pop("NSA_CUDA_SLC_KERNEL", None)


if __name__ == "__main__":
    main()
