"""nsa.gated_sum (nsa_attention's last step, o = g_cmp o_cmp + g_slc o_slc + g_swa o_swa) and its
backward against the same expression in float64, on the CPU and, when there is one, the GPU."""
import pytest
import torch

import nsa_torch
from helpers import DTYPES, LOW_PRECISION, assert_close, make_inputs, random_like, tol

F64 = torch.float64
NAMES = ("o_cmp", "o_slc", "o_swa", "g_cmp", "g_slc", "g_swa")


def gate_inputs(B, T, HQ, Dv, dtype, device="cpu", seed=0, strided_gates=False):
    gen = torch.Generator().manual_seed(seed)
    o = [torch.randn(B, T, HQ, Dv, generator=gen, dtype=F64).to(dtype).to(device) for _ in range(3)]
    if strided_gates:  # views of one [B, T, 3, HQ] tensor, as a fused gate projection gives them
        all_g = torch.sigmoid(torch.randn(B, T, 3, HQ, generator=gen, dtype=F64)).to(dtype).to(device)
        g = [all_g[:, :, i] for i in range(3)]
    else:
        g = [torch.sigmoid(torch.randn(B, T, HQ, generator=gen, dtype=F64)).to(dtype).to(device)
             for _ in range(3)]
    return o + g


def expected(dout, o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa):
    """o and every gradient from the eager expression in float64."""
    xs = [t.detach().to(F64).requires_grad_(True) for t in (o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa)]
    o = sum(g.unsqueeze(-1) * x for x, g in zip(xs[:3], xs[3:]))
    grads = torch.autograd.grad(o, xs, dout.to(F64))
    return o.detach(), grads


def check_against_float64(args, dtype):
    leaves = [t.detach().requires_grad_(True) for t in args]
    o = torch.ops.nsa.gated_sum(*leaves)
    assert o.dtype == dtype and o.shape == args[0].shape
    dout = random_like(o.cpu(), 7).to(o.device)
    grads = torch.autograd.grad(o, leaves, dout)
    o_ref, grads_ref = expected(dout, *args)
    assert_close(o, o_ref, tol(dtype), "o")
    for name, g, ref in zip(NAMES, grads, grads_ref):
        assert g.dtype == dtype and g.shape == ref.shape, name
        assert_close(g, ref, tol(dtype, grad=True), "d" + name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 7, 3, 5), (1, 33, 4, 16)], ids=str)
def test_matches_float64(dtype, shape):
    check_against_float64(gate_inputs(*shape, dtype, seed=sum(shape)), dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_strided_gates(dtype):
    check_against_float64(gate_inputs(2, 9, 4, 8, dtype, seed=3, strided_gates=True), dtype)


def test_gradcheck():
    args = [t.requires_grad_(True) for t in gate_inputs(1, 3, 2, 3, F64, seed=11)]
    assert torch.autograd.gradcheck(torch.ops.nsa.gated_sum, args)


def test_deterministic():
    args = gate_inputs(2, 17, 4, 24, torch.bfloat16, seed=5)
    dout = random_like(args[0], 9)
    first = torch.ops.nsa.gated_sum_bwd(dout, *args)
    second = torch.ops.nsa.gated_sum_bwd(dout, *args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_nsa_attention_fused_and_eager_gates_agree(dtype):
    """nsa_attention takes the fused op when the gates share the outputs' dtype and the eager
    expression otherwise: the two agree (within rounding) and both reach the gates."""
    hp = dict(block_size=16, block_stride=8, select_size=16, num_selected=3, window_size=9)
    x = make_inputs(T=70, HQ=4, H=2, D=16, dtype=dtype, seed=21, **hp)
    names = ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_swa")
    outs = {}
    for gate_dtype in (dtype, torch.float32):
        leaves = [x[n].detach().to(gate_dtype if n.startswith("g_") else dtype).requires_grad_(True)
                  for n in names]
        o = nsa_torch.nsa_attention(*leaves, **hp)
        assert o.dtype == dtype
        dout = random_like(o, 4)
        outs[gate_dtype] = [o] + list(torch.autograd.grad(o, leaves, dout))
    for a, b in zip(outs[dtype], outs[torch.float32]):
        assert_close(a, b, tol(dtype, grad=True))


ERRORS = [
    ("g_slc", lambda a: a[4][..., :-1], ValueError, "g_slc must be"),
    ("o_swa", lambda a: a[2][..., :-1], ValueError, "o_swa must be"),
    ("g_cmp", lambda a: a[3].double(), TypeError, "g_cmp must be float32"),
    ("o_cmp", lambda a: a[0][..., 0], ValueError, "o_cmp must be a 4-D tensor"),
    ("o_slc", lambda a: a[1].transpose(-1, -2).contiguous().transpose(-1, -2), ValueError,
     "o_slc must have a contiguous last dim"),
]


@pytest.mark.parametrize("arg,change,exc,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(arg, change, exc, message):
    args = gate_inputs(1, 5, 2, 4, torch.float32, seed=2)
    i = NAMES.index(arg)
    args[i] = change(args)
    with pytest.raises(exc, match=f"nsa.gated_sum: {message}"):
        torch.ops.nsa.gated_sum(*args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("Dv,offset", [(128, 0), (64, 0), (8, 0), (192, 0), (20, 0), (128, 1)],
                         ids=["dv128", "dv64", "dv8", "dv192", "dv20-scalar", "dv128-misaligned"])
def test_cuda_matches_float64(dtype, Dv, offset):
    """The 16-byte vector path (Dv % 8 == 0, aligned rows; 1 to 32 lanes per row) and the
    element path (odd sizes, a storage offset that breaks the alignment)."""
    args = gate_inputs(2, 37, 6, Dv + offset, dtype, device="cuda", seed=Dv)
    if offset:
        args[:3] = [t[..., offset:] for t in args[:3]]
    check_against_float64(args, dtype)
