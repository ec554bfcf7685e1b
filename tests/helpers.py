"""Shared helpers of the pytest suite (every test file imports what it uses from here; tests/ is
on sys.path through pyproject's pytest `pythonpath`).

- measures and tolerances against the float64 reference (docs/design.md section 5);
- seeded CPU input factories (make_inputs) and the branches as functions of a module
  (nsa_torch or nsa_torch.reference), so one harness runs both;
- the select_blocks score rule (check_selection) and torch.library.opcheck samples;
- the CUDA harness: seeded GPU inputs, the case lists, an independent float64 row checker
  (rows_attend) for the log-sum-exp and the long tests, check_branch / check_select /
  check_nsa / run_branch, and `kernels`, which forces kernels through nsa_torch._debug and
  checks that they ran.

The C++ ops NaN-poison their outputs when NSA_POISON_OUTPUTS=1 (set by conftest.py before
anything imports nsa_torch), so an element a kernel forgets to write fails every comparison.
"""
import contextlib
import math
import zlib

import pytest
import torch

import nsa_torch
from nsa_torch import reference

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)
F64 = torch.float64

# ||out - ref|| / ||ref|| against the float64 reference (docs/design.md section 5); gradients get 2x.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}

# The eight tensor inputs of nsa_attention, in its argument order.
TENSOR_NAMES = ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_swa")

HYPER_DEFAULTS = dict(block_size=32, block_stride=16, select_size=64, num_selected=16,
                      num_initial=1, num_local=2, window_size=512, scale=None)
HYPER_NSA = ("block_size", "block_stride", "select_size", "num_selected", "num_initial",
             "num_local", "window_size", "scale")
CMP_H = ("block_size", "block_stride", "scale")                     # compressed branch
SEL_H = ("select_size", "num_selected", "num_initial", "num_local")  # and select_blocks


# ------------------------------------------------------------------------------------ measures
def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def tol(dtype, grad=False):
    return TOLERANCE[dtype] * (2 if grad else 1)


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64. Infinite entries (lse = -inf) must sit at the same
    places with the same sign and are left out of the norms; NaN anywhere gives inf. When ref is
    0 the absolute error ||out|| is returned."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out = out.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    if torch.isnan(out).any() or torch.isnan(ref).any():
        return math.inf
    inf_out, inf_ref = torch.isinf(out), torch.isinf(ref)
    if not torch.equal(inf_out, inf_ref) or not torch.equal(out[inf_out], ref[inf_ref]):
        return math.inf
    out, ref = out[~inf_out], ref[~inf_ref]
    err = torch.linalg.vector_norm(out - ref).item()
    norm = torch.linalg.vector_norm(ref).item()
    return err / norm if norm > 0 else err


def assert_close(out, ref, bound, what=""):
    err = rel_err(out, ref)
    assert err <= bound, f"{what}: relative error {err:.3g} > {bound:.3g}"


def count_calls(monkeypatch, calls, owner, name, key):
    """Replaces owner.name (a function) by one that also counts its calls in calls[key]."""
    f = getattr(owner, name)

    def counted(*args):
        calls[key] += 1
        return f(*args)
    monkeypatch.setattr(owner, name, counted)


# ------------------------------------------------------------------------------------ inputs
def num_cmp(T, block_size, block_stride):
    return reference.num_cmp_tokens(T, block_size, block_stride)


def cu_seqlens_of(lengths):
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32)


