"""benchmarks/bench_attention.py --plot-only on the CPU: the figure and the tables from a CSV
written earlier, with one panel per config that has times of ours and of a baseline."""
import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_attention  # noqa: E402


def write_rows(path):
    """g16 at two lengths with a baseline, fla with ours only (skipped baselines), g4 with no
    time at all."""
    meta = dict(gpu="Test GPU", torch="2.0", triton="3.0", commit="abc1234")
    rows = []
    for config, T, impl, mode, ms in (
            ("g16", 8192, "ours", "fwd", "2.0"), ("g16", 8192, "ours", "fwdbwd", "9.0"),
            ("g16", 8192, "sdpa_cudnn", "fwd", "1.5"), ("g16", 8192, "sdpa_cudnn", "fwdbwd", "7.0"),
            ("g16", 65536, "ours", "fwd", "40.0"), ("g16", 65536, "ours", "fwdbwd", "130.0"),
            ("g16", 65536, "sdpa_cudnn", "fwd", "120.0"),
            ("g16", 65536, "sdpa_cudnn", "fwdbwd", "450.0"),
            ("g16", 65536, "flex_swa", "fwd", "4.0"), ("g16", 65536, "flex_swa", "fwdbwd", "16.0"),
            ("fla", 65536, "ours", "fwd", "27.0"), ("fla", 65536, "fla_nsa", "fwd", ""),
            ("g4", 65536, "ours", "fwd", "")):
        rows.append(dict(meta, config=config, B=1, T=T, HQ=64, H=4, D=128, Dv=128, block_size=32,
                         block_stride=16, select_size=64, num_selected=16, window_size=512,
                         impl=impl, mode=mode, ms=ms, note="" if ms else "skipped: time budget"))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=bench_attention.FIELDS)
        w.writeheader()
        w.writerows(rows)
    return rows


def test_plotted_configs(tmp_path):
    rows = write_rows(tmp_path / "bench.csv")
    assert bench_attention.plotted_configs(rows) == ["g16"]


def test_plot_only(tmp_path):
    path = tmp_path / "bench_test_abc1234.csv"
    write_rows(path)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_attention.py"),
                          "--plot-only", str(path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert path.with_suffix(".png").exists()
    # sdpa_flash was not timed; flex_swa computes the window alone: its time, no ratio
    row = "| 64k | g16 | 40.0 | 130 | 120 (3.00x) | 450 (3.46x) | n/a | n/a | 4.00 | 16.0 |"
    assert row in run.stdout
