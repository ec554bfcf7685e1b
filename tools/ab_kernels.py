"""Times the CUDA kernel kinds that an environment switch chooses between, side by side on the
benchmark's inputs, and prints how far each kind's results are from the first kind's:

    fwd   NSA_CUDA_FWD_KERNEL = default | wgmma_kv2 | wide | narrow: the compressed and window
          forward (the default is the warpgroup kernel with one stage of V on sm_90, else wide)
    bwd   NSA_CUDA_BWD_KERNEL = default | mma: forward + backward of the compressed, selected and
          window branches (the dQ and dK/dV kernels; the default is wgmma on sm_90)
    slc   NSA_CUDA_SLC_KERNEL = union | warp: the selected branch's forward and forward + backward
    slcfwd  NSA_CUDA_SLC_FWD_KERNEL = default | blocks | tokens: the selected branch's forward
          (by blocks: sm_90, the default for G < 16)
    select  NSA_CUDA_SELECT_KERNEL = default | wgmma | mma: select_blocks (the default is the
          warpgroup kernel on sm_90 for D in {64, 128} and G = 16, 32); the diff is the share of
          (token, KV head) rows whose selection differs (near-ties)
    slcdq NSA_CUDA_SLC_DQ_KERNEL = default | blocks | tokens: the selected branch's forward +
          backward (dQ by blocks: sm_90, the default for G < 16)
    slckeys NSA_CUDA_SLC_WARP_KEYS = default | 16 | 32: keys per sub-tile of the selected
          branch's per-warp forward and dQ (the default is 16)
    slcstages NSA_CUDA_SLC_WARP_STAGES = default | 2 | 3: their stages of 16-key sub-tiles (the
          default is 2)

    python3 tools/ab_kernels.py fwd bwd --T 65536 --configs g16 g4
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

SWITCHES = {
    "fwd": ("NSA_CUDA_FWD_KERNEL", ["default", "wgmma_kv2", "wide", "narrow"]),
    "bwd": ("NSA_CUDA_BWD_KERNEL", ["default", "mma"]),
    "slc": ("NSA_CUDA_SLC_KERNEL", ["warp", "union"]),
    "slcfwd": ("NSA_CUDA_SLC_FWD_KERNEL", ["default", "blocks", "tokens"]),
    "slcdq": ("NSA_CUDA_SLC_DQ_KERNEL", ["default", "blocks", "tokens"]),
    "select": ("NSA_CUDA_SELECT_KERNEL", ["default", "wgmma", "mma"]),
    "slckeys": ("NSA_CUDA_SLC_WARP_KEYS", ["default", "16", "32"]),
    "slcstages": ("NSA_CUDA_SLC_WARP_STAGES", ["default", "2", "3"]),
}


def branches(x, hp, idx):
    """name -> (function returning the outputs, the inputs whose gradients count)."""
    return {
        "cmp": (lambda: nsa_torch.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], block_size=hp["block_size"],
                                                       block_stride=hp["block_stride"]), ("q", "k_cmp", "v_cmp")),
        "slc": (lambda: (nsa_torch.selected_attention(x["q"], x["k"], x["v"], idx, select_size=hp["select_size"]),),
                ("q", "k", "v")),
        "swa": (lambda: (nsa_torch.sliding_window_attention(x["q"], x["k"], x["v"], window_size=hp["window_size"]),),
                ("q", "k", "v")),
    }


def set_kind(var, kind):
    if kind == "default":
        os.environ.pop(var, None)
    else:
        os.environ[var] = kind


def run_select(name, T, x, sel, lse):
    """select_blocks (keyword arguments sel, under no_grad) per kind of NSA_CUDA_SELECT_KERNEL."""
    var, kinds = SWITCHES["select"]
    ref = None
    for kind in kinds:
        set_kind(var, kind)
        ms = do_bench(lambda: nsa_torch.select_blocks(x["q"], x["k_cmp"], lse, **sel), warmup=25, rep=100)
        idx = nsa_torch.select_blocks(x["q"], x["k_cmp"], lse, **sel)
        line = f"{name} T={T} select {var}={kind:8s} fwd {ms:8.3f} ms"
        if ref is None:
            ref = idx
        else:
            differ = (idx.sort(-1).values != ref.sort(-1).values).any(-1).float().mean().item()
            line += f"  rows whose selection differs from {kinds[0]}: {differ:.2e}"
        print(line, flush=True)
    os.environ.pop(var, None)


def results(fn, names, x, backward):
    """The outputs (and with backward, the gradients under fixed upstream gradients), as float."""
    outs = fn()
    if not backward:
        return [o.float() for o in outs]
    douts = [grad_of(o, 3 + i) for i, o in enumerate(outs)]
    grads = torch.autograd.grad(outs, [x[n] for n in names], douts)
    return [o.float() for o in outs] + [g.float() for g in grads]


def run(switch, name, T):
    var, kinds = SWITCHES[switch]
    cfg = CONFIGS[name]
    hp = cfg["hp"]
    x = make_inputs(T, cfg)
    sel = {k: hp[k] for k in ("block_size", "block_stride", "select_size", "num_selected", "num_initial", "num_local")}
    with torch.no_grad():
        _, lse = nsa_torch.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], block_size=hp["block_size"],
                                                block_stride=hp["block_stride"])
        if switch == "select":
            return run_select(name, T, x, sel, lse)
        idx = nsa_torch.select_blocks(x["q"], x["k_cmp"], lse, **sel)
    todo = {"fwd": ("cmp", "swa"), "bwd": ("cmp", "slc", "swa"), "slc": ("slc",), "slcfwd": ("slc",), "slcdq": ("slc",),
            "slckeys": ("slc",), "slcstages": ("slc",)}[switch]
    backward = switch not in ("fwd", "slcfwd")
    for br, (fn, names) in branches(x, hp, idx).items():
        if br not in todo:
            continue
        ref = None
        for kind in kinds:
            set_kind(var, kind)
            with torch.no_grad():
                fwd = do_bench(fn, warmup=25, rep=100)
            line = f"{name} T={T} {br} {var}={kind:8s} fwd {fwd:8.3f} ms"
            if backward:
                douts = [grad_of(o, 3 + i) for i, o in enumerate(fn())]
                fb = do_bench(lambda: torch.autograd.grad(fn(), [x[n] for n in names], douts), warmup=25, rep=100)
                line += f"  fwd+bwd {fb:8.3f} ms"
            res = results(fn, names, x, backward)
            if ref is None:
                ref = res
            else:
                diff = ", ".join(f"{(a - b).nan_to_num().abs().max().item():.2e}" for a, b in zip(res, ref))
                line += f"  max |diff| to {kinds[0]} (outputs, grads): {diff}"
            print(line, flush=True)
        os.environ.pop(var, None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("switches", nargs="+", choices=list(SWITCHES))
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--configs", nargs="+", default=["g16"], choices=list(CONFIGS))
    args = ap.parse_args()
    for switch in args.switches:
        for name in args.configs:
            run(switch, name, args.T)


if __name__ == "__main__":
    main()
