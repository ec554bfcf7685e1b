"""nsa.decode_attention, the decoding step over a contiguous or paged KV cache: against
nsa_torch.reference.decode_attention, and against row t of nsa_torch.nsa_attention on the
whole prefix (teacher forcing at the op level: the caches are built from the training inputs);
every argument check; opcheck and torch.compile; the CUDA kernels (marked).

Caches are poisoned: rows past a sequence's length, compressed rows past Nc(length), pages of
the pool no sequence uses, and block_table entries past a sequence's last page (these point
outside the pool) hold NaN or invalid values, so that a kernel reading them fails the test.
"""
import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import nsa_torch
from helpers import (F64, HYPER_NSA, SCORE_RTOL, assert_close, check_selection, dtype_name,
                     gpu_inputs, hyper, make_inputs, rand_like, random_like, seed_of, to64, tol)
from nsa_torch import reference

# Smaller blocks than the paper's, so that short sequences select among many blocks: 333 tokens
# are 11 selection blocks for n = 4; the window (40) is passed by most lengths.
SMALL = dict(block_size=32, block_stride=16, select_size=32, num_selected=4, num_initial=1,
             num_local=2, window_size=40)
# One batch with every edge: 1 token, < block_size, = block_size, one past it, one before a
# compression window's end (the next token completes window 1), at it (t = 47) and one past it,
# a selection-block edge (64) and one past it, > window.
LENGTHS = [1, 20, 32, 33, 47, 48, 49, 64, 65, 97, 200, 333]
# G = HQ / H -> (HQ, H, D, Dv), D != Dv; G = 80 takes two batches of rows (kMaxRows = 64).
GROUPS = {1: (2, 2, 16, 32), 2: (4, 2, 20, 12), 3: (3, 1, 24, 16), 4: (8, 2, 16, 8),
          8: (8, 1, 32, 16), 16: (16, 1, 16, 24), 80: (80, 1, 16, 8)}
SWEEP = [1, 2, 3, 4, 8, 16]
LAYOUTS = {"contiguous": None, "paged64": 64, "paged128": 128}

STEP_ARGS = ("q", "k_cache", "v_cache", "k_cmp_cache", "v_cmp_cache", "g_cmp", "g_slc", "g_swa",
             "cache_seqlens")
STEP_KWARGS = ("block_table", "k_swa_cache", "v_swa_cache")


