"""Long CUDA problems, opt-in with NSA_LONG_TESTS=1 (benchmarks/gpu_check.sh deselects them with
-k 'not long' otherwise): T = 8192 and 65536, and one 128k problem past 2^31 elements. bf16. At
T = 8192 the dense float64 reference runs one (KV head, two query heads) slice at a time; at
T > 8192 o, lse and dq are checked on 256 random query rows with the row checker
(helpers.rows_branch), and every other gradient must be finite (unwritten elements stay NaN)."""
import math
import os

import pytest
import torch

import nsa_torch
from helpers import (CMP_H, F64, SCORE_RTOL, SEL_H, TENSOR_NAMES, as_tuple, check_selection, close,
                     compressed, gpu_inputs, grads, hyper, leaves, nsa, rand_like, raw_fwd,
                     ref_nsa_given_indices, rows_branch, scale_of, seed_of, selected, sequences,
                     sliding, to64, tol, visible_rows)
from nsa_torch import reference

pytestmark = pytest.mark.cuda

LONG = os.environ.get("NSA_LONG_TESTS") == "1"
long_only = pytest.mark.skipif(not LONG, reason="long CUDA tests: set NSA_LONG_TESTS=1")
LONG_HEADS = {1: (2, 2), 4: (4, 1), 16: (16, 1)}  # G -> (HQ, H)
LONG_CASES = [pytest.param(dict(T=T, HQ=LONG_HEADS[G][0], H=LONG_HEADS[G][1], D=D, Dv=Dv),
                           id=f"T{T}-G{G}-d{D}v{Dv}")
              for T in (8192, 65536) for G in (1, 4, 16) for D, Dv in ((128, 128), (192, 128))]
FULL_REFERENCE_MAX_T = 8192  # beyond, the dense T x T float64 reference is too big: row checks
LONG_ROWS = 256


