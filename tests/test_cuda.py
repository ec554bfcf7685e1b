"""The CUDA kernels against nsa_torch.reference (DESIGN.md section 4), on the GPU.

Every test here is marked `cuda` (skipped without a GPU). Inputs are fresh seeded normal values
drawn on the GPU directly in bfloat16/float16; the oracle is nsa_torch.reference run in float64 on
those same (already rounded) values, on the GPU, so the error measured is the kernels' own.
Outputs are NaN-poisoned before every kernel (NSA_POISON_OUTPUTS=1, set by conftest.py).

Groups (select with -k):
- per-branch and end-to-end tests over odd shapes, GQA group sizes, head dims, hyper-parameters,
  batches, packed varlen batches and strided inputs, forward and backward;
- select_blocks by the score rule (test_selection.check_selection), not by exact indices;
- the log-sum-exp of the selected and sliding-window branches (returned by the raw
  torch.ops.nsa.*_fwd ops) against an independent float64 checker written from DESIGN.md
  section 1 (`rows_attend` below), which also serves the long tests;
- determinism (bit-identical gradients), rows that see nothing, opcheck, torch.compile, errors;
- test_sanitize_*: tiny problems for compute-sanitizer (`pytest -k sanitize`), float64
  reference on the CPU so that only our kernels do much on the GPU;
- test_long_*: T = 8192 and 65536 (and one 128k problem past 2^31 elements), opt-in with
  NSA_LONG_TESTS=1. At T = 8192 the dense float64 reference runs one (KV head, two query heads)
  slice at a time; at T > 8192 o, lse and dq are checked on 256 random query rows with the row
  checker, and every other gradient must be finite (unwritten elements stay NaN).
"""
import math
import os
import zlib

import pytest
import torch

import nsa_torch
from conftest import TENSOR_NAMES, assert_close, hyper, leaves, op_samples_for, opcheck_all, tol
from nsa_torch import reference
from test_errors import ALL, CALLS, FAMILY, base, on_cuda
from test_ops import (HYPER_NSA, as_tuple, compressed, grads, nsa, ref_nsa_given_indices, selected,
                      sliding)
from test_selection import check_selection, positions

pytestmark = pytest.mark.cuda

LOW = (torch.bfloat16, torch.float16)
F64 = torch.float64
CMP_H = ("block_size", "block_stride", "scale")
SEL_H = ("select_size", "num_selected", "num_initial", "num_local")

# Relative slack of the select_blocks score rule (test_selection.py uses 1e-6 for the CPU
# kernels): the CUDA kernels compute q.k_cmp on the tensor cores and exp in float32, in another
# order than the float64 scores. A wrong block is off by far more than this.
SCORE_RTOL = 1e-5


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def seed_of(*parts):
    """A fixed seed per test and parameter set (crc32 is stable across runs, hash() is not)."""
    return zlib.crc32(repr(parts).encode()) % 100_000


# ------------------------------------------------------------------------------------ cases
# Anything not given takes its DESIGN.md default (l = 32, d = 16, l' = 64, n = 16, w = 512).
# Head dims (D, Dv) cover every pair of nsa_torch._C.CUDA_HEAD_DIMS (test_cases_cover_every_head_dim),
# the mma.sync-only ones (96, 96) and (256, 256) at G = 1, 4 and 16; G = HQ / H covers 1, 2, 3, 4, 5,
# 8, 16, 24 and 64. No case name may contain "long" (gpu_check.sh deselects -k 'not long').
FLA_HYPER = dict(block_size=64, block_stride=64, select_size=64)  # fla's configuration
CUSTOM_HYPER = dict(block_size=32, block_stride=16, select_size=32, window_size=100,
                    num_selected=8, num_initial=2, num_local=1)
CASES = {
    "T1-B2-G2-d64": dict(B=2, T=1, HQ=4, H=2, D=64, Dv=64),
    "T20-G4-d128": dict(T=20, HQ=8, H=2, D=128, Dv=128),            # T < l: Nc = 0
    "T65-G1-d64v128": dict(T=65, HQ=2, H=2, D=64, Dv=128, window_size=64),  # one past block 0
    "T100-B2-G3-d128v64": dict(B=2, T=100, HQ=6, H=2, D=128, Dv=64, select_size=48,
                               num_selected=2, num_local=1, window_size=40, scale=0.3),
    "T257-G16-d192v128": dict(T=257, HQ=16, H=1, D=192, Dv=128),
    "T300-G2-d128-fla": dict(T=300, HQ=4, H=2, D=128, Dv=128, **FLA_HYPER),
    "T333-G8-d64-custom": dict(T=333, HQ=8, H=1, D=64, Dv=64, **CUSTOM_HYPER),
    "T513-G8-d128v64": dict(T=513, HQ=16, H=2, D=128, Dv=64),       # one past the window
    "T700-G24-d128": dict(T=700, HQ=24, H=1, D=128, Dv=128, num_selected=8),
    "T520-G64-d64": dict(T=520, HQ=64, H=1, D=64, Dv=64),
    "T1100-G5-d64v128": dict(T=1100, HQ=5, H=1, D=64, Dv=128),      # NB = 18 > n = 16
    "T2100-B2-G4-d192v128": dict(B=2, T=2100, HQ=8, H=2, D=192, Dv=128),  # NB = 33, many tiles
    # A negative scale reverses the order of the scores (the warpgroup forward puts the scale
    # into the exps' FMA only when it is positive; a zero scale: test_zero_scale).
    "T600-G4-d128-negscale": dict(T=600, HQ=8, H=2, D=128, Dv=128, scale=-0.15),
    # D = Dv = 96 (rows of 12 16-byte chunks: the swizzle's odd tail) and 256 (dK, dV in two passes;
    # Q read from shared memory per key tile), mma.sync kernels only.
    "T77-G1-d96": dict(T=77, HQ=2, H=2, D=96, Dv=96, window_size=40),
    "T333-G4-d96-custom": dict(T=333, HQ=8, H=2, D=96, Dv=96, **CUSTOM_HYPER),
    "T1031-G16-d96": dict(T=1031, HQ=16, H=1, D=96, Dv=96),         # NB = 17 > n = 16
    "T129-G1-d256": dict(T=129, HQ=2, H=2, D=256, Dv=256, window_size=64),
    "T601-G4-d256-fla": dict(T=601, HQ=8, H=2, D=256, Dv=256, **FLA_HYPER),
    "T1031-B2-G16-d256": dict(B=2, T=1031, HQ=16, H=1, D=256, Dv=256, scale=0.1),
}

