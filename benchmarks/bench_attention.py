"""GPU benchmark: nsa_torch.nsa_attention against the baselines of docs/design.md section 6, all in
one process (same GPU state, same torch):

- ours: nsa_torch.nsa_attention, every branch, the block selection and the gating included,
  forward and forward+backward; and each branch alone (compressed_attention, select_blocks,
  selected_attention, sliding_window_attention) so that the time splits by kernel;
- sdpa_cudnn / sdpa_flash: torch SDPA (causal full attention) with the cuDNN / flash backend;
- flex_swa: compiled flex_attention with a sliding-window mask (w = 512, block mask built once);
- fla_nsa: flash-linear-attention 0.6's Triton parallel_nsa in its own configuration
  (l = d = l' = 64, n = 16) without its window branch (that one needs flash-attn), and
  fla_nsa+flex_swa = fla_nsa + flex_swa (derived: the sum of the two times), compared with ours
  in the same configuration (config "fla").

    python benchmarks/bench_attention.py [--lengths 8192 16384 32768 65536]
        [--configs g16 fla g4 g1 d192] [--quick] [--out-dir DIR] [--warmup 25] [--rep 100]
        [--time-budget SECONDS] [--plot-only CSV]

Times are triton.testing.do_bench medians (ms; warmup/rep in ms). Forward runs under
torch.no_grad(); forward+backward calls torch.autograd.grad with a fixed random grad_output, so
no .grad accumulates. Every measurement is in try/except: a failure (unsupported shape, OOM) is
recorded with its reason instead of a time. Inputs are bf16 on CUDA; k_cmp/v_cmp are plain
inputs (mean-pooled k/v over the compression windows, computed once, not timed).

Writes benchmarks/results/bench_<gpu>_torch<version>_<commit>.csv and .png (also into --out-dir),
the CSV after every measurement (a killed run keeps what it measured), and prints markdown
tables at the end. Commit: $NSA_COMMIT if set, else `git rev-parse --short=7 HEAD` (with -dirty
when tracked files differ from it), else
"nogit". `ratio` columns are baseline time / our time (> 1: ours is faster).
"""
import argparse
import csv
import gc
import math
import os
import re
import subprocess
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

PAPER = dict(block_size=32, block_stride=16, select_size=64, num_selected=16, num_initial=1,
             num_local=2, window_size=512)
FLA = dict(PAPER, block_size=64, block_stride=64, select_size=64)

# name -> heads, head dims, hyper-parameters, baselines measured with it
FULL = ("sdpa_cudnn", "sdpa_flash", "flex_swa")
CONFIGS = {
    "g16": dict(HQ=64, H=4, D=128, Dv=128, hp=PAPER, baselines=FULL),
    "fla": dict(HQ=64, H=4, D=128, Dv=128, hp=FLA, baselines=("fla_nsa", "flex_swa")),
    "g8": dict(HQ=64, H=8, D=128, Dv=128, hp=PAPER, baselines=FULL),
    "g4": dict(HQ=64, H=16, D=128, Dv=128, hp=PAPER, baselines=FULL),
    "g1": dict(HQ=64, H=64, D=128, Dv=128, hp=PAPER, baselines=FULL),
    "d192": dict(HQ=64, H=4, D=192, Dv=128, hp=PAPER, baselines=FULL),
}
DEFAULT_CONFIGS = ["g16", "fla", "g4", "g1", "d192"]
DEFAULT_LENGTHS = [8192, 16384, 32768, 65536]
BRANCHES = ("ours.cmp", "ours.select", "ours.slc", "ours.swa")
COLORS = {"ours": "black", "sdpa_cudnn": "tab:blue", "sdpa_flash": "tab:orange",
          "flex_swa": "tab:green", "fla_nsa": "tab:red", "fla_nsa+flex_swa": "tab:purple"}
# Baselines that compute only the window branch: shown for reference, never as a ratio to ours.
WINDOW_ONLY = ("flex_swa",)
FIELDS = ["gpu", "torch", "triton", "commit", "config", "B", "T", "HQ", "H", "D", "Dv",
          "block_size", "block_stride", "select_size", "num_selected", "window_size", "impl",
          "mode", "ms", "note"]


