"""Passkey retrieval by generation, with a decoding cache, for checkpoints written by
examples/train.py (an NSA model, an SDPA one, or both):

    python examples/generate.py runs/nsa-gpu/checkpoint.pt runs/sdpa-gpu/checkpoint.pt \\
        --lengths 16384 65536 --batch 8 --check

Each prompt is examples/tasks.py's passkey task cut before its answer: `length` tokens of filler
with the 5-digit key at a given depth, ending with [QUERY]. The model prefills its cache with the
prompt (NSA: nsa_torch.NSACache per layer; SDPA: a static dense KV cache per layer) and then
generates --new-tokens tokens greedily, one step per token, each fed back (no teacher forcing):
the first five are the answer, the others only lengthen the timed decode.

Per model and length it prints: accuracy (rows with all five digits right), the prefill time of a
batch (time to first token), decode tokens/s (the steps after the first token, every row of the
batch counted; the device synchronised around the timed span) and, with both models, NSA's
speed-up over SDPA. The first batch of each length is not timed when there are others (it loads
that length's kernels). --check runs a full forward (no cache) over the first row's prompt and
generated tokens: its logits at the generated positions must be the cached steps' (a cache bug
cannot hide), and it counts the generated tokens that are its argmax (any other can only be a
near-tie within the logits' rounding). Writes generate.md and generate.json to --out (default
examples/results/<gpu>, or cpu).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402
from needle import load  # noqa: E402

DIGITS = tasks.PASSKEY_DIGITS


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model, prompt, new_tokens, autocast=False):
    """Greedy generation with the model's cache: (tokens [B, new_tokens], the prefill's seconds,
    the seconds of the new_tokens - 1 decode steps, the logits of row 0 [new_tokens, vocab])."""
    device = prompt.device
    B, T = prompt.shape
    # (the last token is never fed back)
    cache = model.new_cache(B, T + new_tokens - 1, torch.bfloat16 if autocast else None)
    out, logits = [], []

    def pick(step_logits):
        last = step_logits[:, -1]
        logits.append(last[0])
        out.append(last.argmax(-1, keepdim=True))
        return out[-1]

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        sync(device)
        t0 = time.perf_counter()
        nxt = pick(model(prompt, cache=cache))
        sync(device)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            nxt = pick(model(nxt, cache=cache))
        sync(device)
        t2 = time.perf_counter()
    return torch.cat(out, 1), t1 - t0, t2 - t1, torch.stack(logits)


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
    """The rows of one model: one per length."""
    rows = []
    batch = min(args.batch, args.samples)
    per_depth = -(-args.samples // batch)
    batches = [(d, start) for d in args.depths for start in range(0, args.samples, batch)]
    for T in args.lengths:
        gen = torch.Generator().manual_seed(args.seed + T)  # the same prompts for every model
        hits, timed, checked = [0] * len(args.depths), [], None
        for i, (d, start) in enumerate(batches):
            b = min(batch, args.samples - start)
            tok, _ = tasks.passkey(b, T + DIGITS, gen, depth=d)
            prompt, answer = tok[:, :T].to(device), tok[:, T:].to(device)
            out, pre_s, dec_s, logits = generate(model, prompt, args.new_tokens, autocast)
            hits[i // per_depth] += int((out[:, :DIGITS] == answer).all(1).sum())
            if i > 0 or len(batches) == 1:
                timed.append((b, pre_s, dec_s))
            if args.check and i == 0:
                checked = check(model, prompt[0], out[0], logits, autocast)
        steps = args.new_tokens - 1
        dec_s = sum(t[2] for t in timed)
        row = dict(attn=model.cfg.attn, length=T, batch=batch, samples=args.samples * len(hits),
                   accuracy=sum(hits) / (args.samples * len(hits)),
                   accuracy_by_depth=[h / args.samples for h in hits],
                   prefill_s=sum(t[1] for t in timed) / len(timed),
                   decode_tokens_per_s=sum(t[0] for t in timed) * steps / dec_s,
                   decode_ms_per_step=1000 * dec_s / (len(timed) * steps), timed_batches=len(timed))
        if checked is not None:
            row.update(check_rel_err=checked[0], check_argmax=checked[1],
                       check_ok=checked[0] <= args.check_tol)
        rows.append(row)
        print(summary_line(row), flush=True)
    return rows


def summary_line(r):
    line = (f"{r['attn']} T={r['length']}: accuracy {r['accuracy']:.2f}, prefill "
            f"{r['prefill_s']:.3f} s (batch {r['batch']}), decode {r['decode_tokens_per_s']:.0f} tokens/s "
            f"({r['decode_ms_per_step']:.2f} ms/step)")
    if "check_ok" in r:
        line += f"; check {'ok' if r['check_ok'] else 'FAILED'} ({check_note(r)})"
    return line


def check_note(r):
    return (f"logits within {r['check_rel_err']:.2g} of a full forward's, {r['check_argmax']} "
            f"tokens its argmax")


def speedups(rows):
    """NSA's speed-up over SDPA at each length both ran: {length: (decode, prefill)}."""
    by = {(r["attn"], r["length"]): r for r in rows}
    return {T: (r["decode_tokens_per_s"] / by["sdpa", T]["decode_tokens_per_s"],
                by["sdpa", T]["prefill_s"] / r["prefill_s"])
            for (attn, T), r in by.items() if attn == "nsa" and ("sdpa", T) in by}


