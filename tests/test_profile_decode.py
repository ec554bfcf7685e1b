"""tools/profile_decode.py's timeline of a decode step, from kernel records as torch.profiler gives
them (the GPU runs come from gpu_check.sh's dprofile stage)."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("profile_decode", ROOT / "tools" / "profile_decode.py")
pd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pd)

A = "void nsa::cuda::decode::decode_cmp_kernel<__nv_bfloat16, 128, 128, 1>(nsa::DecodeParams, nsa::cuda::decode::Workspace)"
B = "nsa::cuda::decode::decode_select_kernel(nsa::DecodeParams, nsa::cuda::decode::Workspace)"
C = "void nsa::cuda::decode::decode_sparse_kernel<__nv_bfloat16, 128, 128, 1>(nsa::DecodeParams, nsa::cuda::decode::Workspace)"
D = "void nsa::cuda::decode::decode_combine_kernel<__nv_bfloat16, 128>(nsa::DecodeParams, nsa::cuda::decode::Workspace, int)"


def step(t0, a_end, b_end, c_end, d_end):
    # dependents start early (their spans overlap their predecessor's)
    return [(A, t0, t0 + a_end), (B, t0 + 1, t0 + b_end), (C, t0 + 2, t0 + c_end), (D, t0 + 3, t0 + d_end)]


def test_step_timeline_means_and_what_each_kernel_adds():
    kernels = step(100.0, 10, 15, 20, 22) + step(130.0, 12, 17, 22, 24) + step(161.0, 11, 16, 21, 23)
    kernels.append((A, 190.0, 195.0))  # an incomplete last step: counted in the step time only
    rows, step_us = pd.step_timeline(list(reversed(kernels)), "decode_cmp_kernel")
    assert [pd.short_name(r[0]) for r in rows] == [
        "decode_cmp_kernel", "decode_select_kernel", "decode_sparse_kernel", "decode_combine_kernel"]
    starts = [r[1] for r in rows]
    ends = [r[2] for r in rows]
    adds = [r[3] for r in rows]
    assert starts == pytest.approx([0, 1, 2, 3])
    assert ends == pytest.approx([11, 16, 21, 23])
    assert adds == pytest.approx([11, 5, 5, 2])
    assert sum(adds) == pytest.approx(ends[-1])
    assert step_us == pytest.approx(30.0)  # (130 - 100, 161 - 130, 190 - 161) mean


def test_step_timeline_without_steps():
    assert pd.step_timeline([], "decode_cmp_kernel") == ([], None)
    assert pd.step_timeline([(B, 0.0, 1.0)], "decode_cmp_kernel") == ([], None)
    rows, step_us = pd.step_timeline(step(0.0, 1, 2, 3, 4), "decode_cmp_kernel")
    assert len(rows) == 4 and step_us is None
