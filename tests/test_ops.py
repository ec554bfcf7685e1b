"""Every public function against nsa_torch.reference, forward and backward.

Ours runs in the test dtype; the reference runs in float64 on the same (already rounded) values,
so the error measured is the kernels' own. Gradients are taken with torch.autograd.grad under a
random upstream gradient, for every differentiable input.
"""
import pytest
import torch

import nsa_torch
from helpers import (DTYPES, LOW_PRECISION, TENSOR_NAMES, as_tuple, assert_close, compressed,
                     dtype_name, grads, hyper, leaves, make_inputs, nsa, random_block_indices,
                     random_like, ref_nsa_given_indices, selected, sliding, tol)
from nsa_torch import reference

# Shapes and hyper-parameters (anything not given takes its default (docs/design.md section 1)).
CASES = {
    "T1": dict(B=2, T=1, HQ=4, H=2, D=16),
    "T<l": dict(T=20, HQ=4, H=1, D=16, Dv=8),  # Nc = 0: no compressed token at all
    "T100-G3-l'48": dict(B=2, T=100, HQ=6, H=2, D=20, Dv=12, select_size=48, num_selected=2,
                         num_local=1, window_size=40, scale=0.3),
    "T65-G1": dict(T=65, HQ=2, H=2, D=16, window_size=64),  # one token past block 0
    "T150-G8": dict(T=150, HQ=8, H=1, D=16, Dv=24, block_size=16, block_stride=8, select_size=32,
                    num_selected=4, window_size=9),
    "T90-G16": dict(T=90, HQ=16, H=1, D=8, block_size=16, block_stride=8, select_size=16,
                    num_selected=3, num_initial=0, num_local=1, window_size=7),
    "T130-G2-l'<l": dict(T=130, HQ=4, H=2, D=12, Dv=20, block_size=32, block_stride=8,
                         select_size=16, num_selected=5, num_initial=2, num_local=2,
                         window_size=33),
    # NB = 18 > n = 16 blocks: the paper's hyper-parameters with a real choice (and T > w).
    "T1100-G4-paper": dict(T=1100, HQ=4, H=1, D=32, Dv=16, dtypes=(torch.float32, torch.bfloat16)),
}

# Packed batches: empty and length-1 sequences, sequences shorter than block_size and longer
# than several selection blocks.
VARLEN = {
    "small-hyper": dict(lengths=[0, 1, 37, 0, 70, 5, 129], HQ=4, H=2, D=16, Dv=8, block_size=16,
                        block_stride=8, select_size=32, num_selected=4, window_size=9),
    "paper-hyper": dict(lengths=[1, 0, 100, 65, 200, 0], HQ=6, H=2, D=16, window_size=48),
}


def case_dtypes(cases=CASES, dtypes=DTYPES):
    """(case, dtype) pairs; a case may restrict its dtypes (the slowest run in two only)."""
    return [pytest.param(case, dtype, id=f"{name}-{dtype_name(dtype)}")
            for name, case in cases.items() for dtype in dtypes
            if dtype in case.get("dtypes", dtypes)]


def cast(x, dtype):
    return {n: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t
            for n, t in x.items()}


# ------------------------------------------------------------------------------------ harness
def check_branch(branch, x, case, names, dtype, seed=100):
    """branch(nsa_torch) on x (in dtype) against branch(reference) on x in float64: every output,
    then the gradients of `names`. Returns ours' outputs."""
    ours_x = dict(x, **leaves(x, names))
    ref_x = dict(cast(x, torch.float64), **leaves(x, names, torch.float64))
    outs = as_tuple(branch(nsa_torch, ours_x, case))
    refs = as_tuple(branch(reference, ref_x, case))
    assert outs[0].dtype == dtype
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert_close(o, r, tol(dtype), f"{branch.__name__} output {i}")
    douts = [random_like(o, seed + i) for i, o in enumerate(outs)]
    g_ours = grads(outs, [ours_x[n] for n in names], douts)
    g_ref = grads(refs, [ref_x[n] for n in names], [d.to(r.dtype) for d, r in zip(douts, refs)])
    for n, g, r in zip(names, g_ours, g_ref):
        assert g.dtype == dtype, f"d{n} dtype"
        assert_close(g, r, tol(dtype, grad=True), f"{branch.__name__} d{n}")
    return outs


