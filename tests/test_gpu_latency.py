"""tools/gpu_latency.cu (gpu_check.sh's latency stage) compiles for sm_90a wherever nvcc is, so
that the GPU call that runs it does not find it broken."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_gpu_latency_compiles_for_sm90a(tmp_path):
    cmd = ["nvcc", "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Werror", "all-warnings",
           "-c", str(ROOT / "tools" / "gpu_latency.cu"), "-o", str(tmp_path / "gpu_latency.o")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "gpu_latency.o").stat().st_size > 0
