"""Packed batches (cu_seqlens) on CUDA: empty and length-1 sequences mixed with long ones
(helpers.VARLEN), every branch against the float64 reference, and a packed batch against its
sequences run one at a time."""
import pytest
import torch

import nsa_torch
from helpers import (TENSOR_NAMES, VARLEN, case_params, close, gpu_inputs, grads, leaves, nsa,
                     rand_like, run_branch, seed_of, sequences, tol)

pytestmark = pytest.mark.cuda

VARLEN_BRANCHES = ["compressed", "selected", "sliding", "select", "nsa"]


@pytest.mark.parametrize("branch", VARLEN_BRANCHES)
@pytest.mark.parametrize("case,dtype", case_params(VARLEN))
def test_varlen(case, dtype, branch):
    x = gpu_inputs(dtype=dtype, seed=seed_of("varlen", case, dtype, branch), **case)
    run_branch(branch, x, case, dtype, seed=seed_of("varlen-idx", case, branch))


def test_varlen_equals_per_sequence():
    """A packed batch gives what each sequence gives alone (within tolerance: tiles may differ):
    nsa_attention's output and every gradient, slice by slice."""
    case = VARLEN["mixed-G4-d128"]
    dtype = torch.bfloat16
    x = gpu_inputs(dtype=dtype, seed=seed_of("varlen-split"), **case)
    names = list(TENSOR_NAMES)
    px = dict(x, **leaves(x, names))
    o, _ = nsa(nsa_torch, px, case)
    dout = rand_like(o, 31)
    g_packed = dict(zip(names, grads([o], [px[n] for n in names], [dout])))
    for b, start, n, c0, nc in sequences(x, case):
        if n == 0:
            continue
        seq = {k: x[k][:, start:start + n] for k in ("q", "k", "v", "g_cmp", "g_slc", "g_swa")}
        seq.update({k: x[k][:, c0:c0 + nc] for k in ("k_cmp", "v_cmp")})
        seq["cu_seqlens"] = None
        sx = dict(seq, **leaves(seq, names))
        so, _ = nsa(nsa_torch, sx, case)
        close(o[:, start:start + n], so, tol(dtype), f"sequence at {start}: o")
        for m, g in zip(names, grads([so], [sx[m] for m in names], [dout[:, start:start + n]])):
            a, e = (c0, nc) if m in ("k_cmp", "v_cmp") else (start, n)
            close(g_packed[m][:, a:a + e], g, tol(dtype, grad=True), f"sequence at {start}: d{m}")
