"""The summary of examples/multi_gpu.sh: python examples/multi_gpu_summary.py DIR prints (as
markdown) the runs whose metrics_<run>.json lie in DIR, written by examples/train.py:

  1gpu       one GPU, the global batch of the N processes and their very rows (--data-shards N)
  1gpu-part  one GPU doing what rank 0 of the N processes does (its batch, its rows)
  ddp, fsdp  N processes, the same global batch as 1gpu (strong scaling)
  ddp-weak, fsdp-weak
             N processes, each with 1gpu's batch (weak scaling; other rows)

or, with --compare DIR NAME..., the table of any runs against the first (tools/multi_gpu_ab.sh).

Throughput is taken over one window of steps common to every run (the first quarter of the
shortest run is left out as warm-up, and so are the steps that train.py --profile profiled),
since a step's time drifts as training goes on."""
import json
import os
import sys

ORDER = ("1gpu", "1gpu-part", "ddp", "fsdp", "ddp-weak", "fsdp-weak")
SAME_ROWS = ("1gpu", "ddp", "fsdp")  # trained on the same rows: their loss curves compare


def load(folder):
    return {n: json.load(open(os.path.join(folder, f"metrics_{n}.json")))
            for n in ORDER if os.path.exists(os.path.join(folder, f"metrics_{n}.json"))}


def throughput(m, lo, hi):
    """(ms per step, tokens per second) over steps lo..hi-1, less the profiled ones (slower)."""
    profiled = set(m.get("profiled_steps", ()))
    steps = [i for i in range(lo, hi) if i not in profiled]
    t = sum(m["step_times"][i] for i in steps)
    return 1000 * t / len(steps), sum(m["step_tokens"][i] for i in steps) / t


def speeds(runs):
    """(lo, hi, {name: throughput}) over the steps common to every run, past the first quarter."""
    hi = min(len(m["step_times"]) for m in runs.values())
    lo = hi // 4
    return lo, hi, {n: throughput(m, lo, hi) for n, m in runs.items()}


def summary(runs):
    """The markdown text for the runs (a dict name -> metrics; 1gpu required)."""
    if "1gpu" not in runs:
        raise SystemExit("multi_gpu_summary: metrics_1gpu.json (the baseline) is missing")
    lo, hi, speed = speeds(runs)
    base = speed["1gpu"][1]
    out = [f"Tokens per second over steps {lo + 1}-{hi} of every run:\n",
           "| run | processes | sequences per process | tokens/step (all processes) | ms/step | "
           "tokens/s | against 1gpu |", "|---|---|---|---|---|---|---|"]
    for n, m in runs.items():
        ms, tok_s = speed[n]
        out.append(f"| {n} | {m['processes']} | {m['batch_per_process']} | {m['step_tokens'][-1]} | "
                   f"{ms:.0f} | {tok_s:.0f} | {tok_s / base:.2f}x |")
    N = max(m["processes"] for m in runs.values())
    notes = []
    if "1gpu-part" in runs:
        part = speed["1gpu-part"]
        notes.append(f"- 1gpu-part: one GPU alone at one process's share is {N * part[1] / base:.2f}x "
                     f"1gpu's tokens/s for {N} of them, the most that strong scaling can reach "
                     f"with these kernels at this batch.")
        for n in ("ddp", "fsdp"):
            if n in runs:
                notes.append(f"- {n} against 1gpu-part: {speed[n][0] / part[0]:.2f}x the step time "
                             f"(what running as {N} processes costs); {speed[n][1] / part[1]:.2f}x "
                             f"its tokens/s (weak scaling at 1gpu-part's batch).")
    if notes:
        out += [""] + notes
    same = [n for n in SAME_ROWS if n in runs]
    if len(same) > 1:
        steps = min(len(runs[n]["losses"]) for n in same)
        w = max(1, steps // 8)
        out += ["", f"{', '.join(same)} train on the same rows. Mean loss over windows of {w} steps:\n",
                "| steps | " + " | ".join(same) + " |", "|---|" + "---|" * len(same)]
        for s in range(0, steps - w + 1, w):
            out.append(f"| {s + 1}-{s + w} | " + " | ".join(
                f"{sum(runs[n]['losses'][s:s + w]) / w:.3f}" for n in same) + " |")
        # The noise: DDP and FSDP2 compute the same steps and differ only in rounding and in the
        # order of reductions, so their difference is the yardstick.
        out += ["", "Mean (largest) per-step loss difference between runs; the N-process runs "
                    "against each other are the noise:\n",
                "| | " + " | ".join(same[1:]) + " |", "|---|" + "---|" * (len(same) - 1)]
        for i, a in enumerate(same[:-1]):
            cells = []
            for j, b in enumerate(same[1:], 1):
                d = [abs(x - y) for x, y in zip(runs[a]["losses"][:steps], runs[b]["losses"][:steps])]
                cells.append(f"{sum(d) / len(d):.4f} ({max(d):.3f})" if j > i else "")
            out.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def compare(runs):
    """The markdown table of any runs (a dict name -> metrics, in order), e.g. the variants of
    tools/multi_gpu_ab.sh: ms/step and tokens/s over their common steps, against the first."""
    lo, hi, speed = speeds(runs)
    first = next(iter(speed.values()))[1]
    out = [f"Over steps {lo + 1}-{hi} of every run:\n",
           "| run | processes | tokens/step (all processes) | ms/step | tokens/s | against the first |",
           "|---|---|---|---|---|---|"]
    for n, m in runs.items():
        ms, tok_s = speed[n]
        out.append(f"| {n} | {m['processes']} | {m['step_tokens'][-1]} | {ms:.0f} | {tok_s:.0f} | "
                   f"{tok_s / first:.2f}x |")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--compare":  # DIR NAME...: metrics_<NAME>.json
        print(compare({n: json.load(open(os.path.join(sys.argv[2], f"metrics_{n}.json"))) for n in sys.argv[3:]}))
    elif len(sys.argv) == 2:
        print(summary(load(sys.argv[1])))
    else:
        raise SystemExit("usage: python examples/multi_gpu_summary.py DIR (holding metrics_<run>.json)\n"
                         "       python examples/multi_gpu_summary.py --compare DIR NAME... (metrics_<NAME>.json)")
