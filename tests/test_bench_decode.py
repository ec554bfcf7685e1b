"""benchmarks/bench_decode.py on the CPU: the byte counts, the derived columns (floor share, ratios
to dense and mdy666, the targets' pass/fail lines) from rows made here, --plot-only, and a
--cpu-smoke run of nsa_torch.decode_attention against SDPA at tiny sizes."""
import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_decode  # noqa: E402
import nsa_torch  # noqa: E402

PAPER = bench_decode.PAPER


def test_nsa_tokens():
    # 64k: 4095 compressed + 16 blocks of 64 + 512 window tokens, against 65536 for dense: the
    # issue's 11.6x byte ratio
    assert bench_decode.nsa_tokens(65536, PAPER) == 4095 + 1024 + 512
    assert round(65536 / bench_decode.nsa_tokens(65536, PAPER), 1) == 11.6
    # fewer blocks than n: every token is selected; the window is capped by the length
    assert bench_decode.nsa_tokens(100, PAPER) == 5 + 100 + 100
    # 17 blocks, the last one partial (10 tokens): 15 full blocks + the partial one
    assert bench_decode.nsa_tokens(16 * 64 + 10, PAPER) == 63 + 15 * 64 + 10 + 512
    cfg = dict(H=4, D=128, Dv=128, itemsize=2, hp=PAPER)
    assert bench_decode.step_bytes([65536, 8192], cfg, nsa=False) == (65536 + 8192) * 4 * 256 * 2


def test_seq_lengths():
    assert bench_decode.seq_lengths(1024, 3, "equal") == [1024] * 3
    assert bench_decode.seq_lengths(1024, 3, "mixed") == [1024, 768, 512]
    assert bench_decode.seq_lengths(1024, 1, "mixed") == [1024]


META = dict(gpu="Test GPU", torch="2.0", triton="3.0", commit="abc1234", dtype="bfloat16",
            HQ=64, H=4, D=128, Dv=128, block_size=32, block_stride=16, select_size=64,
            num_selected=16, window_size=512)


def row(T, B, impl, mode, ms, nbytes="", layout="contiguous", kind="equal", byte_ratio="",
        note=""):
    r = {f: "" for f in bench_decode.FIELDS}
    r.update(META, T=str(T), B=str(B), lengths=kind, layout=layout, impl=impl, mode=mode,
             ms="" if ms is None else str(ms), bytes=str(nbytes), byte_ratio=byte_ratio,
             note=note)
    return r


def make_rows():
    """Copy at 4000 GB/s; 64k B=16: ours 0.3 ms for 184.5 MB (floor 0.0461 ms), dense the best
    of three (sdpa_cudnn's eager time is not taken over sdpa_flash's graph time), mdy666;
    128k B=1: ours with dense 4.5x slower."""
    ours_bytes = 16 * 4 * 5631 * 512
    return [
        row("", "", "copy", "d2d", 0.5, nbytes=2 * 10**9),
        row(65536, 16, "ours", "graph", 0.3, ours_bytes, byte_ratio="11.639"),
        row(65536, 16, "ours", "eager", 0.4, ours_bytes, byte_ratio="11.639"),
        row(65536, 16, "sdpa_flash", "graph", 2.7, 16 * 65536 * 4 * 512),
        row(65536, 16, "sdpa_cudnn", "eager", 2.0, 16 * 65536 * 4 * 512),
        row(65536, 16, "sdpa_efficient", "graph", None, note="n/a: RuntimeError: refused"),
        row(65536, 16, "mdy666", "graph", 0.6, ours_bytes, layout="paged", byte_ratio="11.639"),
        row(131072, 1, "ours", "graph", 0.1, 4 * 9727 * 512),
        row(131072, 1, "sdpa_flash", "graph", 0.45, 131072 * 4 * 512),
    ]


def test_derive():
    rows = make_rows()
    bench_decode.derive(rows)
    by = {(r["T"], r["impl"], r["mode"]): r for r in rows}
    ours = by[("65536", "ours", "graph")]
    assert ours["copy_gbps"] == "4000.0"
    assert float(ours["floor_ms"]) == pytest.approx(16 * 4 * 5631 * 512 / 4e12 * 1e3, rel=1e-5)
    assert float(ours["floor_share"]) == pytest.approx(float(ours["floor_ms"]) / 0.3, rel=1e-3)
    assert ours["dense_impl"] == "sdpa_flash" and float(ours["dense_ms"]) == 2.7
    assert float(ours["dense_ratio"]) == pytest.approx(9.0)
    assert float(ours["mdy666_ratio"]) == pytest.approx(2.0)
    assert float(by[("65536", "ours", "eager")]["dense_ratio"]) == pytest.approx(2.7 / 0.4, 1e-3)
    mdy = by[("65536", "mdy666", "graph")]
    assert float(mdy["dense_ratio"]) == pytest.approx(4.5) and mdy["mdy666_ratio"] == ""
    dense = by[("65536", "sdpa_flash", "graph")]
    assert dense["dense_ratio"] == "" and float(dense["floor_share"]) > 0
    assert by[("65536", "sdpa_efficient", "graph")]["floor_ms"] == ""


