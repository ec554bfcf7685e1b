"""Smoke check of every CUDA op on small shapes, one op per subprocess (a crash names its op).

    python3 tools/cuda_smoke.py            # all ops
    python3 tools/cuda_smoke.py cmp_fwd    # one op, in this process (for a debugger)

Prints the relative error of each output against nsa_torch.reference (float64)."""
import os
import subprocess
import sys

import torch

OPS = ["cmp_fwd", "cmp_bwd", "topk", "slc_fwd", "slc_bwd", "swa_fwd", "swa_bwd", "nsa"]


def rel(a, b):
    a, b = a.double(), b.double()
    if torch.isnan(a).any():
        return float("nan")
    fin = torch.isfinite(b)
    return ((a[fin] - b[fin]).norm() / b[fin].norm().clamp_min(1e-30)).item()


def run(op, T=300, HQ=8, H=2, D=128, dtype=torch.bfloat16):
    import nsa_torch
    from nsa_torch import reference as ref
    torch.manual_seed(0)
    dev = "cuda"
    l, d, ls, n = 32, 16, 64, 4
    nc = (T - l) // d + 1
    q = torch.randn(1, T, HQ, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(1, T, H, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(1, T, H, D, device=dev, dtype=dtype, requires_grad=True)
    kc = torch.randn(1, nc, H, D, device=dev, dtype=dtype, requires_grad=True)
    vc = torch.randn(1, nc, H, D, device=dev, dtype=dtype, requires_grad=True)
    up = lambda *x: [t.detach().double().requires_grad_() for t in x]  # noqa: E731
    q64, k64, v64, kc64, vc64 = up(q, k, v, kc, vc)
    out = {}
    if op.startswith("cmp"):
        o, lse = nsa_torch.compressed_attention(q, kc, vc)
        o64, lse64 = ref.compressed_attention(q64, kc64, vc64)
        out["o"], out["lse"] = rel(o, o64), rel(lse, lse64)
        if op == "cmp_bwd":
            g = torch.randn_like(o)
            a = torch.autograd.grad(o, (q, kc, vc), g)
            b = torch.autograd.grad(o64, (q64, kc64, vc64), g.double())
            out.update({n_: rel(x, y) for n_, x, y in zip(("dq", "dk", "dv"), a, b)})
    elif op == "topk":
        _, lse = ref.compressed_attention(q64, kc64, vc64)
        idx = nsa_torch.select_blocks(q, kc, lse.float(), num_selected=n)
        idx64 = ref.select_blocks(q64, kc64, lse, num_selected=n)
        out["match"] = (idx.cpu() == idx64.cpu()).float().mean().item()
    elif op.startswith("slc") or op.startswith("swa"):
        if op.startswith("slc"):
            _, lse = ref.compressed_attention(q64, kc64, vc64)
            idx = ref.select_blocks(q64, kc64, lse, num_selected=n).to(dev)
            o = nsa_torch.selected_attention(q, k, v, idx)
            o64 = ref.selected_attention(q64, k64, v64, idx)
        else:
            o = nsa_torch.sliding_window_attention(q, k, v, window_size=100)
            o64 = ref.sliding_window_attention(q64, k64, v64, window_size=100)
        out["o"] = rel(o, o64)
        if op.endswith("bwd"):
            g = torch.randn_like(o)
            a = torch.autograd.grad(o, (q, k, v), g)
            b = torch.autograd.grad(o64, (q64, k64, v64), g.double())
            out.update({n_: rel(x, y) for n_, x, y in zip(("dq", "dk", "dv"), a, b)})
    elif op == "nsa":
        gates = [torch.rand(1, T, HQ, device=dev, dtype=dtype) for _ in range(3)]
        o = nsa_torch.nsa_attention(q, k, v, kc, vc, *gates, num_selected=n)
        o64 = ref.nsa_attention(q64, k64, v64, kc64, vc64, *[x.double() for x in gates], num_selected=n)
        out["o"] = rel(o, o64)
        g = torch.randn_like(o)
        a = torch.autograd.grad(o, (q, k, v, kc, vc), g)
        b = torch.autograd.grad(o64, (q64, k64, v64, kc64, vc64), g.double())
        out.update({n_: rel(x, y) for n_, x, y in zip(("dq", "dk", "dv", "dkc", "dvc"), a, b)})
    torch.cuda.synchronize()
    print(op, " ".join(f"{k_}={v_:.3g}" for k_, v_ in out.items()), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run(sys.argv[1])
    else:
        for op in OPS:
            r = subprocess.run([sys.executable, __file__, op], capture_output=True, text=True,
                               timeout=300)
            lines = (r.stdout + r.stderr).strip().splitlines()
            print(f"{op}: rc={r.returncode} " + (lines[-1] if lines else ""), flush=True)
            if r.returncode != 0:
                print("\n".join(lines[-15:]), flush=True)
