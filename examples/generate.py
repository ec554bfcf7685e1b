"""Passkey retrieval by generation, with a decoding cache, for checkpoints written by
examples/train.py (an NSA model, an SDPA one, or both):

    python examples/generate.py runs/nsa-gpu/checkpoint.pt runs/sdpa-gpu/checkpoint.pt \\
        --lengths 16384 65536 --batch 8 --check

Each prompt is examples/tasks.py's passkey task cut before its answer: `length` tokens of filler
with the 5-digit key at a given depth, ending with [QUERY]. The model prefills its cache with the
prompt (NSA: nsa_torch.NSACache per layer; SDPA: a static dense KV cache per layer, whose steps
attend the whole capacity under a length mask, as a static cache under torch.compile does) and
then generates --new-tokens tokens greedily, one step per token, each fed back (no teacher
forcing): the first five are the answer, the others only lengthen the timed decode.

Decoding steps run eagerly or, with --graphs (the default on CUDA: what serving engines do), as
one CUDA graph: after the prefill, the first step runs eagerly (the warm-up) and the model's
one-token step (every layer, the caches' in-place updates) is captured once per batch on static
input and output buffers, then replayed per token. Both caches keep their lengths on the device,
so a replay needs no Python; the host lengths are read back once at the end (sync_lengths).
--graphs both times each model both ways.

Per model, length and decoding mode it prints: accuracy (rows with all five digits right), the
prefill time of a batch (time to first token), decode tokens/s (the eager steps after the first
token, or the replays after the capture; every row of the batch counted; the device
synchronised around the timed span), the capture's seconds (warm-up step included) and, with
both models, NSA's speed-up over SDPA. The first batch of each length is not timed when there
are others (it loads that length's kernels). --check runs a full forward (no cache) over the
first row's prompt and generated tokens: its logits at the generated positions must be the
cached steps' (a cache bug cannot hide), and it counts the generated tokens that are its argmax
(any other can only be a near-tie within the logits' rounding). Writes generate.md and
generate.json to --out (default examples/results/<gpu>, or cpu).
"""
import argparse
import json
import os
import sys
import time
from typing import NamedTuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402
from needle import load  # noqa: E402

DIGITS = tasks.PASSKEY_DIGITS


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Decode(NamedTuple):
    """The timed decode of generate(): `steps` steps (each a token of every row) in `seconds`,
    after a CUDA graph capture of `capture_s` seconds (0 when eager)."""

    seconds: float
    steps: int
    capture_s: float = 0.0


class GraphedStep:
    """The model's one-token decoding step, every layer and its cache's in-place updates,
    captured in a CUDA graph: step(tokens [B, 1]) replays it and returns the logits
    [B, 1, vocab] (a static buffer, overwritten by the next replay). Made after the prefill; the
    caches' device-side lengths advance at each replay, and finish() brings their host lengths
    (which only the Python of the capture advanced) back in step."""

    def __init__(self, model, cache, tokens):
        """Runs the step for tokens [B, 1] eagerly on a side stream (the warm-up that
        torch.cuda.graph asks for: it loads the kernels and makes the caches' constants and
        autocast's weight casts, which the graph then reads: keep the same autocast region
        around every replay), then captures the step that follows it. `first`: the logits of
        the warm-up step."""
        self.cache = cache
        self.tokens = tokens.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.first = model(self.tokens, cache=cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.tokens, cache=cache)

    def __call__(self, tokens):
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits

    def finish(self):
        for c in self.cache:
            c.sync_lengths()


@torch.no_grad()
def generate(model, prompt, new_tokens, autocast=False, graphs=False):
    """Greedy generation with the model's cache, its steps eager or replayed from a CUDA graph:
    (tokens [B, new_tokens], the prefill's seconds, Decode (the timed steps: all after the first
    token when eager, the replays when graphed), the logits of row 0 [new_tokens, vocab])."""
    device = prompt.device
    if graphs and device.type != "cuda":
        raise ValueError(f"generate: CUDA graphs need a CUDA device, got {device}")
    B, T = prompt.shape
    # (the last token is never fed back)
    cache = model.new_cache(B, T + new_tokens - 1, torch.bfloat16 if autocast else None)
    out, logits = [], []

    def pick(step_logits):
        last = step_logits[:, -1]
        logits.append(last[0].clone())  # (a graph's output buffer is overwritten)
        out.append(last.argmax(-1, keepdim=True))
        return out[-1]

    # One autocast region for the prefill, the capture and every replay (see GraphedStep).
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        sync(device)
        t0 = time.perf_counter()
        nxt = pick(model(prompt, cache=cache))
        sync(device)
        t1 = time.perf_counter()
        graphed, steps = None, new_tokens - 1
        if graphs and steps > 0:
            graphed = GraphedStep(model, cache, nxt)
            nxt = pick(graphed.first)
            steps -= 1
            sync(device)
        t2 = time.perf_counter()
        for _ in range(steps):
            nxt = pick(graphed(nxt) if graphed else model(nxt, cache=cache))
        sync(device)
        t3 = time.perf_counter()
    if graphed:
        graphed.finish()
    decode = Decode(t3 - t2, steps, t2 - t1 if graphed else 0.0)
    return torch.cat(out, 1), t1 - t0, decode, torch.stack(logits)


