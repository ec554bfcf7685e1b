"""Non-finite values never vanish (docs/design.md section 4, "Non-finite values"): a NaN or Inf in an
input shows in every output row that depends on it, forward and backward (it may reach more rows),
and scores that overflow give non-finite rows, never zeros. A query that sees no key still gets
o = 0 and lse = -inf without NaN.

Which rows depend on a NaN is what the float64 reference says: every row that is NaN there must
be non-finite here. CPU tests run everywhere; the same cases run on CUDA (bfloat16, D = 64).
"""
import pytest
import torch

import nsa_torch
from nsa_torch import reference

from helpers import make_inputs

T, HQ, H = 96, 4, 2        # l = 32, d = 16: Nc = 5; queries t < 31 see no compressed token
SEL = dict(select_size=32)
WINDOW = 16

DEVICES = [pytest.param(("cpu", torch.float32, 16), id="cpu"),
           pytest.param(("cuda", torch.bfloat16, 64), id="cuda", marks=pytest.mark.cuda)]


def inputs(device, dtype, D, seed=3):
    a = make_inputs(B=1, T=T, HQ=HQ, H=H, D=D, seed=seed)
    # Block 0 and the query's own block: every query sees keys of the selected branch.
    own = torch.arange(T) // SEL["select_size"]
    bi = torch.stack([torch.zeros(T, dtype=torch.long), own], -1)
    bi[own == 0, 1] = -1
    a["block_indices"] = bi.to(torch.int32)[None, :, None].expand(1, T, H, 2).contiguous()
    return {n: x.to(device=device, dtype=dtype) if torch.is_tensor(x) and x.is_floating_point()
            else (x.to(device) if torch.is_tensor(x) else x) for n, x in a.items()}


def run(mod, branch, a, **kw):
    """o (and lse for the compressed branch) of `branch` through `mod` (nsa_torch or reference)."""
    if branch == "cmp":
        return mod.compressed_attention(a["q"], a["k_cmp"], a["v_cmp"], **kw)
    if branch == "slc":
        return mod.selected_attention(a["q"], a["k"], a["v"], a["block_indices"], **SEL, **kw),
    if branch == "swa":
        return mod.sliding_window_attention(a["q"], a["k"], a["v"], window_size=WINDOW, **kw),
    return mod.nsa_attention(*(a[n] for n in ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc",
                                              "g_swa")), **SEL, num_selected=3, **kw),


def bad_rows(x):
    """[T, HQ] mask of the (token, head) rows of a [1, T, HQ, ...] output with a non-finite value."""
    x = x[0]
    return ~torch.isfinite(x.float()).reshape(x.shape[0], x.shape[1], -1).all(-1)


POISON = {  # name: (the input, the index poisoned, the value)
    "nan-query": ("q", (0, 60, 1, 3), float("nan")),
    "inf-query": ("q", (0, 80, 2, 0), float("inf")),
    "nan-key": ("k", (0, 50, 1, 2), float("nan")),
    "nan-value": ("v", (0, 33, 0, 1), float("nan")),
    "nan-cmp-key": ("k_cmp", (0, 2, 1, 0), float("nan")),
    "nan-cmp-value": ("v_cmp", (0, 1, 0, 3), float("nan")),
}
BRANCH_READS = {"cmp": ("q", "k_cmp", "v_cmp"), "slc": ("q", "k", "v"), "swa": ("q", "k", "v"),
                "nsa": ("q", "k", "v", "k_cmp", "v_cmp")}
CASES = [pytest.param(b, p, id=f"{b}-{p}") for b in BRANCH_READS for p in POISON
         if POISON[p][0] in BRANCH_READS[b]]