# ------------------------------------------------------------------------------------ naming
def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def commit():
    env = os.environ.get("NSA_COMMIT")
    if env:
        return env[:7]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            # A tree that differs from HEAD (e.g. a copy of a working tree whose .git is older)
            # is not that commit.
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   text=True, capture_output=True, timeout=10)
            suffix = "-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else ""
            return out.stdout.strip() + suffix
    except (OSError, subprocess.SubprocessError):
        pass
    return "nogit"


def stem(gpu, torch_version, sha):
    return f"bench_{slug(gpu)}_torch{torch_version.split('+')[0]}_{sha}"


# ------------------------------------------------------------------------------------ timing
class Budget:
    def __init__(self, seconds):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self):
        return math.inf if self.end is None else self.end - time.monotonic()


def free():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def short_error(e):
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "OOM"
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return msg[:200]


class Recorder:
    """Rows of the CSV, rewritten after every measurement."""

    fields = FIELDS  # the CSV's columns (a subclass may write others)

    def __init__(self, meta, paths, args):
        self.meta, self.paths, self.args, self.rows = meta, paths, args, []

    def add(self, config, T, cfg, impl, mode, ms, note=""):
        hp = cfg["hp"]
        row = dict(self.meta, config=config, B=1, T=T, HQ=cfg["HQ"], H=cfg["H"], D=cfg["D"],
                   Dv=cfg["Dv"], block_size=hp["block_size"], block_stride=hp["block_stride"],
                   select_size=hp["select_size"], num_selected=hp["num_selected"],
                   window_size=hp["window_size"], impl=impl, mode=mode,
                   ms="" if ms is None else f"{ms:.4f}", note=note)
        self.rows.append(row)
        shown = "n/a" if ms is None else f"{ms:9.3f} ms"
        print(f"  {config:5s} T={T:6d} {impl:18s} {mode:7s} {shown} {note}", flush=True)
        self.write()

    def write(self):
        for path in self.paths:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.fields)
                w.writeheader()
                w.writerows(self.rows)
            os.replace(path + ".tmp", path)



def record_na(rec, config, T, cfg, impl, error):
    """Records both modes of `impl` as not measured, with the reason."""
    for mode in ("fwd", "fwdbwd"):
        rec.add(config, T, cfg, impl, mode, None, "n/a: " + short_error(error))

def measure(rec, budget, args, config, T, cfg, impl, mode, fn):
    """Times fn (a zero-argument callable) with do_bench; records ms or the reason it failed."""
    from triton.testing import do_bench
    if budget.left() < 5:
        rec.add(config, T, cfg, impl, mode, None, "skipped: time budget")
        return None
    try:
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    fn()
        else:
            run = fn
        run()  # first call outside the timing: compilation, autotuning, workspace allocation
        torch.cuda.synchronize()
        ms = do_bench(run, warmup=args.warmup, rep=args.rep, return_mode="median")
        rec.add(config, T, cfg, impl, mode, float(ms))
        return float(ms)
    except Exception as e:  # noqa: BLE001 - every failure is recorded, the run goes on
        rec.add(config, T, cfg, impl, mode, None, "n/a: " + short_error(e))
        if args.verbose:
            traceback.print_exc()
        return None
    finally:
        free()


# ------------------------------------------------------------------------------------ inputs
def measure_both(rec, budget, args, config, T, cfg, impl, attn, inputs, seed):
    """Forward and forward+backward (gradients to `inputs`, upstream gradient drawn with `seed`)
    of attn(); (None, None) and an n/a record when its first call fails."""
    try:
        with torch.no_grad():
            dout = grad_of(attn(), seed)
    except Exception as e:  # noqa: BLE001
        record_na(rec, config, T, cfg, impl, e)
        return None, None
    fwd = measure(rec, budget, args, config, T, cfg, impl, "fwd", attn)
    fb = measure(rec, budget, args, config, T, cfg, impl, "fwdbwd",
                 lambda: torch.autograd.grad(attn(), inputs, dout))
    return fwd, fb


