"""Each branch and nsa_attention on CUDA against nsa_torch.reference in float64 (docs/design.md
section 5), forward and backward, over odd shapes, GQA group sizes, head dims and
hyper-parameters (helpers.CASES), plus the log-sum-exp of the raw selected and sliding-window
forward ops against the independent row checker (helpers.check_raw_lse)."""
import pytest
import torch

import nsa_torch
from helpers import (CASES, VARLEN, case_params, check_branch, check_nsa, check_raw_lse,
                     compressed, gpu_inputs, run_branch, seed_of, selected, sliding, with_indices)

pytestmark = pytest.mark.cuda


def test_cases_cover_every_head_dim():
    """Every (D, Dv) pair with CUDA kernels has cases; the mma.sync-only 96 and 256 at G = 1, 4
    and 16, and packed."""
    for dims in map(tuple, nsa_torch._C.CUDA_HEAD_DIMS):
        groups = {c["HQ"] // c["H"] for c in CASES.values() if (c["D"], c["Dv"]) == dims}
        assert groups, f"no case for (D, Dv) = {dims}"
        if dims[0] in (96, 256):
            assert {1, 4, 16} <= groups, f"(D, Dv) = {dims}: G = {sorted(groups)}"
            assert any((c["D"], c["Dv"]) == dims for c in VARLEN.values()), f"{dims}: no packed case"


@pytest.mark.parametrize("case,dtype", case_params(CASES))
def test_compressed_attention(case, dtype):
    x = gpu_inputs(dtype=dtype, seed=seed_of("cmp", case, dtype), **case)
    o, lse = check_branch(compressed, x, case, ["q", "k_cmp", "v_cmp"], dtype)
    assert lse.dtype == torch.float32


@pytest.mark.parametrize("case,dtype", case_params(CASES))
def test_sliding_window_attention(case, dtype):
    x = gpu_inputs(dtype=dtype, seed=seed_of("swa", case, dtype), **case)
    (o,) = check_branch(sliding, x, case, ["q", "k", "v"], dtype)
    check_raw_lse("swa", x, case, o)


# "sorted" (ascending, -1 at the end) only in bf16: the slot order does not depend on the dtype.
SLC_PARAMS = [pytest.param(*p.values, kind, id=f"{p.id}-{kind}")
              for kind in ("user", "sorted", "selected") for p in case_params(CASES)
              if kind != "sorted" or p.values[1] == torch.bfloat16]


@pytest.mark.parametrize("case,dtype,kind", SLC_PARAMS)
def test_selected_attention(case, dtype, kind):
    """Given block indices: random caller-style rows (shuffled, or ascending; -1 padding, future
    blocks, empty rows) and the float64 reference's own selection."""
    x = gpu_inputs(dtype=dtype, seed=seed_of("slc", case, dtype), **case)
    x = with_indices(x, case, kind, seed=seed_of("slc-idx", case, kind))
    (o,) = check_branch(selected, x, case, ["q", "k", "v"], dtype)
    check_raw_lse("slc", x, case, o)


@pytest.mark.parametrize("branch", ["compressed", "sliding"])
def test_zero_scale(branch):
    """scale = 0: every visible key weighs the same (the forward's other softmax path)."""
    case = dict(T=300, HQ=8, H=2, D=128, Dv=64, window_size=100, scale=0.0)
    x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of("zero-scale", branch), **case)
    run_branch(branch, x, case, torch.bfloat16)


@pytest.mark.parametrize("case,dtype", case_params(CASES))
def test_nsa_attention(case, dtype):
    x = gpu_inputs(dtype=dtype, seed=seed_of("nsa", case, dtype), **case)
    check_nsa(x, case, dtype)