@torch.no_grad()
def generate_without_cache(model, prompt, new_tokens, autocast=False):
    """Greedy generation by a full forward over the whole sequence for each token:
    [B, new_tokens]."""
    seq = prompt
    with torch.autocast(prompt.device.type, dtype=torch.bfloat16, enabled=autocast):
        for _ in range(new_tokens):
            seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), 1)
    return seq[:, prompt.shape[1]:]


@torch.no_grad()
def check(model, prompt, tokens, step_logits, autocast=False):
    """One full forward (no cache) over prompt + tokens (one row: [T], [N]) against the cached
    steps' logits [N, vocab]: (the largest relative difference of a position's logits,
    ||cached - full|| / ||full||; how many of the N tokens are the full forward's argmax)."""
    seq = torch.cat((prompt, tokens[:-1]))[None]
    with torch.autocast(prompt.device.type, dtype=torch.bfloat16, enabled=autocast):
        full = model(seq)[0, prompt.shape[0] - 1:].double()
    rel = (step_logits.double() - full).norm(dim=-1) / full.norm(dim=-1)
    return float(rel.max()), int((full.argmax(-1) == tokens).sum())


def device_name(device):
    """A folder name for the results: cpu, or the GPU's model (h100, h200, ...)."""
    if device.type != "cuda":
        return "cpu"
    words = torch.cuda.get_device_name(device).lower().replace("nvidia", "").split()
    return words[0] if words else "cuda"