# Packed batches: empty and length-1 sequences mixed with long ones.
VARLEN = {
    "mixed-G4-d128": dict(lengths=[0, 1, 37, 0, 700, 5, 1300, 64, 65, 0], HQ=8, H=2, D=128,
                          Dv=128),
    "mixed-G16-d192v128-custom": dict(lengths=[1, 0, 100, 2049, 0, 31, 513], HQ=16, H=1, D=192,
                                      Dv=128, **CUSTOM_HYPER),
    "mixed-G3-d64v128-fla": dict(lengths=[200, 0, 1, 777, 63, 64], HQ=6, H=2, D=64, Dv=128,
                                 **FLA_HYPER),
    "mixed-G4-d96": dict(lengths=[1, 0, 300, 65, 777], HQ=8, H=2, D=96, Dv=96),
    "mixed-G16-d256-custom": dict(lengths=[0, 130, 1, 513], HQ=16, H=1, D=256, Dv=256,
                                  **CUSTOM_HYPER),
}


def test_cases_cover_every_head_dim():
    """Every (D, Dv) pair with CUDA kernels has cases here, at G = 1, 4 and 16 and packed."""
    for dims in nsa_torch._C.CUDA_HEAD_DIMS:
        groups = {c["HQ"] // c["H"] for c in CASES.values() if (c["D"], c["Dv"]) == tuple(dims)}
        assert groups, f"no case for (D, Dv) = {tuple(dims)}"
        if dims[0] in (96, 256):
            assert {1, 4, 16} <= groups, f"(D, Dv) = {tuple(dims)}: G = {sorted(groups)}"
            assert any((c["D"], c["Dv"]) == tuple(dims) for c in VARLEN.values())


def case_params(cases, dtypes=LOW):
    return [pytest.param(case, dtype, id=f"{name}-{dtype_name(dtype)}")
            for name, case in cases.items() for dtype in dtypes]


# ------------------------------------------------------------------------------------ inputs
def gpu_inputs(*, B=1, T=None, lengths=None, HQ, H, D, Dv=None, dtype, seed, block_size=32,
               block_stride=16, device="cuda", **_hyper):
    """The eight tensors of TENSOR_NAMES (and cu_seqlens) on the GPU, drawn from a seeded CUDA
    generator directly in `dtype`: normal q, k, v, k_cmp, v_cmp (never zeros) and sigmoid gates.
    With lengths=[...], one packed batch (B = 1) with int32 cu_seqlens on the GPU."""
    Dv = D if Dv is None else Dv
    if lengths is not None:
        B, T = 1, sum(lengths)
        Nc = sum(reference.num_cmp_tokens(n, block_size, block_stride) for n in lengths)
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=device)
    else:
        Nc = reference.num_cmp_tokens(T, block_size, block_stride)
        cu_seqlens = None
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    def gate():
        return torch.sigmoid(torch.randn(B, T, HQ, generator=gen, device=device)).to(dtype)

    return dict(q=randn(B, T, HQ, D), k=randn(B, T, H, D), v=randn(B, T, H, Dv),
                k_cmp=randn(B, Nc, H, D), v_cmp=randn(B, Nc, H, Dv),
                g_cmp=gate(), g_slc=gate(), g_swa=gate(), cu_seqlens=cu_seqlens)


def rand_like(x, seed):
    """A seeded normal tensor shaped, typed and placed like x (an upstream gradient)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32).to(x.dtype)


def to64(x, device=None):
    """x's tensors in float64 (integer tensors unchanged), optionally moved to `device`."""
    out = {}
    for n, t in x.items():
        if torch.is_tensor(t):
            t = t.to(device) if device is not None else t
            out[n] = t.to(F64) if t.is_floating_point() else t
        else:
            out[n] = t
    return out


def sequences(x, case):
    """(batch, start, length, cmp_start, cmp_len) of every sequence of x."""
    l, d = hyper(case, "block_size", "block_stride").values()
    B, T = x["q"].shape[:2]
    if x.get("cu_seqlens") is None:
        return [(b, 0, T, 0, reference.num_cmp_tokens(T, l, d)) for b in range(B)]
    bounds, seqs, c = x["cu_seqlens"].tolist(), [], 0
    for a, e in zip(bounds[:-1], bounds[1:]):
        nc = reference.num_cmp_tokens(e - a, l, d)
        seqs.append((0, a, e - a, c, nc))
        c += nc
    return seqs