def make_inputs(T, cfg, seed=0):
    """bf16 CUDA leaves: q [1, T, HQ, D], k [1, T, H, D], v [1, T, H, Dv], k_cmp/v_cmp
    (mean pooling of k/v over the compression windows), sigmoid gates [1, T, HQ]."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    HQ, H, D, Dv = cfg["HQ"], cfg["H"], cfg["D"], cfg["Dv"]
    l, d = cfg["hp"]["block_size"], cfg["hp"]["block_stride"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)

    q, k, v = randn(1, T, HQ, D), randn(1, T, H, D), randn(1, T, H, Dv)
    with torch.no_grad():
        k_cmp = k.unfold(1, l, d).float().mean(-1).to(torch.bfloat16)   # [1, Nc, H, D]
        v_cmp = v.unfold(1, l, d).float().mean(-1).to(torch.bfloat16)
    gates = [torch.sigmoid(randn(1, T, HQ).float()).to(torch.bfloat16) for _ in range(3)]
    x = dict(q=q, k=k, v=v, k_cmp=k_cmp.contiguous(), v_cmp=v_cmp.contiguous(),
             g_cmp=gates[0], g_slc=gates[1], g_swa=gates[2])
    return {n: t.detach().requires_grad_(True) for n, t in x.items()}


def grad_of(o, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(o.shape, generator=gen, device="cuda", dtype=torch.float32).to(o.dtype)


# ------------------------------------------------------------------------------------ ours
def bench_ours(rec, budget, args, config, T, cfg):
    import nsa_torch
    hp = cfg["hp"]
    x = make_inputs(T, cfg)
    names = ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_swa")
    leaves = [x[n] for n in names]
    times = {}

    def nsa():
        return nsa_torch.nsa_attention(*leaves, **hp)

    with torch.no_grad():
        dout = grad_of(nsa(), 1)
    times["fwd"] = measure(rec, budget, args, config, T, cfg, "ours", "fwd", nsa)
    times["fwdbwd"] = measure(rec, budget, args, config, T, cfg, "ours", "fwdbwd",
                              lambda: torch.autograd.grad(nsa(), leaves, dout))
    if args.no_branches:
        return times
    cmp_kw = dict(block_size=hp["block_size"], block_stride=hp["block_stride"])
    sel_kw = dict(cmp_kw, **{k: hp[k] for k in ("select_size", "num_selected", "num_initial",
                                                "num_local")})
    q, k, v, k_cmp, v_cmp = (x[n] for n in names[:5])
    with torch.no_grad():
        o_cmp, lse = nsa_torch.compressed_attention(q, k_cmp, v_cmp, **cmp_kw)
        idx = nsa_torch.select_blocks(q, k_cmp, lse, **sel_kw)
    dout_b = grad_of(o_cmp, 2)

    def cmp():
        return nsa_torch.compressed_attention(q, k_cmp, v_cmp, **cmp_kw)[0]

    def slc():
        return nsa_torch.selected_attention(q, k, v, idx, select_size=hp["select_size"])

    def swa():
        return nsa_torch.sliding_window_attention(q, k, v, window_size=hp["window_size"])

    measure(rec, budget, args, config, T, cfg, "ours.cmp", "fwd", cmp)
    measure(rec, budget, args, config, T, cfg, "ours.select", "fwd",
            lambda: nsa_torch.select_blocks(q, k_cmp, lse, **sel_kw))
    measure(rec, budget, args, config, T, cfg, "ours.slc", "fwd", slc)
    measure(rec, budget, args, config, T, cfg, "ours.swa", "fwd", swa)
    for name, fn, inputs in (("ours.cmp", cmp, (q, k_cmp, v_cmp)), ("ours.slc", slc, (q, k, v)),
                             ("ours.swa", swa, (q, k, v))):
        measure(rec, budget, args, config, T, cfg, name, "fwdbwd",
                lambda fn=fn, inputs=inputs: torch.autograd.grad(fn(), inputs, dout_b))
    return times


# ------------------------------------------------------------------------------------ baselines
def bench_sdpa(rec, budget, args, config, T, cfg, backend_name):
    """Causal SDPA with one backend. GQA through enable_gqa=True where the backend takes it,
    else k/v expanded to all query heads before the timing (the expansion is not timed)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa_flash": SDPBackend.FLASH_ATTENTION}[backend_name]
    x = make_inputs(T, cfg)
    G = cfg["HQ"] // cfg["H"]
    q = x["q"]
    kv = {"gqa": (x["k"], x["v"])}
    attempts = ["gqa"] if G == 1 else ["gqa", "expanded"]
    note, last_error = "", None
    for how in attempts:
        if how == "expanded":
            k = x["k"].detach().repeat_interleave(G, dim=2).requires_grad_(True)
            v = x["v"].detach().repeat_interleave(G, dim=2).requires_grad_(True)
            kv[how] = (k, v)
        k, v = kv[how]

        def attn(k=k, v=v, gqa=(how == "gqa" and G > 1)):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2), is_causal=True,
                                                      enable_gqa=gqa)
        try:
            with torch.no_grad():
                o = attn()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            last_error = e
            free()
            continue
        note = "" if G == 1 else ("enable_gqa" if how == "gqa" else "k/v expanded (not timed)")
        dout = grad_of(o, 3)
        del o
        inputs = (q, k, v)
        fwd = measure(rec, budget, args, config, T, cfg, backend_name, "fwd", attn)
        fb = measure(rec, budget, args, config, T, cfg, backend_name, "fwdbwd",
                     lambda: torch.autograd.grad(attn(), inputs, dout))
        if note:
            rec.rows[-1]["note"] = (rec.rows[-1]["note"] + " " + note).strip()
            rec.rows[-2]["note"] = (rec.rows[-2]["note"] + " " + note).strip()
            rec.write()
        return fwd, fb
    record_na(rec, config, T, cfg, backend_name, last_error)
    return None, None