def make_inputs(*, B=1, T=None, lengths=None, HQ=4, H=2, D=16, Dv=None, dtype=torch.float32,
                seed=0, block_size=32, block_stride=16, **_hyper):
    """Fresh random inputs of the NSA ops (never zeros), drawn in float64 from a seeded generator
    and rounded to `dtype`: a dict with the eight tensors of TENSOR_NAMES and cu_seqlens.

    Either B sequences of T tokens, or (lengths=[...]) one packed batch with cu_seqlens; k_cmp and
    v_cmp have Nc(T) rows per sequence (packed in sequence order). Gates lie in (0, 1) like the
    module's sigmoid gates. Extra keyword arguments (other hyper-parameters) are ignored, so a
    test case's dict can be passed whole.
    """
    Dv = D if Dv is None else Dv
    if lengths is not None:
        B, T = 1, sum(lengths)
        Nc = sum(num_cmp(n, block_size, block_stride) for n in lengths)
        cu_seqlens = cu_seqlens_of(lengths)
    else:
        Nc = num_cmp(T, block_size, block_stride)
        cu_seqlens = None
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    def gate():
        return torch.sigmoid(torch.randn(B, T, HQ, generator=gen, dtype=torch.float64)).to(dtype)

    return dict(q=randn(B, T, HQ, D), k=randn(B, T, H, D), v=randn(B, T, H, Dv),
                k_cmp=randn(B, Nc, H, D), v_cmp=randn(B, Nc, H, Dv),
                g_cmp=gate(), g_slc=gate(), g_swa=gate(), cu_seqlens=cu_seqlens)


def random_like(x, seed):
    """A seeded random tensor shaped and typed like x (an upstream gradient)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)


def leaves(inputs, names, dtype=None):
    """inputs[names] as new autograd leaves, cast to dtype if given. Without a cast the leaf is
    a view with the input's strides (a clone would compact a strided input)."""
    out = {}
    for n in names:
        x = inputs[n].detach()
        out[n] = (x if dtype is None else x.to(dtype)).detach().requires_grad_(True)
    return out


def op_samples_for(x, rand, *, block_size, block_stride, select_size, num_selected, num_initial,
                   num_local, window_size, scale):
    """(op name, args) for all 9 nsa:: ops on inputs x (tensors of make_inputs' names and
    cu_seqlens), forward inputs requiring grad; `rand(t, seed)` makes the upstream gradients.
    Shared by the CPU and CUDA opcheck tests."""
    cu = x["cu_seqlens"]
    l, d, l_sel, w = block_size, block_stride, select_size, window_size
    sel = (l_sel, num_selected, num_initial, num_local, scale)
    g = leaves(x, ["q", "k", "v", "k_cmp", "v_cmp"])
    ops = torch.ops.nsa
    with torch.no_grad():
        o_cmp, lse_cmp = ops.compressed_attention_fwd(x["q"], x["k_cmp"], x["v_cmp"], cu, l, d,
                                                      scale)
        idx = ops.select_blocks(x["q"], x["k_cmp"], lse_cmp, cu, l, d, *sel)
        o_slc, lse_slc = ops.selected_attention_fwd(x["q"], x["k"], x["v"], idx, cu, l_sel, scale)
        o_swa, lse_swa = ops.sliding_window_attention_fwd(x["q"], x["k"], x["v"], cu, w, scale)
    dout = rand(o_cmp, 56)
    dlse = rand(lse_cmp, 57)
    return [
        ("compressed_attention_fwd", (g["q"], g["k_cmp"], g["v_cmp"], cu, l, d, scale)),
        ("compressed_attention_bwd", (dout, dlse, x["q"], x["k_cmp"], x["v_cmp"], o_cmp, lse_cmp,
                                      cu, l, d, scale)),
        ("compressed_attention_bwd", (dout, None, x["q"], x["k_cmp"], x["v_cmp"], o_cmp, lse_cmp,
                                      cu, l, d, scale)),
        ("select_blocks", (x["q"], x["k_cmp"], lse_cmp, cu, l, d, *sel)),
        ("selected_attention_fwd", (g["q"], g["k"], g["v"], idx, cu, l_sel, scale)),
        ("selected_attention_bwd", (dout, x["q"], x["k"], x["v"], idx, o_slc, lse_slc, cu, l_sel,
                                    scale)),
        ("sliding_window_attention_fwd", (g["q"], g["k"], g["v"], cu, w, scale)),
        ("sliding_window_attention_bwd", (dout, x["q"], x["k"], x["v"], o_swa, lse_swa, cu, w,
                                          scale)),
        ("gated_sum", tuple(t.detach().requires_grad_(True) for t in (o_cmp, o_slc, o_swa))
         + tuple(x[n].detach().requires_grad_(True) for n in ("g_cmp", "g_slc", "g_swa"))),
        ("gated_sum_bwd", (dout, o_cmp, o_slc, o_swa, x["g_cmp"], x["g_slc"], x["g_swa"])),
    ]


