"""The demo's model (examples/model.py) on CUDA in bfloat16 against the same weights on CPU in
float64: the answer loss and every parameter's gradient, at a few (rows, length) shapes. A bug
in a kernel's backward for the model's shapes shows as a gradient whose relative error is far
above bf16 noise (~1e-2) or whose cosine to the reference is far below 1. Then each NSA op at
the model's head shapes and hyper-parameters, on random inputs (outputs and input gradients,
the selected branch given the CUDA selection), names the op when the model is off.

    python tools/check_model_grads.py [--preset gpu] [--layers 2] [--shapes 64x64 2x1024 1x4096]
"""
import argparse
import copy
import os
import sys

import torch

import nsa_torch.functional as nsa_fn
from nsa_torch.modules import NSAConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from model import ModelConfig, TinyLM, masked_loss  # noqa: E402
import tasks  # noqa: E402
from train import PRESETS  # noqa: E402


def loss_and_grads(model, tok, mask, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast(tok.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = masked_loss(model(tok), tok, mask)
    loss.backward()
    return loss.item(), {n: p.grad.detach().double().cpu() for n, p in model.named_parameters()
                         if p.grad is not None}


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_ops(B, T, cfg, hyper, gen, dev, dtype):
    """Each branch op on dev in dtype (CUDA: bf16) against CPU float64: output and input gradients."""
    HQ, H, D = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    l, d = hyper["block_size"], hyper["block_stride"]
    Nc = (T - l) // d + 1 if T >= l else 0

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    x = dict(q=r(B, T, HQ, D), k=r(B, T, H, D), v=r(B, T, H, D), k_cmp=r(B, Nc, H, D),
             v_cmp=r(B, Nc, H, D))
    gpu = {n: t.to(dev, dtype).requires_grad_() for n, t in x.items()}
    cpu = {n: gpu[n].detach().double().cpu().requires_grad_() for n in x}
    with torch.no_grad():
        _, lse = nsa_fn.compressed_attention(gpu["q"], gpu["k_cmp"], gpu["v_cmp"], block_size=l, block_stride=d)
        idx = nsa_fn.select_blocks(gpu["q"], gpu["k_cmp"], lse, block_size=l, block_stride=d,
                                   select_size=hyper["select_size"], num_selected=hyper["num_selected"],
                                   num_initial=hyper["num_initial"], num_local=hyper["num_local"])
    branches = {
        "compressed": (lambda t, i: nsa_fn.compressed_attention(t["q"], t["k_cmp"], t["v_cmp"], block_size=l,
                                                                 block_stride=d)[0], ("q", "k_cmp", "v_cmp")),
        "selected": (lambda t, i: nsa_fn.selected_attention(t["q"], t["k"], t["v"], i,
                                                             select_size=hyper["select_size"]), ("q", "k", "v")),
        "window": (lambda t, i: nsa_fn.sliding_window_attention(t["q"], t["k"], t["v"],
                                                                 window_size=hyper["window_size"]), ("q", "k", "v")),
    }
    worst = 0.0
    for name, (fn, ins) in branches.items():
        o_g = fn(gpu, idx)
        o_c = fn(cpu, idx.cpu())
        dout = r(*o_c.shape)
        gg = torch.autograd.grad(o_g, [gpu[n] for n in ins], dout.to(dev, dtype))
        gc = torch.autograd.grad(o_c, [cpu[n] for n in ins], dout)
        errs = [rel(o_g, o_c)] + [rel(a, b) for a, b in zip(gg, gc)]
        worst = max(worst, *errs)
        print(f"  op {name:10s} B {B} T {T}: out {errs[0]:.2e}, " + ", ".join(
            f"d{n} {e:.2e}" for n, e in zip(ins, errs[1:])))
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpu", choices=list(PRESETS))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=["64x64", "2x1024", "1x4096"],
                    help="ROWSxT of each check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cpu: float32 without autocast (a smoke test)")
    args = ap.parse_args()
    kw = dict(PRESETS[args.preset]["model"], layers=args.layers)
    torch.manual_seed(args.seed)
    ref = TinyLM(ModelConfig(attn="nsa", **kw)).double()
    dev = torch.device(args.device)
    gpu = copy.deepcopy(ref).float().to(dev)
    gen = torch.Generator().manual_seed(args.seed)
    worst = 0.0
    for shape in args.shapes:
        B, T = map(int, shape.split("x"))
        tok, mask = tasks.batch("mix", B, T, gen)
        l_ref, g_ref = loss_and_grads(ref, tok, mask, False)
        l_gpu, g_gpu = loss_and_grads(gpu, tok.to(dev), mask.to(dev), dev.type == "cuda")
        print(f"== rows {B}, T {T}: loss float64 {l_ref:.6f}, {dev.type} {l_gpu:.6f}")
        rows = []
        for n, r in g_ref.items():
            g = g_gpu.get(n)
            if g is None:
                rows.append((float("inf"), -1.0, n))
                continue
            cos = torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0).item()
            rows.append((rel(g, r), cos, n))
        rows.sort(reverse=True)
        for err, cos, n in rows[:8]:
            print(f"  {n:40s} rel err {err:.3e}  cos {cos:.5f}")
        worst = max(worst, rows[0][0])
    print(f"worst relative gradient error: {worst:.3e}")
    hyper = NSAConfig(kw["hidden"], kw["heads"], kw["kv_heads"], kw["head_dim"], **kw.get("nsa", {})).hyper()
    print(f"ops at HQ {kw['heads']}, H {kw['kv_heads']}, D {kw['head_dim']}, {hyper}")
    w = 0.0
    for shape in args.shapes:
        B, T = map(int, shape.split("x"))
        w = max(w, check_ops(B, T, kw, hyper, gen, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32))
    print(f"worst relative op error: {w:.3e}")


if __name__ == "__main__":
    main()