def gpu_block_indices(x, case, seed, shuffle=True):
    """Caller-style block indices int32 [B, T, H, n] on the GPU: per row a random subset of its
    sequence's blocks (future blocks too; in half of the rows past blocks are preferred), of
    random size 0 .. min(NB, n), no duplicates, -1 in the other slots; `shuffle` puts the slots
    in random order, else ascending with -1 at the end."""
    B, T = x["q"].shape[:2]
    H = x["k"].shape[2]
    h = hyper(case, "select_size", "num_selected")
    l_sel, n = h["select_size"], h["num_selected"]
    dev = x["q"].device
    gen = torch.Generator(device=dev).manual_seed(seed)
    pos = torch.zeros(B, T, dtype=torch.long, device=dev)
    nb = torch.zeros(B, T, dtype=torch.long, device=dev)
    for b, start, length, _, _ in sequences(x, case):
        pos[b, start:start + length] = torch.arange(length, device=dev)
        nb[b, start:start + length] = reference.num_select_blocks(length, l_sel)
    NBmax = max(int(nb.max()) if nb.numel() else 0, 1)
    j = torch.arange(NBmax, device=dev)
    keys = torch.rand(B, T, H, NBmax, generator=gen, device=dev)
    prefer_past = torch.rand(B, T, H, 1, generator=gen, device=dev) < 0.5
    future = (j > (pos // l_sel)[..., None, None])
    keys = keys + (future & prefer_past).float()            # past blocks first in half the rows
    keys = keys.masked_fill(j >= nb[..., None, None], 3.0)   # blocks of no sequence: never
    order = keys.argsort(-1)
    if NBmax < n:
        order = torch.cat([order, order.new_zeros(B, T, H, n - NBmax)], -1)
    order = order[..., :n]
    limit = torch.minimum(nb, torch.tensor(n, device=dev))[..., None]           # [B, T, 1]
    m = (torch.rand(B, T, H, generator=gen, device=dev) * (limit + 1)).floor().long()
    m = torch.minimum(m, limit)
    slots = torch.arange(n, device=dev) < m[..., None]
    rows = torch.where(slots, order, torch.full_like(order, -1))
    if shuffle:
        perm = torch.rand(B, T, H, n, generator=gen, device=dev).argsort(-1)
        rows = rows.gather(-1, perm)
    else:
        rows = torch.where(slots, rows, torch.full_like(rows, NBmax + 1)).sort(-1).values
        rows = torch.where(rows > NBmax, torch.full_like(rows, -1), rows)
    return rows.to(torch.int32).contiguous()


def reference_lse32(x, case, device=None):
    """The reference compressed lse (float64 math) rounded to float32, on x's device."""
    x64 = to64(x, device)
    _, lse = reference.compressed_attention(x64["q"], x64["k_cmp"], x64["v_cmp"],
                                            cu_seqlens=x64["cu_seqlens"], **hyper(case, *CMP_H))
    return lse.to(device=x["q"].device, dtype=torch.float32)


def with_indices(x, case, kind, seed=7, ref_device=None):
    """x plus block_indices: 'user' (random, shuffled, -1 in random slots), 'sorted' (random,
    ascending, -1 at the end) or 'selected' (the float64 reference's select_blocks)."""
    if kind == "selected":
        x64 = to64(x, ref_device)
        lse = reference_lse32(x, case, ref_device).to(x64["q"].device).double()
        bi = reference.select_blocks(x64["q"], x64["k_cmp"], lse, cu_seqlens=x64["cu_seqlens"],
                                     **hyper(case, *CMP_H, *SEL_H)).to(x["q"].device)
    else:
        bi = gpu_block_indices(x, case, seed, shuffle=kind == "user")
    return dict(x, block_indices=bi)


# ------------------------------------------------------------------------------------ checker
def scale_of(case, D):
    s = case.get("scale")
    return D ** -0.5 if s is None else s


def rows_attend(q_rows, k, v, visible, scale):
    """Masked softmax attention of some query rows, straight from the definition, in q_rows'
    dtype (float64): q_rows [R, HQ, D], k [S, H, D], v [S, H, Dv], visible [R, H or 1, S] bool.
    Returns o [R, HQ, Dv] and lse [R, HQ]; a row that sees nothing gets o = 0 and lse = -inf, and
    no NaN in its gradients (it is left unmasked, then multiplied by 0)."""
    R, HQ, D = q_rows.shape
    S, H, Dv = v.shape
    G = HQ // H
    if S == 0:
        o = q_rows.new_zeros(R, HQ, Dv) + 0 * q_rows.sum()
        return o, q_rows.new_full((R, HQ), -math.inf)
    visible = visible.expand(R, H, S)
    seen = visible.any(-1, keepdim=True)                                       # [R, H, 1]
    logits = torch.einsum("rhgd,shd->rhgs", q_rows.reshape(R, H, G, D), k) * scale
    logits = logits.masked_fill(~(visible | ~seen)[:, :, None, :], -math.inf)
    lse = torch.logsumexp(logits, -1)                                          # [R, H, G]
    o = torch.einsum("rhgs,shv->rhgv", torch.softmax(logits, -1), v) * seen[..., None]
    lse = torch.where(seen, lse, torch.full_like(lse, -math.inf))
    return o.reshape(R, HQ, Dv), lse.reshape(R, HQ)


def visible_rows(branch, rows, S, case, bi_rows=None):
    """[R, H or 1, S] bool: what query rows (positions in their sequence) see (DESIGN.md 1).
    branch 'cmp': compressed tokens 0 .. S-1; 'swa', 'slc': tokens 0 .. S-1 of the sequence;
    'slc' reads the rows' block indices bi_rows [R, H, n]."""
    dev = rows.device
    s = torch.arange(S, device=dev)
    t = rows[:, None]
    if branch == "cmp":
        h = hyper(case, "block_size", "block_stride")
        end = s * h["block_stride"] + h["block_size"] - 1
        return (end[None, :] <= t)[:, None, :]
    causal = s[None, :] <= t
    if branch == "swa":
        w = hyper(case, "window_size")["window_size"]
        return (causal & (s[None, :] > t - w))[:, None, :]
    l_sel = hyper(case, "select_size")["select_size"]
    NB = reference.num_select_blocks(S, l_sel)
    bi = bi_rows.long()
    chosen = torch.zeros(*bi.shape[:2], NB + 1, dtype=torch.bool, device=dev)
    chosen = chosen.scatter(-1, torch.where(bi < 0, torch.full_like(bi, NB), bi), True)[..., :NB]
    return chosen[:, :, s // l_sel] & causal[:, None, :]


def rows_branch(branch, q_rows, x, case, seq, rows, cache=None):
    """(o, lse) in float64 for the query rows `rows` of sequence seq = (b, start, len, cmp_start,
    cmp_len) of x (any dtype; slices are upcast, optionally cached in `cache`). q_rows [R, HQ, D]
    float64 (may require grad) are the queries of those rows."""
    b, start, n, c0, nc = seq
    cache = {} if cache is None else cache

    def f64(name, lo, hi):
        key = (name, b, lo, hi)
        if key not in cache:
            cache[key] = x[name][b, lo:hi].to(F64)
        return cache[key]

    scale = scale_of(case, q_rows.shape[-1])
    if branch == "cmp":
        k, v = f64("k_cmp", c0, c0 + nc), f64("v_cmp", c0, c0 + nc)
        return rows_attend(q_rows, k, v, visible_rows("cmp", rows, nc, case), scale)
    k, v = f64("k", start, start + n), f64("v", start, start + n)
    bi = x["block_indices"][b, start + rows] if branch == "slc" else None
    return rows_attend(q_rows, k, v, visible_rows(branch, rows, n, case, bi), scale)


def checker_lse(branch, x, case, chunk=512):
    """lse [B, T, HQ] float64 of every row, by the row checker, sequence by sequence."""
    B, T, HQ, _ = x["q"].shape
    out = torch.full((B, T, HQ), -math.inf, dtype=F64, device=x["q"].device)
    cache = {}
    for seq in sequences(x, case):
        b, start, n = seq[:3]
        for r0 in range(0, n, chunk):
            rows = torch.arange(r0, min(r0 + chunk, n), device=x["q"].device)
            q_rows = x["q"][b, start + rows].to(F64)
            out[b, start + rows] = rows_branch(branch, q_rows, x, case, seq, rows, cache)[1]
    return out


def raw_fwd(branch, x, case):
    """(o, lse) of the raw forward op torch.ops.nsa.<branch>_fwd (lse is internal to the public
    selected/sliding functions)."""
    scale = scale_of(case, x["q"].shape[-1])
    with torch.no_grad():
        if branch == "slc":
            return torch.ops.nsa.selected_attention_fwd(
                x["q"], x["k"], x["v"], x["block_indices"], x["cu_seqlens"],
                hyper(case, "select_size")["select_size"], scale)
        return torch.ops.nsa.sliding_window_attention_fwd(
            x["q"], x["k"], x["v"], x["cu_seqlens"], hyper(case, "window_size")["window_size"],
            scale)


def check_raw_lse(branch, x, case, o_public=None):
    """The raw op's lse against the row checker; its o equals the public function's o."""
    o, lse = raw_fwd(branch, x, case)
    assert lse.dtype == torch.float32 and lse.shape == x["q"].shape[:3]
    assert_close(lse, checker_lse(branch, x, case), tol(x["q"].dtype), f"{branch} lse")
    if o_public is not None:
        assert torch.equal(o, o_public.detach()), f"{branch}: raw op o != public o"


# ------------------------------------------------------------------------------------ harness
def close(out, ref, bound, what):
    assert out.is_cuda, f"{what}: not on the GPU"
    assert_close(out, ref.to(out.device), bound, what)


def check_branch(branch, x, case, names, dtype, *, seed=100, ref_device=None, strided_dout=False):
    """branch(nsa_torch) on x against branch(reference) on x in float64 (on ref_device, default
    x's device): every output, then the gradients of `names` under random upstream gradients."""
    ours_x = dict(x, **leaves(x, names))
    src = to64(x, ref_device)
    ref_x = dict(src, **leaves(src, names))
    outs = as_tuple(branch(nsa_torch, ours_x, case))
    refs = as_tuple(branch(reference, ref_x, case))
    assert outs[0].dtype == dtype and outs[0].is_cuda
    for i, (o, r) in enumerate(zip(outs, refs)):
        close(o, r, tol(dtype), f"{branch.__name__} output {i}")
    douts = [rand_like(o, seed + i) for i, o in enumerate(outs)]
    if strided_dout:
        douts = [strided_copy(d, seed + 50 + i) for i, d in enumerate(douts)]
    g_ours = grads(outs, [ours_x[n] for n in names], douts)
    g_ref = grads(refs, [ref_x[n] for n in names],
                  [d.to(r.device, r.dtype) for d, r in zip(douts, refs)])
    for n, g, r in zip(names, g_ours, g_ref):
        assert g.dtype == x[n].dtype, f"d{n} dtype {g.dtype}"
        close(g, r, tol(dtype, grad=True), f"{branch.__name__} d{n}")
    return outs


def check_select(x, case, dtype, lse=None, ref_device=None, rtol=SCORE_RTOL, agree=0.98):
    """select_blocks by the score rule (float64 scores from the very lse it was given: by default
    the reference lse rounded to float32), and mostly equal to the reference's choice."""
    h, hs = hyper(case, *CMP_H), hyper(case, *SEL_H)
    if lse is None:
        lse = reference_lse32(x, case, ref_device)
    idx = nsa_torch.select_blocks(x["q"], x["k_cmp"], lse, cu_seqlens=x["cu_seqlens"], **h, **hs)
    B, T = x["q"].shape[:2]
    H = x["k_cmp"].shape[2]
    assert idx.dtype == torch.int32 and idx.is_cuda
    assert idx.shape == (B, T, H, hs["num_selected"])
    check_selection_by_score(idx, x, case, lse, ref_device, rtol)
    x64 = to64(x, ref_device)
    ref = reference.select_blocks(x64["q"], x64["k_cmp"], lse.to(x64["q"].device).double(),
                                  cu_seqlens=x64["cu_seqlens"], **h, **hs)
    if T:
        same = (idx.cpu() == ref.cpu()).all(-1).float().mean().item()
        assert same >= agree, f"selection equals the reference on {same:.1%} of the rows"
    return idx


def check_selection_by_score(idx, x, case, lse, ref_device=None, rtol=SCORE_RTOL):
    h = hyper(case, *CMP_H)
    x64 = to64(x, ref_device)
    scores = reference.block_scores(x64["q"], x64["k_cmp"], lse.to(x64["q"].device).double(),
                                    cu_seqlens=x64["cu_seqlens"], **h,
                                    **hyper(case, "select_size"))
    B, T = x["q"].shape[:2]
    cu = x["cu_seqlens"].cpu() if x["cu_seqlens"] is not None else None
    check_selection(idx.cpu(), scores.cpu(), positions(B, T, cu), case, rtol)


def check_nsa(x, case, dtype, *, seed=200, ref_device=None, strided_dout=False):
    """nsa_attention (with gates) against the reference. Near-ties may flip the selection in
    bf16/fp16: our selection is checked by the score rule (with the lse of our compressed
    branch) and must mostly equal the reference's; the oracle of o and of the gradients of all
    eight inputs is the reference's branches run with our selection."""
    names = list(TENSOR_NAMES)
    ours_x = dict(x, **leaves(x, names))
    src = to64(x, ref_device)
    ref_x = dict(src, **leaves(src, names))
    o, idx = nsa(nsa_torch, ours_x, case)
    assert o.dtype == dtype and o.is_cuda and idx.dtype == torch.int32
    _, lse = nsa_torch.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"],
                                            cu_seqlens=x["cu_seqlens"], **hyper(case, *CMP_H))
    check_selection_by_score(idx, x, case, lse, ref_device)
    _, ref_idx = nsa(reference, to64(x, ref_device), case)
    if idx.shape[1]:
        same = (idx.cpu() == ref_idx.cpu()).all(-1).float().mean().item()
        assert same >= 0.98, f"selection equals the reference on {same:.1%} of the rows"
    ref_o = ref_nsa_given_indices(ref_x, idx.to(src["q"].device), case)
    close(o, ref_o, tol(dtype), "nsa_attention o")
    dout = rand_like(o, seed)
    if strided_dout:
        dout = strided_copy(dout, seed + 1)
    g_ours = grads([o], [ours_x[n] for n in names], [dout])
    g_ref = grads([ref_o], [ref_x[n] for n in names], [dout.to(ref_o.device, F64)])
    for n, g, r in zip(names, g_ours, g_ref):
        assert g.dtype == x[n].dtype, f"d{n} dtype {g.dtype}"
        close(g, r, tol(dtype, grad=True), f"nsa_attention d{n}")
    return o, idx


# ------------------------------------------------------------------------------------ branches
@pytest.mark.parametrize("case,dtype", case_params(CASES))
def test_compressed_attention(case, dtype):
    x = gpu_inputs(dtype=dtype, seed=seed_of("cmp", case, dtype), **case)
    o, lse = check_branch(compressed, x, case, ["q", "k_cmp", "v_cmp"], dtype)
    assert lse.dtype == torch.float32


@pytest.mark.parametrize("case,dtype", case_params(CASES))
def test_sliding_window_attention(case, dtype):
    x = gpu_inputs(dtype=dtype, seed=seed_of("swa", case, dtype), **case)
    (o,) = check_branch(sliding, x, case, ["q", "k", "v"], dtype)
    check_raw_lse("swa", x, case, o)


FWD_KIND_PARAMS = [pytest.param(*p.values, kind, id=f"{p.id}-{kind}")
                   for kind in ("narrow", "wide", "wgmma_kv2")
                   for p in case_params(CASES) if p.values[1] == torch.bfloat16 or kind != "narrow"]


@pytest.mark.parametrize("case,dtype,kind", FWD_KIND_PARAMS)
def test_forward_kernel_kinds(case, dtype, kind, monkeypatch):
    """The forward kernels of the compressed and window branches that sm_90 does not run by
    default (it takes the warpgroup kernel with one stage of V): NSA_CUDA_FWD_KERNEL=narrow
    (mma.sync, 16 rows per warp; the default for D = 192), =wide (mma.sync, 32 rows per warp; the
    default before sm_90) and =wgmma_kv2 (the warpgroup kernel with two stages of V)."""
    monkeypatch.setenv("NSA_CUDA_FWD_KERNEL", kind)
    x = gpu_inputs(dtype=dtype, seed=seed_of("cmp", case, dtype), **case)
    check_branch(compressed, x, case, ["q", "k_cmp", "v_cmp"], dtype)
    x = gpu_inputs(dtype=dtype, seed=seed_of("swa", case, dtype), **case)
    check_branch(sliding, x, case, ["q", "k", "v"], dtype)


# "sorted" (ascending, -1 at the end) only in bf16: the slot order does not depend on the dtype.
SLC_PARAMS = [pytest.param(*p.values, kind, id=f"{p.id}-{kind}")
              for kind in ("user", "sorted", "selected") for p in case_params(CASES)
              if kind != "sorted" or p.values[1] == torch.bfloat16]


@pytest.mark.parametrize("case,dtype,kind", SLC_PARAMS)
def test_selected_attention(case, dtype, kind):
    """Given block indices: random caller-style rows (shuffled, or ascending; -1 padding, future
    blocks, empty rows) and the float64 reference's own selection."""
    x = gpu_inputs(dtype=dtype, seed=seed_of("slc", case, dtype), **case)
    x = with_indices(x, case, kind, seed=seed_of("slc-idx", case, kind))
    (o,) = check_branch(selected, x, case, ["q", "k", "v"], dtype)
    check_raw_lse("slc", x, case, o)


@pytest.mark.parametrize("branch", ["compressed", "sliding"])
def test_zero_scale(branch):
    """scale = 0: every visible key weighs the same (the forward's other softmax path)."""
    case = dict(T=300, HQ=8, H=2, D=128, Dv=64, window_size=100, scale=0.0)
    x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of("zero-scale", branch), **case)
    run_branch(branch, x, case, torch.bfloat16)


@pytest.mark.parametrize("case,dtype", case_params(CASES))
def test_select_blocks(case, dtype):
    """Given the reference lse rounded to float32, then given the lse of our compressed kernel
    (what nsa_attention feeds to the selection)."""
    x = gpu_inputs(dtype=dtype, seed=seed_of("sel", case, dtype), **case)
    check_select(x, case, dtype)
    _, lse = nsa_torch.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"],
                                            **hyper(case, *CMP_H))
    check_select(x, case, dtype, lse=lse)