NSA_OPS = ("compressed_attention_fwd", "compressed_attention_bwd", "select_blocks",
           "selected_attention_fwd", "selected_attention_bwd", "sliding_window_attention_fwd",
           "sliding_window_attention_bwd", "gated_sum", "gated_sum_bwd")


def opcheck_all(samples):
    """torch.library.opcheck on every (op name, args) sample; the samples must cover every op."""
    seen = set()
    for name, args in samples:
        torch.library.opcheck(getattr(torch.ops.nsa, name).default, args)
        seen.add(name)
    assert seen == set(NSA_OPS)


def hyper(case, *names):
    """The hyper-parameters `names` of a test case, defaults filled in."""
    return {n: case.get(n, HYPER_DEFAULTS[n]) for n in names}


def random_block_indices(B, T, H, n, select_size, seed, cu_seqlens=None, shuffle=False):
    """Caller-style block indices int32 [B, T, H, n]: per row a random subset (possibly empty,
    possibly of future blocks) of its sequence's blocks, ascending, with -1 in random slots in
    between and always in the last slot; `shuffle` permutes each row instead."""
    gen = torch.Generator().manual_seed(seed)
    if cu_seqlens is None:
        seqs = [(b, 0, T) for b in range(B)]
    else:
        c = cu_seqlens.tolist()
        seqs = [(0, start, end - start) for start, end in zip(c[:-1], c[1:])]
    out = torch.full((B, T, H, n), -1, dtype=torch.int32)
    for b, start, length in seqs:
        nb = reference.num_select_blocks(length, select_size)
        for t in range(start, start + length):
            for h in range(H):
                m = int(torch.randint(0, min(nb, n - 1) + 1, (1,), generator=gen))
                blocks = torch.randperm(nb, generator=gen)[:m].sort().values
                slots = torch.randperm(n - 1, generator=gen)[:m].sort().values
                row = torch.full((n,), -1, dtype=torch.int32)
                row[slots] = blocks.to(torch.int32)
                if shuffle:
                    row = row[torch.randperm(n, generator=gen)]
                out[b, t, h] = row
    return out


# ------------------------------------------------------------------------------------ branches
# Each takes the module (nsa_torch or reference), the tensors and the case's hyper-parameters.
def compressed(mod, x, case):
    return mod.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], cu_seqlens=x["cu_seqlens"],
                                    **hyper(case, "block_size", "block_stride", "scale"))


def selected(mod, x, case):
    return mod.selected_attention(x["q"], x["k"], x["v"], x["block_indices"],
                                  cu_seqlens=x["cu_seqlens"], **hyper(case, "select_size", "scale"))


def sliding(mod, x, case):
    return mod.sliding_window_attention(x["q"], x["k"], x["v"], cu_seqlens=x["cu_seqlens"],
                                        **hyper(case, "window_size", "scale"))


def nsa(mod, x, case):
    return mod.nsa_attention(*(x[n] for n in TENSOR_NAMES), cu_seqlens=x["cu_seqlens"],
                             return_block_indices=True, **hyper(case, *HYPER_NSA))


def ref_nsa_given_indices(x, block_indices, case):
    """nsa_attention of the reference with the selection replaced by `block_indices`."""
    h = dict(cu_seqlens=x["cu_seqlens"], scale=case.get("scale"))
    o_cmp, _ = reference.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"],
                                              **hyper(case, "block_size", "block_stride"), **h)
    o_slc = reference.selected_attention(x["q"], x["k"], x["v"], block_indices,
                                         **hyper(case, "select_size"), **h)
    o_swa = reference.sliding_window_attention(x["q"], x["k"], x["v"],
                                               **hyper(case, "window_size"), **h)
    return (x["g_cmp"].unsqueeze(-1) * o_cmp + x["g_slc"].unsqueeze(-1) * o_slc
            + x["g_swa"].unsqueeze(-1) * o_swa)


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def grads(outs, inputs, douts):
    gs = torch.autograd.grad(outs, inputs, douts, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs)]


