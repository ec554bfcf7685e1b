"""Needle-in-a-haystack evaluation of checkpoints written by examples/train.py: passkey retrieval
accuracy over context length x needle depth, as a table and a heatmap (the shape of the NSA
paper's Figure 5).

    python examples/needle.py runs/nsa-gpu/checkpoint.pt runs/sdpa-gpu/checkpoint.pt \\
        --lengths 4096 8192 16384 32768 65536 --out examples/results

A row is right when all five passkey digits are predicted (argmax with the earlier digits given).
With several checkpoints the summary puts each model's training time per step (metrics.json of
its run) next to its accuracy. Writes needle_<attn>.png and needle_<attn>.json per checkpoint and
needle.md; `--merge needle_sdpa.json ...` adds the results of earlier runs (another machine's,
say) to needle.md.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import ModelConfig, TinyLM, answer_hits  # noqa: E402
import tasks  # noqa: E402


def load(path, device):
    ck = torch.load(path, map_location="cpu", weights_only=False)
    model = TinyLM(ModelConfig(**ck["config"])).to(device)
    model.load_state_dict(ck["state_dict"])
    model.eval()
    return model, ck.get("metrics", {})


@torch.no_grad()
def grid(model, lengths, depths, samples, batch, device, seed):
    """acc[i][j]: accuracy at lengths[i], depths[j]; also the seconds per forward of each length."""
    gen = torch.Generator().manual_seed(seed)
    autocast = device.type == "cuda"
    acc, secs = [], []
    for T in lengths:
        row, t_len = [], 0.0
        for d in depths:
            hits = 0
            for start in range(0, samples, batch):
                b = min(batch, samples - start)
                tok, mask = tasks.passkey(b, T, gen, depth=d)
                tok, mask = tok.to(device), mask.to(device)
                t0 = time.time()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    logits = model(tok)
                hits += int(answer_hits(logits, tok, mask)[0].sum())
                t_len += time.time() - t0
            row.append(hits / samples)
        acc.append(row)
        secs.append(t_len)
    return acc, secs


def heatmap(acc, lengths, depths, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 4))
    data = torch.tensor(acc).T.numpy()  # depth x length
    im = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{T // 1024}k" if T >= 1024 else str(T) for T in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length")
    ax.set_ylabel("needle depth")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            ax.text(i, j, f"{acc[i][j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results):
    """needle.md's summary table (one row per model: training time per step and steps, mean
    accuracy over depths by length) and one depth x length table per model."""
    lengths = sorted({T for r in results for T in r["lengths"]})
    summary = ["| model | train s | steps | ms/step | tokens/s | " + " | ".join(
        f"{T} acc (eval s)" for T in lengths) + " |", "|" + "---|" * (5 + len(lengths))]
    details = []
    for r in results:
        by_len = {T: (sum(a) / len(a), s, min(a)) for T, a, s in zip(r["lengths"], r["acc"], r["eval_seconds"])}
        step_ms = (r.get("step_seconds") or float("nan")) * 1000
        summary.append(f"| {r['attn']} | {r.get('train_seconds') or 'n/a'} | {r.get('steps') or 'n/a'} | "
                       f"{step_ms:.0f} | {r.get('tokens_per_second') or 'n/a'} | " + " | ".join(
                           f"{by_len[T][0]:.2f} ({by_len[T][1]:.1f})" if T in by_len else "-" for T in lengths) + " |")
        rows = ["| depth | " + " | ".join(str(T) for T in r["lengths"]) + " |", "|" + "---|" * (1 + len(r["lengths"]))]
        for j, d in enumerate(r["depths"]):
            rows.append(f"| {d:.0%} | " + " | ".join(f"{r['acc'][i][j]:.2f}" for i in range(len(r["lengths"]))) + " |")
        details.append(f"### {r['attn']} ({r['checkpoint']}, {r.get('device', '?')}), {r['samples']} rows per cell\n\n"
                       + "\n".join(rows) + "\n\nmin over depths: " + ", ".join(
                           f"{T}: {by_len[T][2]:.2f}" for T in r["lengths"])
                       + f"\n\n![{r['attn']}](needle_{r['attn']}.png)\n")
    return summary, details


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*")
    ap.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                    help="needle_<attn>.json of earlier runs to add to needle.md")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--depths", type=int, default=11, help="needle depths from 0% to 100%")
    ap.add_argument("--samples", type=int, default=20, help="rows per (length, depth) cell")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default="examples/results")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    depths = [i / (args.depths - 1) for i in range(args.depths)] if args.depths > 1 else [0.5]
    os.makedirs(args.out, exist_ok=True)
    if not args.checkpoints and not args.merge:
        ap.error("give checkpoints to evaluate or --merge results")
    results = []
    for path in args.checkpoints:
        model, metrics = load(path, device)
        attn = model.cfg.attn
        acc, secs = grid(model, args.lengths, depths, args.samples, args.batch, device, args.seed)
        res = dict(attn=attn, checkpoint=path, lengths=args.lengths, depths=depths, samples=args.samples,
                   acc=acc, eval_seconds=secs, step_seconds=metrics.get("step_seconds"),
                   tokens_per_second=metrics.get("tokens_per_second"),
                   train_seconds=metrics.get("train_seconds"), steps=metrics.get("steps"),
                   device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
        heatmap(acc, args.lengths, depths, os.path.join(args.out, f"needle_{attn}.png"),
                f"{attn}: passkey retrieval")
        with open(os.path.join(args.out, f"needle_{attn}.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(f"{attn}: " + ", ".join(f"{T}: {sum(r) / len(r):.2f}" for T, r in zip(args.lengths, acc)), flush=True)
        results.append(res)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for path in args.merge:
        with open(path) as f:
            results.append(json.load(f))
    summary, details = report(results)
    text = ("# Needle in a haystack (examples/needle.py)\n\nMean accuracy over depths by context "
            "length (seconds of evaluation forwards in brackets), and the training time per step "
            "of each model:\n\n" + "\n".join(summary) + "\n\n" + "\n".join(details))
    with open(os.path.join(args.out, "needle.md"), "w") as f:
        f.write(text)
    print("\n".join(summary))
    print(f"wrote {os.path.join(args.out, 'needle.md')} and the heatmaps")


if __name__ == "__main__":
    main()