def table(rows, meta):
    ups = speedups(rows)
    lines = [f"# Passkey by generation (examples/generate.py), {meta['device']}", "",
             f"Prompts of `length` tokens (the passkey at depths {meta['depths']}), "
             f"{meta['new_tokens']} tokens generated greedily with the cache, batch {meta['batch']}"
             + (", under bf16 autocast" if meta["autocast"] else "") + ". Accuracy: rows with all "
             f"{DIGITS} digits right. Prefill: seconds per batch (time to first token). Decode: "
             "tokens/s over the steps after the first token, every row counted.", "",
             "| model | length | rows | accuracy | TTFT s (prefill) | decode tokens/s | ms/step "
             "| NSA speed-up decode (prefill) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        up = ups.get(r["length"]) if r["attn"] == "nsa" else None
        cell = "-" if up is None else f"{up[0]:.2f}x ({up[1]:.2f}x)"
        lines.append(f"| {r['attn']} | {r['length']} | {r['samples']} | {r['accuracy']:.2f} | "
                     f"{r['prefill_s']:.3f} | {r['decode_tokens_per_s']:.0f} | "
                     f"{r['decode_ms_per_step']:.2f} | {cell} |")
    checks = [r for r in rows if "check_ok" in r]
    if checks:
        lines += ["", f"Check (the first row of each length: the logits of its {meta['new_tokens']} "
                      "generated positions against a full forward without cache, relative "
                      f"difference <= {meta['check_tol']:g}): " + ", ".join(
                          f"{r['attn']} {r['length']}: {'ok' if r['check_ok'] else 'FAILED'} "
                          f"({check_note(r)})" for r in checks) + "."]
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
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    autocast = device.type == "cuda"
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
    for T, (dec, pre) in sorted(speedups(rows).items()):
        print(f"NSA over SDPA at {T}: decode {dec:.2f}x, prefill {pre:.2f}x")
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, checkpoints=args.checkpoints, depths=args.depths,
                batch=min(args.batch, args.samples), new_tokens=args.new_tokens, autocast=autocast,
                seed=args.seed, check_tol=args.check_tol if args.check else None)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "generate.md"), "w") as f:
        f.write(table(rows, meta))
    with open(os.path.join(out_dir, "generate.json"), "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
    print(f"wrote {os.path.join(out_dir, 'generate.md')} and generate.json")
    failed = [r for r in rows if r.get("check_ok") is False]
    if failed:
        sys.exit("generate.py: the cached generation differs from a full forward: "
                 + ", ".join(f"{r['attn']} at {r['length']}" for r in failed))


if __name__ == "__main__":
    main()
