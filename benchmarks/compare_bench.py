"""Compares two bench_attention.py CSVs of one GPU run: each one's speed-up over its own
in-process cuDNN SDPA (ratio = cuDNN ms / ours ms), and how the second's ratio moved against the
first's. Used by gpu_check.sh's `baseline` stage (the tree before a change against the tree
after it, built and timed in the same device call).

    python benchmarks/compare_bench.py BASE.csv NEW.csv [--tolerance 0.03]

Prints a markdown table (config, T, mode, both ratios, change) and exits 1 when any ratio of
NEW is more than `tolerance` below BASE's.
"""
import argparse
import csv
import sys


def ratios(path):
    """{(config, T, mode): cuDNN ms / ours ms} over the rows where both were timed. A config
    without its own cuDNN rows (fla's: full attention does not depend on the NSA
    hyper-parameters) takes those of another config at the same T."""
    ms = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["impl"] in ("ours", "sdpa_cudnn") and row["ms"]:
                ms[(row["config"], int(row["T"]), row["mode"], row["impl"])] = float(row["ms"])
    out = {}
    for (config, T, mode, impl), t in ms.items():
        base = ms.get((config, T, mode, "sdpa_cudnn")) or next(
            (v for (c, t2, m2, i), v in sorted(ms.items()) if (t2, m2, i) == (T, mode, "sdpa_cudnn")), None)
        if impl == "ours" and base:
            out[(config, T, mode)] = base / t
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base")
    ap.add_argument("new")
    ap.add_argument("--tolerance", type=float, default=0.03)
    args = ap.parse_args(argv)
    base, new = ratios(args.base), ratios(args.new)
    keys = sorted(base.keys() & new.keys())
    if not keys:
        print("compare_bench: no (config, T, mode) timed in both files")
        return 1
    worst = 0.0
    print("| config | T | mode | base x cuDNN | new x cuDNN | change |")
    print("|---|---|---|---|---|---|")
    for k in keys:
        change = new[k] / base[k] - 1
        worst = min(worst, change)
        flag = " (regression)" if change < -args.tolerance else ""
        print(f"| {k[0]} | {k[1]} | {k[2]} | {base[k]:.2f} | {new[k]:.2f} | {change:+.1%}{flag} |")
    print(f"worst change {worst:+.1%} (tolerance -{args.tolerance:.0%})")
    return 1 if worst < -args.tolerance else 0


if __name__ == "__main__":
    sys.exit(main())
