"""Per-kernel means of an Nsight Compute CSV (`ncu --csv --print-units base --metrics ...`), one
row per kernel and launch shape, the first --skip launches of each left out (warm-up):

    ncu --csv --print-units base --cache-control none --clock-control none \\
        --log-file /tmp/k.csv -k regex:decode_ \\
        --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \\
        python3 tools/profile_decode.py --shapes 65536x1 --warmup 1 --steps 3 --no-profiler
    python3 tools/ncu_kernel_times.py /tmp/k.csv --skip 2

ncu runs each kernel on its own (no overlap with its neighbours, no programmatic dependent
launch; with the two controls off, caches and clocks as a step leaves them rather than flushed
and locked at base), so the times add up to a step without the launch gaps: the per-kernel view
that torch.profiler cannot give for kernels launched as dependents.
gpu__time_duration is printed in us, percentages as they are, other metrics in base units.
"""
import argparse
import collections
import csv
import sys


def read_rows(path):
    """The metric rows of the CSV (ncu's own messages before the header are skipped)."""
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    return list(csv.DictReader(lines[start:]))


def kernel_means(rows, skip):
    """{(kernel, grid, block): {metric: mean}} in order of first launch, and launch counts."""
    launches = collections.OrderedDict()  # key -> {launch id: {metric: value}}
    for r in rows:
        name = r["Kernel Name"].split("(")[0].split("<")[0].strip()
        name = name[len("void "):] if name.startswith("void ") else name
        key = (name, r.get("Grid Size", ""), r.get("Block Size", ""))
        value = r["Metric Value"].replace(",", "")
        try:
            value = float(value)
        except ValueError:
            continue
        launches.setdefault(key, collections.OrderedDict()).setdefault(r["ID"], {})[r["Metric Name"]] = value
    means = collections.OrderedDict()
    counts = {}
    for key, by_id in launches.items():
        kept = list(by_id.values())[skip:] or list(by_id.values())
        metrics = collections.OrderedDict()
        for m in kept[0]:
            metrics[m] = sum(x.get(m, 0.0) for x in kept) / len(kept)
        means[key] = metrics
        counts[key] = len(kept)
    return means, counts


STALL = "smsp__average_warps_issue_stalled_"


def short(metric):
    """A column's name: the usual metrics' short names; a stall reason's (warps stalled on it per
    issued instruction) as "stall <reason>"."""
    if metric.startswith(STALL) and metric.endswith("_per_issue_active.ratio"):
        return "stall " + metric[len(STALL):-len("_per_issue_active.ratio")].replace("_", " ")
    return {"gpu__time_duration.sum": "us", "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram %",
            "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm %",
            "launch__registers_per_thread": "regs"}.get(metric, metric)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--skip", type=int, default=0, help="launches of each kernel left out first")
    args = ap.parse_args(argv)
    means, counts = kernel_means(read_rows(args.csv), args.skip)
    if not means:
        print(f"{args.csv}: no kernel rows")
        return 1
    metrics = list(next(iter(means.values())))
    print("| kernel | grid | block | n | " + " | ".join(short(m) for m in metrics) + " |")
    print("|---|---|---|---|" + "---|" * len(metrics))
    total = 0.0
    for (name, grid, block), vals in means.items():
        cells = []
        for m in metrics:
            v = vals.get(m, float("nan"))
            if m == "gpu__time_duration.sum":
                v /= 1000.0
                total += v
            cells.append(f"{v:.1f}")
        print(f"| {name} | {grid} | {block} | {counts[(name, grid, block)]} | " + " | ".join(cells) + " |")
    if "gpu__time_duration.sum" in metrics:
        print(f"sum of the kernels' means: {total:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
