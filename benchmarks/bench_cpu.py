"""CPU benchmark: nsa_attention forward vs torch SDPA (causal) in the same process.

    python benchmarks/bench_cpu.py [--lengths 8192 16384 32768] [--dtype float32] [--csv FILE]

Configuration: B = 1, HQ = 8, H = 2, D = Dv = 64, the paper's hyper-parameters (l = 32, d = 16,
l' = 64, n = 16, w = 512). Times are medians over --repeats runs after one warm-up run; the
ratio is SDPA time / our time (> 1: we are faster). NSA is also split by branch.
"""
import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nsa_torch  # noqa: E402

HP = dict(block_size=32, block_stride=16, select_size=64, num_selected=16, num_initial=1,
          num_local=2, window_size=512)


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def inputs(T, HQ, H, D, dtype, gen):
    nc = (T - HP["block_size"]) // HP["block_stride"] + 1
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    q, k, v = r(1, T, HQ, D), r(1, T, H, D), r(1, T, H, D)
    k_cmp, v_cmp = r(1, nc, H, D), r(1, nc, H, D)
    g = [torch.sigmoid(r(1, T, HQ)) for _ in range(3)]
    return q, k, v, k_cmp, v_cmp, g


def bench(T, HQ, H, D, dtype, repeats, gen):
    q, k, v, k_cmp, v_cmp, g = inputs(T, HQ, H, D, dtype, gen)
    row = {"T": T}
    with torch.no_grad():
        row["nsa_fwd_s"] = median_time(lambda: nsa_torch.nsa_attention(q, k, v, k_cmp, v_cmp, *g, **HP), repeats)
        cmp_kw = dict(block_size=HP["block_size"], block_stride=HP["block_stride"])
        sel_kw = {k_: HP[k_] for k_ in ("block_size", "block_stride", "select_size", "num_selected",
                                        "num_initial", "num_local")}
        o_cmp, lse = nsa_torch.compressed_attention(q, k_cmp, v_cmp, **cmp_kw)
        idx = nsa_torch.select_blocks(q, k_cmp, lse, **sel_kw)
        row["cmp_s"] = median_time(lambda: nsa_torch.compressed_attention(q, k_cmp, v_cmp, **cmp_kw), repeats)
        row["select_s"] = median_time(lambda: nsa_torch.select_blocks(q, k_cmp, lse, **sel_kw), repeats)
        row["slc_s"] = median_time(lambda: nsa_torch.selected_attention(q, k, v, idx, select_size=HP["select_size"]), repeats)
        row["swa_s"] = median_time(lambda: nsa_torch.sliding_window_attention(q, k, v, window_size=HP["window_size"]), repeats)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # Expand K/V over the group outside the timed region: SDPA gets its fastest (MHA) path.
        kt = kt.repeat_interleave(HQ // H, dim=1)
        vt = vt.repeat_interleave(HQ // H, dim=1)
        row["sdpa_fwd_s"] = median_time(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), repeats)
    row["speedup"] = row["sdpa_fwd_s"] / row["nsa_fwd_s"]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    print(f"# nsa-torch CPU benchmark: commit {commit}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"B=1 HQ={args.heads} H={args.kv_heads} D={args.head_dim} {args.dtype}")
    rows = []
    for T in args.lengths:
        rows.append(bench(T, args.heads, args.kv_heads, args.head_dim, dtype, args.repeats, gen))
        r = rows[-1]
        print(f"T={T}: nsa {r['nsa_fwd_s']:.3f}s sdpa {r['sdpa_fwd_s']:.3f}s", flush=True)
    print()
    print("| T | NSA fwd (s) | cmp | select | slc | swa | SDPA causal fwd (s) | SDPA / NSA |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['nsa_fwd_s']:.3f} | {r['cmp_s']:.3f} | {r['select_s']:.3f} | "
              f"{r['slc_s']:.3f} | {r['swa_s']:.3f} | {r['sdpa_fwd_s']:.3f} | {r['speedup']:.2f}x |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            f.write(f"# commit {commit}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}\n")
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