def test_targets():
    rows = make_rows()
    bench_decode.derive(rows)
    lines = bench_decode.target_lines(rows)
    assert lines[0].startswith("target 64k B=16: dense / ours >= 8x: 9.00x") and "PASS" in lines[0]
    assert "15%" in lines[1] and lines[1].endswith("FAIL")  # 0.0461 / 0.3 of copy bandwidth
    assert "4.50x" in lines[2] and lines[2].endswith("FAIL")
    lines = bench_decode.target_lines(rows[:3])
    assert lines[2].endswith("NOT MEASURED")


def test_plot_only(tmp_path):
    rows = make_rows()
    bench_decode.derive(rows)
    path = tmp_path / "decode_test_abc1234.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=bench_decode.FIELDS)
        w.writeheader()
        w.writerows(rows)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_decode.py"),
                          "--plot-only", str(path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert path.with_suffix(".png").exists()
    table = run.stdout.split("### nsa-decode table begin")[1].split("### nsa-decode table end")[0]
    # T, B, ours, paged, eager, dense, ratio, MB, floor, share, bytes, mdy666, ratio
    assert ("| 64k | 16 | 300 | n/a | 400 | 2700 (sdpa_flash) | 9.00x | 184.5 | 46.1 | 15% | "
            "11.64x | 600 | 2.00x |") in table
    assert "- sdpa_efficient (1x): n/a: RuntimeError: refused" in table


@pytest.mark.skipif(not hasattr(nsa_torch, "decode_attention"),
                    reason="nsa_torch.decode_attention is not in this tree yet")
def test_cpu_smoke(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_decode.py"),
                          "--cpu-smoke", "--lengths", "512", "--batches", "1", "3", "--warmup", "1",
                          "--rep", "4", "--windows", "2", "--out-dir", str(tmp_path),
                          "--force", "cmp_splits=2,sel_splits=3", "--head-major"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "### nsa-decode table begin" in run.stdout
    csvs = list(tmp_path.glob("decode-smoke_cpu_*.csv"))
    assert len(csvs) == 1, os.listdir(tmp_path)
    assert csvs[0].with_suffix(".png").exists()
    with open(csvs[0], newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench_decode.FIELDS
        rows = list(reader)
    ours = {(int(r["B"]), r["lengths"], r["layout"]): r for r in rows
            if r["impl"] == "ours" and r["mode"] == "eager"}
    # the plan variant: timed beside the planned step, contiguous only, and in the table
    variants = {(int(r["B"]), r["lengths"]): r for r in rows
                if r["impl"] == "ours" and r["mode"] == "eager cmp_splits=2,sel_splits=3"}
    assert set(variants) == {(1, "equal"), (3, "equal"), (3, "mixed")}, sorted(variants)
    assert all(r["ms"] and r["layout"] == "contiguous" for r in variants.values())
    assert "| equal | 512 | 3 | cmp_splits=2,sel_splits=3 |" in run.stdout
    # head-major caches: the same step on [B, H, T, D] memory, contiguous only, in the table
    heads = {(int(r["B"]), r["lengths"]): r for r in rows
             if r["impl"] == "ours" and r["mode"] == "eager heads"}
    assert set(heads) == {(1, "equal"), (3, "equal"), (3, "mixed")}, sorted(heads)
    assert all(r["ms"] and r["layout"] == "contiguous" for r in heads.values())
    assert "| mixed | 512 | 3 | heads |" in run.stdout
    assert set(ours) == {(B, kind, layout) for B, kind in ((1, "equal"), (3, "equal"),
                                                           (3, "mixed"))
                         for layout in ("contiguous", "paged")}, sorted(ours)
    for r in ours.values():
        assert r["ms"], r["note"]
        assert float(r["bytes"]) == bench_decode.step_bytes(
            bench_decode.seq_lengths(512, int(r["B"]), r["lengths"]),
            dict(H=2, D=32, Dv=32, itemsize=4, hp=bench_decode.SMOKE_SIZES["hp"]), nsa=True)
        assert float(r["dense_ratio"]) == pytest.approx(float(r["dense_ms"]) / float(r["ms"]),
                                                        rel=1e-3)
        assert float(r["floor_share"]) == pytest.approx(float(r["floor_ms"]) / float(r["ms"]),
                                                        rel=1e-3)
        assert float(r["byte_ratio"]) > 1
    for impl in ("flash_attn", "fa3", "flashinfer", "mdy666"):
        assert {r["note"] for r in rows if r["impl"] == impl} == {"n/a: needs CUDA"}


def test_parse_force():
    assert bench_decode.parse_force("cmp_splits=32,sel_splits=4") == {"cmp_splits": 32, "sel_splits": 4}
    assert bench_decode.parse_force("fwd=mma") == {"fwd": "mma"}
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        bench_decode.parse_force("cmp_splits")


def test_bad_force_fails_before_measuring():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_decode.py"),
                          "--cpu-smoke", "--force", "sel_splits=65"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "--force sel_splits=65" in run.stderr and "[1, 64]" in run.stderr, run.stderr[-2000:]