def check_rows(T, case, seed, count=LONG_ROWS):
    """`count` query rows: the edges that matter (first rows, block and window edges, the last
    row) plus random ones, sorted."""
    h = hyper(case, "block_size", "select_size", "window_size")
    fixed = [0, 1, h["block_size"] - 2, h["block_size"] - 1, h["select_size"] - 1,
             h["select_size"], h["window_size"] - 1, h["window_size"], T // 2, T - 2, T - 1]
    fixed = torch.tensor([r for r in fixed if 0 <= r < T], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    rest = torch.randperm(T, generator=gen)[:count]
    rows = torch.cat([fixed, rest]).unique()[:count]
    return rows.sort().values.cuda()


def chunked_reference(fn, x, names, douts, chunk=2):
    """fn(reference, sub_x) on float64 slices of x, one KV head and `chunk` of its query heads at
    a time (the dense [T, T] matrices then stay small). Returns the outputs (float64, full
    heads) and the gradients of `names` (key/value gradients summed over the query heads)."""
    B, T, HQ, _ = x["q"].shape
    H = x["k"].shape[2]
    G = HQ // H
    per_q = {"q", "g_cmp", "g_slc", "g_swa"}
    per_kv = {"k", "v", "k_cmp", "v_cmp", "block_indices"}
    outs = None
    g_all = {n: torch.zeros(x[n].shape, dtype=F64, device=x[n].device) for n in names}
    for g in range(H):
        for h0 in range(g * G, (g + 1) * G, chunk):
            h1 = min(h0 + chunk, (g + 1) * G)
            sub = {}
            for n, t in x.items():
                if n in per_q and t is not None:
                    sub[n] = t[:, :, h0:h1]
                elif n in per_kv and t is not None:
                    sub[n] = t[:, :, g:g + 1]
                else:
                    sub[n] = t
            sub = to64(sub)
            sub = dict(sub, **leaves(sub, names))
            o = as_tuple(fn(reference, sub))
            if outs is None:
                outs = [torch.empty(B, T, HQ, *r.shape[3:], dtype=F64, device=r.device) for r in o]
            for full, part in zip(outs, o):
                full[:, :, h0:h1] = part.detach()
            gs = grads(o, [sub[n] for n in names], [d[:, :, h0:h1].to(F64) for d in douts])
            for n, gr in zip(names, gs):
                if n in per_q:
                    g_all[n][:, :, h0:h1] = gr
                else:
                    g_all[n][:, :, g:g + 1] += gr
            del o, gs, sub
    return outs, g_all


def long_inputs(case, seed):
    x = gpu_inputs(dtype=torch.bfloat16, seed=seed, **case)
    return x


def assert_finite(t, what):
    assert not torch.isnan(t).any(), f"{what} has NaN (unwritten or invalid)"
    assert torch.isfinite(t).all(), f"{what} is not finite"


def check_selection_rows(idx, x, case, lse, rows, rtol=SCORE_RTOL):
    """The score rule on some rows (B = 1): float64 scores from the definition with the given
    lse (the one the selection saw)."""
    h = hyper(case, "block_size", "block_stride", "select_size")
    T = x["q"].shape[1]
    q = x["q"][0, rows].to(F64)                                       # [R, HQ, D]
    kc = x["k_cmp"][0].to(F64)                                        # [Nc, H, D]
    Nc, H, D = kc.shape
    R, HQ = q.shape[:2]
    G = HQ // H
    NB = reference.num_select_blocks(T, h["select_size"])
    logits = torch.einsum("rhgd,ihd->rhgi", q.reshape(R, H, G, D), kc) * scale_of(case, D)
    lse_r = lse[0, rows].to(F64).reshape(R, H, G, 1)
    vis = visible_rows("cmp", rows, Nc, case)[:, :, None, :] & torch.isfinite(lse_r)
    p = torch.where(vis, torch.exp(torch.where(vis, logits - lse_r, torch.zeros_like(logits))),
                    torch.zeros_like(logits))
    i = torch.arange(Nc, device=q.device)
    ws, we = i * h["block_stride"], i * h["block_stride"] + h["block_size"] - 1
    j = torch.arange(NB, device=q.device)
    bs, be = j * h["select_size"], (j + 1) * h["select_size"] - 1
    overlap = (torch.minimum(we[:, None], be[None, :]) - torch.maximum(ws[:, None], bs[None, :])
               + 1).clamp(min=0).to(F64) / h["block_stride"]
    scores = torch.einsum("rhgi,ij->rhj", p, overlap)
    candidate = j[None, :] <= (rows // h["select_size"])[:, None]
    scores = scores.masked_fill(~candidate[:, None, :], -math.inf)
    check_selection(idx[0, rows][None].cpu(), scores[None].cpu(), rows[None].cpu(), case, rtol)


def rows_grad_check(branch, x, case, rows, dout, dlse, ours_o, ours_lse, ours_dq, chunk=32):
    """o, lse and dq of our kernels on `rows` against the row checker (float64)."""
    dtype = x["q"].dtype
    seq = sequences(x, case)[0]
    cache, o_ref, lse_ref, dq_ref = {}, [], [], []
    for r0 in range(0, len(rows), chunk):
        r = rows[r0:r0 + chunk]
        q_rows = x["q"][0, r].to(F64).requires_grad_(True)
        o, lse = rows_branch(branch, q_rows, x, case, seq, r, cache)
        outs, gouts = [o], [dout[0, r].to(F64)]
        if dlse is not None:
            outs.append(lse)
            gouts.append(dlse[0, r].to(F64))
        (dq,) = torch.autograd.grad(outs, [q_rows], gouts)
        o_ref.append(o.detach())
        lse_ref.append(lse.detach())
        dq_ref.append(dq)
    close(ours_o[0, rows], torch.cat(o_ref), tol(dtype), f"{branch} o on {len(rows)} rows")
    if ours_lse is not None:
        close(ours_lse[0, rows], torch.cat(lse_ref), tol(dtype), f"{branch} lse on rows")
    close(ours_dq[0, rows], torch.cat(dq_ref), tol(dtype, grad=True), f"{branch} dq on rows")


@long_only
@pytest.mark.parametrize("branch", ["compressed", "selected", "sliding"])
@pytest.mark.parametrize("case", LONG_CASES)
def test_long_branch(case, branch):
    """One branch at T = 8192 (every output and gradient against the float64 reference) or
    T = 65536 (o, lse, dq on 256 rows against the row checker; all gradients finite). The
    selected branch runs on our own selection, itself checked by the score rule on the rows."""
    T = case["T"]
    x = long_inputs(case, seed_of("long", case, branch))
    rows = check_rows(T, case, seed_of("rows", case, branch))
    if branch == "compressed":
        names, fn, kind = ["q", "k_cmp", "v_cmp"], compressed, "cmp"
    else:
        names, fn = ["q", "k", "v"], (selected if branch == "selected" else sliding)
        kind = "slc" if branch == "selected" else "swa"
    if branch == "selected":
        _, lse = nsa_torch.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"],
                                                **hyper(case, *CMP_H))
        idx = nsa_torch.select_blocks(x["q"], x["k_cmp"], lse, **hyper(case, *CMP_H, *SEL_H))
        check_selection_rows(idx, x, case, lse, rows)
        x["block_indices"] = idx
    xs = dict(x, **leaves(x, names))
    outs = as_tuple(fn(nsa_torch, xs, case))
    douts = [rand_like(o, 90 + i) for i, o in enumerate(outs)]
    gs = grads(outs, [xs[n] for n in names], douts)
    assert_finite(outs[0], f"{branch} o")
    for n, g in zip(names, gs):
        assert_finite(g, f"{branch} d{n}")
    if kind == "cmp":
        ours_lse = outs[1]
    else:
        o_raw, ours_lse = raw_fwd(kind, x, case)
        assert torch.equal(o_raw, outs[0].detach())
    # lse (and o, dq) on the rows, at every T
    rows_grad_check(kind, x, case, rows, douts[0], douts[1] if kind == "cmp" else None,
                    outs[0].detach(), ours_lse, gs[0])
    if T <= FULL_REFERENCE_MAX_T:
        refs, g_ref = chunked_reference(lambda mod, sx: fn(mod, sx, case), x, names, douts)
        for i, (o, r) in enumerate(zip(outs, refs)):
            close(o, r, tol(torch.bfloat16), f"{branch} output {i}")
        for n, g in zip(names, gs):
            close(g, g_ref[n], tol(torch.bfloat16, grad=True), f"{branch} d{n}")


def nsa_rows_check(x, case, rows, idx, dout, o, gs, chunk=32):
    """o, dq and the gate gradients of nsa_attention on `rows` against the row checker with our
    selection."""
    seq = sequences(x, case)[0]
    xi = dict(x, block_indices=idx)
    cache, o_ref, dq_ref, dg_ref = {}, [], [], []
    for r0 in range(0, len(rows), chunk):
        r = rows[r0:r0 + chunk]
        q_rows = x["q"][0, r].to(F64).requires_grad_(True)
        gates = [x[n][0, r].to(F64).requires_grad_(True) for n in ("g_cmp", "g_slc", "g_swa")]
        o_r = sum(g[..., None] * rows_branch(kind, q_rows, xi, case, seq, r, cache)[0]
                  for g, kind in zip(gates, ("cmp", "slc", "swa")))
        d = torch.autograd.grad(o_r, [q_rows] + gates, dout[0, r].to(F64))
        o_ref.append(o_r.detach())
        dq_ref.append(d[0])
        dg_ref.append(torch.stack(d[1:]))
    dtype = x["q"].dtype
    close(o[0, rows], torch.cat(o_ref), tol(dtype), "nsa o on rows")
    close(gs["q"][0, rows], torch.cat(dq_ref), tol(dtype, grad=True), "nsa dq on rows")
    dg = torch.cat(dg_ref, 1)
    for i, n in enumerate(("g_cmp", "g_slc", "g_swa")):
        close(gs[n][0, rows], dg[i], tol(dtype, grad=True), f"nsa d{n} on rows")


@long_only
@pytest.mark.parametrize("case", LONG_CASES)
def test_long_nsa_attention(case):
    T = case["T"]
    x = long_inputs(case, seed_of("long-nsa", case))
    names = list(TENSOR_NAMES)
    xs = dict(x, **leaves(x, names))
    o, idx = nsa(nsa_torch, xs, case)
    dout = rand_like(o, 95)
    gs = dict(zip(names, grads([o], [xs[n] for n in names], [dout])))
    assert_finite(o, "nsa o")
    for n in names:
        assert_finite(gs[n], f"nsa d{n}")
    rows = check_rows(T, case, seed_of("rows-nsa", case))
    _, lse = nsa_torch.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], **hyper(case, *CMP_H))
    check_selection_rows(idx, x, case, lse, rows)
    nsa_rows_check(x, case, rows, idx, dout, o.detach(), gs)
    if T <= FULL_REFERENCE_MAX_T:
        xi = dict(x, block_indices=idx)
        refs, g_ref = chunked_reference(
            lambda mod, sx: ref_nsa_given_indices(sx, sx["block_indices"], case), xi, names,
            [dout])
        close(o, refs[0], tol(torch.bfloat16), "nsa o")
        for n in names:
            close(gs[n], g_ref[n], tol(torch.bfloat16, grad=True), f"nsa d{n}")


@long_only
def test_long_int64_offsets():
    """T = 131072, HQ = 128, D = 192: q has 3.2e9 elements, past 2^31 (docs/design.md section 4):
    index arithmetic must be 64-bit. o, dq and the gate gradients on 64 rows, everything finite."""
    case = dict(T=131072, HQ=128, H=8, D=192, Dv=128)
    x = long_inputs(case, 97)
    names = list(TENSOR_NAMES)
    xs = dict(x, **leaves(x, names))
    o, idx = nsa(nsa_torch, xs, case)
    dout = rand_like(o, 98)
    gs = dict(zip(names, grads([o], [xs[n] for n in names], [dout])))
    assert_finite(o, "o")
    for n in names:
        assert_finite(gs[n], f"d{n}")
    rows = check_rows(case["T"], case, 99, count=64)
    nsa_rows_check(x, case, rows, idx, dout, o.detach(), gs, chunk=8)
