"""Times the CUDA kernel kinds that nsa_torch._debug.force chooses between, side by side on the
benchmark's inputs, prints the kernels each run recorded (nsa_torch._debug.plans) and how far each
kind's results are from the first kind's:

    fwd     force(fwd=) default | wide | mma: the compressed and window forward (the default is
            the warpgroup kernel on sm_90 for D, Dv <= 128)
    bwd     force(bwd=) default | mma: forward + backward of the compressed, selected and window
            branches (the dQ and dK/dV kernels; the default is wgmma on sm_90)
    slc     force(slc_fwd=) warp | union: the selected branch's forward and forward + backward
            (its dQ by tokens follows)
    slcfwd  force(slc_fwd=) default | blocks | warp | union: the selected branch's forward (by
            blocks: sm_90, the default for G < 16)
    slcdq   force(slc_dq=) default | blocks | tokens: the selected branch's forward + backward
            (dQ by blocks: sm_90, the default for G < 16)
    select  force(select=) default | wgmma | mma: select_blocks (the default is the warpgroup
            kernel on sm_90 for D in {64, 128} and G = 16, 32); the diff is the share of
            (token, KV head) rows whose selection differs (near-ties)
    split   force(split_tokens=) default | 0 | 1024 | 16384: forward + backward (the dK/dV split)

A kind the shape or GPU cannot take is reported as refused, with the reason.

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
from nsa_torch import _debug  # noqa: E402
from triton.testing import do_bench  # noqa: E402

# switch -> (the key of _debug.force, its kinds; "default" is the plan's own choice)
SWITCHES = {
    "fwd": ("fwd", ["default", "wide", "mma"]),
    "bwd": ("bwd", ["default", "mma"]),
    "slc": ("slc_fwd", ["warp", "union"]),
    "slcfwd": ("slc_fwd", ["default", "blocks", "warp", "union"]),
    "slcdq": ("slc_dq", ["default", "blocks", "tokens"]),
    "select": ("select", ["default", "wgmma", "mma"]),
    "split": ("split_tokens", ["default", 0, 1024, 16384]),
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


def forced(key, kind):
    """_debug.force of one kind ("default": no override)."""
    return _debug.force(**{key: None if kind == "default" else kind})


def ran(fn, key):
    """Runs fn once and returns what the plans it recorded chose for key (and the dQ by tokens's
    kernel for slc_dq), e.g. "nsa.compressed_attention_fwd:wgmma"."""
    with _debug.plans() as plans:
        fn()
    shown = []
    for p in plans:
        if key in p:
            shown.append(f"{p['op'].removeprefix('nsa.')}:{p[key]}" + (f"/{p['slc_tokens']}" if "slc_tokens" in p else ""))
    return " ".join(shown)


def run_select(name, T, x, sel, lse):
    """select_blocks (keyword arguments sel, under no_grad) per kind of force(select=)."""
    key, kinds = SWITCHES["select"]
    ref = None
    for kind in kinds:
        head = f"{name} T={T} select force {key}={kind!s:8s}"
        try:
            with forced(key, kind):
                call = lambda: nsa_torch.select_blocks(x["q"], x["k_cmp"], lse, **sel)  # noqa: E731
                plan = ran(call, key)
                ms = do_bench(call, warmup=25, rep=100)
                idx = call()
        except ValueError as e:
            print(f"{head} refused: {e}", flush=True)
            continue
        line = f"{head} fwd {ms:8.3f} ms  ran {plan}"
        if ref is None:
            ref, first = idx, kind
        else:
            differ = (idx.sort(-1).values != ref.sort(-1).values).any(-1).float().mean().item()
            line += f"  rows whose selection differs from {first}: {differ:.2e}"
        print(line, flush=True)


def results(fn, names, x, backward):
    """The outputs (and with backward, the gradients under fixed upstream gradients), as float."""
    outs = fn()
    if not backward:
        return [o.float() for o in outs]
    douts = [grad_of(o, 3 + i) for i, o in enumerate(outs)]
    grads = torch.autograd.grad(outs, [x[n] for n in names], douts)
    return [o.float() for o in outs] + [g.float() for g in grads]


def run(switch, name, T):
    key, kinds = SWITCHES[switch]
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
            "split": ("cmp", "slc")}[switch]
    backward = switch not in ("fwd", "slcfwd")
    for br, (fn, names) in branches(x, hp, idx).items():
        if br not in todo:
            continue
        ref = None
        for kind in kinds:
            head = f"{name} T={T} {br} force {key}={kind!s:8s}"
            try:
                with forced(key, kind):
                    plan = ran(lambda: results(fn, names, x, backward), "split" if key == "split_tokens" else key)
                    with torch.no_grad():
                        fwd = do_bench(fn, warmup=25, rep=100)
                    line = f"{head} fwd {fwd:8.3f} ms"
                    if backward:
                        douts = [grad_of(o, 3 + i) for i, o in enumerate(fn())]
                        fb = do_bench(lambda: torch.autograd.grad(fn(), [x[n] for n in names], douts), warmup=25,
                                      rep=100)
                        line += f"  fwd+bwd {fb:8.3f} ms"
                    res = results(fn, names, x, backward)
            except ValueError as e:
                print(f"{head} refused: {e}", flush=True)
                continue
            line += f"  ran {plan}"
            if ref is None:
                ref, first = res, kind
            else:
                diff = ", ".join(f"{(a - b).nan_to_num().abs().max().item():.2e}" for a, b in zip(res, ref))
                line += f"  max |diff| to {first} (outputs, grads): {diff}"
            print(line, flush=True)


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