def with_block_indices(x, case, kind, seed=7):
    """x plus block_indices of `kind`: 'user' (-1 in the middle and at the end), 'shuffled'
    (the same, in any order) or 'selected' (the reference's select_blocks in float64)."""
    B, T = x["q"].shape[:2]
    H = x["k"].shape[2]
    if kind == "selected":
        x64 = cast(x, torch.float64)
        h = hyper(case, "block_size", "block_stride", "scale")
        _, lse = reference.compressed_attention(x64["q"], x64["k_cmp"], x64["v_cmp"],
                                                cu_seqlens=x["cu_seqlens"], **h)
        bi = reference.select_blocks(x64["q"], x64["k_cmp"], lse, cu_seqlens=x["cu_seqlens"], **h,
                                     **hyper(case, "select_size", "num_selected", "num_initial",
                                             "num_local"))
    else:
        n = hyper(case, "num_selected")["num_selected"]
        bi = random_block_indices(B, T, H, n, hyper(case, "select_size")["select_size"], seed,
                                  x["cu_seqlens"], shuffle=kind == "shuffled")
    return dict(x, block_indices=bi)


# ------------------------------------------------------------------------------------ branches
@pytest.mark.parametrize("case,dtype", case_dtypes())
def test_compressed_attention(case, dtype):
    x = make_inputs(dtype=dtype, seed=1, **case)
    o, lse = check_branch(compressed, x, case, ["q", "k_cmp", "v_cmp"], dtype)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("case,dtype", case_dtypes())
def test_sliding_window_attention(case, dtype):
    x = make_inputs(dtype=dtype, seed=2, **case)
    check_branch(sliding, x, case, ["q", "k", "v"], dtype)


@pytest.mark.parametrize("case,dtype", case_dtypes())
def test_selected_attention(case, dtype):
    """Caller-style indices (-1 in the middle and at the end, future blocks, empty rows)."""
    x = with_block_indices(make_inputs(dtype=dtype, seed=3, **case), case, "user")
    check_branch(selected, x, case, ["q", "k", "v"], dtype)


@pytest.mark.parametrize("kind", ["shuffled", "selected"])
@pytest.mark.parametrize("case,dtype", case_dtypes(dtypes=(torch.float64, torch.float32)))
def test_selected_attention_index_sources(case, dtype, kind):
    """Slots in any order, and indices as select_blocks makes them (the index source does not
    depend on the dtype, so float64/float32 cover it)."""
    x = with_block_indices(make_inputs(dtype=dtype, seed=3, **case), case, kind)
    check_branch(selected, x, case, ["q", "k", "v"], dtype)


@pytest.mark.parametrize("case,dtype", case_dtypes())
def test_select_blocks(case, dtype):
    """Exact agreement with the reference given the same lse (test_selection.py checks the score
    rule where rounding can legitimately reorder near-ties)."""
    x = make_inputs(dtype=dtype, seed=4, **case)
    h = hyper(case, "block_size", "block_stride", "scale")
    hs = hyper(case, "select_size", "num_selected", "num_initial", "num_local")
    _, lse = nsa_torch.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], **h)
    ours = nsa_torch.select_blocks(x["q"], x["k_cmp"], lse, **h, **hs)
    ref = reference.select_blocks(x["q"].double(), x["k_cmp"].double(), lse.double(), **h, **hs)
    assert ours.dtype == torch.int32
    if dtype in LOW_PRECISION:  # float32 score sums: allow a rare near-tie to flip
        assert (ours == ref).all(-1).float().mean() >= 0.98
    else:
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("case,dtype", case_dtypes())
def test_nsa_attention(case, dtype):
    x = make_inputs(dtype=dtype, seed=5, **case)
    check_nsa(x, case, dtype)


