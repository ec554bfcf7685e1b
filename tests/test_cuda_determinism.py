"""Determinism on CUDA: two runs on the same inputs give bit-identical outputs and gradients (no
float atomics whose order varies), also with split dK/dV and with the selected branch's dQ by
blocks."""
import pytest
import torch

import nsa_torch
from helpers import (CMP_H, CUSTOM_HYPER, HYPER_NSA, SEL_H, TENSOR_NAMES, as_tuple, assert_split,
                     case_params, gpu_inputs, hyper, kernels, leaves, rand_like, seed_of)

pytestmark = pytest.mark.cuda

DET_CASES = {
    "T4096-G16-d128": dict(T=4096, HQ=16, H=1, D=128, Dv=128),
    "T3000-G1-d64": dict(T=3000, HQ=8, H=8, D=64, Dv=64),
    "T2500-G4-d192v128-custom": dict(T=2500, HQ=8, H=2, D=192, Dv=128, **CUSTOM_HYPER),
}


def bits(fn, x, names, seed):
    xs = leaves(x, names)
    outs = as_tuple(fn(xs))
    gs = torch.autograd.grad(outs, [xs[n] for n in names],
                             [rand_like(o, seed + i) for i, o in enumerate(outs)])
    return [o.detach().clone() for o in outs], [g.clone() for g in gs]


def check_deterministic(case, dtype, which):
    """Two runs of `which` on the same inputs give bit-identical outputs and gradients."""
    x = gpu_inputs(dtype=dtype, seed=seed_of("det", case, dtype), **case)
    if which == "compressed":
        names = ["q", "k_cmp", "v_cmp"]

        def fn(t):
            return nsa_torch.compressed_attention(t["q"], t["k_cmp"], t["v_cmp"],
                                                  **hyper(case, *CMP_H))
    elif which == "selected":
        names = ["q", "k", "v"]
        _, lse = nsa_torch.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"],
                                                **hyper(case, *CMP_H))
        idx = nsa_torch.select_blocks(x["q"], x["k_cmp"], lse, **hyper(case, *CMP_H, *SEL_H))

        def fn(t):
            return nsa_torch.selected_attention(t["q"], t["k"], t["v"], idx,
                                                **hyper(case, "select_size", "scale"))
    elif which == "sliding":
        names = ["q", "k", "v"]

        def fn(t):
            return nsa_torch.sliding_window_attention(t["q"], t["k"], t["v"],
                                                      **hyper(case, "window_size", "scale"))
    else:
        names = list(TENSOR_NAMES)

        def fn(t):
            return nsa_torch.nsa_attention(*(t[n] for n in names), **hyper(case, *HYPER_NSA))

    first = bits(fn, x, names, 61)
    second = bits(fn, x, names, 61)
    for i, (a, b) in enumerate(zip(first[0], second[0])):
        assert torch.equal(a, b), f"output {i} differs between runs"
    for n, a, b in zip(names, first[1], second[1]):
        assert torch.equal(a, b), f"d{n} differs between runs"
        assert torch.isfinite(a).all(), f"d{n} is not finite"


# The selected branch's forward by blocks (sm_90, D, Dv <= 128, 32 <= select_size <= 256: the


@pytest.mark.parametrize("which", ["compressed", "selected", "sliding", "nsa"])
@pytest.mark.parametrize("case,dtype", case_params(DET_CASES, (torch.bfloat16,))
                         + case_params({"T4096-G16-d128": DET_CASES["T4096-G16-d128"]},
                                       (torch.float16,)))
def test_backward_is_deterministic(case, dtype, which):
    check_deterministic(case, dtype, which)


@pytest.mark.parametrize("which", ["compressed", "selected", "nsa"])
def test_split_dkdv_is_deterministic(which):
    """dK/dV split in ranges of 64 tokens: the fp32 partials are summed in a fixed order."""
    case = DET_CASES["T4096-G16-d128"]
    with kernels(case, split_tokens=64) as ran:
        check_deterministic(case, torch.bfloat16, which)
    assert_split(ran)


def test_selected_dq_by_blocks_is_deterministic():
    """The selected branch's dQ by blocks (per-(row, slot) partials summed in slot order), in
    chunks of 100 rows."""
    case = DET_CASES["T3000-G1-d64"]
    with kernels(case, slc_dq="blocks", slc_chunk_rows=100):
        check_deterministic(case, torch.bfloat16, "selected")