def dependent_rows(branch, a, names, name, index):
    """The rows of the output and of each gradient (of o.sum()) that depend on a[name][index]:
    those the float64 reference changes when that element moves (the reference itself spreads a
    NaN further, through 0 x NaN in its dense masked products)."""
    def outputs(delta):
        x = {n: (t.detach().cpu().double() if torch.is_tensor(t) and t.is_floating_point() else
                 (t.cpu() if torch.is_tensor(t) else t)) for n, t in a.items()}
        x[name][index] = delta
        for n in names:
            x[n].requires_grad_()
        out = run(reference, branch, x)
        out[0].sum().backward()
        return [o.detach() for o in out] + [x[n].grad for n in names]
    before, after = outputs(0.5), outputs(3.0)
    return [(b != c)[0].reshape(b.shape[1], b.shape[2], -1).any(-1) for b, c in zip(before, after)]


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("branch,poison", CASES)
def test_non_finite_input_shows_in_dependent_rows(dev, branch, poison):
    device, dtype, D = dev
    a = inputs(device, dtype, D)
    name, index, value = POISON[poison]
    names = BRANCH_READS[branch]
    deps = dependent_rows(branch, a, names, name, index)
    a[name][index] = value
    leaves = {n: a[n].detach().requires_grad_() for n in names}
    a.update(leaves)
    out = run(nsa_torch, branch, a)
    out[0].float().sum().backward()
    got = list(out) + [leaves[n].grad for n in names]
    what = ["o", "lse"][:len(out)] + ["d" + n for n in names]
    assert deps[0].any(), "no output row depends on the poisoned element"
    for w, dep, x in zip(what, deps, got):
        missing = dep & ~bad_rows(x).cpu()
        assert not missing.any(), f"{w}: rows that read the {poison} came out finite: " \
            f"{missing.nonzero()[:4].tolist()}"


@pytest.mark.parametrize("dev", DEVICES)
def test_nan_elsewhere_keeps_rows_that_see_nothing_at_zero(dev):
    """Queries t < 31 see no compressed token: o = 0, lse = -inf and no NaN, whatever else is NaN
    (the "no visible key" case is not a non-finite one)."""
    device, dtype, D = dev
    a = inputs(device, dtype, D)
    a["k_cmp"][0, 0, 0, 0] = float("nan")
    a["q"][0, 50, 0, 0] = float("nan")
    o, lse = nsa_torch.compressed_attention(a["q"], a["k_cmp"], a["v_cmp"])
    assert (o[0, :31] == 0).all() and (lse[0, :31] == float("-inf")).all()
    assert bad_rows(o)[31:, :2].all()  # heads 0, 1 read kv head 0 and its NaN key


def overflowing(device, dtype, D, sign):
    a = inputs(device, dtype, D)
    for n in ("q", "k", "k_cmp"):
        a[n] = a[n].abs() * 1e20
    for n in ("k", "k_cmp"):
        a[n] = a[n] * sign
    return a


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("branch", ["cmp", "slc", "swa", "nsa"])
def test_overflowing_scores_are_not_zeros(dev, branch):
    """Scores past float32 (q, k around 1e20: q.k around 1e41, +inf) give NaN rows, not zeros."""
    device, dtype, D = dev
    o = run(nsa_torch, branch, overflowing(device, dtype, D, 1.0))[0]
    sees = torch.ones(T, HQ, dtype=torch.bool)
    if branch == "cmp":
        sees[:31] = False
        assert (o[0, :31] == 0).all()
    assert bad_rows(o)[sees].all()


@pytest.mark.parametrize("branch", ["cmp", "slc", "swa"])
def test_scores_overflowing_to_minus_inf_are_not_zeros(branch):
    """Every score a row sees is -inf (overflow): not "no visible key" (CPU; on CUDA such rows
    still come out as zeros)."""
    o = run(nsa_torch, branch, overflowing("cpu", torch.float32, 16, -1.0))[0]
    rows = bad_rows(o)
    assert (rows[31:] if branch == "cmp" else rows).all()


@pytest.mark.parametrize("dev", DEVICES)
def test_huge_scale_is_not_zeros(dev):
    """scale = 1e300 overflows the float32 accumulation: NaN rows, not zeros."""
    device, dtype, D = dev
    a = inputs(device, dtype, D)
    o = nsa_torch.sliding_window_attention(a["q"], a["k"], a["v"], window_size=WINDOW, scale=1e300)
    assert bad_rows(o).all()