# Shapes of the warpgroup selection kernel (sm_90: D in {64, 128}, G a power of two in [4, 32]),
# several key tiles each.
SELECT_WGMMA_CASES = {
    "T1500-G16-d128": dict(T=1500, HQ=32, H=2, D=128, Dv=128),
    "T2100-B2-G4-d128": dict(B=2, T=2100, HQ=8, H=2, D=128, Dv=128),
    "T1300-G32-d64-custom": dict(T=1300, HQ=32, H=1, D=64, Dv=64, **CUSTOM_HYPER),
    "T700-G8-d64-fla": dict(T=700, HQ=16, H=2, D=64, Dv=64, **FLA_HYPER),
}


@pytest.mark.parametrize("kind", ["default", "wgmma", "mma"])
@pytest.mark.parametrize("case,dtype", case_params(SELECT_WGMMA_CASES))
def test_select_blocks_kinds(case, dtype, kind, monkeypatch):
    """NSA_CUDA_SELECT_KERNEL: the default (on sm_90 the warpgroup kernel for G >= 16), =wgmma
    (the warpgroup kernel for every G here) and =mma (select_topk_kernel), each by the score
    rule."""
    if kind != "default":
        monkeypatch.setenv("NSA_CUDA_SELECT_KERNEL", kind)
    x = gpu_inputs(dtype=dtype, seed=seed_of("sel-kinds", case, dtype), **case)
    _, lse = nsa_torch.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"],
                                            **hyper(case, *CMP_H))
    check_select(x, case, dtype, lse=lse)


