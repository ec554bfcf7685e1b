"""select_blocks on CUDA by the score rule (helpers.check_selection; not by exact indices) and
mostly equal to the float64 reference's choice, with each of its kernels: "wgmma" (sm_90, D in
{64, 128}, G in {16, 32}) and "mma" (every shape), forced through nsa_torch._debug."""
import pytest
import torch

import nsa_torch
from helpers import (CASES, CMP_H, CUSTOM_HYPER, FLA_HYPER, case_params, check_select, gpu_inputs,
                     hyper, kernels, run_branch, seed_of, shape_refusal)

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("case,dtype", case_params(CASES))
def test_select_blocks(case, dtype):
    """Given the reference lse rounded to float32, then given the lse of our compressed kernel
    (what nsa_attention feeds to the selection)."""
    x = gpu_inputs(dtype=dtype, seed=seed_of("sel", case, dtype), **case)
    check_select(x, case, dtype)
    _, lse = nsa_torch.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"],
                                            **hyper(case, *CMP_H))
    check_select(x, case, dtype, lse=lse)


# Shapes around the warpgroup selection kernel, several key tiles each: G = 16 and 32 (where it
# runs) and G = 4 and 8 (where only "mma" runs).
SELECT_WGMMA_CASES = {
    "T1500-G16-d128": dict(T=1500, HQ=32, H=2, D=128, Dv=128),
    "T2100-B2-G4-d128": dict(B=2, T=2100, HQ=8, H=2, D=128, Dv=128),
    "T1300-G32-d64-custom": dict(T=1300, HQ=32, H=1, D=64, Dv=64, **CUSTOM_HYPER),
    "T700-G8-d64-fla": dict(T=700, HQ=16, H=2, D=64, Dv=64, **FLA_HYPER),
}
# "default": not forced (the plan must still name a kernel the shape can take).
SELECT_KIND_PARAMS = [pytest.param(*p.values, kind, id=f"{p.id}-{kind}")
                      for kind in ("default", "wgmma", "mma")
                      for p in case_params(SELECT_WGMMA_CASES)
                      if kind != "wgmma" or not shape_refusal(p.values[0], "select", kind)]


def forced_select(case, kind):
    return kernels(case, select=None if kind == "default" else kind)


@pytest.mark.parametrize("case,dtype,kind", SELECT_KIND_PARAMS)
def test_select_blocks_kinds(case, dtype, kind):
    """Each selection kernel by the score rule, given the lse of our compressed kernel."""
    x = gpu_inputs(dtype=dtype, seed=seed_of("sel-kinds", case, dtype), **case)
    _, lse = nsa_torch.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"],
                                            **hyper(case, *CMP_H))
    with forced_select(case, kind):
        check_select(x, case, dtype, lse=lse)


@pytest.mark.parametrize("kind", ["default", "wgmma", "mma"])
def test_select_blocks_kinds_varlen(kind):
    case = dict(lengths=[1, 0, 1100, 7, 2049, 0, 130], HQ=32, H=2, D=128, Dv=128)
    x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of("sel-kinds-varlen", kind), **case)
    with forced_select(case, kind):
        run_branch("select", x, case, torch.bfloat16)
