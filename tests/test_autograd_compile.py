"""The ops as torch citizens: gradcheck, torch.library.opcheck, torch.compile(fullgraph=True),
deterministic backward, autocast."""
import pytest
import torch
from torch.autograd import gradcheck

import nsa_torch
from helpers import (TENSOR_NAMES, assert_close, hyper, leaves, make_inputs, op_samples_for,
                      opcheck_all, random_like)

F64 = torch.float64

# Tiny problems: gradcheck differentiates numerically, one input element at a time. T = 27 is
# not a multiple of any block, the first l - 1 = 7 queries see no compressed token, and n = 2
# with one forced (local) block leaves one free slot to select among up to 3 candidates.
TINY = dict(T=27, HQ=2, H=1, D=4, Dv=3, block_size=8, block_stride=4, select_size=8,
            num_selected=2, num_initial=0, num_local=1, window_size=5)
TINY_VARLEN = dict(TINY, lengths=[0, 1, 9, 17])


def finite(lse):
    """lse with its -inf rows (queries that see nothing) set to 0: a finite difference of -inf is
    NaN, and those rows have no gradient anyway."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def tiny(case, seed):
    return make_inputs(dtype=F64, seed=seed, **case)


# ------------------------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize("case", [TINY, TINY_VARLEN], ids=["batch", "varlen"])
def test_gradcheck_compressed_attention(case):
    x = tiny(case, 51)
    h = hyper(case, "block_size", "block_stride")

    def f(q, k_cmp, v_cmp):
        o, lse = nsa_torch.compressed_attention(q, k_cmp, v_cmp, cu_seqlens=x["cu_seqlens"], **h)
        return o, finite(lse)

    assert gradcheck(f, tuple(leaves(x, ["q", "k_cmp", "v_cmp"]).values()))


@pytest.mark.parametrize("case", [TINY, TINY_VARLEN], ids=["batch", "varlen"])
def test_gradcheck_selected_attention(case):
    x = tiny(case, 52)
    B, T = x["q"].shape[:2]
    # Fixed indices, -1 in the middle and at the end, future blocks included.
    row = torch.tensor([2, -1, 0, -1], dtype=torch.int32)
    block_indices = row.expand(B, T, case["H"], 4).contiguous()
    if x["cu_seqlens"] is not None:  # the 1- and 9-token sequences have 1 and 2 blocks
        block_indices[:, 0] = torch.tensor([0, -1, -1, -1], dtype=torch.int32)
        block_indices[:, 1:10] = torch.tensor([1, -1, 0, -1], dtype=torch.int32)

    def f(q, k, v):
        return nsa_torch.selected_attention(q, k, v, block_indices, cu_seqlens=x["cu_seqlens"],
                                            **hyper(case, "select_size"))

    assert gradcheck(f, tuple(leaves(x, ["q", "k", "v"]).values()))


@pytest.mark.parametrize("case", [TINY, TINY_VARLEN], ids=["batch", "varlen"])
def test_gradcheck_sliding_window_attention(case):
    x = tiny(case, 53)

    def f(q, k, v):
        return nsa_torch.sliding_window_attention(q, k, v, cu_seqlens=x["cu_seqlens"],
                                                  **hyper(case, "window_size"))

    assert gradcheck(f, tuple(leaves(x, ["q", "k", "v"]).values()))


NSA_H = ("block_size", "block_stride", "select_size", "num_selected", "num_initial", "num_local",
         "window_size")


@pytest.mark.parametrize("case", [TINY, TINY_VARLEN], ids=["batch", "varlen"])
def test_gradcheck_nsa_attention(case):
    """All eight tensor inputs. The selection is piecewise constant: random data keeps every
    block score far from a tie compared with the finite-difference step."""
    x = tiny(case, 54)

    def f(*tensors):
        return nsa_torch.nsa_attention(*tensors, cu_seqlens=x["cu_seqlens"], **hyper(case, *NSA_H))

    assert gradcheck(f, tuple(leaves(x, TENSOR_NAMES).values()))


# ------------------------------------------------------------------------------------ opcheck
def op_samples(dtype, varlen):
    """(op name, args) for every nsa:: op, forward inputs requiring grad."""
    case = dict(TINY, T=40, HQ=4, H=2, D=8, Dv=4)
    if varlen:
        case["lengths"] = [0, 1, 17, 22]
    x = make_inputs(dtype=dtype, seed=55, **case)
    return op_samples_for(x, random_like, block_size=case["block_size"],
                          block_stride=case["block_stride"], select_size=case["select_size"],
                          num_selected=2, num_initial=0, num_local=1, window_size=5,
                          scale=case["D"] ** -0.5)


OPCHECK_CONFIGS = [(torch.float32, False), (torch.float64, False), (torch.float32, True)]


@pytest.mark.parametrize("dtype,varlen", OPCHECK_CONFIGS,
                         ids=["float32", "float64", "float32-varlen"])
def test_opcheck(dtype, varlen):
    opcheck_all(op_samples(dtype, varlen))


# ------------------------------------------------------------------------------------ compile
COMPILE_CASE = dict(HQ=4, H=2, D=16, Dv=8, block_size=16, block_stride=8, select_size=32,
                    num_selected=3, window_size=20)


def test_compile_fullgraph_matches_eager():
    h = hyper(COMPILE_CASE, *NSA_H)

    def fn(*tensors):
        return nsa_torch.nsa_attention(*tensors, **h)

    compiled = torch.compile(fn, fullgraph=True)
    for T in (96, 200):
        x = make_inputs(T=T, dtype=torch.float32, seed=T, **COMPILE_CASE)
        results = []
        for f in (fn, compiled):
            xs = leaves(x, TENSOR_NAMES)
            o = f(*xs.values())
            grads = torch.autograd.grad(o, list(xs.values()), random_like(o, 58))
            results.append((o, grads))
        (o_eager, g_eager), (o_comp, g_comp) = results
        assert_close(o_comp, o_eager, 1e-6, f"T={T}: o")
        for n, a, b in zip(TENSOR_NAMES, g_comp, g_eager):
            assert_close(a, b, 1e-6, f"T={T}: d{n}")


# ------------------------------------------------------------------------------------ determinism
DET_CASE = dict(T=700, HQ=8, H=2, D=32, Dv=16, block_size=16, block_stride=8, select_size=32,
                num_selected=4, window_size=64)


def backward_bits(fn, x, names):
    xs = leaves(x, names)
    o = fn(xs)
    return [g.clone() for g in torch.autograd.grad(o, list(xs.values()), random_like(o, 59))]


@pytest.mark.parametrize("which", ["selected_attention", "nsa_attention"])
def test_backward_is_deterministic(which):
    """Same bits on every run and for any number of threads (no float atomics, fixed order)."""
    x = make_inputs(dtype=torch.float32, seed=60, **DET_CASE)
    if which == "selected_attention":
        h = hyper(DET_CASE, "block_size", "block_stride", "select_size", "num_selected")
        _, lse = nsa_torch.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"],
                                                block_size=h["block_size"],
                                                block_stride=h["block_stride"])
        idx = nsa_torch.select_blocks(x["q"], x["k_cmp"], lse, **h)
        names = ["q", "k", "v"]

        def fn(t):
            return nsa_torch.selected_attention(t["q"], t["k"], t["v"], idx,
                                                select_size=h["select_size"])
    else:
        names = list(TENSOR_NAMES)

        def fn(t):
            return nsa_torch.nsa_attention(*t.values(), **hyper(DET_CASE, *NSA_H))

    threads = torch.get_num_threads()
    try:
        runs = [backward_bits(fn, x, names) for _ in range(2)]
        torch.set_num_threads(1)
        runs.append(backward_bits(fn, x, names))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for n, a, b in zip(names, runs[0], run):
            assert torch.equal(a, b), f"d{n} differs between runs"


# ------------------------------------------------------------------------------------ autocast
def test_autocast_bfloat16():
    """Under CPU autocast to bf16, float32 inputs run the bf16 kernels (gates stay float32) and
    the result is bf16; the gradients come back in the inputs' float32."""
    case = dict(T=150, HQ=4, H=2, D=16, block_size=16, block_stride=8, select_size=32,
                num_selected=3, window_size=20)
    h = hyper(case, *NSA_H)
    x = make_inputs(dtype=torch.float32, seed=61, **case)
    xs = leaves(x, TENSOR_NAMES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = nsa_torch.nsa_attention(*xs.values(), **h)
    assert o.dtype == torch.bfloat16
    grads = torch.autograd.grad(o, list(xs.values()), random_like(o, 62))
    for n, g in zip(TENSOR_NAMES, grads):
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), n
    # The same as casting by hand: bf16 branches, float32 gates.
    by_hand = {n: (t.to(torch.bfloat16) if n[0] in "kvq" else t) for n, t in x.items()
               if n in TENSOR_NAMES}
    assert torch.equal(o, nsa_torch.nsa_attention(*by_hand.values(), **h))
