"""Times the compressed and window forward with each CUDA forward kernel
(NSA_CUDA_FWD_KERNEL=narrow: 16 rows per warp, attn_fwd_kernel; wide: 32 rows per warp,
attn_fwd_wide_kernel; wgmma: Hopper warpgroup products, attn_fwd_wgmma_kernel, sm_90 only) on the
benchmark's inputs, and prints how far each one's outputs are from the wide kernel's.

    python3 tools/ab_fwd.py --T 65536 --configs g16 g4
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

from bench_attention import CONFIGS, make_inputs  # noqa: E402

import nsa_torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--configs", nargs="+", default=["g16"])
    args = ap.parse_args()
    for name in args.configs:
        cfg = CONFIGS[name]
        hp = cfg["hp"]
        x = make_inputs(args.T, cfg)
        branches = {
            "cmp": lambda: nsa_torch.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], block_size=hp["block_size"],
                                                          block_stride=hp["block_stride"]),
            "swa": lambda: nsa_torch.sliding_window_attention(x["q"], x["k"], x["v"], window_size=hp["window_size"]),
        }
        for br, fn in branches.items():
            outs = {}
            kinds = ["narrow", "wide"] + (["wgmma"] if torch.cuda.get_device_capability() == (9, 0) else [])
            for kind in kinds:
                os.environ["NSA_CUDA_FWD_KERNEL"] = kind
                with torch.no_grad():
                    ms = do_bench(fn, warmup=25, rep=100)
                    r = fn()
                o, lse = r if isinstance(r, tuple) else (r, torch.zeros(1, device=r.device))
                outs[kind] = (o.float(), lse.float())
                print(f"{name} T={args.T} {br} fwd {kind:6s}: {ms:8.3f} ms", flush=True)
            for kind in kinds:
                if kind == "wide":
                    continue
                do = (outs[kind][0] - outs["wide"][0]).abs().max().item()
                dl = (outs[kind][1] - outs["wide"][1]).nan_to_num().abs().max().item()
                print(f"{name} {br} max |{kind} - wide| o {do:.2e}, lse {dl:.2e}", flush=True)
        os.environ.pop("NSA_CUDA_FWD_KERNEL", None)


if __name__ == "__main__":
    main()
