"""The busiest source lines of each kernel in `ncu --page source --csv --print-source cuda` output.

    ncu --import report.ncu-rep --page source --csv --print-source cuda > source.csv
    python3 tools/ncu_source_top.py source.csv [--top 30]

For each table (one per profiled kernel) prints the total warp-stall samples and the lines with
the most samples: their share, instructions executed and source text. The parser only assumes
that each table starts with a CSV header holding a "Source" column and a column whose name starts
with "Warp Stall Sampling (All"; other lines (kernel names, notes) title the next table. When no
table is found the head of the file is printed, so a changed format is seen rather than hidden.
"""
import argparse
import csv
import io


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def tables(lines):
    title, header, rows = "", None, []
    for line in lines:
        cells = next(csv.reader(io.StringIO(line)), [])
        is_header = "Source" in cells and any(c.startswith("Warp Stall Sampling (All") for c in cells)
        if is_header:
            if header:
                yield title, header, rows
            header, rows = cells, []
        elif header and len(cells) == len(header):
            rows.append(cells)
        elif line.strip():
            if header:
                yield title, header, rows
                header, rows = None, []
            title = line.strip()
    if header:
        yield title, header, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    with open(args.csv, errors="replace") as f:
        lines = f.read().splitlines()
    found = 0
    for title, header, rows in tables(lines):
        found += 1
        src = header.index("Source")
        stall = next(i for i, c in enumerate(header) if c.startswith("Warp Stall Sampling (All"))
        inst = next((i for i, c in enumerate(header) if c.startswith("Instructions Executed")), None)
        line_col = next((i for i, c in enumerate(header) if c in ("Line", "# Line", "#")), None)
        total = sum(number(r[stall]) for r in rows) or 1.0
        total_inst = sum(number(r[inst]) for r in rows) if inst is not None else 0.0
        print(f"\n== {title[:160]}")
        print(f"   warp-stall samples {total:.0f}, instructions executed {total_inst:.4g}, {len(rows)} lines")
        for r in sorted(rows, key=lambda r: -number(r[stall]))[:args.top]:
            where = r[line_col] if line_col is not None else ""
            ins = f"{number(r[inst]):10.4g}" if inst is not None else ""
            print(f"   {100 * number(r[stall]) / total:5.1f}%  {ins}  {where:>5}  {r[src].strip()[:110]}")
    if not found:
        print("no source table found; head of the file:")
        print("\n".join(lines[:40]))


if __name__ == "__main__":
    main()
