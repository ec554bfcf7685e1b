"""The CUDA ops as torch citizens: torch.library.opcheck of all nine nsa:: ops, and
torch.compile(fullgraph=True) of nsa_attention forward and backward against eager and the
reference."""
import pytest
import torch

import nsa_torch
from helpers import (HYPER_NSA, TENSOR_NAMES, close, gpu_inputs, hyper, leaves, op_samples_for,
                     opcheck_all, rand_like, ref_nsa_given_indices, to64, tol)

pytestmark = pytest.mark.cuda


def op_samples(dtype, varlen):
    """(op name, args) for all 9 nsa:: ops on CUDA, forward inputs requiring grad."""
    case = dict(T=100, HQ=4, H=2, D=64, Dv=64, select_size=32, num_selected=3, num_initial=1,
                num_local=1)
    if varlen:
        case = dict(case, lengths=[0, 1, 37, 62])
        del case["T"]
    x = gpu_inputs(dtype=dtype, seed=55, **case)
    return op_samples_for(x, rand_like, block_size=32, block_stride=16, select_size=32,
                          num_selected=3, num_initial=1, num_local=1, window_size=20,
                          scale=64 ** -0.5)


@pytest.mark.parametrize("dtype,varlen", [(torch.bfloat16, False), (torch.bfloat16, True),
                                          (torch.float16, False)],
                         ids=["bfloat16", "bfloat16-varlen", "float16"])
def test_opcheck(dtype, varlen):
    opcheck_all(op_samples(dtype, varlen))


# ------------------------------------------------------------------------------------ compile
def test_compile_fullgraph():
    """torch.compile(fullgraph=True) forward + backward of nsa_attention on CUDA: the same
    results as eager (within rounding: Inductor fuses the gated sum) and as the reference."""
    case = dict(HQ=8, H=2, D=64, Dv=128, num_selected=4, window_size=64)
    dtype = torch.bfloat16
    h = hyper(case, *HYPER_NSA)

    def fn(*tensors):
        return nsa_torch.nsa_attention(*tensors, **h)

    compiled = torch.compile(fn, fullgraph=True)
    for T in (200, 333):
        x = gpu_inputs(T=T, dtype=dtype, seed=T, **case)
        results = []
        for f in (fn, compiled):
            xs = leaves(x, TENSOR_NAMES)
            o = f(*xs.values())
            results.append((o, torch.autograd.grad(o, list(xs.values()), rand_like(o, 58))))
        (o_e, g_e), (o_c, g_c) = results
        assert o_c.dtype == dtype and torch.isfinite(o_c).all()
        close(o_c, o_e, tol(dtype), f"T={T}: compiled o vs eager")
        for n, a, b in zip(TENSOR_NAMES, g_c, g_e):
            close(a, b, tol(dtype, grad=True), f"T={T}: compiled d{n} vs eager")
        # and against the reference with the same (eager) selection
        _, idx = nsa_torch.nsa_attention(*(x[n] for n in TENSOR_NAMES), return_block_indices=True,
                                         **h)
        ref_x = to64(x)
        ref_x = dict(ref_x, **leaves(ref_x, TENSOR_NAMES))
        ref_o = ref_nsa_given_indices(ref_x, idx, case)
        close(o_c, ref_o, tol(dtype), f"T={T}: compiled o vs reference")
        g_r = torch.autograd.grad(ref_o, [ref_x[n] for n in TENSOR_NAMES],
                                  rand_like(o_c, 58).double())
        for n, a, b in zip(TENSOR_NAMES, g_c, g_r):
            close(a, b, tol(dtype, grad=True), f"T={T}: compiled d{n} vs reference")