def check_nsa(x, case, dtype, seed=200):
    """nsa_attention against the reference. In float32/float64 the selection must match exactly;
    in bf16/fp16 a near-tie may flip, so the oracle is the reference's branches run with our
    selection (which test_selection.py checks by score), and most rows must agree anyway."""
    names = list(TENSOR_NAMES)
    ours_x = dict(x, **leaves(x, names))
    ref_x = dict(cast(x, torch.float64), **leaves(x, names, torch.float64))
    o, idx = nsa(nsa_torch, ours_x, case)
    assert o.dtype == dtype and idx.dtype == torch.int32
    if dtype in LOW_PRECISION:
        _, ref_idx = nsa(reference, cast(x, torch.float64), case)
        agree = (idx == ref_idx).all(-1).float().mean().item()
        assert agree >= 0.98, f"selection agrees with the reference on {agree:.1%} of the rows"
        ref_o = ref_nsa_given_indices(ref_x, idx, case)
    else:
        ref_o, ref_idx = nsa(reference, ref_x, case)
        assert torch.equal(idx, ref_idx)
    assert_close(o, ref_o, tol(dtype), "o")
    dout = random_like(o, seed)
    g_ours = grads([o], [ours_x[n] for n in names], [dout])
    g_ref = grads([ref_o], [ref_x[n] for n in names], [dout.double()])
    for n, g, r in zip(names, g_ours, g_ref):
        assert g.dtype == dtype, f"d{n} dtype"
        assert_close(g, r, tol(dtype, grad=True), f"nsa_attention d{n}")


# ------------------------------------------------------------------------------------ varlen
def split_sequences(x, lengths, case):
    """Per-sequence (B = 1, no cu_seqlens) views of the packed inputs, empty sequences left out."""
    h = hyper(case, "block_size", "block_stride")
    start, cmp_start, out = 0, 0, []
    for n in lengths:
        nc = reference.num_cmp_tokens(n, **h)
        if n:
            seq = {k: x[k][:, start:start + n] for k in ("q", "k", "v", "g_cmp", "g_slc", "g_swa")}
            seq.update({k: x[k][:, cmp_start:cmp_start + nc] for k in ("k_cmp", "v_cmp")})
            if "block_indices" in x:
                seq["block_indices"] = x["block_indices"][:, start:start + n]
            out.append((start, n, cmp_start, nc, dict(seq, cu_seqlens=None)))
        start, cmp_start = start + n, cmp_start + nc
    return out


VARLEN_BRANCHES = {
    "compressed": (compressed, ["q", "k_cmp", "v_cmp"]),
    "selected": (selected, ["q", "k", "v"]),
    "sliding": (sliding, ["q", "k", "v"]),
    "nsa": (None, list(TENSOR_NAMES)),
}


# float16 shares bfloat16's code paths (16-bit loads, float accumulation): three dtypes suffice.
@pytest.mark.parametrize("dtype", DTYPES[:3], ids=dtype_name)
@pytest.mark.parametrize("branch", VARLEN_BRANCHES.keys())
@pytest.mark.parametrize("case", VARLEN.values(), ids=VARLEN.keys())
def test_varlen(case, branch, dtype):
    x = make_inputs(dtype=dtype, seed=6, **case)
    fn, names = VARLEN_BRANCHES[branch]
    if branch == "selected":
        x = with_block_indices(x, case, "user")
    if branch == "nsa":
        check_nsa(x, case, dtype)
    else:
        check_branch(fn, x, case, names, dtype)
    check_per_sequence(x, case, branch, dtype)


