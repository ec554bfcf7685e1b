"""Rows that see nothing on CUDA (no compressed token yet, no selected block, T < block_size):
o = 0 exactly and lse = -inf, no NaN anywhere forward or backward, no gradient from those rows."""
import pytest
import torch

import nsa_torch
from helpers import (CMP_H, LOW_PRECISION, check_branch, check_nsa, check_select, dtype_name,
                     gpu_inputs, hyper, leaves, rand_like, raw_fwd, selected)

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_name)
def test_rows_that_see_nothing(dtype):
    """o = 0 exactly and lse = -inf where a query sees nothing; no NaN anywhere, forward or
    backward, and no gradient from those rows."""
    # Compressed, T < l: no compressed token at all (Nc = 0).
    case = dict(B=2, T=20, HQ=8, H=2, D=128, Dv=128)
    x = gpu_inputs(dtype=dtype, seed=71, **case)
    xs = leaves(x, ["q", "k_cmp", "v_cmp"])
    o, lse = nsa_torch.compressed_attention(xs["q"], xs["k_cmp"], xs["v_cmp"])
    assert x["k_cmp"].shape[1] == 0
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all()
    dq, dk, dv = torch.autograd.grad((o, lse), list(xs.values()),
                                     (rand_like(o, 1), rand_like(lse, 2)))
    assert torch.equal(dq, torch.zeros_like(dq))
    assert dk.shape == x["k_cmp"].shape and dv.shape == x["v_cmp"].shape

    # Compressed, T = 100: the first l - 1 = 31 queries see nothing, the others something.
    case = dict(B=2, T=100, HQ=8, H=2, D=64, Dv=128)
    x = gpu_inputs(dtype=dtype, seed=72, **case)
    xs = leaves(x, ["q", "k_cmp", "v_cmp"])
    o, lse = nsa_torch.compressed_attention(xs["q"], xs["k_cmp"], xs["v_cmp"])
    assert torch.equal(o[:, :31], torch.zeros_like(o[:, :31]))
    assert torch.isneginf(lse[:, :31]).all() and torch.isfinite(lse[:, 31:]).all()
    gs = torch.autograd.grad((o, lse), list(xs.values()), (rand_like(o, 3), rand_like(lse, 4)))
    assert torch.equal(gs[0][:, :31], torch.zeros_like(gs[0][:, :31]))
    for g in gs:
        assert torch.isfinite(g).all()

    # Selected: rows listing no block, and rows listing only future blocks.
    case = dict(B=2, T=200, HQ=6, H=2, D=128, Dv=64, num_selected=4)
    x = gpu_inputs(dtype=dtype, seed=73, **case)
    t = torch.arange(200, device="cuda")
    own, future = t // 64, t // 64 + 1                            # 4 blocks of 64 tokens
    blind = t % 3 != 0                                            # these rows see nothing
    bi = torch.full((2, 200, 2, 4), -1, dtype=torch.int32, device="cuda")
    bi[..., 0] = torch.where(blind, -1, own).to(torch.int32)[None, :, None]
    bi[..., 2] = torch.where(blind & (future < 4), future, -1).to(torch.int32)[None, :, None]
    x["block_indices"] = bi
    (o,) = check_branch(selected, x, case, ["q", "k", "v"], dtype)
    assert torch.equal(o[:, blind], torch.zeros_like(o[:, blind]))
    o_raw, lse = raw_fwd("slc", x, case)
    assert torch.isneginf(lse[:, blind]).all() and torch.isfinite(lse[:, ~blind]).all()
    xs = leaves(x, ["q", "k", "v"])
    o = nsa_torch.selected_attention(xs["q"], xs["k"], xs["v"], bi, select_size=64)
    gs = torch.autograd.grad(o, list(xs.values()), rand_like(o, 5))
    assert torch.equal(gs[0][:, blind], torch.zeros_like(gs[0][:, blind]))
    for g in gs:
        assert torch.isfinite(g).all()

    # select_blocks with lse = -inf everywhere (T < l): forced blocks plus the smallest others.
    case = dict(T=30, HQ=4, H=2, D=64, Dv=64, block_size=32, block_stride=16, select_size=16,
                num_selected=1, num_initial=0, num_local=0)
    x = gpu_inputs(dtype=dtype, seed=74, **case)
    _, lse = nsa_torch.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], **hyper(case, *CMP_H))
    assert torch.isneginf(lse).all()
    idx = check_select(x, case, dtype, lse=lse)
    assert (idx[..., 0] == 0).all()

    # nsa_attention with T < l: the compressed branch contributes 0, gradients are finite.
    case = dict(B=2, T=20, HQ=8, H=2, D=128, Dv=128)
    x = gpu_inputs(dtype=dtype, seed=75, **case)
    o, _ = check_nsa(x, case, dtype)
    assert torch.isfinite(o).all()
