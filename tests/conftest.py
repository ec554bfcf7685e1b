"""Shared helpers of the pytest suite: error measure, tolerances, seeded input factories.

The C++ ops fill every output with NaN (float) or INT32_MIN (int) before their kernel runs when
NSA_POISON_OUTPUTS=1, so an element a kernel forgets to write fails every comparison below. The
flag is read when the first output is allocated; set it before anything imports nsa_torch.
"""
import os

os.environ["NSA_POISON_OUTPUTS"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import nsa_torch  # noqa: E402
from nsa_torch import reference  # noqa: E402

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)

# ||out - ref|| / ||ref|| against the float64 reference (DESIGN.md section 4); gradients get 2x.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}

# The eight tensor inputs of nsa_attention, in its argument order.
TENSOR_NAMES = ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_swa")

HYPER_DEFAULTS = dict(block_size=32, block_stride=16, select_size=64, num_selected=16,
                      num_initial=1, num_local=2, window_size=512, scale=None)


def pytest_report_header(config):
    if nsa_torch._C is None:
        return f"nsa_torch._C: NOT LOADED ({nsa_torch._C_ERROR}); every op test will fail"
    return f"nsa_torch._C: {nsa_torch._C.__file__}"


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


# ------------------------------------------------------------------------------------ measures
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
