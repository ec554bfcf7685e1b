"""Decoding benchmark: one decode step (S = 1 new token per sequence) of one layer's attention,
nsa_torch.decode_attention against dense decoding and mdy666's NSA decode, in one process.

    python benchmarks/bench_decode.py [--lengths 65536 131072 32768 16384 8192]
        [--batches 16 1 64] [--kinds equal mixed] [--page-size 64] [--impls ...] [--quick]
        [--out-dir DIR] [--time-budget SECONDS] [--warmup 25] [--rep 100] [--windows 5]
        [--flash-nsa DIR] [--plot-only CSV] [--cpu-smoke] [--verbose]
        [--force cmp_splits=32,sel_splits=4 ...]   # plan variants of ours, timed beside it
        [--head-major]   # ours again with head-major caches, timed beside it

Configuration: HQ = 64, H = 4, D = Dv = 128, bf16, the paper's hyper-parameters (l = 32, d = 16,
l' = 64, n = 16, 1 initial and 2 local blocks, w = 512). For each context T and batch B the
caches are built directly as tensors (random values): raw K/V of capacity T, contiguous
[B, T, H, D] or a paged pool [B * T / page_size, page_size, H, D] with a shuffled block table;
compressed K/V [B, Nc(T), H, D]. Lengths (cache_seqlens) are T for every sequence (kind `equal`)
or spread evenly over [T/2, T] (kind `mixed`, B > 1).

Implementations (impl column):
- ours: nsa_torch.decode_attention (every branch, the selection and the gated sum; the
  compressed tokens are an input: the cache makes them), contiguous and paged;
- sdpa_flash / sdpa_efficient / sdpa_cudnn: torch SDPA of the new query against the whole
  cache (q [B, HQ, 1, D], k/v the cache viewed as [B, H, T, D], enable_gqa; k/v repeated to HQ
  heads where a backend refuses GQA; `mixed`: a key-padding mask);
- flash_attn / fa3: flash_attn_with_kvcache of flash-attn 2 / 3 when importable (cache_seqlens);
- flashinfer: BatchDecodeWithPagedKVCacheWrapper (tensor cores) over our paged pool when
  importable; benchmarks/carry_flashinfer.sh makes the wheels that bring it to a machine
  without package access;
- mdy666: flash_nsa.inference.nsa_decode (mdy666's Triton NSA decode, ../shared/anchors or
  --flash-nsa) in its own layout: one page pool (page 128) holding the raw and the compressed
  K/V, gate logits [B, HQ, 3]; per step it also mean-pools the compressed token that the new
  length completes (T % 16 == 0: every sequence of `equal`) and combines the branches: its time
  counts everything it does per step. Its window counts w + 1 keys: it gets w - 1.
`dense` = the fastest of the sdpa_*, flash_attn, fa3 and flashinfer rows of the same T, B and
lengths.

Timing (CUDA): every step is captured in a CUDA graph and the graph is replayed, as serving
engines run decode; times are CUDA-event windows of back-to-back replays (do_bench-style warmup
of --warmup ms, then --windows windows over --rep ms), the median window / steps. So that one
layer's step does not find its cache in L2 (in a model the other layers' caches pass through
L2 between two steps of a layer), a graph holds R steps over R copies of the caches, R chosen
so that they read >= 8x the L2 size (column copies). ours is also timed eagerly (mode eager: the
same steps called from Python back to back, launch overhead included). CPU (--cpu-smoke): tiny
sizes, float32, perf_counter windows, eager only, for testing the script.

Bytes (column bytes): what the step must read from the caches, bf16, K and V, per sequence and
KV head: NSA reads Nc(L) compressed tokens, the selected blocks' tokens (n blocks of l', fewer
when the sequence has fewer) and min(w, L) window tokens; dense reads L tokens. The copy
bandwidth (impl copy) is a device-to-device copy of a 1 GiB buffer timed at the start (read +
write bytes / time); byte floor = bytes / bandwidth; floor_share = floor / measured time.

CSV columns: gpu, torch, triton, commit, dtype, T, B, lengths (equal|mixed), tokens (sum of
the lengths), layout (contiguous|paged), page_size, HQ, H, D, Dv, block_size, block_stride,
select_size, num_selected, window_size, impl, mode (graph|eager; d2d for the copy), copies, ms
(per step), bytes, copy_gbps, floor_ms, floor_share, dense_ms, dense_impl, dense_ratio
(dense_ms / ms), mdy666_ratio (mdy666's graph time / ms, on ours' rows), byte_ratio (dense
bytes / NSA bytes), note (why a row has no time, or how it was run).

Writes benchmarks/results/decode_<gpu>_torch<version>_<commit>.csv after every measurement (and
the same CSV into --out-dir), the plot beside the first CSV, and prints markdown tables and the
issue's targets (64k B=16: >= 8x dense and >= 70% of copy bandwidth; 128k B=1: >= 5x) last.
Every measurement is in try/except: a failure, an absent package or caches that do not fit are
recorded with the reason instead of a time. --cpu-smoke writes only into --out-dir (default
benchmarks/results).
"""
import argparse
import gc
import math
import os
import statistics
import sys
import time
import traceback
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_attention import (PAPER, Budget, Recorder, commit, read_csv, short_error,  # noqa: E402
                             slug, t_label)

import nsa_torch  # noqa: E402  (bench_attention put the repository root on sys.path)
from nsa_torch import _debug  # noqa: E402

GPU_SIZES = dict(HQ=64, H=4, D=128, Dv=128, hp=PAPER, dtype=torch.bfloat16,
                 lengths=[65536, 131072, 32768, 16384, 8192], batches=[16, 1, 64], page_size=64)
SMOKE_SIZES = dict(HQ=8, H=2, D=32, Dv=32, dtype=torch.float32, lengths=[512, 256], batches=[1, 3],
                   page_size=64, hp=dict(PAPER, block_size=16, block_stride=8, select_size=32,
                                         num_selected=4, window_size=64))
