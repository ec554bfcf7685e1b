"""CPU smoke test of benchmarks/bench_layer.py --tiny: it runs and records both layers at both
lengths."""
import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_layer_tiny(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_layer.py"),
                          "--tiny", "--device", "cpu", "--repeats", "2", "--out-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "### nsa-bench table begin" in run.stdout
    csvs = list(tmp_path.glob("layer-tiny_cpu_*.csv"))
    assert len(csvs) == 1, os.listdir(tmp_path)
    assert csvs[0].with_suffix(".png").exists()
    with open(csvs[0], newline="") as f:
        rows = list(csv.DictReader(f))
    timed = {(r["impl"], int(r["T"]), r["mode"]) for r in rows if r["ms"]}
    want = {(i, T, m) for i in ("nsa", "sdpa") for T in (256, 128) for m in ("fwd", "fwdbwd")}
    assert want <= timed, f"missing timings: {sorted(want - timed)}"