_FLEX = {}


def bench_flex(rec, budget, args, config, T, cfg):
    """Compiled flex_attention with a causal sliding-window mask of w keys (the block mask is
    built once per T, outside the timing)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    w = cfg["hp"]["window_size"]
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["fn"]

    def window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < w)

    try:
        mask = create_block_mask(window, B=None, H=None, Q_LEN=T, KV_LEN=T, device="cuda")
    except Exception as e:  # noqa: BLE001
        record_na(rec, config, T, cfg, "flex_swa", e)
        return None, None
    x = make_inputs(T, cfg)
    q, k, v = x["q"], x["k"], x["v"]
    gqa = cfg["HQ"] != cfg["H"]

    def attn():
        return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                    enable_gqa=gqa)

    return measure_both(rec, budget, args, config, T, cfg, "flex_swa", attn, (q, k, v), seed=4)


def bench_fla(rec, budget, args, config, T, cfg):
    """fla's parallel_nsa: compression (mean pooling inside), top-n, selected attention and
    gating, window_size=0 (its window branch needs flash-attn)."""
    try:
        from fla.ops.nsa import parallel_nsa
    except Exception as e:  # noqa: BLE001
        record_na(rec, config, T, cfg, "fla_nsa", e)
        return None, None
    hp = cfg["hp"]
    x = make_inputs(T, cfg)
    q, k, v, g_cmp, g_slc = (x[n] for n in ("q", "k", "v", "g_cmp", "g_slc"))

    def attn():
        return parallel_nsa(q, k, v, g_cmp=g_cmp, g_slc=g_slc, g_swa=None,
                            block_counts=hp["num_selected"], block_size=hp["select_size"],
                            window_size=0)

    return measure_both(rec, budget, args, config, T, cfg, "fla_nsa", attn, (q, k, v, g_cmp, g_slc),
                        seed=5)


# ------------------------------------------------------------------------------------ reports
def table_rows(rows):
    """{(config, T): {(impl, mode): ms or None}} plus notes."""
    data = {}
    for r in rows:
        key = (r["config"], int(r["T"]))
        data.setdefault(key, {})[(r["impl"], r["mode"])] = float(r["ms"]) if r["ms"] else None
    return data


def baselines_of(config, cells):
    names = list(CONFIGS.get(config, {}).get("baselines", ()))
    names += sorted({impl for impl, _ in cells
                     if not impl.startswith("ours") and impl not in names})
    return names


def fmt(ms):
    if ms is None:
        return "n/a"
    digits = 3 if ms < 1 else 2 if ms < 10 else 1 if ms < 100 else 0
    return f"{ms:.{digits}f}"


def config_order(config):
    return list(CONFIGS).index(config) if config in CONFIGS else len(CONFIGS)


def t_label(T):
    return f"{T // 1024}k" if T % 1024 == 0 else str(T)


def ratio(base, ours):
    return "" if base is None or not ours else f" ({base / ours:.2f}x)"


def markdown(rows):
    data = table_rows(rows)
    lines = ["### nsa-bench table begin",
             "Times in ms (median); (Nx) = baseline / ours, > 1 means ours is faster.", ""]
    by_config = {}
    for (config, T), cells in sorted(data.items(),
                                     key=lambda kv: (config_order(kv[0][0]), kv[0][1])):
        by_config.setdefault(config, []).append((T, cells))
    for config, entries in by_config.items():
        cfg = CONFIGS.get(config, {})
        bases = baselines_of(config, set().union(*(c.keys() for _, c in entries)))
        head = ["T", "config", "ours fwd", "ours fwd+bwd"]
        for b in bases:
            head += [f"{b} fwd", f"{b} fwd+bwd"]
        lines += [f"**{config}**: HQ={cfg.get('HQ')}, H={cfg.get('H')}, D={cfg.get('D')}, "
                  f"Dv={cfg.get('Dv')}, {cfg.get('hp')}", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for T, cells in entries:
            of, ob = cells.get(("ours", "fwd")), cells.get(("ours", "fwdbwd"))
            row = [t_label(T), config, fmt(of), fmt(ob)]
            for b in bases:
                bf, bb = cells.get((b, "fwd")), cells.get((b, "fwdbwd"))
                if b in WINDOW_ONLY:  # not the same work as ours: its time, no ratio
                    row += [fmt(bf), fmt(bb)]
                else:
                    row += [fmt(bf) + ratio(bf, of), fmt(bb) + ratio(bb, ob)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        # time split by branch
        head = ["T", "nsa fwd", "cmp fwd", "select", "slc fwd", "swa fwd", "sum fwd",
                "nsa fwd+bwd", "cmp fwd+bwd", "slc fwd+bwd", "swa fwd+bwd", "sum fwd+bwd"]
        if any(("ours.cmp", "fwd") in c for _, c in entries):
            lines += [f"{config}: our time by branch (sum = branches alone, the rest is the "
                      "gating and glue)", "", "| " + " | ".join(head) + " |",
                      "|" + "---|" * len(head)]
            for T, c in entries:
                f = [c.get((b, "fwd")) for b in BRANCHES]
                fb = [c.get((b, "fwdbwd")) for b in ("ours.cmp", "ours.slc", "ours.swa")]
                sf = None if None in f else sum(f)
                sb = None if None in fb or f[1] is None else sum(fb) + f[1]
                row = [t_label(T), fmt(c.get(("ours", "fwd")))] + [fmt(t) for t in f] + [fmt(sf)]
                row += [fmt(c.get(("ours", "fwdbwd")))] + [fmt(t) for t in fb] + [fmt(sb)]
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    lines.append("### nsa-bench table end")
    return "\n".join(lines)


def add_derived(rec, config, T, cfg, fla, flex):
    """fla_nsa + flex_swa: fla's NSA without its window plus flex's window-512, summed."""
    for i, mode in enumerate(("fwd", "fwdbwd")):
        a = fla[i] if fla else None
        b = flex[i] if flex else None
        rec.add(config, T, cfg, "fla_nsa+flex_swa", mode, None if a is None or b is None else a + b,
                "derived: fla_nsa + flex_swa")


LABELS = {"ours": "nsa_torch", "flex_swa": "flex_swa (window only)", "fla_nsa": "fla_nsa (no window)",
          "fla_nsa+flex_swa": "fla_nsa + flex_swa"}


def plotted_configs(rows):
    """The configs of `rows` with a time of ours and of a baseline (something to compare), in
    CONFIGS order."""
    timed = {}
    for r in rows:
        if r["ms"] and not r["impl"].startswith("ours."):
            timed.setdefault(r["config"], set()).add(r["impl"] == "ours")
    return sorted((c for c, kinds in timed.items() if kinds == {True, False}), key=config_order)


def plot(rows, path):
    """Time against T on log axes, one panel per config of plotted_configs: ours and every
    baseline, forward+backward solid with circles, forward dashed with triangles. Returns the
    path, or None when nothing was drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"no plot ({short_error(e)}); rerun with --plot-only {path[:-4]}.csv where "
              "matplotlib is installed")
        return None
    data = table_rows(rows)
    configs = plotted_configs(rows)
    if not configs:
        return None
    cols = min(3, len(configs))
    nrows = (len(configs) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.6 * cols, 5.6 * nrows), squeeze=False)
    for ax in axes.flat[len(configs):]:
        ax.remove()
    for ax, config in zip(axes.flat, configs):
        entries = sorted((T, cells) for (c, T), cells in data.items() if c == config)
        impls = ["ours"] + baselines_of(config, set().union(*(c.keys() for _, c in entries)))
        for impl in impls:
            for mode, ls, marker in (("fwdbwd", "-", "o"), ("fwd", "--", "^")):
                pts = [(T, cells[(impl, mode)]) for T, cells in entries if cells.get((impl, mode))]
                if pts:
                    what = "fwd+bwd" if mode == "fwdbwd" else "fwd"
                    ax.plot(*zip(*pts), ls=ls, marker=marker, ms=5, color=COLORS.get(impl, "gray"),
                            label=f"{LABELS.get(impl, impl)} {what}")
        ts = [T for T, _ in entries]
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ts, [t_label(T) for T in ts])
        ax.minorticks_off()
        if len(ts) == 1:
            ax.set_xlim(ts[0] / 1.5, ts[0] * 1.5)
        cfg = CONFIGS.get(config, {})
        hp = cfg.get("hp", {})
        ax.set_title(f"{config}: HQ={cfg.get('HQ')}, H={cfg.get('H')}, D={cfg.get('D')}, "
                     f"Dv={cfg.get('Dv')}, l={hp.get('block_size')}, d={hp.get('block_stride')}",
                     fontsize=9)
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel("ms (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    meta = rows[0]
    fig.suptitle(f"nsa_attention and baselines, {meta['gpu']}, torch {meta['torch']}, "
                 f"commit {meta['commit']} (bf16, B = 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS))
    ap.add_argument("--quick", action="store_true",
                    help="T = 8192, configs g16 and fla, warmup/rep 10/30 ms")
    ap.add_argument("--warmup", type=float, default=None, help="do_bench warmup (ms), default 25")
    ap.add_argument("--rep", type=float, default=None,
                    help="do_bench repetition time (ms), default 100")
    ap.add_argument("--out-dir", default=None, help="also write the CSV and the plot here")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds; measurements that would start later are recorded as skipped")
    ap.add_argument("--no-branches", action="store_true", help="skip the per-branch timings")
    ap.add_argument("--plot-only", default=None, metavar="CSV",
                    help="only redraw the plot and the tables from a CSV written earlier")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = ap.parse_args()

    if args.plot_only:
        rows = read_csv(args.plot_only)
        png = plot(rows, os.path.splitext(args.plot_only)[0] + ".png")
        print(markdown(rows))
        print(f"plot: {png}")
        return

    lengths = args.lengths or ([8192] if args.quick else DEFAULT_LENGTHS)
    configs = args.configs or (["g16", "fla"] if args.quick else DEFAULT_CONFIGS)
    args.warmup = args.warmup if args.warmup is not None else (10 if args.quick else 25)
    args.rep = args.rep if args.rep is not None else (30 if args.quick else 100)
    budget = Budget(args.time_budget)

    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    import triton
    import nsa_torch
    if nsa_torch._C is None:
        sys.exit(f"nsa_torch._C is not built: {nsa_torch._C_ERROR}")
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))

    gpu = torch.cuda.get_device_name()
    sha = commit()
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, commit=sha)
    name = stem(gpu, torch.__version__, sha)
    paths = [os.path.join(HERE, "results", name + ".csv")]
    if args.out_dir:
        paths.append(os.path.join(os.path.abspath(args.out_dir), name + ".csv"))
    rec = Recorder(meta, paths, args)
    print(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}, commit {sha}; "
          f"lengths {lengths}, configs {configs}, do_bench warmup/rep {args.warmup}/{args.rep} ms",
          flush=True)

    t0 = time.monotonic()
    for config in configs:
        cfg = CONFIGS[config]
        for T in lengths:
            print(f"[{time.monotonic() - t0:7.1f} s] {config} T={T}", flush=True)
            bench_ours(rec, budget, args, config, T, cfg)
            flex = None
            for b in cfg["baselines"]:
                if b.startswith("sdpa"):
                    bench_sdpa(rec, budget, args, config, T, cfg, b)
                elif b == "flex_swa":
                    flex = bench_flex(rec, budget, args, config, T, cfg)
                elif b == "fla_nsa":
                    fla = bench_fla(rec, budget, args, config, T, cfg)
            if "fla_nsa" in cfg["baselines"]:
                add_derived(rec, config, T, cfg, fla, flex)
            free()

    for path in paths:
        print(f"csv: {path}")
        png = plot(rec.rows, os.path.splitext(path)[0] + ".png") if rec.rows else None
        if png:
            print(f"plot: {png}")
    print(markdown(rec.rows))
    print(f"total {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