@pytest.mark.parametrize("kind", ["default", "wgmma", "mma"])
def test_select_blocks_kinds_varlen(kind, monkeypatch):
    if kind != "default":
        monkeypatch.setenv("NSA_CUDA_SELECT_KERNEL", kind)
    case = dict(lengths=[1, 0, 1100, 7, 2049, 0, 130], HQ=32, H=2, D=128, Dv=128)
    x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of("sel-kinds-varlen", kind), **case)
    run_branch("select", x, case, torch.bfloat16)


@pytest.mark.parametrize("case,dtype", case_params(CASES))
def test_nsa_attention(case, dtype):
    x = gpu_inputs(dtype=dtype, seed=seed_of("nsa", case, dtype), **case)
    check_nsa(x, case, dtype)


# ------------------------------------------------------------------------------------ varlen
VARLEN_BRANCHES = ["compressed", "selected", "sliding", "select", "nsa"]


def run_branch(branch, x, case, dtype, ref_device=None, strided_dout=False, seed=7):
    if branch == "compressed":
        check_branch(compressed, x, case, ["q", "k_cmp", "v_cmp"], dtype, ref_device=ref_device,
                     strided_dout=strided_dout)
    elif branch == "selected":
        if "block_indices" not in x:
            x = with_indices(x, case, "user", seed=seed)
        (o,) = check_branch(selected, x, case, ["q", "k", "v"], dtype, ref_device=ref_device,
                            strided_dout=strided_dout)
        check_raw_lse("slc", x, case, o)
    elif branch == "sliding":
        (o,) = check_branch(sliding, x, case, ["q", "k", "v"], dtype, ref_device=ref_device,
                            strided_dout=strided_dout)
        check_raw_lse("swa", x, case, o)
    elif branch == "select":
        check_select(x, case, dtype, ref_device=ref_device)
    else:
        check_nsa(x, case, dtype, ref_device=ref_device, strided_dout=strided_dout)


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


# ------------------------------------------------------------------------------------ strided
def strided_copy(t, seed):
    """t's values in a non-contiguous view with a contiguous last dim (rows 16-byte aligned):
    a slice of a wider tensor whose two middle dims are stored transposed."""
    if t.dim() == 3:
        wide = rand_like(torch.empty(*t.shape[:-1], t.shape[-1] + 8, dtype=t.dtype,
                                     device=t.device), seed)
        view = wide[..., :t.shape[-1]]
    else:
        B, R, Hh, Dd = t.shape
        wide = rand_like(torch.empty(B, Hh, R, Dd + 8, dtype=t.dtype, device=t.device), seed)
        view = wide.transpose(1, 2)[..., :Dd]
    view.copy_(t)
    return view