def run_model(model, args, device, autocast):
    """The rows of one model: one per length and decoding mode (eager, graphs)."""
    rows = []
    batch = min(args.batch, args.samples)
    per_depth = -(-args.samples // batch)
    batches = [(d, start) for d in args.depths for start in range(0, args.samples, batch)]
    for T in args.lengths:
        for graphs in args.modes:
            gen = torch.Generator().manual_seed(args.seed + T)  # the same prompts for every model
            hits, timed, checked = [0] * len(args.depths), [], None
            for i, (d, start) in enumerate(batches):
                b = min(batch, args.samples - start)
                tok, _ = tasks.passkey(b, T + DIGITS, gen, depth=d)
                prompt, answer = tok[:, :T].to(device), tok[:, T:].to(device)
                out, pre_s, dec, logits = generate(model, prompt, args.new_tokens, autocast, graphs)
                hits[i // per_depth] += int((out[:, :DIGITS] == answer).all(1).sum())
                if i > 0 or len(batches) == 1:
                    timed.append((b, pre_s, dec))
                if args.check and i == 0:
                    checked = check(model, prompt[0], out[0], logits, autocast)
            dec_s = sum(t[2].seconds for t in timed)
            steps = sum(t[2].steps for t in timed)
            row = dict(attn=model.cfg.attn, length=T, graphs=graphs, batch=batch,
                       samples=args.samples * len(hits),
                       accuracy=sum(hits) / (args.samples * len(hits)),
                       accuracy_by_depth=[h / args.samples for h in hits],
                       prefill_s=sum(t[1] for t in timed) / len(timed),
                       decode_tokens_per_s=sum(t[0] * t[2].steps for t in timed) / dec_s,
                       decode_ms_per_step=1000 * dec_s / steps,
                       capture_s=sum(t[2].capture_s for t in timed) / len(timed),
                       timed_batches=len(timed))
            if checked is not None:
                row.update(check_rel_err=checked[0], check_argmax=checked[1],
                           check_ok=checked[0] <= args.check_tol)
            rows.append(row)
            print(summary_line(row), flush=True)
    return rows


def mode(r):
    return "graphs" if r["graphs"] else "eager"


def summary_line(r):
    line = (f"{r['attn']} T={r['length']}: accuracy {r['accuracy']:.2f}, prefill "
            f"{r['prefill_s']:.3f} s (batch {r['batch']}), decode {r['decode_tokens_per_s']:.0f} tokens/s "
            f"({r['decode_ms_per_step']:.2f} ms/step, {mode(r)}"
            + (f", capture {r['capture_s']:.3f} s" if r["graphs"] else "") + ")")
    if "check_ok" in r:
        line += f"; check {'ok' if r['check_ok'] else 'FAILED'} ({check_note(r)})"
    return line


def check_note(r):
    return (f"logits within {r['check_rel_err']:.2g} of a full forward's, {r['check_argmax']} "
            f"tokens its argmax")


def speedups(rows):
    """NSA's speed-up over SDPA at each length and mode both ran: {(length, graphs): (decode,
    prefill)}."""
    by = {(r["attn"], r["length"], r["graphs"]): r for r in rows}
    return {(T, g): (r["decode_tokens_per_s"] / by["sdpa", T, g]["decode_tokens_per_s"],
                     by["sdpa", T, g]["prefill_s"] / r["prefill_s"])
            for (attn, T, g), r in by.items() if attn == "nsa" and ("sdpa", T, g) in by}


def table(rows, meta):
    ups = speedups(rows)
    lines = [f"# Passkey by generation (examples/generate.py), {meta['device']}", "",
             f"Prompts of `length` tokens (the passkey at depths {meta['depths']}), "
             f"{meta['new_tokens']} tokens generated greedily with the cache, batch {meta['batch']}"
             + (", under bf16 autocast" if meta["autocast"] else "") + ". Accuracy: rows with all "
             f"{DIGITS} digits right. Prefill: seconds per batch (time to first token). Decode: "
             "tokens/s, every row counted, over the steps after the first token (eager) or over "
             "the replays of the step captured in a CUDA graph after the first step (graphs; "
             "capture: its seconds, that first step included).", "",
             "| model | length | rows | steps | accuracy | TTFT s (prefill) | decode tokens/s "
             "| ms/step | capture s | NSA speed-up decode (prefill) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        up = ups.get((r["length"], r["graphs"])) if r["attn"] == "nsa" else None
        cell = "-" if up is None else f"{up[0]:.2f}x ({up[1]:.2f}x)"
        capture = f"{r['capture_s']:.3f}" if r["graphs"] else "-"
        lines.append(f"| {r['attn']} | {r['length']} | {r['samples']} | {mode(r)} | "
                     f"{r['accuracy']:.2f} | {r['prefill_s']:.3f} | "
                     f"{r['decode_tokens_per_s']:.0f} | {r['decode_ms_per_step']:.2f} | "
                     f"{capture} | {cell} |")
    checks = [r for r in rows if "check_ok" in r]
    if checks:
        lines += ["", f"Check (the first row of each length: the logits of its {meta['new_tokens']} "
                      "generated positions against a full forward without cache, relative "
                      f"difference <= {meta['check_tol']:g}): " + ", ".join(
                          f"{r['attn']} {r['length']} {mode(r)}: "
                          f"{'ok' if r['check_ok'] else 'FAILED'} ({check_note(r)})"
                          for r in checks) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="prompt lengths (default 16384 65536 on CUDA, 512 1024 on the CPU)")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9],
                    help="needle depths, fractions of the filler")
    ap.add_argument("--samples", type=int, default=8, help="rows per (length, depth)")
    ap.add_argument("--batch", type=int, default=8,
                    help="rows generated together (a larger batch makes the attention a larger "
                         "share of a decode step)")
    ap.add_argument("--new-tokens", type=int, default=32,
                    help=f"tokens generated per row (>= {DIGITS}, the answer's)")
    ap.add_argument("--check", action="store_true",
                    help="compare each length's first row with a full forward without cache")
    ap.add_argument("--check-tol", type=float, default=None,
                    help="the largest relative difference allowed between a cached step's logits "
                         "and the full forward's (default 1e-3, 0.1 under bf16 autocast)")
    ap.add_argument("--out", default=None, help="default examples/results/<gpu or cpu>")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--graphs", nargs="?", const="on", choices=("on", "off", "both"),
                    help="decode by replaying the step captured in a CUDA graph (on, the default "
                         "on CUDA), eagerly (off, the default on the CPU), or both ways")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    autocast = device.type == "cuda"
    if args.graphs is None:
        args.graphs = "on" if device.type == "cuda" else "off"
    if args.graphs != "off" and device.type != "cuda":
        ap.error(f"--graphs {args.graphs} needs a CUDA device, got {device}")
    args.modes = {"off": [False], "on": [True], "both": [False, True]}[args.graphs]
    if args.lengths is None:
        args.lengths = [16384, 65536] if device.type == "cuda" else [512, 1024]
    if args.new_tokens < DIGITS:
        ap.error(f"--new-tokens must be >= {DIGITS}")
    if args.check_tol is None:
        args.check_tol = 0.1 if autocast else 1e-3
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       device_name(device))
    rows = []
    for path in args.checkpoints:
        model, _ = load(path, device)
        rows += run_model(model, args, device, autocast)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for (T, graphs), (dec, pre) in sorted(speedups(rows).items()):
        print(f"NSA over SDPA at {T}: decode {dec:.2f}x, prefill {pre:.2f}x "
              f"({'graphs' if graphs else 'eager'})")
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, checkpoints=args.checkpoints, depths=args.depths,
                batch=min(args.batch, args.samples), new_tokens=args.new_tokens, autocast=autocast,
                graphs=args.graphs, seed=args.seed, check_tol=args.check_tol if args.check else None)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "generate.md"), "w") as f:
        f.write(table(rows, meta))
    with open(os.path.join(out_dir, "generate.json"), "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
    print(f"wrote {os.path.join(out_dir, 'generate.md')} and generate.json")
    failed = [r for r in rows if r.get("check_ok") is False]
    if failed:
        sys.exit("generate.py: the cached generation differs from a full forward: "
                 + ", ".join(f"{r['attn']} at {r['length']} ({mode(r)})" for r in failed))


if __name__ == "__main__":
    main()