# ------------------------------------------------------------------------------------ the step
def build_step(x, lengths, S, *, page_size=None, capacity=None, seed=0, block_size=32,
               block_stride=16, **_hyper):
    """The decoding step of training inputs x (make_inputs / gpu_inputs: [B, T] tensors, plus
    optional k_swa, v_swa): sequence b holds its first lengths[b] tokens, the last S of which
    are the step's queries. Contiguous caches [B, capacity, H, *] (page_size None) or page pools
    with a shuffled block table. Everything a step must not read is poisoned."""
    q = x["q"]
    B, T, HQ, D = q.shape
    H, dev = x["k"].shape[2], q.device
    capacity = capacity or max(lengths) + 7
    gen = torch.Generator().manual_seed(seed)
    step = dict(block_table=None, k_swa_cache=None, v_swa_cache=None)
    if page_size is not None:
        max_pages = -(-capacity // page_size)
        capacity = max_pages * page_size
        used = [-(-L // page_size) for L in lengths]
        num_pages = sum(used) + 3  # spare pages: NaN, never read
        order = torch.randperm(num_pages, generator=gen).tolist()
        table = torch.full((B, max_pages), num_pages + 5, dtype=torch.int32)  # past the pool
        for b, n in enumerate(used):
            table[b, :n] = torch.tensor(order[:n], dtype=torch.int32)
            order = order[n:]
        step["block_table"] = table.to(dev)

    def raw(src):
        C = src.shape[-1]
        if page_size is None:
            cache = src.new_full((B, capacity, H, C), math.nan)
            for b, L in enumerate(lengths):
                cache[b, :L] = src[b, :L]
            return cache
        cache = src.new_full((num_pages, page_size, H, C), math.nan)
        for b, L in enumerate(lengths):
            for i in range(used[b]):
                n = min(page_size, L - i * page_size)
                cache[int(table[b, i]), :n] = src[b, i * page_size:i * page_size + n]
        return cache

    def compressed(src):
        rows = reference.num_cmp_tokens(capacity, block_size, block_stride) + 1  # a scratch row
        cache = src.new_full((B, rows, H, src.shape[-1]), math.nan)
        for b, L in enumerate(lengths):
            nc = reference.num_cmp_tokens(L, block_size, block_stride)
            cache[b, :nc] = src[b, :nc]
        return cache

    def new(src):  # the step's rows [B, S, ...] of a [B, T, ...] tensor
        rows = [src[b, L - S:L] for b, L in enumerate(lengths)]
        return torch.stack(rows) if rows else src[:0, :S]

    step.update(q=new(q), k_cache=raw(x["k"]), v_cache=raw(x["v"]),
                k_cmp_cache=compressed(x["k_cmp"]), v_cmp_cache=compressed(x["v_cmp"]),
                g_cmp=new(x["g_cmp"]), g_slc=new(x["g_slc"]), g_swa=new(x["g_swa"]),
                cache_seqlens=torch.tensor(lengths, dtype=torch.int32, device=dev))
    if "k_swa" in x:
        step.update(k_swa_cache=raw(x["k_swa"]), v_swa_cache=raw(x["v_swa"]))
    return step


def decode(mod, step, case, **kw):
    """mod.decode_attention (nsa_torch or reference) on a step: (o, block_indices)."""
    return mod.decode_attention(*(step[n] for n in STEP_ARGS), **{n: step[n] for n in STEP_KWARGS},
                                return_block_indices=True, **hyper(case, *HYPER_NSA), **kw)


def prefix(x, b, L, case):
    """The training inputs of sequence b's first L tokens, batch of one (k_cmp: Nc(L) rows)."""
    nc = reference.num_cmp_tokens(L, *hyper(case, "block_size", "block_stride").values())
    out = {n: t[b:b + 1, :L] for n, t in x.items() if torch.is_tensor(t)}
    out.update(k_cmp=x["k_cmp"][b:b + 1, :nc], v_cmp=x["v_cmp"][b:b + 1, :nc])
    return out


def oracle_given_indices(x64, b, L, S, idx, case):
    """Rows L-S .. L-1 of the float64 reference on sequence b's prefix with the selection of
    those rows replaced by idx [S, H, n] (each row's output depends only on its own blocks)."""
    p = prefix(x64, b, L, case)
    h = dict(scale=case.get("scale"))
    o_cmp, _ = reference.compressed_attention(p["q"], p["k_cmp"], p["v_cmp"], **h,
                                              **hyper(case, "block_size", "block_stride"))
    bi = torch.full((1, L) + tuple(idx.shape[1:]), -1, dtype=torch.int32, device=idx.device)
    bi[0, L - S:] = idx
    o_slc = reference.selected_attention(p["q"], p["k"], p["v"], bi.to(p["q"].device), **h,
                                         **hyper(case, "select_size"))
    k_w, v_w = (p["k_swa"], p["v_swa"]) if "k_swa" in p else (p["k"], p["v"])
    o_swa = reference.sliding_window_attention(p["q"], k_w, v_w, **h,
                                               **hyper(case, "window_size"))
    o = sum(p[g].unsqueeze(-1) * o_x for g, o_x in (("g_cmp", o_cmp), ("g_slc", o_slc),
                                                     ("g_swa", o_swa)))
    return o[0, L - S:]


def selection_by_score(idx, x64, b, L, S, case):
    """idx [S, H, n] of sequence b by the score rule of the float64 reference's block scores."""
    p = prefix(x64, b, L, case)
    h = hyper(case, "block_size", "block_stride", "scale")
    _, lse = reference.compressed_attention(p["q"], p["k_cmp"], p["v_cmp"], **h)
    scores = reference.block_scores(p["q"], p["k_cmp"], lse, **h, **hyper(case, "select_size"))
    pos = torch.arange(L - S, L).unsqueeze(0)
    check_selection(idx.unsqueeze(0).cpu(), scores[:, L - S:].cpu(), pos, case, SCORE_RTOL)


def check_step(x, lengths, S, case, dtype, *, ref_device=None, **layout):
    """nsa_torch.decode_attention on the step of x against reference.decode_attention in
    float64: identical block indices (float64 and float32: every row; bfloat16 and float16: a
    row may differ where blocks tie within rounding, and must then pass the score rule) and o
    within DESIGN.md's tolerance (against the reference run with our blocks where they differ)."""
    step = build_step(x, lengths, S, seed=seed_of(lengths, S), **layout, **case)
    o, idx = decode(nsa_torch, step, case)
    B, _, HQ, _ = step["q"].shape
    H, Dv = step["k_cache"].shape[2], step["v_cache"].shape[3]
    n = hyper(case, "num_selected")["num_selected"]
    assert o.dtype == dtype and o.shape == (B, S, HQ, Dv) and o.device == step["q"].device
    assert idx.dtype == torch.int32 and idx.shape == (B, S, H, n)
    ref_o, ref_idx = decode(reference, to64(step, ref_device), case)
    same = (idx.cpu() == ref_idx.cpu()).all(-1).all(-1)  # [B, S]
    if dtype in (torch.float64, torch.float32):
        assert same.all(), f"block indices differ from the reference at {(~same).nonzero()[0]}"
    if same.all():
        assert_close(o, ref_o, tol(dtype), "decode o")
        return o, idx, step
    x64 = to64(x, ref_device)
    oracle = torch.stack([oracle_given_indices(x64, b, L, S, idx[b].to(x64["q"].device), case)
                          for b, L in enumerate(lengths)])
    for b, L in enumerate(lengths):
        if not same[b].all():
            selection_by_score(idx[b], x64, b, L, S, case)
    assert_close(o, oracle, tol(dtype), "decode o (reference with our selection)")
    return o, idx, step


def cpu_case(G, dtype, lengths, S, seed, swa=False, **case):
    HQ, H, D, Dv = GROUPS[G]
    lengths = [max(L, S) for L in lengths]
    x = make_inputs(B=len(lengths), T=max(lengths), HQ=HQ, H=H, D=D, Dv=Dv, dtype=dtype,
                    seed=seed, **case)
    if swa:
        x.update(k_swa=random_like(x["k"], seed + 1), v_swa=random_like(x["v"], seed + 2))
    return x, lengths


# ------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("G", SWEEP, ids=[f"G{g}" for g in SWEEP])
@pytest.mark.parametrize("S", [1, 2, 5], ids=["S1", "S2", "S5"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_reference_float64(layout, S, G):
    x, lengths = cpu_case(G, F64, LENGTHS, S, seed_of("f64", layout, S, G), **SMALL)
    check_step(x, lengths, S, SMALL, F64, page_size=LAYOUTS[layout])


def test_more_heads_per_group_than_a_batch_of_rows():
    x, lengths = cpu_case(80, F64, LENGTHS, 2, seed_of("G80"), **SMALL)
    check_step(x, lengths, 2, SMALL, F64, page_size=64)


def test_oracle_given_indices_is_the_reference():
    """The fallback oracle of check_step (rows whose selection differs from the reference's,
    which CPU runs never hit) run with the reference's own blocks is the reference."""
    x, lengths = cpu_case(4, F64, LENGTHS, 2, 29, swa=True, **SMALL)
    step = build_step(x, lengths, 2, page_size=64, **SMALL)
    ref_o, ref_idx = decode(reference, step, SMALL)
    for b, L in enumerate(lengths):
        selection_by_score(ref_idx[b], x, b, L, 2, SMALL)
        assert_close(oracle_given_indices(x, b, L, 2, ref_idx[b], SMALL), ref_o[b], 1e-12,
                     f"sequence {b}")


@pytest.mark.parametrize("G", [1, 4, 16], ids=["G1", "G4", "G16"])
@pytest.mark.parametrize("layout", ["contiguous", "paged128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_name)
def test_matches_reference(dtype, layout, G):
    x, lengths = cpu_case(G, dtype, LENGTHS, 2, seed_of(dtype, layout, G), **SMALL)
    check_step(x, lengths, 2, SMALL, dtype, page_size=LAYOUTS[layout])


@pytest.mark.parametrize("layout", ["contiguous", "paged64"])
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16], ids=dtype_name)
def test_separate_window_caches(dtype, layout):
    """k_swa_cache / v_swa_cache: the window branch reads them, the selected branch k/v."""
    x, lengths = cpu_case(4, dtype, LENGTHS, 2, seed_of("swa", dtype, layout), swa=True, **SMALL)
    check_step(x, lengths, 2, SMALL, dtype, page_size=LAYOUTS[layout])


# The paper's hyper-parameters: more than n = 16 blocks of 64 from 1025 tokens on.
PAPER_LENGTHS = [1300, 1, 1025, 511, 513, 1100]


@pytest.mark.parametrize("dtype,layout,S", [(F64, "paged128", 1), (torch.float32, "contiguous", 3)],
                         ids=["float64-paged128-S1", "float32-contiguous-S3"])
def test_matches_reference_paper_sizes(dtype, layout, S):
    x, lengths = cpu_case(4, dtype, PAPER_LENGTHS, S, seed_of("paper", dtype, S))
    check_step(x, lengths, S, {}, dtype, page_size=LAYOUTS[layout])


def teacher_forced(x, lengths, S, case, dtype, **layout):
    """Decode rows against rows L-S .. L-1 of nsa_torch.nsa_attention on each whole prefix."""
    step = build_step(x, lengths, S, seed=seed_of(lengths, S, "tf"), **layout, **case)
    o, idx = decode(nsa_torch, step, case)
    for b, L in enumerate(lengths):
        p = prefix(x, b, L, case)
        o_t, idx_t = nsa_torch.nsa_attention(
            *(p[n] for n in ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_swa")),
            return_block_indices=True, **hyper(case, *HYPER_NSA))
        assert torch.equal(idx[b], idx_t[0, L - S:]), f"sequence {b} (length {L}): blocks differ"
        bound = 1e-12 if dtype == F64 else tol(dtype)
        assert_close(o[b], o_t[0, L - S:], bound, f"sequence {b} (length {L})")


@pytest.mark.parametrize("S", [1, 5], ids=["S1", "S5"])
@pytest.mark.parametrize("G", [1, 3, 16], ids=["G1", "G3", "G16"])
@pytest.mark.parametrize("layout", ["contiguous", "paged64"])
def test_teacher_forcing_float64(layout, G, S):
    """The strongest check: a step equals the training forward's rows on the whole prefix."""
    x, lengths = cpu_case(G, F64, LENGTHS, S, seed_of("tf", layout, G, S), **SMALL)
    teacher_forced(x, lengths, S, SMALL, F64, page_size=LAYOUTS[layout])


@pytest.mark.parametrize("dtype,case", [(torch.float32, SMALL), (F64, {})],
                         ids=["float32-small", "float64-paper"])
def test_teacher_forcing(dtype, case):
    lengths = LENGTHS if case else PAPER_LENGTHS
    x, lengths = cpu_case(4, dtype, lengths, 2, seed_of("tf", dtype, bool(case)), **case)
    teacher_forced(x, lengths, 2, case, dtype, page_size=128)


def test_strided_inputs():
    """q, gates and cache_seqlens as strided views, and a block table whose rows are a slice of
    a wider table: the same result as contiguous copies."""
    x, lengths = cpu_case(4, torch.float32, LENGTHS, 2, 17, **SMALL)
    step = build_step(x, lengths, 2, page_size=64, **SMALL)
    o, idx = decode(nsa_torch, step, SMALL)

    def strided(t):
        wide = torch.full(t.shape[:-1] + (2 * t.shape[-1] + 3,), math.nan, dtype=t.dtype)
        view = wide[..., 3:3 + t.shape[-1]] if t.dim() == 4 else wide[..., ::2][..., :t.shape[-1]]
        view.copy_(t)
        return view

    bt = step["block_table"]
    wide_bt = torch.full((bt.shape[0], bt.shape[1] + 5), -1, dtype=torch.int32)
    wide_bt[:, :bt.shape[1]] = bt
    lens = torch.zeros(2 * len(lengths), dtype=torch.int32)
    lens[::2] = step["cache_seqlens"]
    views = dict(step, q=strided(step["q"]), g_cmp=strided(step["g_cmp"]),
                 g_slc=strided(step["g_slc"]), g_swa=strided(step["g_swa"]),
                 cache_seqlens=lens[::2], block_table=wide_bt[:, :bt.shape[1]])
    assert not views["q"].is_contiguous() and not views["g_cmp"].is_contiguous()
    o2, idx2 = decode(nsa_torch, views, SMALL)
    assert torch.equal(o, o2) and torch.equal(idx, idx2)


def head_major_caches(step):
    """The step with its raw and compressed caches stored head-major ([B, H, T, C] memory) and
    passed as the same [B, T, H, C] views."""
    hm = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
    views = dict(step, **{n: hm(step[n]) for n in ("k_cache", "v_cache", "k_cmp_cache", "v_cmp_cache")})
    assert not views["k_cache"].is_contiguous() and views["k_cmp_cache"].stride(1) == views["k_cmp_cache"].shape[-1]
    return views


def test_head_major_caches():
    """Caches laid out head-major (each head's keys one run of memory): the same result."""
    x, lengths = cpu_case(4, torch.float32, LENGTHS, 2, 29, **SMALL)
    step = build_step(x, lengths, 2, **SMALL)
    o, idx = decode(nsa_torch, step, SMALL)
    o2, idx2 = decode(nsa_torch, head_major_caches(step), SMALL)
    assert torch.equal(o, o2) and torch.equal(idx, idx2)


def test_result_does_not_depend_on_threads():
    x, lengths = cpu_case(16, torch.float32, LENGTHS, 2, 23, **SMALL)
    step = build_step(x, lengths, 2, **SMALL)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode(nsa_torch, step, SMALL)
    finally:
        torch.set_num_threads(threads)
    many = decode(nsa_torch, step, SMALL)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_returns_o_only_by_default():
    x, lengths = cpu_case(2, torch.float32, [40, 7], 1, 5, **SMALL)
    step = build_step(x, lengths, 1, **SMALL)
    o = nsa_torch.decode_attention(*(step[n] for n in STEP_ARGS), **hyper(SMALL, *HYPER_NSA))
    assert torch.equal(o, decode(nsa_torch, step, SMALL)[0])


def test_empty_batch_and_no_new_tokens():
    for B, S, L in ((0, 1, []), (2, 0, [0, 5])):
        x = make_inputs(B=B, T=max(L, default=1), HQ=4, H=2, D=16, Dv=8, seed=3)
        o, idx = decode(nsa_torch, build_step(x, L, S, capacity=8), SMALL)
        assert o.shape == (B, S, 4, 8) and idx.shape == (B, S, 2, 4)


def test_cpu_calls_record_no_plan():
    from nsa_torch import _debug
    x, lengths = cpu_case(1, torch.float32, [9], 1, 4, **SMALL)
    with _debug.plans() as ran:
        decode(nsa_torch, build_step(x, lengths, 1, **SMALL), SMALL)
    assert list(ran) == []


# ------------------------------------------------------------------------------------ citizens
def op_args(step, case):
    h = hyper(case, *HYPER_NSA)
    scale = h.pop("scale") or step["q"].shape[-1] ** -0.5
    return (step["q"], step["k_cache"], step["v_cache"], step["k_swa_cache"], step["v_swa_cache"],
            step["k_cmp_cache"], step["v_cmp_cache"], step["g_cmp"], step["g_slc"], step["g_swa"],
            step["cache_seqlens"], step["block_table"], *(h[n] for n in (
                "block_size", "block_stride", "select_size", "num_selected", "num_initial",
                "num_local", "window_size")), scale)


@pytest.mark.parametrize("layout,swa", [("contiguous", False), ("paged64", True)])
def test_opcheck(layout, swa):
    x, lengths = cpu_case(4, torch.float32, [70, 1, 33], 2, 8, swa=swa, **SMALL)
    step = build_step(x, lengths, 2, page_size=LAYOUTS[layout], **SMALL)
    torch.library.opcheck(torch.ops.nsa.decode_attention.default, op_args(step, SMALL))


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) of nsa_torch.decode_attention: the eager results, for both
    layouts and new lengths without a host sync."""
    h = hyper(SMALL, *HYPER_NSA)

    def fn(step):
        return nsa_torch.decode_attention(*(step[n] for n in STEP_ARGS),
                                          **{n: step[n] for n in STEP_KWARGS},
                                          return_block_indices=True, **h)

    compiled = torch.compile(fn, fullgraph=True)
    x, lengths = cpu_case(4, torch.float32, LENGTHS, 2, 9, **SMALL)
    for page_size in (None, 64):
        for lens in (lengths, lengths[::-1]):
            step = build_step(x, lens, 2, page_size=page_size, capacity=400, **SMALL)
            o_c, idx_c = compiled(step)
            o_e, idx_e = fn(step)
            assert torch.equal(o_c, o_e) and torch.equal(idx_c, idx_e)


def test_autocast_runs_in_the_autocast_dtype():
    x, lengths = cpu_case(4, torch.float32, [40, 77], 1, 12, **SMALL)
    step = build_step(x, lengths, 1, **SMALL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = decode(nsa_torch, step, SMALL)[0]
    assert o.dtype == torch.bfloat16
    step16 = {n: (t.bfloat16() if torch.is_tensor(t) and t.is_floating_point() else t)
              for n, t in step.items()}
    assert torch.equal(o, decode(nsa_torch, step16, SMALL)[0])


# ------------------------------------------------------------------------------------ errors
B, S, HQ, H, D, DV, CAP = 2, 2, 4, 2, 16, 8, 128  # Nc(128) = 7 compressed tokens


def base(paged=False):
    """Valid arguments of the function and the op; each check breaks exactly one thing. Paged:
    a pool of 6 pages of 64 tokens, two pages per sequence (capacity 128)."""
    gen = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    rows = (6, 64) if paged else (B, CAP)
    a = dict(q=r(B, S, HQ, D), k_cache=r(*rows, H, D), v_cache=r(*rows, H, DV),
             k_swa_cache=None, v_swa_cache=None, k_cmp_cache=r(B, 8, H, D),
             v_cmp_cache=r(B, 8, H, DV), g_cmp=torch.rand(B, S, HQ), g_slc=torch.rand(B, S, HQ),
             g_swa=torch.rand(B, S, HQ), cache_seqlens=torch.tensor([2, 100], dtype=torch.int32),
             block_table=torch.tensor([[4, 1], [0, 5]], dtype=torch.int32) if paged else None)
    a.update(block_size=32, block_stride=16, select_size=32, num_selected=3, num_initial=1,
             num_local=1, window_size=16, scale=None)
    return a


def call_fn(a):
    return nsa_torch.decode_attention(
        *(a[n] for n in STEP_ARGS), **{n: a[n] for n in STEP_KWARGS},
        **{n: a[n] for n in HYPER_NSA})


def call_op(a):
    return torch.ops.nsa.decode_attention(*op_args(a, a))


CALLS = {"fn": call_fn, "op": call_op}
PREFIX = {"fn": "nsa_torch.decode_attention: ", "op": "nsa.decode_attention: "}


@dataclass
class Check:
    """`mutate(a)` breaks the arguments; the call raises `error` whose message, after the
    prefix, matches `py` (the function) or `cpp` (the op). `cpp_only`: a check of values that
    only the op sees, raised with its message through the function too."""
    name: str
    mutate: Callable
    error: type
    py: Optional[str]
    cpp: Optional[str]
    paged: bool = False
    cpp_only: bool = False


def setter(**values):
    def mutate(a):
        a.update({n: (v(a) if callable(v) else v) for n, v in values.items()})
    return mutate


def non_contiguous_last(x):
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


def three_kv_heads(a):
    for n in ("k_cache", "v_cache", "k_cmp_cache", "v_cmp_cache"):
        a[n] = torch.cat([a[n], a[n][:, :, :1]], 2)


def huge(rows, per_row, dim):
    """A cache of per_row tokens per row at no cost (zero strides but the last dim)."""
    return torch.zeros(1, 1, H, dim).expand(rows, per_row, H, dim)


def lengths(*values):
    return setter(cache_seqlens=torch.tensor(values, dtype=torch.int32))


def table(*rows):
    return setter(block_table=torch.tensor(rows, dtype=torch.int32))


CTG = r"\[B, capacity, H, D\]"
PGD = r"\[num_pages, page_size, H, D\]"
CHECKS = [
    # ---- q
    Check("q-3d", setter(q=lambda a: a["q"][..., 0]), ValueError,
          r"q must be \[B, S, HQ, D\], got float32 \[2, 2, 4\] on cpu",
          r"q must be a 4-D tensor \[B, S, HQ, D\], got float32 \[2, 2, 4\] on cpu"),
    Check("q-int", setter(q=lambda a: a["q"].to(torch.int32)), TypeError,
          r"q must be float32, float64, bfloat16 or float16, got int32",
          r"q must be float32, float64, bfloat16 or float16, got int32"),
    Check("q-strided-last-dim", setter(q=lambda a: non_contiguous_last(a["q"])), ValueError,
          r"q must have a contiguous last dim, got strides \[",
          r"q must have a contiguous last dim \(stride 1\), got strides \["),
    Check("q-more-tokens-than-capacity",
          setter(k_cache=lambda a: a["k_cache"][:, :1], v_cache=lambda a: a["v_cache"][:, :1]),
          ValueError,
          r"q must be \[B, S, HQ, D\] with at most capacity = 1 new tokens, got S = 2",
          r"q must be \[B, S, HQ, D\] with at most capacity = 1 new tokens, got S = 2"),
    # ---- raw caches
    Check("k_cache-3d", setter(k_cache=lambda a: a["k_cache"][..., 0]), ValueError,
          r"k_cache must be \[B, capacity, H, D\], got float32 \[2, 128, 2\] on cpu",
          r"k_cache must be a 4-D tensor \[B, capacity, H, D\], got float32 \[2, 128, 2\] on cpu"),
    Check("v_cache-3d-paged", setter(v_cache=lambda a: a["v_cache"][..., 0]), ValueError,
          r"v_cache must be \[num_pages, page_size, H, Dv\], got float32 \[6, 64, 2\] on cpu",
          r"v_cache must be a 4-D tensor \[num_pages, page_size, H, Dv\], got float32 "
          r"\[6, 64, 2\] on cpu", paged=True),
    Check("k_cache-batch", setter(k_cache=lambda a: a["k_cache"][:1]), ValueError,
          r"k_cache must be " + CTG + r" = \[2, 128, 2, 16\], got float32 \[1, 128, 2, 16\] on cpu",
          r"k_cache must be float32 " + CTG + r" = \[2, 128, 2, 16\], got float32 "
          r"\[1, 128, 2, 16\]"),
    Check("k_cache-head-dim", setter(k_cache=lambda a: a["k_cache"][..., :-1]), ValueError,
          r"k_cache must be " + CTG + r" = \[2, 128, 2, 16\], got float32 \[2, 128, 2, 15\] on cpu",
          r"k_cache must be float32 " + CTG + r" = \[2, 128, 2, 16\], got float32 "
          r"\[2, 128, 2, 15\]"),
    Check("k_cache-head-dim-paged", setter(k_cache=lambda a: a["k_cache"][..., :-1]), ValueError,
          r"k_cache must be " + PGD + r" = \[6, 64, 2, 16\], got float32 \[6, 64, 2, 15\] on cpu",
          r"k_cache must be float32 " + PGD + r" = \[6, 64, 2, 16\], got float32 "
          r"\[6, 64, 2, 15\]", paged=True),
    Check("v_cache-capacity", setter(v_cache=lambda a: a["v_cache"][:, :-1]), ValueError,
          r"v_cache must be \[B, capacity, H, Dv\] = \[2, 128, 2, \*\], got float32 "
          r"\[2, 127, 2, 8\] on cpu",
          r"v_cache must be float32 \[B, capacity, H, Dv\] = \[2, 128, 2, \*\], got float32 "
          r"\[2, 127, 2, 8\]"),
    Check("v_cache-page-size", setter(v_cache=lambda a: a["v_cache"][:, :32]), ValueError,
          r"v_cache must be \[num_pages, page_size, H, Dv\] = \[6, 64, 2, \*\], got float32 "
          r"\[6, 32, 2, 8\] on cpu",
          r"v_cache must be float32 \[num_pages, page_size, H, Dv\] = \[6, 64, 2, \*\], got "
          r"float32 \[6, 32, 2, 8\]", paged=True),
    Check("v_cache-heads", setter(v_cache=lambda a: a["v_cache"][:, :, :1]), ValueError,
          r"v_cache must be \[B, capacity, H, Dv\] = \[2, 128, 2, \*\], got float32 "
          r"\[2, 128, 1, 8\] on cpu",
          r"v_cache must be float32 \[B, capacity, H, Dv\] = \[2, 128, 2, \*\], got float32 "
          r"\[2, 128, 1, 8\]"),
    Check("k_cache-dtype", setter(k_cache=lambda a: a["k_cache"].double()), TypeError,
          r"k_cache must be float32 " + CTG + r" = \[2, 128, 2, 16\], got float64 "
          r"\[2, 128, 2, 16\] on cpu",
          r"k_cache must be float32 " + CTG + r" = \[2, 128, 2, 16\], got float64 "
          r"\[2, 128, 2, 16\]"),
    Check("v_cache-dtype", setter(v_cache=lambda a: a["v_cache"].half()), TypeError,
          r"v_cache must be float32 \[B, capacity, H, Dv\] = \[2, 128, 2, \*\], got float16",
          r"v_cache must be float32 \[B, capacity, H, Dv\] = \[2, 128, 2, \*\], got float16"),
    Check("k_cache-strided-last-dim", setter(k_cache=lambda a: non_contiguous_last(a["k_cache"])),
          ValueError, r"k_cache must have a contiguous last dim, got strides \[",
          r"k_cache must have a contiguous last dim \(stride 1\), got strides \["),
    Check("capacity-past-int32", setter(k_cache=huge(B, 2**31, D), v_cache=huge(B, 2**31, DV)),
          ValueError,
          r"the cache capacity must be at most 2\^31 - 1 tokens \(int32 cache_seqlens\), got "
          r"2147483648",
          r"the cache capacity must be at most 2\^31 - 1 tokens \(int32 cache_seqlens\), got "
          r"2147483648"),
    Check("capacity-past-int32-paged",
          setter(k_cache=huge(6, 2**26, D), v_cache=huge(6, 2**26, DV),
                 block_table=torch.zeros(B, 64, dtype=torch.int32)), ValueError,
          r"the cache capacity must be at most 2\^31 - 1 tokens \(int32 cache_seqlens\), got "
          r"max_pages \* page_size = 64 \* 67108864",
          r"the cache capacity must be at most 2\^31 - 1 tokens \(int32 cache_seqlens\), got "
          r"max_pages \* page_size = 64 \* 67108864", paged=True),
    Check("page-size-not-multiple-of-select-size",
          setter(k_cache=lambda a: a["k_cache"][:, :48], v_cache=lambda a: a["v_cache"][:, :48]),
          ValueError,
          r"k_cache must be a pool of pages of a multiple of select_size = 32 tokens \(a "
          r"selection block never straddles two pages\), got page_size = 48",
          r"k_cache must be a pool of pages of a multiple of select_size = 32 tokens \(a "
          r"selection block never straddles two pages\), got page_size = 48", paged=True),
    # ---- the window branch's caches
    Check("k_swa_cache-without-v", setter(k_swa_cache=lambda a: a["k_cache"].clone()), ValueError,
          r"v_swa_cache must be given with k_swa_cache \(the window branch's own keys and "
          r"values, or neither\), got None",
          r"v_swa_cache must be given with k_swa_cache \(the window branch's own keys and "
          r"values, or neither\), got None"),
    Check("v_swa_cache-without-k", setter(v_swa_cache=lambda a: a["v_cache"].clone()), ValueError,
          r"k_swa_cache must be given with v_swa_cache \(the window branch's own keys and "
          r"values, or neither\), got None",
          r"k_swa_cache must be given with v_swa_cache \(the window branch's own keys and "
          r"values, or neither\), got None"),
    Check("k_swa_cache-layout", setter(k_swa_cache=lambda a: a["k_cache"][:, :-1],
                                       v_swa_cache=lambda a: a["v_cache"]), ValueError,
          r"k_swa_cache must be " + CTG + r" = \[2, 128, 2, 16\], got float32 \[2, 127, 2, 16\]",
          r"k_swa_cache must be float32 " + CTG + r" = \[2, 128, 2, 16\], got float32 "
          r"\[2, 127, 2, 16\]"),
    Check("v_swa_cache-dtype", setter(k_swa_cache=lambda a: a["k_cache"],
                                      v_swa_cache=lambda a: a["v_cache"].double()), TypeError,
          r"v_swa_cache must be float32 \[num_pages, page_size, H, Dv\] = \[6, 64, 2, 8\], got "
          r"float64",
          r"v_swa_cache must be float32 \[num_pages, page_size, H, Dv\] = \[6, 64, 2, 8\], got "
          r"float64", paged=True),
    # ---- heads and head dims
    Check("hq-not-multiple-of-h", three_kv_heads, ValueError,
          r"the number of query heads HQ = 4 must be a multiple of the number of key/value "
          r"heads H = 3",
          r"the number of query heads HQ must be a multiple of the number of key/value heads "
          r"H = 3, got HQ = 4"),
    Check("zero-query-heads", setter(q=lambda a: a["q"][:, :, :0]), ValueError,
          r"the number of query heads HQ must be at least 1, got HQ = 0",
          r"the number of query heads HQ must be at least 1, got HQ = 0"),
    Check("zero-head-dim", lambda a: a.update(scale=1.0, **{n: a[n][..., :0] for n in (
        "q", "k_cache", "k_cmp_cache")}), ValueError,
          r"the head dims must be at least 1, got D = 0, Dv = 8",
          r"the head dims must be at least 1, got D = 0, Dv = 8"),
    # ---- compressed caches
    Check("k_cmp_cache-rows", setter(k_cmp_cache=lambda a: a["k_cmp_cache"][:, :6],
                                     v_cmp_cache=lambda a: a["v_cmp_cache"][:, :6]), ValueError,
          r"k_cmp_cache must be \[B, cmp_capacity, H, D\] with cmp_capacity >= Nc\(capacity\) = "
          r"7 compressed tokens for capacity = 128, got 6 rows",
          r"k_cmp_cache must be \[B, cmp_capacity, H, D\] with cmp_capacity >= Nc\(capacity\) = "
          r"7 compressed tokens for capacity = 128, got 6 rows"),
    Check("k_cmp_cache-heads", setter(k_cmp_cache=lambda a: a["k_cmp_cache"][:, :, :1]),
          ValueError,
          r"k_cmp_cache must be \[B, cmp_capacity, H, D\] = \[2, \*, 2, 16\], got float32 "
          r"\[2, 8, 1, 16\]",
          r"k_cmp_cache must be float32 \[B, cmp_capacity, H, D\] = \[2, \*, 2, 16\], got "
          r"float32 \[2, 8, 1, 16\]"),
    Check("v_cmp_cache-rows", setter(v_cmp_cache=lambda a: a["v_cmp_cache"][:, :7]), ValueError,
          r"v_cmp_cache must be \[B, cmp_capacity, H, Dv\] = \[2, 8, 2, 8\], got float32 "
          r"\[2, 7, 2, 8\]",
          r"v_cmp_cache must be float32 \[B, cmp_capacity, H, Dv\] = \[2, 8, 2, 8\], got "
          r"float32 \[2, 7, 2, 8\]"),
    Check("v_cmp_cache-head-dim", setter(v_cmp_cache=lambda a: a["v_cmp_cache"][..., :1]),
          ValueError,
          r"v_cmp_cache must be \[B, cmp_capacity, H, Dv\] = \[2, 8, 2, 8\], got float32 "
          r"\[2, 8, 2, 1\]",
          r"v_cmp_cache must be float32 \[B, cmp_capacity, H, Dv\] = \[2, 8, 2, 8\], got "
          r"float32 \[2, 8, 2, 1\]"),
    # ---- gates
    Check("gate-shape", setter(g_cmp=lambda a: a["g_cmp"][..., :3]), ValueError,
          r"g_cmp must be \[B, S, HQ\] = \[2, 2, 4\], got float32 \[2, 2, 3\]",
          r"g_cmp must be float32 \[B, S, HQ\] = \[2, 2, 4\], got float32 \[2, 2, 3\]"),
    Check("gate-dtype", setter(g_slc=lambda a: a["g_slc"].double()), TypeError,
          r"g_slc must be float32 \[B, S, HQ\] = \[2, 2, 4\], got float64 \[2, 2, 4\]",
          r"g_slc must be float32 \[B, S, HQ\] = \[2, 2, 4\], got float64 \[2, 2, 4\]"),
    # ---- cache_seqlens and block_table
    Check("cache_seqlens-int64", setter(cache_seqlens=lambda a: a["cache_seqlens"].long()),
          TypeError, r"cache_seqlens must be int32 \[B\] = \[2\], got int64 \[2\]",
          r"cache_seqlens must be int32 \[B\] = \[2\], got int64 \[2\]"),
    Check("cache_seqlens-shape", lengths(2, 100, 3), ValueError,
          r"cache_seqlens must be \[B\] = \[2\], got int32 \[3\]",
          r"cache_seqlens must be int32 \[B\] = \[2\], got int32 \[3\]"),
    Check("block_table-int64", setter(block_table=lambda a: a["block_table"].long()), TypeError,
          r"block_table must be int32 \[B, max_pages\] = \[2, \*\], got int64 \[2, 2\]",
          r"block_table must be int32 \[B, max_pages\] = \[2, \*\], got int64 \[2, 2\]",
          paged=True),
    Check("block_table-1d", setter(block_table=lambda a: a["block_table"][0]), ValueError,
          r"block_table must be \[B, max_pages\] = \[2, \*\], got int32 \[2\]",
          r"block_table must be int32 \[B, max_pages\], got int32 \[2\]", paged=True),
    Check("block_table-batch", setter(block_table=lambda a: a["block_table"][:1]), ValueError,
          r"block_table must be \[B, max_pages\] = \[2, \*\], got int32 \[1, 2\]",
          r"block_table must be int32 \[B, max_pages\] = \[2, \*\], got int32 \[1, 2\]",
          paged=True),
    Check("block_table-strided-last-dim",
          setter(block_table=lambda a: non_contiguous_last(a["block_table"])), ValueError,
          r"block_table must have a contiguous last dim, got strides \[",
          r"block_table must have a contiguous last dim \(stride 1\), got strides \[", paged=True),
    # ---- hyper-parameters
    Check("block_size", setter(block_size=40), ValueError,
          r"block_size must be a multiple of block_stride \(16\), got 40",
          r"block_size must be a positive multiple of block_stride \(16\), got 40"),
    Check("block_stride", setter(block_stride=0), ValueError,
          r"block_stride must be at least 1, got 0", r"block_stride must be at least 1, got 0"),
    Check("select_size", setter(select_size=40), ValueError,
          r"select_size must be a multiple of block_stride \(16\), got 40",
          r"select_size must be a positive multiple of block_stride \(16\), got 40"),
    Check("select_size-past-int32", setter(select_size=2**32 + 32), ValueError,
          r"select_size must be at most 1073741824, got 4294967328",
          r"select_size must be at most 1073741824, got 4294967328"),
    Check("num_selected", setter(num_selected=1), ValueError,
          r"num_selected must be at least num_initial \+ num_local = 2, got 1",
          r"num_selected must be at least 1 and at least num_initial \+ num_local = 2, got 1"),
    Check("num_selected-huge", setter(num_selected=10**9), ValueError,
          r"num_selected must be at most 65536, got 1000000000",
          r"num_selected must be at most 65536, got 1000000000"),
    Check("num_initial", setter(num_initial=-1), ValueError,
          r"num_initial must be in \[0, num_selected\], got -1",
          r"num_initial must be in \[0, num_selected\], got -1"),
    Check("num_local", setter(num_local=4), ValueError,
          r"num_local must be in \[0, num_selected\], got 4",
          r"num_local must be in \[0, num_selected\], got 4"),
    Check("window_size", setter(window_size=0), ValueError,
          r"window_size must be at least 1, got 0", r"window_size must be at least 1, got 0"),
    Check("scale-nan", setter(scale=math.nan), ValueError,
          r"scale must be a finite number, got nan", r"scale must be a finite number, got -?nan"),
    Check("window_size-bool", setter(window_size=True), TypeError,
          r"window_size must be an int, got bool", None),
    Check("scale-str", setter(scale="0.5"), TypeError, r"scale must be a float or None, got str",
          None),
    # ---- devices (meta stands for another device than q's: the op would run its fake kernel)
    Check("k_cache-device", setter(k_cache=lambda a: a["k_cache"].to("meta")), ValueError,
          r"k_cache must be on cpu \(the device of q\), got meta", None),
    Check("k_cmp_cache-device", setter(k_cmp_cache=lambda a: a["k_cmp_cache"].to("meta")),
          ValueError, r"k_cmp_cache must be on cpu \(the device of q\), got meta", None),
    Check("cache_seqlens-device", setter(cache_seqlens=lambda a: a["cache_seqlens"].to("meta")),
          ValueError, r"cache_seqlens must be on cpu \(the device of q\), got meta", None),
    Check("block_table-device", setter(block_table=lambda a: a["block_table"].to("meta")),
          ValueError, r"block_table must be on cpu \(the device of q\), got meta", None,
          paged=True),
    # ---- values, read by the CPU kernel (on CUDA: NaN rows, test_cuda_bad_lengths_give_nan)
    Check("length-past-capacity", lengths(2, 129), ValueError, None,
          r"cache_seqlens\[1\] must be in \[S, capacity\] = \[2, 128\], got 129", cpp_only=True),
    Check("length-below-new-tokens", lengths(1, 100), ValueError, None,
          r"cache_seqlens\[0\] must be in \[S, capacity\] = \[2, 128\], got 1", cpp_only=True),
    Check("length-negative", lengths(2, -5), ValueError, None,
          r"cache_seqlens\[1\] must be in \[S, capacity\] = \[2, 128\], got -5", cpp_only=True),
    Check("length-past-capacity-paged", lengths(129, 100), ValueError, None,
          r"cache_seqlens\[0\] must be in \[S, capacity\] = \[2, 128\], got 129", paged=True,
          cpp_only=True),
    Check("block_table-past-the-pool", table([4, 1], [0, 6]), ValueError, None,
          r"block_table\[1, 1\] must be a page of the pool, in \[0, 6\), for sequence 1 "
          r"\(cache_seqlens\[1\] = 100 uses its pages 0 \.\. 1\), got 6", paged=True,
          cpp_only=True),
    Check("block_table-negative", table([-1, 1], [0, 5]), ValueError, None,
          r"block_table\[0, 0\] must be a page of the pool, in \[0, 6\), for sequence 0 "
          r"\(cache_seqlens\[0\] = 2 uses its pages 0 \.\. 0\), got -1", paged=True,
          cpp_only=True),
]


def error_cases():
    for c in CHECKS:
        for target in ("fn", "op"):
            pattern = c.cpp if target == "op" or c.cpp_only else c.py
            if pattern is not None:
                yield pytest.param(c, target, id=f"{c.name}-{target}")


@pytest.mark.parametrize("check,target", list(error_cases()))
def test_check(check, target):
    a = base(check.paged)
    check.mutate(a)
    prefix = PREFIX["op" if check.cpp_only else target]
    pattern = check.cpp if target == "op" or check.cpp_only else check.py
    with pytest.raises(check.error, match=re.escape(prefix) + pattern):
        CALLS[target](a)


def test_every_check_of_both_sides_is_exercised_on_both_paths():
    for c in CHECKS:
        assert c.py or c.cpp
        if c.cpp and not c.cpp_only:
            assert c.py, f"{c.name}: the function must check it too (torch.compile traces it)"


def test_valid_base_arguments_pass():
    """The unbroken arguments are accepted, also with a block table entry outside the pool
    where the sequence has no page (it is never read)."""
    for paged in (False, True):
        for call in CALLS.values():
            call(base(paged))
    a = base(True)
    a["block_table"][0, 1] = 99  # sequence 0 holds 2 tokens: page 1 is not its
    call_op(a)


# CUDA arguments on fake tensors (no GPU needed): the function's checks run before any op.
CUDA_HEAD_DIMS = getattr(nsa_torch._C, "CUDA_HEAD_DIMS", ())


def on_cuda_fake(a, dtype, D, Dv):
    out = dict(a)
    for n, t in a.items():
        if torch.is_tensor(t):
            shape = list(t.shape)
            if n in ("q", "k_cache", "k_cmp_cache"):
                shape[-1] = D
            elif n in ("v_cache", "v_cmp_cache"):
                shape[-1] = Dv
            out[n] = torch.empty(shape, dtype=dtype if t.is_floating_point() else t.dtype,
                                 device="cuda")
    return out


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_cuda_float32_is_rejected(paged):
    with FakeTensorMode():
        a = on_cuda_fake(base(paged), torch.float32, 64, 64)
        with pytest.raises(TypeError, match=r"nsa_torch.decode_attention: .*bfloat16 or float16"):
            call_fn(a)


@pytest.mark.skipif(not CUDA_HEAD_DIMS, reason="this build of nsa_torch has no CUDA kernels")
def test_cuda_unsupported_head_dims_are_rejected():
    with FakeTensorMode():
        a = on_cuda_fake(base(), torch.bfloat16, 80, 80)
        with pytest.raises(ValueError, match=r"nsa_torch.decode_attention: head dims \(D, Dv\) "
                                             r"must be one of .* on CUDA, got \(80, 80\)"):
            call_fn(a)
        for D, Dv in CUDA_HEAD_DIMS:
            for paged in (False, True):
                call_fn(on_cuda_fake(base(paged), torch.bfloat16, D, Dv))


@pytest.mark.skipif(bool(CUDA_HEAD_DIMS), reason="this build of nsa_torch has CUDA kernels")
def test_cuda_inputs_need_a_cuda_build():
    with FakeTensorMode():
        a = on_cuda_fake(base(), torch.bfloat16, 64, 64)
        with pytest.raises(NotImplementedError, match=r"nsa_torch.decode_attention: this build of "
                                                      r"nsa_torch has no CUDA kernels"):
            call_fn(a)


# ==================================================================================== CUDA
# bfloat16/float16 on every G in {1, 4, 16} and every compiled (D, Dv); three sequences of
# different lengths up to ~5000 in caches of 8192 tokens, the paper's hyper-parameters.
CUDA_LENGTHS = [4999, 1, 1537]
CUDA_CAPACITY = 8192
CUDA_GROUPS = {1: (2, 2), 4: (8, 2), 16: (16, 1)}  # G -> (HQ, H)


def cuda_step_inputs(G, D, Dv, dtype, seed, lengths=CUDA_LENGTHS, **case):
    HQ, H = CUDA_GROUPS[G]
    return gpu_inputs(B=len(lengths), T=max(lengths), HQ=HQ, H=H, D=D, Dv=Dv, dtype=dtype,
                      seed=seed, **case)


def cuda_params():
    return [pytest.param(dtype, G, D, Dv, id=f"{dtype_name(dtype)}-G{G}-d{D}v{Dv}")
            for dtype in (torch.bfloat16, torch.float16) for G in CUDA_GROUPS
            for D, Dv in CUDA_HEAD_DIMS]


@pytest.mark.cuda
@pytest.mark.parametrize("layout,S", [("contiguous", 1), ("paged64", 2), ("paged128", 3)])
@pytest.mark.parametrize("dtype,G,D,Dv", cuda_params())
def test_cuda_matches_reference(dtype, G, D, Dv, layout, S):
    x = cuda_step_inputs(G, D, Dv, dtype, seed_of("cuda", dtype, G, D, Dv, layout))
    check_step(x, [max(L, S) for L in CUDA_LENGTHS], S, {}, dtype, page_size=LAYOUTS[layout],
               capacity=CUDA_CAPACITY)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_name)
def test_cuda_small_blocks_and_edges(dtype):
    """The CPU tests' edge lengths and small blocks, separate window caches, G = 4."""
    x = cuda_step_inputs(4, 64, 128, dtype, seed_of("cuda-edges", dtype), lengths=LENGTHS,
                         **SMALL)
    x.update(k_swa=rand_like(x["k"], 5), v_swa=rand_like(x["v"], 6))
    for S in (1, 5):
        lens = [max(L, S) for L in LENGTHS]
        check_step(x, lens, S, SMALL, dtype, page_size=64, capacity=1024)


# Forced splits of the three split kernels: one thread block each; several, each selection split
# with a full list of n (and the window kernel launched before the scan); the selection's most
# (64: short lists, empty splits for the short sequences, a merge in rounds); few, long splits of
# a scan with its keys first (16 key tiles each at 32k).
SPLITS = {"one": dict(cmp_splits=1, slc_splits=1, sel_splits=1, scan_order="together"),
          "many": dict(cmp_splits=7, slc_splits=5, sel_splits=2, window_order="before_scan",
                       scan_order="keys_first"),
          "sel64": dict(cmp_splits=3, slc_splits=2, sel_splits=64, dep_wait="grid", scan_order="together"),
          "keys": dict(cmp_splits=2, slc_splits=3, sel_splits=3, window_order="after_select",
                       scan_order="keys_first")}
# n = 16 of 79 candidate blocks at 4999 tokens; n = 128 of 16-token blocks (312 candidates);
# and 1250 candidates in a 32k cache (a selection split scores them in rounds). (Not "long":
# gpu_check.sh's test selection leaves out names holding it.)
SPLIT_CASES = {"n16": ({}, CUDA_LENGTHS, CUDA_CAPACITY),
               "n128": (dict(select_size=16, num_selected=128, num_initial=3, num_local=5), CUDA_LENGTHS,
                        CUDA_CAPACITY),
               "rounds": (dict(select_size=16, num_selected=24), [20000, 1, 1537], 32768)}


@pytest.mark.cuda
@pytest.mark.parametrize("splits", list(SPLITS))
@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_cuda_forced_splits_match_reference(name, splits):
    from nsa_torch import _debug
    case, lengths, capacity = SPLIT_CASES[name]
    x = cuda_step_inputs(4, 128, 128, torch.bfloat16, seed_of("cuda-splits", name), lengths=lengths, **case)
    with _debug.force(**SPLITS[splits]), _debug.plans() as ran:
        check_step(x, [max(L, 2) for L in lengths], 2, case, torch.bfloat16, page_size=64, capacity=capacity)
    got = [p for p in ran if p["op"] == "nsa.decode_attention"][0]
    assert all(got[k] == v for k, v in SPLITS[splits].items()), got


@pytest.mark.cuda
@pytest.mark.parametrize("S", [1, 2], ids=["rows16", "rows32"])
@pytest.mark.parametrize("D,Dv", CUDA_HEAD_DIMS)
def test_cuda_scan_orders_agree_bit_for_bit(D, Dv, S):
    """The scan with its keys first (the probabilities kept as the products' operands, then the
    value tiles) adds up what the scan with each key tile's values does, in the same order: the
    same outputs and blocks, bit for bit, at one m-tile (16 rows) and four (32), in a step of
    sequences of different lengths and at several splits of the scan."""
    from nsa_torch import _debug
    x = cuda_step_inputs(16, D, Dv, torch.bfloat16, seed_of("cuda-orders", D, Dv, S))
    step = build_step(x, [max(L, S) for L in CUDA_LENGTHS], S, capacity=CUDA_CAPACITY)
    for splits in (2, 3):  # (one split of 8 tiles at D = 256 and 32 rows passes 227 KB)
        with _debug.force(scan_order="together", window_order="after_scan", cmp_splits=splits):
            o, idx = decode(nsa_torch, step, {})
        with _debug.force(scan_order="keys_first", window_order="after_select", cmp_splits=splits), \
                _debug.plans() as ran:
            o2, idx2 = decode(nsa_torch, step, {})
        plan = [p for p in ran if p["op"] == "nsa.decode_attention"][0]
        assert plan["scan_order"] == "keys_first" and plan["cmp_splits"] == splits
        assert torch.equal(o, o2) and torch.equal(idx, idx2), splits


@pytest.mark.cuda
def test_cuda_head_major_caches():
    """Head-major caches (a key tile of one head is contiguous, as bench_decode.py --head-major
    times them): bit for bit the contiguous caches' result. G = 4: two KV heads, so that
    head-major memory is not the contiguous one."""
    x = cuda_step_inputs(4, 128, 128, torch.bfloat16, seed_of("cuda-heads"))
    step = build_step(x, [max(L, 1) for L in CUDA_LENGTHS], 1, capacity=CUDA_CAPACITY)
    o, idx = decode(nsa_torch, step, {})
    o2, idx2 = decode(nsa_torch, head_major_caches(step), {})
    assert torch.equal(o, o2) and torch.equal(idx, idx2)


# The window kernel's launch orders, each with a scan order.
ORDERS = [("after_scan", "together"), ("before_scan", "together"), ("after_select", "keys_first"),
          ("after_scan", "keys_first")]


@pytest.mark.cuda
@pytest.mark.parametrize("wait", ["grid", "head"])
@pytest.mark.parametrize("order,scan", ORDERS)
def test_cuda_decode_trace_orders_the_kernels(order, scan, wait):
    """nsa_torch._debug.decode_trace: the same result with the trace on; every thread block of the
    window, scan, selection and sparse kernels stores its start; no block ends before it starts;
    each kernel gets past its wait for the one launched before it only once every block of that
    one has ended (a dependent launch's wait returns when the previous grid has completed; the
    second of the scan and window kernels ends only then). The selection, the sparse kernel and
    the combine get past their waits only once the kernel before them has ended (dep_wait =
    grid), or (head) once the blocks of their own (sequence, KV head) have: the selection's of the
    scan (their key tiles, with the keys first), the sparse kernel's of the selection (ranked),
    the combine's first of the scan and window kernels, its second of the sparse kernel."""
    from nsa_torch import _debug
    x = cuda_step_inputs(4, 128, 128, torch.bfloat16, seed_of("cuda-trace"))
    lengths = [max(L, 1) for L in CUDA_LENGTHS]
    step = build_step(x, lengths, 1, capacity=CUDA_CAPACITY)
    o, idx = decode(nsa_torch, step, {})
    with _debug.force(window_order=order, scan_order=scan, dep_wait=wait), _debug.decode_trace(4096) as buf, \
            _debug.plans() as ran:
        o2, idx2 = decode(nsa_torch, step, {})
        torch.cuda.synchronize()
    assert torch.equal(o, o2) and torch.equal(idx, idx2)
    plan = [p for p in ran if p["op"] == "nsa.decode_attention"][0]
    assert plan["window_order"] == order and plan["dep_wait"] == wait and plan["scan_order"] == scan
    B, H = len(lengths), 2
    t = buf.cpu()
    ev = {name: i for i, name in enumerate(_debug.TRACE_EVENTS)}
    kernels = len(_debug.TRACE_KERNELS)
    started = [int((t[k, :, ev["start"]] != 0).sum()) for k in range(kernels)]
    assert started[:4] == [plan["slc_splits"] * H * B, plan["cmp_splits"] * H * B, plan["sel_splits"] * H * B,
                           plan["slc_splits"] * H * B]
    assert started[4] > 0
    for k in range(kernels):
        start, end = t[k, :, ev["start"]], t[k, :, ev["end"]]
        ended = end != 0
        assert ended.any() and bool((end[ended] >= start[ended]).all()), _debug.TRACE_KERNELS[k]
    names = list(_debug.TRACE_KERNELS)
    launched = {"before_scan": names, "after_scan": ["scan", "window"] + names[2:],
                "after_select": ["scan", "select", "window", "sparse", "combine"]}[order]
    for i in range(1, kernels):
        if wait == "head" and launched[i] in ("select", "sparse", "combine"):
            continue
        k, prev = names.index(launched[i]), names.index(launched[i - 1])
        past = t[k, :, ev["end" if i == 1 else "waited"]]
        past = past[past != 0]
        prev_end = t[prev, :, ev["end"]][t[prev, :, ev["end"]] != 0]
        assert int(past.min()) >= int(prev_end.max()), launched[i]
    if wait == "head":
        # S = 1 and G = 4: one row block, so that block i of each kernel's grid belongs to the
        # (sequence, KV head) i // (its splits).
        def per_head(kernel, event, splits):
            return t[names.index(kernel), :splits * H * B, ev[event]].reshape(B * H, splits)
        scan_end = per_head("scan", "end", plan["cmp_splits"]).max(dim=1).values
        keys_done = scan_end
        if scan == "keys_first":  # a block with key tiles stamps their end before its own
            keys = per_head("scan", "step2", plan["cmp_splits"])
            ends = per_head("scan", "end", plan["cmp_splits"])
            stamped = keys > 0
            assert bool(stamped.any()) and bool((keys[stamped] <= ends[stamped]).all())
            keys_done = keys.max(dim=1).values
        ranked = per_head("select", "step2", plan["sel_splits"]).max(dim=1).values
        sel_waited = per_head("select", "waited", plan["sel_splits"]).min(dim=1).values
        slc_waited = per_head("sparse", "waited", plan["slc_splits"]).min(dim=1).values
        assert bool((sel_waited >= keys_done).all()) and bool((slc_waited >= ranked).all())
        # The combine: rows (b, query head) in order, 8 // wpr per thread block (combine.cuh).
        # Past its first wait (step1) once its heads' scan and window blocks are done, past its
        # second (waited) once their sparse blocks are.
        early = torch.stack([scan_end, per_head("window", "end", plan["slc_splits"]).max(dim=1).values]).max(dim=0).values
        late = per_head("sparse", "end", plan["slc_splits"]).max(dim=1).values
        HQ, G, per_block = 4 * H, 4, 8 // plan["combine_wpr"]
        step1 = t[names.index("combine"), :, ev["step1"]]
        waited = t[names.index("combine"), :, ev["waited"]]
        for blk in range((B * HQ + per_block - 1) // per_block):
            rows = range(blk * per_block, min(B * HQ, (blk + 1) * per_block))
            heads = {r // HQ * H + r % HQ // G for r in rows}
            assert int(step1[blk]) >= max(int(early[bh]) for bh in heads), blk
            assert int(waited[blk]) >= max(int(late[bh]) for bh in heads), blk
            assert int(waited[blk]) >= int(step1[blk]), blk


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_name)
def test_cuda_teacher_forcing(dtype):
    """A CUDA step against rows L-S .. L-1 of the CUDA training forward on each prefix: the same
    blocks (but for near-ties) and outputs within the dtype's tolerance of each other."""
    x = cuda_step_inputs(16, 128, 128, dtype, seed_of("cuda-tf", dtype))
    S = 2
    lengths = [max(L, S) for L in CUDA_LENGTHS]
    step = build_step(x, lengths, S, page_size=64, capacity=CUDA_CAPACITY, seed=4)
    o, idx = decode(nsa_torch, step, {})
    x64 = to64(x)
    for b, L in enumerate(lengths):
        p = prefix(x, b, L, {})
        o_t, idx_t = nsa_torch.nsa_attention(
            *(p[n] for n in ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_swa")),
            return_block_indices=True)
        rows = (idx[b] == idx_t[0, L - S:]).all(-1).all(-1)  # [S]
        if not rows.all():  # blocks that tie within rounding
            selection_by_score(idx[b], x64, b, L, S, {})
        assert_close(o[b][rows], o_t[0, L - S:][rows], tol(dtype), f"sequence {b}")


@pytest.mark.cuda
@pytest.mark.parametrize("page_size", [None, 128], ids=["contiguous", "paged128"])
def test_cuda_graph_capture_and_replay(page_size):
    """One decode_attention call captured in a CUDA graph; new cache contents, lengths and block
    table written in place; the replay equals an eager call on the new state."""
    dtype = torch.bfloat16
    x1 = cuda_step_inputs(4, 128, 128, dtype, 31)
    x2 = cuda_step_inputs(4, 128, 128, dtype, 32)
    step = build_step(x1, CUDA_LENGTHS, 1, page_size=page_size, capacity=CUDA_CAPACITY, seed=1)
    new = build_step(x2, [3000, 4999, 2], 1, page_size=page_size, capacity=CUDA_CAPACITY,
                     seed=2)
    if page_size is not None:  # the pools of both states must have one size to copy in place
        pages = max(step["k_cache"].shape[0], new["k_cache"].shape[0])
        for s in (step, new):
            for n in ("k_cache", "v_cache"):
                s[n] = torch.cat([s[n], s[n].new_full((pages - s[n].shape[0],) + s[n].shape[1:],
                                                      math.nan)])

    def run():
        return decode(nsa_torch, step, {})

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, idx = run()
    graph.replay()
    old = o.clone(), idx.clone()
    o_e, idx_e = run()
    assert torch.equal(old[0], o_e) and torch.equal(old[1], idx_e)
    for n, t in new.items():
        if t is not None:
            step[n].copy_(t)
    graph.replay()
    o_e, idx_e = run()
    assert torch.equal(idx, idx_e) and torch.equal(o, o_e)
    assert not torch.equal(o, old[0]), "the replay did not see the new state"


@pytest.mark.cuda
@pytest.mark.parametrize("sel_splits", [None, 5], ids=["planned", "sel5"])
def test_cuda_bad_lengths_give_nan(sel_splits):
    """A length outside [S, capacity] or a used page outside the pool: that sequence's rows are
    NaN, the others exact, no error (no host sync), nothing read outside the caches. With five
    selection splits the bad page lies in a split other than the one that merges."""
    from nsa_torch import _debug
    dtype = torch.bfloat16
    lengths = [100, 300, 200, 700, 64]
    x = cuda_step_inputs(4, 64, 64, dtype, 41, lengths=lengths, **SMALL)
    S = 2
    step = build_step(x, lengths, S, page_size=64, capacity=1024, seed=5, **SMALL)
    step["cache_seqlens"][1] = 1025       # past capacity
    step["cache_seqlens"][2] = 1          # fewer than the S new tokens
    step["block_table"][3, 5] = step["k_cache"].shape[0]  # page 5 of 11 used: past the pool
    step["block_table"][4, 0] = -1
    with _debug.force(sel_splits=sel_splits):
        o, _ = decode(nsa_torch, step, SMALL)
    torch.cuda.synchronize()
    for b in (1, 2, 3, 4):
        assert torch.isnan(o[b]).all(), f"sequence {b}: not NaN"
    good = [0]  # the raw caches are page pools: only the per-sequence tensors are indexed
    batched = ("q", "k_cmp_cache", "v_cmp_cache", "g_cmp", "g_slc", "g_swa", "cache_seqlens",
               "block_table")
    ref = {n: t[good] if n in batched else t for n, t in step.items()}
    ref_o, _ = decode(reference, to64(ref), SMALL)
    assert_close(o[good], ref_o, tol(dtype), "the valid sequence")


@pytest.mark.cuda
def test_cuda_plan_is_recorded_and_fixed_by_capacity():
    from nsa_torch import _debug
    x = cuda_step_inputs(16, 128, 128, torch.bfloat16, 51)
    plans = []
    for lengths in (CUDA_LENGTHS, [1, 2, 3]):
        step = build_step(x, lengths, 1, page_size=64, capacity=CUDA_CAPACITY, seed=6)
        with _debug.plans() as ran:
            decode(nsa_torch, step, {})
        ran = [p for p in ran if p["op"] == "nsa.decode_attention"]
        assert len(ran) == 1, ran
        assert ran[0]["cmp_splits"] >= 1 and ran[0]["slc_splits"] >= 1, ran[0]
        plans.append(ran[0])
    assert plans[0] == plans[1], "the plan must not depend on the lengths (graph capture)"


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    x = cuda_step_inputs(4, 64, 128, torch.bfloat16, 61, lengths=[700, 3, 129], **SMALL)
    step = build_step(x, [700, 3, 129], 2, page_size=64, capacity=1024, seed=7, **SMALL)
    torch.library.opcheck(torch.ops.nsa.decode_attention.default, op_args(step, SMALL))
    h = hyper(SMALL, *HYPER_NSA)

    def fn(s):
        return nsa_torch.decode_attention(*(s[n] for n in STEP_ARGS),
                                          **{n: s[n] for n in STEP_KWARGS},
                                          return_block_indices=True, **h)

    o_c, idx_c = torch.compile(fn, fullgraph=True)(step)
    o_e, idx_e = fn(step)
    assert torch.equal(o_c, o_e) and torch.equal(idx_c, idx_e)


@pytest.mark.cuda
def test_cuda_argument_errors():
    """float32 on CUDA, a cache on another device than q, and a cache whose rows are not 16-byte
    aligned (the op reads caches in place: it never copies one): errors naming the op."""
    x = cuda_step_inputs(4, 64, 64, torch.bfloat16, 71, lengths=[70, 5], **SMALL)
    step = build_step(x, [70, 5], 1, capacity=128, seed=8, **SMALL)
    args = list(op_args(step, SMALL))
    f32 = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    with pytest.raises(TypeError, match=r"nsa.decode_attention: q must be bfloat16 or float16"):
        torch.ops.nsa.decode_attention(*f32)
    cpu_lens = list(args)
    cpu_lens[10] = args[10].cpu()
    with pytest.raises(ValueError, match=r"nsa.decode_attention: cache_seqlens must be on cuda:0 "
                                         r"\(the device of q\), got cpu"):
        torch.ops.nsa.decode_attention(*cpu_lens)
    k = args[1]
    wide = k.new_zeros(k.shape[:-1] + (k.shape[-1] + 1,))
    wide[..., :-1] = k
    unaligned = list(args)
    unaligned[1] = wide[..., :-1]
    with pytest.raises(ValueError, match=r"nsa.decode_attention: k_cache must be 16-byte aligned "
                                         r"on CUDA"):
        torch.ops.nsa.decode_attention(*unaligned)
