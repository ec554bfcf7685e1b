"""Layer benchmark: one nsa_torch.NativeSparseAttention layer against the same layer with full
causal attention (SDPA), forward and forward+backward, hidden states [1, T, hidden] in and out.

    python benchmarks/bench_layer.py [--lengths 65536 32768 16384 8192] [--hidden 4096]
        [--heads 64] [--kv-heads 4] [--head-dim 128] [--out-dir benchmarks/results]
        [--time-budget SECONDS] [--device cuda|cpu] [--dtype bf16|fp16|fp32] [--tiny]

- nsa: NativeSparseAttention with the paper's hyper-parameters (l = 32, d = 16, l' = 64, n = 16,
  w = 512, mlp compression), all of it timed: projections, compression, gates, rotary, NSA, o_proj.
- sdpa: nsa_torch.modules.FullAttention.twin_of(the layer): its q/k/v/o projections (the same
  weights) and rotary embedding with
  F.scaled_dot_product_attention(is_causal=True, enable_gqa=True) in between (k/v repeated to
  all query heads where enable_gqa is refused); on CUDA the cuDNN backend (flash if cuDNN fails,
  said in the note), on CPU torch's default.

Forward runs under torch.no_grad(); forward+backward is torch.autograd.grad of a fixed random
grad_output to the input and every parameter (nothing accumulates). CUDA: triton do_bench
medians, and peak memory = torch.cuda.max_memory_allocated() during one forward+backward minus
the memory allocated before it (weights and input excluded, their gradients and every
activation included). CPU: time.perf_counter medians, peak memory n/a. Writes
<out-dir>/layer_<gpu>_torch<version>_<commit>.csv (after every measurement) and .png (time vs T,
log-log; peak memory vs T on CUDA), and prints a markdown table between marker lines.
--tiny: a CPU smoke run (hidden 64, HQ 4, H 2, D 16, T 256 128, l 16, d 8, l' 32, n 4, w 64).
"""
import argparse
import os
import statistics
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_attention import (PAPER, Budget, Recorder, commit, fmt, ratio,  # noqa: E402
                             short_error, slug, t_label)

import nsa_torch  # noqa: E402  (bench_attention put the repository root on sys.path)
from nsa_torch.modules import FullAttention  # noqa: E402

TINY = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, lengths=[256, 128])
TINY_HP = dict(PAPER, block_size=16, block_stride=8, select_size=32, num_selected=4, window_size=64)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("nsa", "sdpa")
FIELDS = ["gpu", "torch", "commit", "dtype", "T", "hidden", "HQ", "H", "D", "block_size",
          "block_stride", "select_size", "num_selected", "window_size", "impl", "mode", "ms",
          "peak_mib", "note"]