def packed_qkv(x, seed):
    """q, k, v as views of one packed [B, T, HQ*D + H*D + H*Dv + 8] projection output (the usual
    fused qkv linear), gates as views of one [B, T, 3, HQ] tensor, k_cmp/v_cmp and block_indices
    as slices of wider tensors: every tensor non-contiguous, last dim contiguous."""
    q, k, v = x["q"], x["k"], x["v"]
    B, T, HQ, D = q.shape
    H, Dv = k.shape[2], v.shape[3]
    W = HQ * D + H * D + H * Dv + 8
    packed = rand_like(torch.empty(B, T, W, dtype=q.dtype, device=q.device), seed)
    out = dict(x)
    a = 0
    for n, heads, dim in (("q", HQ, D), ("k", H, D), ("v", H, Dv)):
        view = packed[..., a:a + heads * dim].view(B, T, heads, dim)
        view.copy_(x[n])
        out[n] = view
        a += heads * dim
    gates = rand_like(torch.empty(B, T, 3, HQ, dtype=x["g_cmp"].dtype, device=q.device), seed + 1)
    for i, n in enumerate(("g_cmp", "g_slc", "g_swa")):
        gates[:, :, i].copy_(x[n])
        out[n] = gates[:, :, i]
    for i, n in enumerate(("k_cmp", "v_cmp")):
        out[n] = strided_copy(x[n], seed + 2 + i)
    if "block_indices" in x:
        bi = x["block_indices"]
        wide = torch.full((*bi.shape[:-1], bi.shape[-1] + 4), -1, dtype=torch.int32,
                          device=bi.device)
        wide[..., :bi.shape[-1]] = bi
        out["block_indices"] = wide[..., :bi.shape[-1]]
    for n in ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp"):
        assert not out[n].is_contiguous() and out[n].stride(-1) == 1, n
    return out


STRIDED_CASE = dict(B=2, T=300, HQ=8, H=2, D=128, Dv=64, **CUSTOM_HYPER)


@pytest.mark.parametrize("branch", ["compressed", "selected", "sliding", "nsa"])
@pytest.mark.parametrize("dtype", LOW, ids=dtype_name)
def test_strided_inputs(branch, dtype):
    """Non-contiguous inputs (q, k, v sliced from a packed qkv tensor) and a non-contiguous
    upstream gradient."""
    case = STRIDED_CASE
    x = gpu_inputs(dtype=dtype, seed=seed_of("strided", branch, dtype), **case)
    if branch == "selected":
        x = with_indices(x, case, "user", seed=5)
    x = packed_qkv(x, seed_of("strided-pack", branch, dtype))
    run_branch(branch, x, case, dtype, strided_dout=True)


def misaligned_qkv(x, seed):
    """q, k, v as views of one packed buffer starting 1 element (2 bytes) into its storage, with
    an odd row stride: neither the pointers nor the strides are multiples of 16 bytes, which the
    kernels' 16-byte copies need (the ops copy such inputs first)."""
    q, k, v = x["q"], x["k"], x["v"]
    B, T, HQ, D = q.shape
    H, Dv = k.shape[2], v.shape[3]
    W = HQ * D + H * D + H * Dv + 1
    flat = rand_like(torch.empty(B * T * W + 1, dtype=q.dtype, device=q.device), seed)
    packed = flat[1:].view(B, T, W)
    out = dict(x)
    a = 0
    for n, heads, dim in (("q", HQ, D), ("k", H, D), ("v", H, Dv)):
        view = packed[..., a:a + heads * dim].view(B, T, heads, dim)
        view.copy_(x[n])
        assert view.data_ptr() % 16 or view.stride(1) % 8, n
        out[n] = view
        a += heads * dim
    return out


@pytest.mark.parametrize("branch", ["compressed", "selected", "sliding", "select", "nsa"])
def test_misaligned_inputs(branch):
    """Inputs whose pointers and strides break 16-byte alignment give the same results."""
    case, dtype = STRIDED_CASE, torch.bfloat16
    x = gpu_inputs(dtype=dtype, seed=seed_of("misaligned", branch), **case)
    if branch == "selected":
        x = with_indices(x, case, "user", seed=5)
    run_branch(branch, misaligned_qkv(x, seed_of("misaligned-pack", branch)), case, dtype)


# ------------------------------------------------------------------------------------ determinism
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


@pytest.mark.parametrize("which", ["compressed", "selected", "sliding", "nsa"])
@pytest.mark.parametrize("case,dtype", case_params(DET_CASES, (torch.bfloat16,))
                         + case_params({"T4096-G16-d128": DET_CASES["T4096-G16-d128"]},
                                       (torch.float16,)))
def test_backward_is_deterministic(case, dtype, which):
    """Two runs on the same inputs give bit-identical outputs and gradients (no float atomics
    whose order varies)."""
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
# default for G < 16) and by tokens, each forced, with chunks of 100 rows so that the chunking of
# the partials and the split of the lead blocks run on short sequences too.
SLC_FWD_CASES = dict(CASES, **{
    "T600-G4-d128-s128": dict(T=600, HQ=8, H=2, D=128, Dv=128, select_size=128, num_selected=4),
    "T500-B2-G2-d64-s96": dict(B=2, T=500, HQ=4, H=2, D=64, Dv=64, select_size=96, num_selected=3,
                               num_local=1),
})


@pytest.fixture
def small_slc_chunks(monkeypatch):
    monkeypatch.setenv("NSA_CUDA_SLC_FWD_CHUNK_ROWS", "100")


# By blocks, by tokens (the per-warp kernels' default: 16-key sub-tiles in two stages), by tokens
# with 32-key sub-tiles (NSA_CUDA_SLC_WARP_KEYS=32) and with three stages
# (NSA_CUDA_SLC_WARP_STAGES=3).
SLC_KINDS = ["blocks", "tokens", "tokens-32keys", "tokens-3stages"]


def set_slc_kind(monkeypatch, var, kind):
    monkeypatch.setenv(var, kind.split("-")[0])
    if kind.endswith("-32keys"):
        monkeypatch.setenv("NSA_CUDA_SLC_WARP_KEYS", "32")
    if kind.endswith("-3stages"):
        monkeypatch.setenv("NSA_CUDA_SLC_WARP_STAGES", "3")


@pytest.mark.parametrize("kind", SLC_KINDS)
@pytest.mark.parametrize("case,dtype", case_params(SLC_FWD_CASES))
def test_selected_forward_kinds(case, dtype, kind, monkeypatch, small_slc_chunks):
    set_slc_kind(monkeypatch, "NSA_CUDA_SLC_FWD_KERNEL", kind)
    x = gpu_inputs(dtype=dtype, seed=seed_of("slc-fwd", case, dtype, kind), **case)
    for idx_kind in ("user", "selected"):
        xi = with_indices(x, case, idx_kind, seed=seed_of("slc-fwd-idx", case, idx_kind))
        (o,) = check_branch(selected, xi, case, ["q", "k", "v"], dtype)
        check_raw_lse("slc", xi, case, o)