SDPA = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn")
DENSE = SDPA + ("flash_attn", "fa3", "flashinfer")
IMPLS = ("ours",) + DENSE + ("mdy666",)
NSA_IMPLS = ("ours", "mdy666")
MDY_PAGE = 128  # mdy666's decode needs pages of a multiple of 128 tokens
L2_SWEEP = 8    # the R copies of a step read at least this many times the L2 size
MAX_COPIES = 256
FIELDS = ["gpu", "torch", "triton", "commit", "dtype", "T", "B", "lengths", "tokens", "layout",
          "page_size", "HQ", "H", "D", "Dv", "block_size", "block_stride", "select_size",
          "num_selected", "window_size", "impl", "mode", "copies", "ms", "bytes", "copy_gbps",
          "floor_ms", "floor_share", "dense_ms", "dense_impl", "dense_ratio", "mdy666_ratio",
          "byte_ratio", "note"]
DERIVED = ("copy_gbps", "floor_ms", "floor_share", "dense_ms", "dense_impl", "dense_ratio",
           "mdy666_ratio")
TARGETS = [  # (T, B, what, threshold)
    (65536, 16, "dense_ratio", 8.0), (65536, 16, "floor_share", 0.70),
    (131072, 1, "dense_ratio", 5.0)]


# ------------------------------------------------------------------------------------ sizes
def seq_lengths(T, B, kind):
    """equal: T each; mixed: from T down to T/2, evenly spread."""
    if kind == "equal" or B == 1:
        return [T] * B
    return [T - (T // 2) * b // (B - 1) for b in range(B)]


def nsa_tokens(L, hp):
    """Tokens of K/V one (sequence, KV head) of length L reads in an NSA step: the compressed
    tokens, the selected blocks (the last one partial) and the window."""
    l, d, sel, n = hp["block_size"], hp["block_stride"], hp["select_size"], hp["num_selected"]
    nc = (L - l) // d + 1 if L >= l else 0
    blocks = -(-L // sel)
    selected = L if blocks <= n else (n - 1) * sel + (L - (blocks - 1) * sel)
    return nc + selected + min(hp["window_size"], L)


def step_bytes(lengths, cfg, nsa):
    """Bytes of K and V a step must read (bf16 on CUDA, the run's dtype on CPU)."""
    per_token = cfg["H"] * (cfg["D"] + cfg["Dv"]) * cfg["itemsize"]
    tokens = sum(nsa_tokens(L, cfg["hp"]) if nsa else L for L in lengths)
    return tokens * per_token


def num_cmp(T, hp):
    return (T - hp["block_size"]) // hp["block_stride"] + 1 if T >= hp["block_size"] else 0


# ------------------------------------------------------------------------------------ timing
def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def windows_ms(call, steps, args):
    """Per-step time of call() (which runs `steps` steps): do_bench-style warmup, then
    args.windows windows of back-to-back calls over args.rep ms; the median window."""
    cuda = args.device == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def window(n):
        if cuda:
            start.record()
            for _ in range(n):
                call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        return (time.perf_counter() - t0) * 1e3

    call()
    sync(args.device)
    est = max(window(3) / 3, 1e-4)
    window(max(1, int(args.warmup / est)))
    n = max(1, int(args.rep / args.windows / est))
    return statistics.median(window(n) / (n * steps) for _ in range(args.windows))


def graph_of(call):
    """call() run three times on a side stream (compilation, workspaces), then captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph


def copy_bandwidth(args):
    """GB/s of a device-to-device copy (read + write bytes): 1 GiB on CUDA, 64 MiB on CPU."""
    n = 2**30 if args.device == "cuda" else 2**26
    src = torch.ones(n, dtype=torch.uint8, device=args.device)
    dst = torch.empty_like(src)
    ms = windows_ms(lambda: dst.copy_(src), 1, args)
    del src, dst
    free()
    return 2 * n / (ms * 1e-3) / 1e9, ms, 2 * n


class DecodeRecorder(Recorder):
    """Rows of the CSV; the derived columns are recomputed before every write."""

    fields = FIELDS

    def add(self, group, impl, layout, mode, ms, note="", copies="", nbytes=None):
        cfg = self.args.cfg
        nsa = impl in NSA_IMPLS
        if nbytes is None:
            nbytes = group.get("nsa_bytes" if nsa else "dense_bytes", "")
        byte_ratio = (f"{group['dense_bytes'] / group['nsa_bytes']:.5g}"
                      if nsa and group.get("nsa_bytes") else "")
        row = dict(self.meta, T=group.get("T", ""), B=group.get("B", ""),
                   lengths=group.get("kind", ""), tokens=group.get("tokens", ""), layout=layout,
                   page_size=(MDY_PAGE if impl == "mdy666" else cfg["page_size"])
                   if layout == "paged" else "",
                   impl=impl, mode=mode, copies=copies, ms="" if ms is None else f"{ms:.6g}",
                   bytes=nbytes, byte_ratio=byte_ratio, note=note, **{k: "" for k in DERIVED})
        self.rows.append(row)
        shown = "n/a" if ms is None else f"{ms * 1e3:10.2f} us"
        where = f"T={group['T']:6d} B={group['B']:2d} {group['kind']:5s}" if "T" in group else ""
        print(f"  {where} {impl:14s} {layout:10s} {mode:5s} {shown} {note}", flush=True)
        self.write()

    def write(self):
        derive(self.rows)
        super().write()


def num(x):
    return float(x) if x not in ("", None) else None


def derive(rows):
    """Fills the derived columns (DERIVED) from the copy row and each group's dense and mdy666
    times. Baselines: the graph time where there is one, else the eager one."""
    gbps = next((float(r["bytes"]) / float(r["ms"]) / 1e6
                 for r in rows if r["impl"] == "copy" and r["ms"]), None)
    best = {}  # (T, B, lengths, impl) -> (mode is graph, ms)
    for r in rows:
        if r["ms"] and r["impl"] != "ours":
            key = (r["T"], r["B"], r["lengths"], r["impl"])
            cand = (not is_graph(r["mode"]), float(r["ms"]))
            best[key] = min(best.get(key, cand), cand)
    for r in rows:
        group = (r["T"], r["B"], r["lengths"])
        dense = [best[group + (d,)] + (d,) for d in DENSE if group + (d,) in best]
        _, dense_ms, dense_impl = min(dense) if dense else (None, None, "")
        mdy = best.get(group + ("mdy666",))
        ms = num(r["ms"])
        r["copy_gbps"] = f"{gbps:.1f}" if gbps else ""
        if r["impl"] == "copy" or not ms:
            continue
        if gbps and r["bytes"]:
            floor = float(r["bytes"]) / (gbps * 1e9) * 1e3
            r["floor_ms"], r["floor_share"] = f"{floor:.6g}", f"{floor / ms:.5g}"
        if r["impl"] in NSA_IMPLS and dense_ms:
            r["dense_ms"], r["dense_impl"] = f"{dense_ms:.6g}", dense_impl
            r["dense_ratio"] = f"{dense_ms / ms:.5g}"
        if r["impl"] == "ours" and mdy:
            r["mdy666_ratio"] = f"{mdy[1] / ms:.5g}"


# ------------------------------------------------------------------------------------ inputs
def device_free_bytes():
    free()
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 1 << 62


def copies_for(per_copy, args, read):
    """How many copies of per_copy bytes of caches a step that reads `read` bytes cycles
    through (together they read L2_SWEEP x the L2 size), as many as fit; (0, why) when not
    even one fits."""
    if args.device != "cuda":
        return 1, ""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    want = min(MAX_COPIES, max(1, math.ceil(L2_SWEEP * l2 / max(read, 1))))
    room = device_free_bytes() - (2 << 30)  # workspaces, outputs, graph pools
    if room < per_copy:
        return 0, (f"skipped: memory (caches {per_copy / 2**30:.1f} GiB, "
                   f"free {max(room, 0) / 2**30:.1f} GiB)")
    return min(want, room // per_copy), ""


class Inputs:
    """A step's tensors: q [B, 1, HQ, D], gates [B, 1, HQ] (shared), cache_seqlens, block table,
    and `copies` sets of caches (k, v, k_cmp, v_cmp), copy 0 random, the others its clones."""

    def __init__(self, group, args, layout, copies, seed=0):
        cfg, dev, dt = args.cfg, args.device, args.cfg["dtype"]
        B, T, H, D, Dv = group["B"], group["T"], cfg["H"], cfg["D"], cfg["Dv"]
        gen = torch.Generator(device=dev).manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=dev, dtype=dt)

        self.q = randn(B, 1, cfg["HQ"], D)
        self.gates = [torch.sigmoid(randn(B, 1, cfg["HQ"]).float()).to(dt) for _ in range(3)]
        self.seqlens = torch.tensor(group["lengths"], dtype=torch.int32, device=dev)
        self.block_table = None
        nc = num_cmp(T, cfg["hp"])
        if layout == "paged":
            P = cfg["page_size"]
            per_seq = -(-T // P)
            perm = torch.randperm(B * per_seq, generator=torch.Generator().manual_seed(seed))
            self.block_table = perm.view(B, per_seq).to(device=dev, dtype=torch.int32)
            raw = (B * per_seq, P)
        else:
            raw = (B, T)
        first = (randn(*raw, H, D), randn(*raw, H, Dv), randn(B, nc, H, D), randn(B, nc, H, Dv))
        self.caches = [first] + [tuple(t.clone() for t in first) for _ in range(copies - 1)]

    @staticmethod
    def bytes_per_copy(group, cfg, layout):
        T, B = group["T"], group["B"]
        rows = B * -(-T // cfg["page_size"]) * cfg["page_size"] if layout == "paged" else B * T
        rows += B * num_cmp(T, cfg["hp"])
        return rows * cfg["H"] * (cfg["D"] + cfg["Dv"]) * cfg["itemsize"]


# ------------------------------------------------------------------------------------ measuring
class Skip(Exception):
    """A measurement not made, for the reason given (recorded as it is)."""


def measure(rec, budget, args, group, impl, layout, mode, make_call, note=""):
    """make_call() returns (call, steps): call() runs `steps` decode steps (one per copy of the
    caches). Times it eagerly or as a CUDA graph; records ms per step or why there is none."""
    if budget.left() < 5:
        rec.add(group, impl, layout, mode, None, "skipped: time budget")
        return None
    try:
        with torch.no_grad():
            call, steps = make_call()
            if is_graph(mode):
                graph = graph_of(call)
                ms = windows_ms(graph.replay, steps, args)
                del graph
            else:
                ms = windows_ms(call, steps, args)
        rec.add(group, impl, layout, mode, ms, note, steps)
        return ms
    except Skip as e:
        rec.add(group, impl, layout, mode, None, str(e))
        return None
    except Exception as e:  # noqa: BLE001 - every failure is recorded, the run goes on
        rec.add(group, impl, layout, mode, None, "n/a: " + short_error(e))
        if args.verbose:
            traceback.print_exc()
        return None
    finally:
        free()


def is_graph(mode):
    """graph, or a plan variant timed as a graph: "graph <force spec>"."""
    return mode.split()[0] == "graph"


def baseline_mode(args):
    return "graph" if args.device == "cuda" else "eager"


def ours_modes(args):
    return ("graph", "eager") if args.device == "cuda" else ("eager",)


def bench_ours(rec, budget, args, group, x, layout, modes=None, variants=True):
    hp = args.cfg["hp"]

    def make_call():
        op = nsa_torch.decode_attention
        o = op(x.q, *x.caches[0], *x.gates, x.seqlens, block_table=x.block_table, **hp)
        if not torch.isfinite(o).all():
            raise RuntimeError("non-finite output")

        def call():
            for k, v, kc, vc in x.caches:
                op(x.q, k, v, kc, vc, *x.gates, x.seqlens, block_table=x.block_table, **hp)
        return call, len(x.caches)

    for mode in modes or ours_modes(args):
        measure(rec, budget, args, group, "ours", layout, mode, make_call)
    if layout != "contiguous" or not variants:
        return
    for spec in args.force:  # plan variants: the same step under nsa_torch._debug.force
        with _debug.force(**parse_force(spec)):
            measure(rec, budget, args, group, "ours", layout, f"{ours_modes(args)[0]} {spec}",
                    make_call)


HEADS_MODE = "heads"  # the variant label of head-major caches


def head_major(t):
    """t [B, T, H, D] with its memory laid out head-major ([B, H, T, D]): the same view."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def bench_ours_head_major(rec, budget, args, group, x):
    """Ours again with the raw and compressed caches stored head-major (a key tile of one head
    is then one contiguous run of memory, not rows a head-stride apart). Converts x's caches in
    place, one copy at a time, after every other contiguous measurement."""
    mode = f"{ours_modes(args)[0]} {HEADS_MODE}"
    for i, cache in enumerate(x.caches):
        need = max(t.numel() * t.element_size() for t in cache) + (1 << 30)
        if args.device == "cuda" and device_free_bytes() < need:
            rec.add(group, "ours", "contiguous", mode, None, "skipped: memory (head-major copy)")
            return
        x.caches[i] = tuple(head_major(t) for t in cache)
        del cache
    bench_ours(rec, budget, args, group, x, "contiguous", modes=(mode,), variants=False)


def parse_force(spec):
    """"cmp_splits=32,sel_splits=4" -> {"cmp_splits": 32, "sel_splits": 4} (ints where they
    parse, names otherwise)."""
    out = {}
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SystemExit(f"--force {spec!r}: expected KEY=VALUE[,KEY=VALUE...]")
        value = value.strip()
        out[key.strip()] = int(value) if value.lstrip("-").isdigit() else value
    return out


def bench_sdpa(rec, budget, args, group, x):
    """Each SDPA backend over the contiguous caches: enable_gqa first; where the backend refuses
    it, k/v repeated to HQ heads (built before the timing, on as many copies as fit);
    `mixed`: an additive key-padding mask."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"sdpa_flash": SDPBackend.FLASH_ATTENTION,
                "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
    cfg = args.cfg
    G = cfg["HQ"] // cfg["H"]
    q = x.q.transpose(1, 2)  # [B, HQ, 1, D]
    mask = None
    if group["kind"] == "mixed":
        t = torch.arange(group["T"], device=args.device)
        mask = torch.zeros(group["B"], 1, 1, group["T"], dtype=cfg["dtype"], device=args.device)
        mask.masked_fill_(t >= x.seqlens[:, None, None, None], float("-inf"))
    masked = "key-padding mask; " if mask is not None else ""

    def sdpa(backend, kv, gqa):
        def call():
            with sdpa_kernel([backend]):
                for k, v in kv:
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return call

    def gqa_call(backend):
        call = sdpa(backend, [(k.transpose(1, 2), v.transpose(1, 2)) for k, v, _, _ in x.caches],
                    True)
        call()  # a refused backend raises here, before any capture
        return call, len(x.caches)

    def repeated_call(backend):
        # the backend must take repeated k/v at all (checked on a slice) before they are built
        k, v = (c[:1, :64].repeat_interleave(G, 2).transpose(1, 2) for c in x.caches[0][:2])
        with sdpa_kernel([backend]):
            F.scaled_dot_product_attention(q[:1], k, v, attn_mask=None if mask is None
                                           else mask[:1, ..., :64])
        per_copy = G * sum(c.numel() * c.element_size() for c in x.caches[0][:2])
        copies, why = copies_for(per_copy, args, G * group["dense_bytes"])
        if not copies:
            raise Skip(why + " (k/v repeated to HQ heads)")
        kv = [tuple(c.repeat_interleave(G, 2).transpose(1, 2) for c in caches[:2])
              for caches in x.caches[:copies]]
        return sdpa(backend, kv, False), copies

    mode = baseline_mode(args)
    for impl, backend in backends.items():
        if impl not in args.impls:
            continue
        ms = measure(rec, budget, args, group, impl, "contiguous", mode,
                     lambda b=backend: gqa_call(b), masked + "enable_gqa")
        refused = rec.rows[-1]["note"]
        if ms is not None or G == 1 or not refused.startswith("n/a"):
            continue
        rec.rows.pop()  # replaced by the attempt with repeated k/v
        measure(rec, budget, args, group, impl, "contiguous", mode,
                lambda b=backend: repeated_call(b), masked + "k/v repeated to HQ heads (not timed)")
        if not rec.rows[-1]["ms"]:
            rec.rows[-1]["note"] += f" (enable_gqa: {refused})"
            rec.write()


def bench_flash_attn(rec, budget, args, group, x):
    """flash_attn_with_kvcache of flash-attn 2 (flash_attn) and 3 (flash_attn_interface)."""
    for impl, module in (("flash_attn", "flash_attn"), ("fa3", "flash_attn_interface")):
        if impl not in args.impls:
            continue
        if args.device != "cuda":
            rec.add(group, impl, "contiguous", "eager", None, "n/a: needs CUDA")
            continue
        try:
            fn = getattr(__import__(module), "flash_attn_with_kvcache")
        except Exception as e:  # noqa: BLE001
            rec.add(group, impl, "contiguous", "graph", None, "absent: " + short_error(e))
            continue

        def make_call(fn=fn):
            def call():
                for k, v, _, _ in x.caches:
                    fn(x.q, k, v, cache_seqlens=x.seqlens)
            return call, len(x.caches)

        measure(rec, budget, args, group, impl, "contiguous", "graph", make_call)


def bench_flashinfer(rec, budget, args, group, x):
    """FlashInfer's paged decode over our paged pool and block table, in its CUDA-graph mode, on
    tensor cores (its prefill kernel with one query row per sequence: its CUDA-core decode
    takes GQA groups of at most 8). A module that benchmarks/carry_flashinfer.sh compiled ahead
    is loaded, else compiled here."""
    if "flashinfer" not in args.impls:
        return
    if args.device != "cuda":
        rec.add(group, "flashinfer", "paged", "eager", None, "n/a: needs CUDA")
        return
    try:
        import flashinfer
    except Exception as e:  # noqa: BLE001
        rec.add(group, "flashinfer", "paged", "graph", None, "absent: " + short_error(e))
        return
    cfg, P = args.cfg, args.cfg["page_size"]
    version = f"flashinfer {getattr(flashinfer, '__version__', '?')}"

    def make_call():
        lengths = torch.tensor(group["lengths"], dtype=torch.int32)
        pages = (lengths + P - 1) // P
        indptr = torch.zeros(group["B"] + 1, dtype=torch.int32)
        indptr[1:] = torch.cumsum(pages, 0)
        table = x.block_table.cpu()
        indices = torch.cat([table[b, :int(pages[b])] for b in range(group["B"])])
        last = lengths - (pages - 1) * P
        dev = [t.to("cuda") for t in (indptr, indices, last)]
        workspace = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
            paged_kv_indptr_buffer=torch.empty_like(dev[0]),
            paged_kv_indices_buffer=torch.empty_like(dev[1]),
            paged_kv_last_page_len_buffer=torch.empty_like(dev[2]))
        wrapper.plan(*dev, cfg["HQ"], cfg["H"], cfg["D"], P, q_data_type=cfg["dtype"],
                     kv_data_type=cfg["dtype"])
        q = x.q[:, 0]

        def call():
            for k, v, _, _ in x.caches:
                wrapper.run(q, (k, v))
        return call, len(x.caches)

    measure(rec, budget, args, group, "flashinfer", "paged", "graph", make_call,
            version + ", tensor cores")


# ------------------------------------------------------------------------------------ mdy666
def import_flash_nsa(args):
    """mdy666's nsa_decode from flash_nsa: importable as is, or from --flash-nsa,
    $NSA_FLASH_NSA_PATH, shared/anchors or ../shared/anchors (the directory holding flash_nsa)."""
    # Imported by flash_nsa's package but not by its decode path: stand-ins where they are
    # missing (pkg_resources left setuptools 81; pandas only prints its training benchmarks).
    for name in ("pkg_resources", "pandas"):
        try:
            __import__(name)
        except ImportError:
            from packaging.version import parse
            sys.modules[name] = types.SimpleNamespace(parse_version=parse)
    root = os.path.dirname(HERE)
    for d in (args.flash_nsa, os.environ.get("NSA_FLASH_NSA_PATH"),
              os.path.join(root, "shared", "anchors"),
              os.path.join(os.path.dirname(root), "shared", "anchors")):
        if d and os.path.isdir(os.path.join(d, "flash_nsa", "inference")) and d not in sys.path:
            sys.path.append(d)
            break
    from flash_nsa.inference import nsa_decode
    return nsa_decode


def mdy_bytes_per_copy(group, cfg):
    pages = -(-group["T"] // MDY_PAGE) + -(-num_cmp(group["T"], cfg["hp"]) // MDY_PAGE)
    return group["B"] * pages * MDY_PAGE * cfg["H"] * (cfg["D"] + cfg["Dv"]) * cfg["itemsize"]


def bench_mdy666(rec, budget, args, group):
    """mdy666's nsa_decode on the same step: its page pool (page 128) holds each sequence's raw
    K/V (block_tables) and compressed K/V (cmp_block_tables); cmp_slot_mapping is where it
    writes the compressed token that the length completes (-1: none); fixed_y_maxlen and
    fixed_num_slc_blocks (its CUDA-graph shapes) are those of the capacity T."""
    if "mdy666" not in args.impls:
        return
    if args.device != "cuda":
        rec.add(group, "mdy666", "paged", "eager", None, "n/a: needs CUDA")
        return
    try:
        nsa_decode = import_flash_nsa(args)
    except Exception as e:  # noqa: BLE001
        rec.add(group, "mdy666", "paged", "graph", None, "absent: " + short_error(e))
        if args.verbose:
            traceback.print_exc()
        return
    cfg, hp = args.cfg, args.cfg["hp"]
    B, T = group["B"], group["T"]
    nsa_bytes = group["nsa_bytes"]
    copies, why = copies_for(mdy_bytes_per_copy(group, cfg), args, nsa_bytes)
    if not copies:
        rec.add(group, "mdy666", "paged", "graph", None, why)
        return
    l, d = hp["block_size"], hp["block_stride"]
    new_cmp = [L >= l and (L - l) % d == 0 for L in group["lengths"]]
    note = (f"its kv mean-pooling (a new compressed token for {sum(new_cmp)} of {B} sequences) "
            f"and combine included; page {MDY_PAGE}; window_size {hp['window_size'] - 1} (its "
            f"window counts window_size + 1 keys)")

    def make_call():
        gen = torch.Generator(device="cuda").manual_seed(1)
        H, D, Dv, dt = cfg["H"], cfg["D"], cfg["Dv"], cfg["dtype"]
        raw_pages = -(-T // MDY_PAGE)
        cmp_pages = -(-num_cmp(T, hp) // MDY_PAGE)
        perm = torch.randperm(B * (raw_pages + cmp_pages),
                              generator=torch.Generator().manual_seed(1))
        tables = perm[:B * raw_pages].view(B, raw_pages).to(torch.int32)
        cmp_tables = perm[B * raw_pages:].view(B, cmp_pages).to(torch.int32)
        slots = torch.full((B,), -1, dtype=torch.int32)
        for b, L in enumerate(group["lengths"]):
            if new_cmp[b]:
                i = (L - l) // d
                slots[b] = cmp_tables[b, i // MDY_PAGE] * MDY_PAGE + i % MDY_PAGE
        tables, cmp_tables, slots = (t.cuda() for t in (tables, cmp_tables, slots))
        shape = (B * (raw_pages + cmp_pages), MDY_PAGE, H)
        k = torch.randn(*shape, D, generator=gen, device="cuda", dtype=dt)
        v = torch.randn(*shape, Dv, generator=gen, device="cuda", dtype=dt)
        pools = [(k, v)] + [(k.clone(), v.clone()) for _ in range(copies - 1)]
        q = torch.randn(B, cfg["HQ"], D, generator=gen, device="cuda", dtype=dt)
        w = torch.randn(B, cfg["HQ"], 3, generator=gen, device="cuda", dtype=dt)
        lens = torch.tensor(group["lengths"], dtype=torch.int32, device="cuda")
        kw = dict(fixed_y_maxlen=num_cmp(T, hp), fixed_num_slc_blocks=-(-T // hp["select_size"]),
                  kernel_size=l, stride=d, block_size=hp["select_size"],
                  top_n=hp["num_selected"], num_init_blocks=hp["num_initial"],
                  num_local_blocks=hp["num_local"], window_size=hp["window_size"] - 1)

        def call():
            for kp, vp in pools:
                nsa_decode(q, kp, vp, w, lens, tables, slots, cmp_tables, **kw)
        return call, len(pools)

    measure(rec, budget, args, group, "mdy666", "paged", "graph", make_call, note)


# ------------------------------------------------------------------------------------ a group
def bench_group(rec, budget, args, T, B, kind):
    """Every implementation at one (T, B, lengths): contiguous caches (ours, SDPA, flash-attn),
    then a paged pool (ours, FlashInfer), then mdy666's own pool; one at a time in memory."""
    cfg = args.cfg
    lengths = seq_lengths(T, B, kind)
    group = dict(T=T, B=B, kind=kind, lengths=lengths, tokens=sum(lengths),
                 nsa_bytes=step_bytes(lengths, cfg, nsa=True),
                 dense_bytes=step_bytes(lengths, cfg, nsa=False))
    phases = [("contiguous", ("ours",) + SDPA + ("flash_attn", "fa3")),
              ("paged", ("ours", "flashinfer"))]
    for layout, impls in phases:
        impls = [i for i in impls if i in args.impls]
        if not impls:
            continue
        copies, why = copies_for(Inputs.bytes_per_copy(group, cfg, layout), args,
                                 group["nsa_bytes"])
        if not copies:
            for impl in impls:
                rec.add(group, impl, layout, baseline_mode(args), None, why)
            continue
        try:
            x = Inputs(group, args, layout, copies)
        except Exception as e:  # noqa: BLE001
            for impl in impls:
                rec.add(group, impl, layout, baseline_mode(args), None,
                        "n/a: inputs: " + short_error(e))
            free()
            continue
        if "ours" in impls:
            bench_ours(rec, budget, args, group, x, layout)
        if layout == "contiguous":
            bench_sdpa(rec, budget, args, group, x)
            bench_flash_attn(rec, budget, args, group, x)
            if args.head_major and "ours" in impls:
                bench_ours_head_major(rec, budget, args, group, x)
        else:
            bench_flashinfer(rec, budget, args, group, x)
        del x
        free()
    bench_mdy666(rec, budget, args, group)
    free()


# ------------------------------------------------------------------------------------ reports
def fmt_us(ms):
    if ms is None:
        return "n/a"
    us = ms * 1e3
    return f"{us:.{2 if us < 10 else 1 if us < 100 else 0}f}"


def cells(rows):
    """{(kind, T, B): {(impl, layout, mode): row}}"""
    out = {}
    for r in rows:
        if r["impl"] != "copy":
            out.setdefault((r["lengths"], int(r["T"]), int(r["B"])), {})[
                (r["impl"], r["layout"], r["mode"])] = r
    return out


def ours_row(c, layout="contiguous"):
    return c.get(("ours", layout, "graph")) or c.get(("ours", layout, "eager"))


def best_row(c, impl):
    rows = [r for (i, _, _), r in c.items() if i == impl and r["ms"]]
    return min(rows, key=lambda r: (not is_graph(r["mode"]), float(r["ms"]))) if rows else None


def target_lines(rows):
    by = cells(rows)
    lines = []
    for T, B, what, want in TARGETS:
        r = ours_row(by.get(("equal", T, B), {}))
        got = num(r[what]) if r else None
        label = f"target {t_label(T)} B={B}"
        if what == "dense_ratio":
            head = f"{label}: dense / ours >= {want:g}x"
            shown = f"{got:.2f}x" if got is not None else ""
        else:
            head = f"{label}: share of copy bandwidth >= {want:.0%}"
            shown = f"{got:.0%}" if got is not None else ""
        if got is None:
            lines.append(f"{head}: NOT MEASURED")
        else:
            mode = f"{r['layout']}, {r['mode']}"
            lines.append(f"{head}: {shown} ({mode}): {'PASS' if got >= want else 'FAIL'}")
    return lines


def variant_lines(by):
    """The plan variants (--force) beside the planned step: us per step and planned / variant."""
    lines = []
    for key in sorted(by):
        c = by[key]
        base = ours_row(c)
        for (impl, layout, mode), r in sorted(c.items()):
            if impl != "ours" or " " not in mode:
                continue
            if not lines:
                lines = [f"Variants of ours (--force: nsa_torch._debug.force; {HEADS_MODE}: "
                         "--head-major caches; contiguous)", "",
                         "| lengths | T | B | variant | us | planned us | planned / variant |",
                         "|---|---|---|---|---|---|---|"]
            ms, planned = num(r["ms"]), num(base["ms"]) if base else None
            ratio = f"{planned / ms:.2f}x" if ms and planned else "n/a"
            lines.append(f"| {key[0]} | {t_label(key[1])} | {key[2]} | {mode.split(' ', 1)[1]} | "
                         f"{fmt_us(ms)} | {fmt_us(planned)} | {ratio} |")
    return lines + [""] if lines else []


def markdown(rows):
    by = cells(rows)
    copy = next((r for r in rows if r["impl"] == "copy"), None)
    lines = ["### nsa-decode table begin"]
    if copy and copy["ms"]:
        lines.append(f"Copy bandwidth {float(copy['copy_gbps']):.0f} GB/s (device-to-device, "
                     "read + write). Times in us per step; floor = bytes / copy bandwidth; "
                     "share = floor / our time.")
    lines.append("")
    head = ["T", "B", "ours", "ours paged", "ours eager", "dense", "dense / ours", "NSA MB",
            "floor", "share", "byte ratio", "mdy666", "mdy666 / ours"]
    for kind in ("equal", "mixed"):
        keys = sorted(k for k in by if k[0] == kind)
        if not keys:
            continue
        what = "every sequence at T" if kind == "equal" else "lengths spread over [T/2, T]"
        how = ("CUDA-graph replays; ours eager: called from Python"
               if any(r["mode"] == "graph" for r in rows) else "eager")
        lines += [f"**{kind}** ({what}; {how})", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key in keys:
            c = by[key]
            o, op = ours_row(c), ours_row(c, "paged")
            oe = c.get(("ours", "contiguous", "eager"))
            mdy = best_row(c, "mdy666")
            ref = o or op
            dense = f"{fmt_us(num(ref['dense_ms']))} ({ref['dense_impl']})" \
                if ref and ref["dense_ms"] else "n/a"

            def x(r, col, pct=False):
                v = num(r[col]) if r else None
                return "n/a" if v is None else (f"{v:.0%}" if pct else f"{v:.2f}x")
            lines.append("| " + " | ".join([
                t_label(key[1]), str(key[2]), fmt_us(num(o["ms"]) if o else None),
                fmt_us(num(op["ms"]) if op else None), fmt_us(num(oe["ms"]) if oe else None),
                dense, x(ref, "dense_ratio"),
                f"{int(ref['bytes']) / 1e6:.1f}" if ref else "n/a",
                fmt_us(num(ref["floor_ms"]) if ref else None), x(ref, "floor_share", pct=True),
                x(ref, "byte_ratio"), fmt_us(num(mdy["ms"]) if mdy else None),
                x(o, "mdy666_ratio")]) + " |")
        lines.append("")
    # every baseline's own time
    bases = [i for i in DENSE + ("mdy666",) if any(r["impl"] == i for r in rows)]
    if bases:
        lines += ["Baselines (us per step; n/a reasons below)", "",
                  "| lengths | T | B | " + " | ".join(bases) + " |",
                  "|" + "---|" * (3 + len(bases))]
        for key in sorted(by):
            row = [key[0], t_label(key[1]), str(key[2])]
            for b in bases:
                r = best_row(by[key], b)
                row.append(fmt_us(num(r["ms"]) if r else None))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        reasons = {}
        for r in rows:
            if not r["ms"] and r["impl"] != "copy":
                reasons.setdefault((r["impl"], r["note"]), 0)
                reasons[(r["impl"], r["note"])] += 1
        lines += [f"- {impl} ({n}x): {why}" for (impl, why), n in reasons.items()]
        if reasons:
            lines.append("")
    lines += variant_lines(by)
    lines += target_lines(rows)
    lines.append("### nsa-decode table end")
    return "\n".join(lines)


COLORS = {"ours": "black", "sdpa_flash": "tab:orange", "sdpa_efficient": "tab:olive",
          "sdpa_cudnn": "tab:blue", "flash_attn": "tab:brown", "fa3": "tab:pink",
          "flashinfer": "tab:green", "mdy666": "tab:red"}


def plot(rows, path):
    """us per step against T (log-log), one panel per B, lengths `equal`: ours (graph,
    contiguous solid, paged dashed), its byte floor (dotted), every baseline. The path, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"no plot ({short_error(e)}); rerun with --plot-only where matplotlib is installed")
        return None
    by = cells(rows)
    batches = sorted({B for kind, _, B in by if kind == "equal"})
    if not batches:
        return None
    fig, axes = plt.subplots(1, len(batches), figsize=(5.6 * len(batches), 5.4), squeeze=False)
    for ax, B in zip(axes.flat, batches):
        keys = sorted(k for k in by if k[0] == "equal" and k[2] == B)
        ts = [k[1] for k in keys]
        series = [("ours", "contiguous", "-", "o", "nsa_torch"),
                  ("ours", "paged", "--", "s", "nsa_torch paged")]
        series += [(b, None, "-", "^", b) for b in DENSE + ("mdy666",)]
        for impl, layout, ls, marker, label in series:
            pts = []
            for k in keys:
                c = by[k]
                r = (c.get((impl, layout, "graph")) or c.get((impl, layout, "eager"))
                     if layout else best_row(c, impl))
                if r and r["ms"]:
                    pts.append((k[1], float(r["ms"]) * 1e3))
            if pts:
                ax.plot(*zip(*pts), ls=ls, marker=marker, ms=5, color=COLORS.get(impl, "gray"),
                        label=label)
        floor = [(k[1], float(r["floor_ms"]) * 1e3) for k in keys
                 for r in [ours_row(by[k])] if r and r["floor_ms"]]
        if floor:
            ax.plot(*zip(*floor), ls=":", color="gray", label="nsa_torch byte floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ts, [t_label(T) for T in ts])
        ax.minorticks_off()
        ax.set_title(f"B = {B}", fontsize=10)
        ax.set_xlabel("context T (tokens)")
        ax.set_ylabel("us per decode step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    meta = rows[0]
    fig.suptitle(f"decode step of one layer's attention, {meta['gpu']}, torch {meta['torch']}, "
                 f"commit {meta['commit']} (HQ={meta['HQ']}, H={meta['H']}, D={meta['D']}, "
                 f"{meta['dtype']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="contexts T, default 65536 131072 32768 16384 8192 (targets first)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 16 1 64")
    ap.add_argument("--kinds", nargs="+", default=None, choices=("equal", "mixed"),
                    help="lengths: all T (equal), spread over [T/2, T] (mixed); default both")
    ap.add_argument("--page-size", type=int, default=None, help="paged caches, default 64")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--quick", action="store_true",
                    help="T = 65536 131072, B = 16 1, equal lengths, warmup/rep 10/30 ms")
    ap.add_argument("--warmup", type=float, default=None, help="warmup (ms), default 25")
    ap.add_argument("--rep", type=float, default=None, help="timed ms per measurement, default 100")
    ap.add_argument("--windows", type=int, default=5, help="timing windows (median)")
    ap.add_argument("--out-dir", default=None, help="also write the CSV here")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds; measurements that would start later are recorded as skipped")
    ap.add_argument("--flash-nsa", default=None,
                    help="directory holding mdy666's flash_nsa (default: shared/anchors)")
    ap.add_argument("--plot-only", default=None, metavar="CSV",
                    help="only redraw the plot and the tables from a CSV written earlier")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny sizes on the CPU (float32, eager), for testing this script")
    ap.add_argument("--force", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="also time ours (contiguous) under nsa_torch._debug.force with these plan "
                         "overrides, e.g. cmp_splits=32,sel_splits=4 (repeatable)")
    ap.add_argument("--head-major", action="store_true",
                    help="also time ours with the raw and compressed caches stored head-major "
                         "([B, H, T, D] memory passed as [B, T, H, D] views)")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.plot_only:
        rows = read_csv(args.plot_only)
        png = plot(rows, os.path.splitext(args.plot_only)[0] + ".png")
        print(markdown(rows))
        print(f"plot: {png}")
        return

    for spec in args.force:  # unknown keys and values fail here, before any measurement
        try:
            with _debug.force(**parse_force(spec)):
                pass
        except ValueError as e:
            sys.exit(f"--force {spec}: {e}")
    args.device = "cpu" if args.cpu_smoke else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_decode.py needs a CUDA GPU (or --cpu-smoke)")
    if nsa_torch._C is None:
        sys.exit(f"nsa_torch._C is not built: {nsa_torch._C_ERROR}")
    cfg = dict(SMOKE_SIZES if args.cpu_smoke else GPU_SIZES)
    cfg["page_size"] = args.page_size or cfg["page_size"]
    cfg["itemsize"] = torch.empty(0, dtype=cfg["dtype"]).element_size()
    args.cfg = cfg
    quick = args.quick and not args.cpu_smoke
    lengths = args.lengths or ([65536, 131072] if quick else cfg["lengths"])
    batches = args.batches or ([16, 1] if quick else cfg["batches"])
    kinds = args.kinds or (["equal"] if quick else ["equal", "mixed"])
    small = quick or args.cpu_smoke
    args.warmup = args.warmup if args.warmup is not None else (10 if small else 25)
    args.rep = args.rep if args.rep is not None else (30 if small else 100)
    budget = Budget(args.time_budget)

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    sha = commit()
    hp = cfg["hp"]
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton_version, commit=sha,
                dtype=str(cfg["dtype"]).replace("torch.", ""), HQ=cfg["HQ"], H=cfg["H"],
                D=cfg["D"], Dv=cfg["Dv"],
                **{k: hp[k] for k in ("block_size", "block_stride", "select_size",
                                      "num_selected", "window_size")})
    name = (f"decode{'-smoke' if args.cpu_smoke else ''}_{slug(gpu)}_"
            f"torch{torch.__version__.split('+')[0]}_{sha}")
    if args.cpu_smoke:
        paths = [os.path.join(os.path.abspath(args.out_dir or os.path.join(HERE, "results")),
                              name + ".csv")]
    else:
        paths = [os.path.join(HERE, "results", name + ".csv")]
        if args.out_dir:
            paths.append(os.path.join(os.path.abspath(args.out_dir), name + ".csv"))
    rec = DecodeRecorder(meta, paths, args)
    print(f"{gpu}, torch {torch.__version__}, triton {triton_version or '-'}, commit {sha}; "
          f"T {lengths}, B {batches}, lengths {kinds}, page {cfg['page_size']}, "
          f"warmup/rep {args.warmup}/{args.rep} ms, {args.windows} windows", flush=True)

    t0 = time.monotonic()
    gbps, ms, nbytes = copy_bandwidth(args)
    rec.add({}, "copy", "", "d2d", ms, f"{nbytes >> 20} MiB read + written: {gbps:.0f} GB/s",
            nbytes=nbytes)
    for T in lengths:
        for B in batches:
            for kind in kinds:
                if kind == "mixed" and B == 1:
                    continue
                print(f"[{time.monotonic() - t0:7.1f} s] T={T} B={B} {kind}", flush=True)
                bench_group(rec, budget, args, T, B, kind)

    for path in paths:
        print(f"csv: {path}")
    png = plot(rec.rows, os.path.splitext(paths[0])[0] + ".png")
    if png:
        print(f"plot: {png}")
    print(f"total {time.monotonic() - t0:.0f} s")
    print(markdown(rec.rows))


if __name__ == "__main__":
    main()