class LayerRecorder(Recorder):
    fields = FIELDS

    def add(self, T, impl, mode, ms, peak=None, note=""):
        self.rows.append(dict(self.meta, T=T, impl=impl, mode=mode,
                              ms="" if ms is None else f"{ms:.4f}",
                              peak_mib="" if peak is None else f"{peak:.1f}", note=note))
        shown = "n/a" if ms is None else f"{ms:9.3f} ms"
        mem = "" if peak is None else f" peak {peak:.0f} MiB"
        print(f"  T={T:6d} {impl:5s} {mode:7s} {shown}{mem} {note}", flush=True)
        self.write()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def release(device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def median_ms(run, args):
    """do_bench median on CUDA, perf_counter median of --repeats calls on CPU (ms)."""
    if args.device == "cuda":
        from triton.testing import do_bench
        return float(do_bench(run, warmup=args.warmup, rep=args.rep, return_mode="median"))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def peak_mib(run, device):
    """Peak memory allocated during run() above what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    release(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def sdpa_variants(device):
    """(note, backends, gqa) to try in order for the SDPA twin."""
    if device != "cuda":
        return [("default backend", None, True), ("default backend, k/v repeated", None, False)]
    from torch.nn.attention import SDPBackend
    cudnn, flash = [SDPBackend.CUDNN_ATTENTION], [SDPBackend.FLASH_ATTENTION]
    return [("cudnn", cudnn, True), ("cudnn, k/v repeated", cudnn, False),
            ("flash (cuDNN failed)", flash, True), ("flash (cuDNN failed), k/v repeated", flash, False)]


def bench_impl(rec, budget, args, T, impl, layer, x, dout, note):
    """Memory of one forward+backward, then the forward and forward+backward times of layer."""
    wrt = [x] + [p for p in layer.parameters() if p.requires_grad]

    def fwd():
        with torch.no_grad():
            layer(x)

    def fwdbwd():
        torch.autograd.grad(layer(x), wrt, dout, allow_unused=True)

    for mode, run in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        if budget.left() < 5:
            rec.add(T, impl, mode, None, note="skipped: time budget")
            continue
        try:
            run()  # warm-up outside the timing and the memory count
            sync(args.device)
            peak = peak_mib(run, args.device) if mode == "fwdbwd" else None
            rec.add(T, impl, mode, median_ms(run, args), peak, note)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            rec.add(T, impl, mode, None, note="n/a: " + short_error(e))
            if args.verbose:
                traceback.print_exc()
        finally:
            release(args.device)


def bench_length(rec, budget, args, T, nsa_layer):
    gen = torch.Generator(device=args.device).manual_seed(T)
    x = torch.randn(1, T, args.hidden, generator=gen, device=args.device, dtype=args.torch_dtype)
    x.requires_grad_(True)
    dout = torch.randn(x.shape, generator=gen, device=args.device, dtype=args.torch_dtype)
    bench_impl(rec, budget, args, T, "nsa", nsa_layer, x, dout, "")
    last = None
    for note, backends, gqa in sdpa_variants(args.device):  # the first that runs
        twin = FullAttention.twin_of(nsa_layer, backends, gqa)
        try:
            with torch.no_grad():
                twin(x)
            sync(args.device)
        except Exception as e:  # noqa: BLE001
            last = e
            release(args.device)
            continue
        bench_impl(rec, budget, args, T, "sdpa", twin, x, dout, note)
        return
    for mode in ("fwd", "fwdbwd"):
        rec.add(T, "sdpa", mode, None, note="n/a: " + short_error(last))


def markdown(rows, title):
    cells = {}
    for r in rows:
        cells.setdefault(int(r["T"]), {})[(r["impl"], r["mode"])] = r
    ms = lambda r: float(r["ms"]) if r and r["ms"] else None  # noqa: E731
    mib = lambda r: f"{float(r['peak_mib']):.0f}" if r and r["peak_mib"] else "n/a"  # noqa: E731
    head = ["T", "NSA fwd ms", "NSA fwd+bwd ms", "SDPA fwd ms", "SDPA fwd+bwd ms",
            "NSA peak MiB", "SDPA peak MiB"]
    lines = ["### nsa-bench table begin", f"**layer**: {title}",
             "Times in ms (median); (Nx) = SDPA / NSA, > 1 means NSA is faster. Peak MiB: one "
             "forward+backward, above the weights and the input.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = set()
    for T in sorted(cells):
        c = cells[T]
        nf, nb = ms(c.get(("nsa", "fwd"))), ms(c.get(("nsa", "fwdbwd")))
        sf, sb = ms(c.get(("sdpa", "fwd"))), ms(c.get(("sdpa", "fwdbwd")))
        lines.append("| " + " | ".join([t_label(T), fmt(nf), fmt(nb), fmt(sf) + ratio(sf, nf),
                                        fmt(sb) + ratio(sb, nb), mib(c.get(("nsa", "fwdbwd"))),
                                        mib(c.get(("sdpa", "fwdbwd")))]) + " |")
        notes |= {f"{i}: {r['note']}" for (i, _), r in c.items() if r["note"]}
    lines += [""] + sorted(notes) + ["### nsa-bench table end"]
    return "\n".join(lines)


def plot(rows, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"no plot ({short_error(e)})")
        return None
    has_mem = any(r["peak_mib"] for r in rows)
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(11 if has_mem else 6, 4),
                             squeeze=False)
    Ts = sorted({int(r["T"]) for r in rows})
    style = {"nsa": ("tab:red", "NSA"), "sdpa": ("tab:blue", "SDPA")}
    for impl in IMPLS:
        color, label = style[impl]
        for mode, ls in (("fwd", "--"), ("fwdbwd", "-")):
            pts = sorted((int(r["T"]), float(r["ms"])) for r in rows
                         if r["impl"] == impl and r["mode"] == mode and r["ms"])
            if pts:
                axes[0][0].plot(*zip(*pts), ls=ls, marker="o", color=color,
                                label=f"{label} {'fwd' if mode == 'fwd' else 'fwd+bwd'}")
        pts = sorted((int(r["T"]), float(r["peak_mib"])) for r in rows
                     if r["impl"] == impl and r["peak_mib"])
        if has_mem and pts:
            axes[0][1].plot(*zip(*pts), marker="o", color=color, label=label)
    for ax, ylabel in zip(axes[0], ("time (ms)", "peak memory, fwd+bwd (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(Ts, [t_label(T) for T in Ts])
        ax.minorticks_off()
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title.replace("; ", "\n"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="default 65536 32768 16384 8192 (longest first)")
    ap.add_argument("--hidden", type=int, default=None, help="default 4096")
    ap.add_argument("--heads", type=int, default=None, help="query heads HQ, default 64")
    ap.add_argument("--kv-heads", type=int, default=None, help="key/value heads H, default 4")
    ap.add_argument("--head-dim", type=int, default=None, help="default 128")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at tiny sizes")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds; measurements that would start later are recorded as skipped")
    ap.add_argument("--device", default=None, help="default cuda if available, else cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--warmup", type=float, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=float, default=100, help="do_bench repetition time (ms)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per median on CPU")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = ap.parse_args()

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.torch_dtype = DTYPES[args.dtype]
    sizes = TINY if args.tiny else dict(hidden=4096, heads=64, kv_heads=4, head_dim=128,
                                        lengths=[65536, 32768, 16384, 8192])
    for k, v in sizes.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    hp = TINY_HP if args.tiny else PAPER
    if nsa_torch._C is None:
        sys.exit(f"nsa_torch._C is not built: {nsa_torch._C_ERROR}")

    torch.manual_seed(0)
    with torch.device(args.device):
        layer = nsa_torch.NativeSparseAttention(args.hidden, args.heads, args.kv_heads,
                                                args.head_dim, **hp)
    layer = layer.to(args.torch_dtype)

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    sha = commit()
    meta = dict(gpu=gpu, torch=torch.__version__, commit=sha, dtype=args.dtype,
                hidden=args.hidden, HQ=args.heads, H=args.kv_heads, D=args.head_dim,
                **{k: hp[k] for k in ("block_size", "block_stride", "select_size",
                                      "num_selected", "window_size")})
    name = f"layer{'-tiny' if args.tiny else ''}_{slug(gpu)}_torch{torch.__version__.split('+')[0]}_{sha}"
    csv_path = os.path.join(os.path.abspath(args.out_dir), name + ".csv")
    rec = LayerRecorder(meta, [csv_path], args)
    title = (f"{gpu}, torch {torch.__version__}, {args.dtype}, commit {sha}; hidden {args.hidden}, "
             f"HQ={args.heads}, H={args.kv_heads}, D={args.head_dim}, l={hp['block_size']}, "
             f"d={hp['block_stride']}, l'={hp['select_size']}, n={hp['num_selected']}, "
             f"w={hp['window_size']}")
    print(title + f"; lengths {args.lengths}", flush=True)

    budget = Budget(args.time_budget)
    t0 = time.monotonic()
    for T in args.lengths:
        print(f"[{time.monotonic() - t0:7.1f} s] T={T}", flush=True)
        bench_length(rec, budget, args, T, layer)
        release(args.device)

    print(f"csv: {csv_path}")
    png = plot(rec.rows, os.path.splitext(csv_path)[0] + ".png", title) if rec.rows else None
    if png:
        print(f"plot: {png}")
    print(markdown(rec.rows, title))
    print(f"total {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
