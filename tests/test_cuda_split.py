"""Split dK/dV on CUDA. Long key tiles (compressed keys, the selected branch's first blocks) can be
split over several thread blocks whose fp32 partials are summed in order: ranges of split_tokens
tokens (default 4096, up to 16 ranges), so only sequences of 8k tokens and more split by default;
split_tokens=64 (nsa_torch._debug.force) makes short sequences split too. Determinism of the
split: test_cuda_determinism.py."""
import pytest
import torch

from helpers import (CASES, VARLEN, assert_split, case_params, gpu_inputs, kernels, run_branch,
                     seed_of, with_indices)

pytestmark = pytest.mark.cuda

SPLIT_CASES = {k: CASES[k] for k in ("T700-G24-d128", "T2100-B2-G4-d192v128", "T1100-G5-d64v128",
                                     "T1031-G16-d96", "T1031-B2-G16-d256",
                                     "T333-G8-d64-custom")}


@pytest.mark.parametrize("branch", ["compressed", "selected", "nsa"])
@pytest.mark.parametrize("case,dtype", case_params(SPLIT_CASES, (torch.bfloat16,)))
def test_split_dkdv(case, dtype, branch):
    x = gpu_inputs(dtype=dtype, seed=seed_of("split", case, dtype, branch), **case)
    with kernels(case, split_tokens=64) as ran:
        run_branch(branch, x, case, dtype, seed=seed_of("split-idx", case, branch))
        if branch == "selected":
            run_branch(branch, with_indices(x, case, "selected"), case, dtype)
    assert_split(ran)


@pytest.mark.parametrize("branch", ["compressed", "selected", "nsa"])
def test_split_dkdv_varlen(branch):
    case, dtype = VARLEN["mixed-G4-d128"], torch.bfloat16
    x = gpu_inputs(dtype=dtype, seed=seed_of("split-varlen", branch), **case)
    with kernels(case, split_tokens=64) as ran:
        run_branch(branch, x, case, dtype, seed=seed_of("split-varlen-idx", branch))
    assert_split(ran)