def check_per_sequence(x, case, branch, dtype, seed=300):
    """The packed call equals one call per sequence, outputs and gradients (gradients of the
    packed tensors are compared slice by slice)."""
    fn, names = VARLEN_BRANCHES[branch]
    if fn is None:
        def fn(mod, x, case):
            return nsa(mod, x, case)[0]
    packed_x = dict(x, **leaves(x, names))
    outs = as_tuple(fn(nsa_torch, packed_x, case))
    douts = [random_like(o, seed + i) for i, o in enumerate(outs)]
    g_packed = dict(zip(names, grads(outs, [packed_x[n] for n in names], douts)))
    cmp_names = ("k_cmp", "v_cmp")
    for start, n, cmp_start, nc, seq in split_sequences(x, x["cu_seqlens"].diff().tolist(), case):
        seq_x = dict(seq, **leaves(seq, names))
        seq_outs = as_tuple(fn(nsa_torch, seq_x, case))
        seq_douts = [d[:, start:start + n] for d in douts]
        g_seq = grads(seq_outs, [seq_x[m] for m in names], seq_douts)
        for i, (o, so) in enumerate(zip(outs, seq_outs)):
            assert_close(o[:, start:start + n], so, tol(dtype), f"sequence at {start}: output {i}")
        for m, g in zip(names, g_seq):
            a, b = (cmp_start, nc) if m in cmp_names else (start, n)
            assert_close(g_packed[m][:, a:a + b], g, tol(dtype, grad=True),
                         f"sequence at {start}: d{m}")


# ------------------------------------------------------------------------------------ strided
def strided_copy(t, seed):
    """t's values in a non-contiguous view with a contiguous last dim: a slice of a wider
    tensor whose two middle dims are stored transposed."""
    if t.dim() == 3:  # gates [B, T, HQ]: any strides are allowed, take every other element
        wide = random_like(torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype), seed)
        view = wide[..., ::2]
    else:
        B, R, Hh, Dd = t.shape
        wide = random_like(torch.empty(B, Hh, R, Dd + 3, dtype=t.dtype), seed)
        view = wide.transpose(1, 2)[..., :Dd]
    view.copy_(t)
    assert not view.is_contiguous() and (view.dim() == 3 or view.stride(-1) == 1)
    return view


STRIDED_CASE = dict(B=2, T=77, HQ=6, H=2, D=12, Dv=20, block_size=16, block_stride=8,
                    select_size=16, num_selected=3, window_size=20)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_name)
@pytest.mark.parametrize("branch", ["compressed", "selected", "sliding", "nsa"])
def test_strided_inputs(branch, dtype):
    case = STRIDED_CASE
    x = make_inputs(dtype=dtype, seed=8, **case)
    if branch == "selected":
        x = with_block_indices(x, case, "user")
        wide = torch.full((*x["block_indices"].shape[:-1], x["block_indices"].shape[-1] + 2), -1,
                          dtype=torch.int32)
        wide[..., :-2] = x["block_indices"]
        x["block_indices"] = wide[..., :-2]
    x = {n: strided_copy(t, i) if torch.is_tensor(t) and t.is_floating_point() else t
         for i, (n, t) in enumerate(x.items())}
    if branch == "nsa":
        check_nsa(x, case, dtype)
    else:
        fn, names = VARLEN_BRANCHES[branch]
        check_branch(fn, x, case, names, dtype)


@pytest.mark.parametrize("branch", ["compressed", "selected", "sliding"])
def test_strided_upstream_gradient(branch):
    """A non-contiguous (last-dim contiguous) incoming gradient reaches the backward op as is."""
    case = STRIDED_CASE
    x = make_inputs(dtype=torch.float64, seed=9, **case)
    if branch == "selected":
        x = with_block_indices(x, case, "user")
    fn, names = VARLEN_BRANCHES[branch]
    ours_x = dict(x, **leaves(x, names))
    ref_x = dict(x, **leaves(x, names))
    o = as_tuple(fn(nsa_torch, ours_x, case))[0]
    r = as_tuple(fn(reference, ref_x, case))[0]
    dout = strided_copy(random_like(o, 11), 12)
    for n, g, gr in zip(names, grads([o], [ours_x[n] for n in names], [dout]),
                        grads([r], [ref_x[n] for n in names], [dout])):
        assert_close(g, gr, tol(torch.float64, grad=True), f"d{n}")