@pytest.mark.parametrize("kind", SLC_KINDS)
@pytest.mark.parametrize("case,dtype", case_params(SLC_FWD_CASES))
def test_selected_dq_kinds(case, dtype, kind, monkeypatch, small_slc_chunks):
    """NSA_CUDA_SLC_DQ_KERNEL=blocks|tokens: the selected branch's dQ by blocks (sm_90, D, Dv <=
    128, 32 <= select_size <= 256; the default there for G < 16: per-(row, slot) bf16 partials of
    the key tiles, summed in slot order; small chunks) or by tokens. Where by blocks does not
    apply, both check the by-tokens kernels."""
    set_slc_kind(monkeypatch, "NSA_CUDA_SLC_DQ_KERNEL", kind)
    x = gpu_inputs(dtype=dtype, seed=seed_of("slc-dq", case, dtype, kind), **case)
    for idx_kind in ("user", "selected"):
        xi = with_indices(x, case, idx_kind, seed=seed_of("slc-dq-idx", case, idx_kind))
        check_branch(selected, xi, case, ["q", "k", "v"], dtype)


@pytest.mark.parametrize("kind", SLC_KINDS)
@pytest.mark.parametrize("part", ["fwd", "dq"])
@pytest.mark.parametrize("case", VARLEN.values(), ids=list(VARLEN))
def test_selected_kinds_varlen(case, part, kind, monkeypatch, small_slc_chunks):
    """The selected branch's forward (NSA_CUDA_SLC_FWD_KERNEL) or dQ (NSA_CUDA_SLC_DQ_KERNEL) by
    blocks or by tokens on packed batches."""
    set_slc_kind(monkeypatch, f"NSA_CUDA_SLC_{part.upper()}_KERNEL", kind)
    x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of(f"slc-{part}-varlen", case, kind), **case)
    run_branch("selected", x, case, torch.bfloat16, seed=seed_of(f"slc-{part}-varlen-idx", case))


# ------------------------------------------------------------------------------------ split dK/dV
# Long key tiles (compressed keys, the selected branch's first blocks) can be split over several
# thread blocks whose fp32 partials are summed in order: ranges of NSA_CUDA_SPLIT_TOKENS tokens
# (default 4096, up to 16 ranges), so only sequences of 8k tokens and more split by default; 64
# makes short sequences split too.
SPLIT_CASES = {k: CASES[k] for k in ("T700-G24-d128", "T2100-B2-G4-d192v128", "T1100-G5-d64v128",
                                     "T1031-G16-d96", "T1031-B2-G16-d256",
                                     "T333-G8-d64-custom")}


@pytest.fixture
def small_splits(monkeypatch):
    monkeypatch.setenv("NSA_CUDA_SPLIT_TOKENS", "64")


@pytest.mark.parametrize("branch", ["compressed", "selected", "nsa"])
@pytest.mark.parametrize("case,dtype", case_params(SPLIT_CASES, (torch.bfloat16,)))
def test_split_dkdv(case, dtype, branch, small_splits):
    x = gpu_inputs(dtype=dtype, seed=seed_of("split", case, dtype, branch), **case)
    run_branch(branch, x, case, dtype, seed=seed_of("split-idx", case, branch))
    if branch == "selected":
        run_branch(branch, with_indices(x, case, "selected"), case, dtype)


@pytest.mark.parametrize("branch", ["compressed", "sliding", "selected"])
@pytest.mark.parametrize("case,dtype", case_params(CASES))
def test_mma_backward(case, dtype, branch, monkeypatch):
    """NSA_CUDA_BWD_KERNEL=mma: the mma.sync dQ and dK/dV kernels (the default before sm_90 and
    for D = 192; sm_90 otherwise runs their warpgroup twins) against float64, split dK/dV
    included."""
    monkeypatch.setenv("NSA_CUDA_BWD_KERNEL", "mma")
    monkeypatch.setenv("NSA_CUDA_SPLIT_TOKENS", "64")
    x = gpu_inputs(dtype=dtype, seed=seed_of("mma-dkdv", case, dtype, branch), **case)
    run_branch(branch, x, case, dtype, seed=seed_of("mma-dkdv-idx", case, branch))


@pytest.mark.parametrize("branch", ["compressed", "selected", "nsa"])
def test_split_dkdv_varlen(branch, small_splits):
    case, dtype = VARLEN["mixed-G4-d128"], torch.bfloat16
    x = gpu_inputs(dtype=dtype, seed=seed_of("split-varlen", branch), **case)
    run_branch(branch, x, case, dtype, seed=seed_of("split-varlen-idx", branch))


@pytest.mark.parametrize("which", ["compressed", "selected", "nsa"])
def test_split_dkdv_is_deterministic(which, small_splits):
    test_backward_is_deterministic(DET_CASES["T4096-G16-d128"], torch.bfloat16, which)


def test_selected_dq_by_blocks_is_deterministic(monkeypatch, small_slc_chunks):
    monkeypatch.setenv("NSA_CUDA_SLC_DQ_KERNEL", "blocks")
    test_backward_is_deterministic(DET_CASES["T3000-G1-d64"], torch.bfloat16, "selected")


# ------------------------------------------------------------------------------------ edge rows
@pytest.mark.parametrize("dtype", LOW, ids=dtype_name)
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


# ------------------------------------------------------------------------------------ opcheck
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


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("target", ALL)
def test_float32_is_rejected(target):
    """CUDA kernels take bfloat16/float16: float32 CUDA inputs raise a TypeError naming the op
    (never a silent CPU or reference fallback)."""
    a = on_cuda(base(), torch.float32, 64, 64)
    name = target[3:] if target[:3] == "fn:" else FAMILY[target]
    with pytest.raises(TypeError, match=rf"{name}.*bfloat16 or float16"):
        CALLS[target](a)


@pytest.mark.parametrize("target", ALL)
def test_unsupported_head_dim_is_rejected(target):
    a = on_cuda(base(), torch.bfloat16, 80, 80)
    with pytest.raises(ValueError, match=r"head dim"):
        CALLS[target](a)


@pytest.mark.parametrize("target", ALL)
def test_cpu_cu_seqlens_is_rejected(target):
    """cu_seqlens on the CPU with CUDA q: a device-mismatch ValueError naming cu_seqlens."""
    a = on_cuda(base(varlen=True), torch.bfloat16, 64, 64, keep_cpu=("cu_seqlens",))
    assert not a["cu_seqlens"].is_cuda and a["q"].is_cuda
    with pytest.raises(ValueError, match=r"cu_seqlens"):
        CALLS[target](a)


@pytest.mark.parametrize("target", ALL)
def test_valid_cuda_arguments_pass(target):
    """The arguments the error tests break are valid as they are (bf16, D = Dv = 64)."""
    for varlen in (False, True):
        CALLS[target](on_cuda(base(varlen), torch.bfloat16, 64, 64))


# ------------------------------------------------------------------------------------ sanitize
# Tiny problems for compute-sanitizer (memcheck, racecheck): `pytest -k sanitize`. Every branch
# forward and backward plus select_blocks, both dtypes; the float64 reference runs on the CPU so
# that the GPU work is (almost) only our kernels.
SANITIZE_HEADS = {1: dict(HQ=2, H=2, D=128, Dv=128), 3: dict(HQ=6, H=2, D=64, Dv=128),
                  16: dict(HQ=16, H=1, D=192, Dv=128)}