# ------------------------------------------------------------------------------ selection rule


def positions(B, T, cu_seqlens):
    """[B, T] position of each token in its own sequence."""
    if cu_seqlens is None:
        return torch.arange(T).expand(B, T)
    lens = cu_seqlens.diff().long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens)
    return (torch.arange(T) - starts).unsqueeze(0)


def check_selection(idx, scores, pos, case, rtol):
    """idx int32 [B, T, H, n] against scores [B, T, H, NB] (-inf for non-candidates)."""
    h = hyper(case, *SEL_H)
    n, l_sel = h["num_selected"], h["select_size"]
    NB = scores.shape[-1]
    assert idx.dtype == torch.int32 and idx.shape[-1] == n
    idx = idx.long()
    last = (pos // l_sel)[:, :, None, None]                      # t // l', [B, T, 1, 1]
    j = torch.arange(NB)
    candidate = j <= last
    forced = candidate & ((j < h["num_initial"]) | (j > last - h["num_local"]))
    valid = idx >= 0

    count = valid.sum(-1)
    assert torch.equal(count, torch.minimum(last[..., 0] + 1, torch.tensor(n)).expand_as(count)), \
        "fewer blocks than min(n, candidates)"
    assert torch.equal(valid, torch.arange(n) < count[..., None]), "-1 padding not only at the end"
    assert ((idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]).all(), "not ascending / duplicate"
    assert ((idx <= last) & (idx >= -1)).all(), "block not a candidate"

    chosen = torch.zeros(*idx.shape[:-1], NB + 1, dtype=torch.bool)
    chosen = chosen.scatter(-1, torch.where(valid, idx, NB), True)[..., :NB]
    missing = forced & ~chosen
    assert not missing.any(), f"forced block missing at {missing.nonzero()[0].tolist()}"

    lowest_chosen = torch.where(chosen & ~forced, scores, torch.inf).amin(-1)
    best_unchosen = torch.where(candidate & ~chosen, scores, -torch.inf).amax(-1)
    slack = rtol * torch.where(candidate, scores, 0).abs().amax(-1)
    bad = lowest_chosen < best_unchosen - slack
    assert not bad.any(), (f"a chosen free block scores below an unchosen candidate at "
                           f"{bad.nonzero()[0].tolist()}: {lowest_chosen[bad][0].item()!r} < "
                           f"{best_unchosen[bad][0].item()!r}")


# ==================================================================================== CUDA
# Inputs are drawn on the GPU directly in bfloat16/float16; the oracle is nsa_torch.reference in
# float64 on those same (already rounded) values, on the GPU or (ref_device="cpu") on the CPU.

# Relative slack of the select_blocks score rule (test_selection.py uses 1e-6 for the CPU
# kernels): the CUDA kernels compute q.k_cmp on the tensor cores and exp in float32, in another
# order than the float64 scores. A wrong block is off by far more than this.
SCORE_RTOL = 1e-5


def seed_of(*parts):
    """A fixed seed per test and parameter set (crc32 is stable across runs, hash() is not)."""
    return zlib.crc32(repr(parts).encode()) % 100_000


# ------------------------------------------------------------------------------------ cases
# Anything not given takes its default (docs/design.md section 1) (l = 32, d = 16, l' = 64, n = 16, w = 512).
# Head dims (D, Dv) cover every pair of nsa_torch._C.CUDA_HEAD_DIMS (test_cases_cover_every_head_dim
# in test_cuda_branches.py), the mma.sync-only (96, 96) and (256, 256) at G = 1, 4 and 16; G = HQ / H
# covers 1, 2, 3, 4, 5, 8, 16, 24 and 64. No case name may contain "long", nor any test file's name but test_cuda_long.py's
# (gpu_check.sh deselects -k 'not long', which also matches module names).
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


def case_params(cases, dtypes=LOW_PRECISION):
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
    """[R, H or 1, S] bool: what query rows (positions in their sequence) see (docs/design.md section 1).
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


# ------------------------------------------------------------------------------------ kernel plans
# Kernel variants are forced and observed through nsa_torch._debug (force, plans). A kernel that
# the case's shape cannot take must be refused with a ValueError; one the GPU cannot run (no sm_90)
# is refused too, which fails the test instead of silently testing the default kernel.
def shape_refusal(case, key, value):
    """Why the case's shape cannot run kernel `value` of plan key `key`, or None: the shape limits
    of the _debug contract (D, Dv in {64, 128} for the sm_90 kernels, wgmma_head_dims in
    csrc/nsa/cuda/head_dims.h; D, Dv <= 128 for the wide forward; the selection's wgmma kernel for
    D in {64, 128} and G in {16, 32}; the per-warp selected kernels for G < 64; the selected
    branch by blocks for 32 <= select_size <= 256)."""
    D = case["D"]
    Dv = case.get("Dv", D)
    G = case["HQ"] // case["H"]
    l_sel = hyper(case, "select_size")["select_size"]
    wgmma_dims = D in (64, 128) and Dv in (64, 128)
    if key in ("fwd", "bwd") and value == "wgmma" and not wgmma_dims:
        return f"D = {D}, Dv = {Dv} not in {{64, 128}}"
    if key == "fwd" and value == "wide" and not (D <= 128 and Dv <= 128):
        return f"D = {D}, Dv = {Dv} > 128"
    if key == "select" and value == "wgmma" and (D not in (64, 128) or G not in (16, 32)):
        return f"D = {D}, G = {G}"
    if key == "slc_fwd" and value == "warp" and G >= 64:
        return f"G = {G} >= 64"
    if key in ("slc_fwd", "slc_dq") and value == "blocks" and not (wgmma_dims and 32 <= l_sel <= 256):
        return f"D = {D}, Dv = {Dv}, select_size = {l_sel}"
    return None


def slc_by_tokens(case):
    """The selected branch's forward by tokens: the per-warp kernels below G = 64, else by the
    union of the blocks."""
    return "warp" if case["HQ"] // case["H"] < 64 else "union"


@contextlib.contextmanager
def kernels(case, launches=True, **force):
    """Runs the block under nsa_torch._debug.force(**force) and checks what ran. Where the case's
    shape cannot take a forced kernel (shape_refusal), the block must raise a ValueError naming
    the key and the value (and is ended by it). Otherwise every launch plan that names a kernel
    key given ran the forced kernel, or with the value None (the default, not forced) a kernel
    the shape can take; and, unless launches=False (a block with nothing to compute, e.g. no
    compressed token), at least one plan names each key. Yields the list of plans
    (nsa_torch._debug.plans()). split_tokens and slc_chunk_rows pass through unchecked."""
    from nsa_torch import _debug

    chosen = {k: v for k, v in force.items() if k not in ("split_tokens", "slc_chunk_rows")}
    refused = [(k, v) for k, v in chosen.items() if v is not None and shape_refusal(case, k, v)]
    with _debug.force(**{k: v for k, v in force.items() if v is not None}), \
            _debug.plans() as ran:
        if refused:
            with pytest.raises(ValueError) as error:
                yield ran
            message = str(error.value)
            assert any(k in message and v in message for k, v in refused), \
                f"the refusal does not name the forced {refused}: {message}"
            return
        yield ran
    for key, value in chosen.items():
        kinds = [p[key] for p in ran if key in p]
        assert kinds or not launches, f"no kernel launch plan names {key} (ran: {ran})"
        if value is None:
            assert not any(shape_refusal(case, key, k) for k in kinds), \
                f"the default {key} ran {kinds}, which this shape cannot take"
        else:
            assert all(k == value for k in kinds), f"forced {key}={value!r}, ran {kinds}"


def assert_split(ran):
    """Some dK/dV of the block was split over several token ranges."""
    splits = [p["split"] for p in ran if "split" in p]
    assert any(s > 1 for s in splits), f"no dK/dV split (plans: {ran})"