SANITIZE = [pytest.param(dict(T=T, **SANITIZE_HEADS[G], **(CUSTOM_HYPER if T == 300 else {})),
                         dtype, id=f"T{T}-G{G}-{dtype_name(dtype)}")
            for T in (100, 300) for G in (1, 3, 16) for dtype in LOW]


@pytest.mark.parametrize("case,dtype", SANITIZE)
def test_sanitize_branches(case, dtype):
    x = gpu_inputs(dtype=dtype, seed=seed_of("sanitize", case, dtype), **case)
    for branch in ("compressed", "selected", "sliding", "select", "nsa"):
        run_branch(branch, x, case, dtype, ref_device="cpu")
    run_branch("selected", with_indices(x, case, "selected", ref_device="cpu"), case, dtype,
               ref_device="cpu")


def test_sanitize_split(monkeypatch):
    monkeypatch.setenv("NSA_CUDA_SPLIT_TOKENS", "64")
    monkeypatch.setenv("NSA_CUDA_SLC_FWD_CHUNK_ROWS", "70")  # the kernels by blocks in chunks
    monkeypatch.setenv("NSA_CUDA_SLC_DQ_KERNEL", "blocks")    # (dQ by blocks at every G)
    case = dict(T=300, **SANITIZE_HEADS[3])
    x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of("sanitize-split"), **case)
    for branch in ("compressed", "selected", "nsa"):
        run_branch(branch, x, case, torch.bfloat16, ref_device="cpu")


def test_sanitize_split_heavy_tiles(monkeypatch):
    """The selected branch's forward and dQ by blocks with every key tile split by the tokens
    that chose it: G = 16 and chunks of 100 rows give 3 splits, and at T = 300 with 16 blocks
    chosen each of the 5 blocks is chosen by every later token."""
    monkeypatch.setenv("NSA_CUDA_SLC_FWD_CHUNK_ROWS", "100")
    monkeypatch.setenv("NSA_CUDA_SLC_FWD_KERNEL", "blocks")
    monkeypatch.setenv("NSA_CUDA_SLC_DQ_KERNEL", "blocks")
    case = dict(T=300, HQ=16, H=1, D=128, Dv=128)
    x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of("sanitize-slc-heavy"), **case)
    run_branch("selected", with_indices(x, case, "selected", ref_device="cpu"), case,
               torch.bfloat16, ref_device="cpu")


@pytest.mark.parametrize("T", [100, 1200], ids=lambda T: f"T{T}")
def test_sanitize_select(T, monkeypatch):
    """The warpgroup selection kernel (sm_90; G = 16, D = 128 and, forced, G = 4, D = 64): one key
    tile (racecheck's) and several."""
    monkeypatch.setenv("NSA_CUDA_SELECT_KERNEL", "wgmma")
    for heads, hyper_ in ((dict(HQ=16, H=1, D=128, Dv=128), {}),
                          (dict(HQ=8, H=2, D=64, Dv=64), CUSTOM_HYPER)):
        case = dict(T=T, **heads, **hyper_)
        x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of("sanitize-select", T, heads["HQ"]), **case)
        run_branch("select", x, case, torch.bfloat16, ref_device="cpu")


@pytest.mark.parametrize("dims", [(128, 128), (64, 64)], ids=lambda d: f"d{d[0]}v{d[1]}")
def test_sanitize_forward_tiles(dims):
    """The default warpgroup forward (sm_90) over enough key tiles to cycle its stages several
    times: the window branch sees up to 10 tiles per block of 64 rows, the compressed up to 5
    (Nc = 261)."""
    case = dict(T=4200, HQ=2, H=2, D=dims[0], Dv=dims[1])
    x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of("sanitize-tiles", *dims), **case)
    for branch in ("compressed", "sliding"):
        run_branch(branch, x, case, torch.bfloat16, ref_device="cpu")


@pytest.mark.parametrize("kind", ["wgmma_kv2"])
def test_sanitize_forward_kinds(kind, monkeypatch):
    """The warpgroup forward's other kinds (the default runs in test_sanitize_branches)."""
    monkeypatch.setenv("NSA_CUDA_FWD_KERNEL", kind)
    case = dict(T=300, HQ=16, H=1, D=128, Dv=128, window_size=100)
    x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of("sanitize-fwd", kind), **case)
    for branch in ("compressed", "sliding"):
        run_branch(branch, x, case, torch.bfloat16, ref_device="cpu")


@pytest.mark.parametrize("dims", [(96, 96), (256, 256)], ids=lambda d: f"d{d[0]}v{d[1]}")
def test_sanitize_head_dims(dims):
    """The mma.sync-only head dims: rows of 12 chunks (D = 96, also through the top-k kernel's
    resident units) and dK, dV in two passes (D = 256), every branch and select_blocks."""
    case = dict(T=300, HQ=8, H=2, D=dims[0], Dv=dims[1], **CUSTOM_HYPER)
    x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of("sanitize-dims", *dims), **case)
    for branch in ("compressed", "selected", "sliding", "select", "nsa"):
        run_branch(branch, x, case, torch.bfloat16, ref_device="cpu")


@pytest.mark.parametrize("variant", ["32keys", "3stages"])
def test_sanitize_slc_warp(variant, monkeypatch):
    """The selected branch's per-warp forward and dQ with 32-key sub-tiles or three stages (the
    default, 16 keys in two stages, runs in test_sanitize_branches)."""
    monkeypatch.setenv("NSA_CUDA_SLC_FWD_KERNEL", "tokens")
    monkeypatch.setenv("NSA_CUDA_SLC_DQ_KERNEL", "tokens")
    if variant == "32keys":
        monkeypatch.setenv("NSA_CUDA_SLC_WARP_KEYS", "32")
    else:
        monkeypatch.setenv("NSA_CUDA_SLC_WARP_STAGES", "3")
    case = dict(T=300, HQ=16, H=1, D=128, Dv=128)
    x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of("sanitize-slc-warp", variant), **case)
    run_branch("selected", x, case, torch.bfloat16, ref_device="cpu")


def test_sanitize_varlen():
    case = dict(lengths=[0, 1, 37, 0, 130, 5, 64, 65], HQ=6, H=2, D=64, Dv=64, **CUSTOM_HYPER)
    for dtype in LOW:
        x = gpu_inputs(dtype=dtype, seed=seed_of("sanitize-varlen", dtype), **case)
        for branch in ("compressed", "selected", "sliding", "select", "nsa"):
            run_branch(branch, x, case, dtype, ref_device="cpu")


# ------------------------------------------------------------------------------------ long
# Opt-in (NSA_LONG_TESTS=1; gpu_check.sh deselects them with -k 'not long' otherwise). bf16.
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
    """T = 131072, HQ = 128, D = 192: q has 3.2e9 elements, past 2^31 (DESIGN.md section 6):
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
