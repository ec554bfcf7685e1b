"""Every argument check, proven through the public functions (Python messages,
"nsa_torch.<fn>: ...") and through torch.ops.nsa.* directly (C++ messages, "nsa.<family>: ...").

Checks of tensor *values* (cu_seqlens contents, packed compressed-row counts, block index values)
live in the C++ ops only, since reading values would need a host sync in Python: through the
public functions they raise the C++ message of the first op that sees them.
"""
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import nsa_torch
from helpers import cu_seqlens_of, make_inputs

# ------------------------------------------------------------------------------------ calls
B, T, HQ, H, D, DV = 2, 40, 4, 2, 16, 8  # l = 32, d = 16: Nc(40) = 1; l' = 64: one block


def base(varlen=False):
    """Valid arguments of every function and op; each check breaks exactly one thing."""
    if varlen:  # two packed sequences of 40 tokens: 2 compressed rows, 2 blocks of 32
        a = make_inputs(lengths=[40, 40], HQ=HQ, H=H, D=D, Dv=DV, seed=41)
        a.update(select_size=32)
    else:
        a = make_inputs(B=B, T=T, HQ=HQ, H=H, D=D, Dv=DV, seed=41)
        a.update(select_size=64)
    b, t = a["q"].shape[:2]
    a.update(block_size=32, block_stride=16, num_selected=3, num_initial=1, num_local=2,
             window_size=16, scale=None)
    a["lse"] = torch.randn(b, t, HQ)
    a["dlse"] = torch.randn(b, t, HQ)
    a["o"] = torch.randn(b, t, HQ, DV)
    a["dout"] = torch.randn(b, t, HQ, DV)
    a["block_indices"] = torch.tensor([0, -1, -1], dtype=torch.int32).expand(b, t, H, 3).clone()
    return a


def op_scale(a):
    return a["scale"] if a["scale"] is not None else a["q"].shape[-1] ** -0.5


def kw(a, *names):
    return {n: a[n] for n in names}


CMP_H = ("block_size", "block_stride")
SEL_H = ("block_size", "block_stride", "select_size", "num_selected", "num_initial", "num_local")
NSA_H = SEL_H + ("window_size",)
ops = torch.ops.nsa if nsa_torch._C is not None else None

CALLS = {
    "fn:compressed_attention": lambda a: nsa_torch.compressed_attention(
        a["q"], a["k_cmp"], a["v_cmp"], **kw(a, *CMP_H, "scale", "cu_seqlens")),
    "fn:select_blocks": lambda a: nsa_torch.select_blocks(
        a["q"], a["k_cmp"], a["lse"], **kw(a, *SEL_H, "scale", "cu_seqlens")),
    "fn:selected_attention": lambda a: nsa_torch.selected_attention(
        a["q"], a["k"], a["v"], a["block_indices"], **kw(a, "select_size", "scale", "cu_seqlens")),
    "fn:sliding_window_attention": lambda a: nsa_torch.sliding_window_attention(
        a["q"], a["k"], a["v"], **kw(a, "window_size", "scale", "cu_seqlens")),
    "fn:nsa_attention": lambda a: nsa_torch.nsa_attention(
        *(a[n] for n in ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_swa")),
        **kw(a, *NSA_H, "scale", "cu_seqlens")),
    "op:compressed_attention_fwd": lambda a: ops.compressed_attention_fwd(
        a["q"], a["k_cmp"], a["v_cmp"], a["cu_seqlens"], *kw(a, *CMP_H).values(), op_scale(a)),
    "op:compressed_attention_bwd": lambda a: ops.compressed_attention_bwd(
        a["dout"], a["dlse"], a["q"], a["k_cmp"], a["v_cmp"], a["o"], a["lse"], a["cu_seqlens"],
        *kw(a, *CMP_H).values(), op_scale(a)),
    "op:select_blocks": lambda a: ops.select_blocks(
        a["q"], a["k_cmp"], a["lse"], a["cu_seqlens"], *kw(a, *SEL_H).values(), op_scale(a)),
    "op:selected_attention_fwd": lambda a: ops.selected_attention_fwd(
        a["q"], a["k"], a["v"], a["block_indices"], a["cu_seqlens"], a["select_size"],
        op_scale(a)),
    "op:selected_attention_bwd": lambda a: ops.selected_attention_bwd(
        a["dout"], a["q"], a["k"], a["v"], a["block_indices"], a["o"], a["lse"],
        a["cu_seqlens"], a["select_size"], op_scale(a)),
    "op:sliding_window_attention_fwd": lambda a: ops.sliding_window_attention_fwd(
        a["q"], a["k"], a["v"], a["cu_seqlens"], a["window_size"], op_scale(a)),
    "op:sliding_window_attention_bwd": lambda a: ops.sliding_window_attention_bwd(
        a["dout"], a["q"], a["k"], a["v"], a["o"], a["lse"], a["cu_seqlens"], a["window_size"],
        op_scale(a)),
}

# The op family whose C++ checks a call reaches first (for value checks through the public API).
FAMILY = {
    "fn:compressed_attention": "compressed_attention",
    "fn:select_blocks": "select_blocks",
    "fn:selected_attention": "selected_attention",
    "fn:sliding_window_attention": "sliding_window_attention",
    "fn:nsa_attention": "compressed_attention",
}
FAMILY.update({t: t[3:].removesuffix("_fwd").removesuffix("_bwd") for t in CALLS if t[:3] == "op:"})

ALL = tuple(CALLS)
CMP = ("fn:compressed_attention", "fn:select_blocks", "fn:nsa_attention",
       "op:compressed_attention_fwd", "op:compressed_attention_bwd", "op:select_blocks")
SAME_LEN = ("fn:selected_attention", "fn:sliding_window_attention", "fn:nsa_attention",
            "op:selected_attention_fwd", "op:selected_attention_bwd",
            "op:sliding_window_attention_fwd", "op:sliding_window_attention_bwd")
WITH_V = tuple(t for t in ALL if "select_blocks" not in t)
SLC = ("fn:selected_attention", "op:selected_attention_fwd", "op:selected_attention_bwd")
SWA = ("fn:sliding_window_attention", "fn:nsa_attention", "op:sliding_window_attention_fwd",
       "op:sliding_window_attention_bwd")
SEL = ("fn:select_blocks", "fn:nsa_attention", "op:select_blocks")
LSE = ("fn:select_blocks", "op:select_blocks", "op:compressed_attention_bwd",
       "op:selected_attention_bwd", "op:sliding_window_attention_bwd")
BWD = ("op:compressed_attention_bwd", "op:selected_attention_bwd",
       "op:sliding_window_attention_bwd")
PUBLIC = tuple(t for t in ALL if t[:3] == "fn:")


def key(target):  # the keys a call reads: the compressed ones for the compressed branch and top-n
    return "k" if target in SAME_LEN else "k_cmp"


def value(target):
    return "v" if target in SAME_LEN else "v_cmp"


# ------------------------------------------------------------------------------------ checks
@dataclass
class Check:
    """`mutate(a, target)` breaks the arguments; the call must raise `error` whose message
    matches `py` (public functions) or `cpp` (ops), both after the "<prefix>: " of the function.
    {k} and {v} stand for the key/value argument names of the target. `cpp_only`: a value
    check that the public path also reports with the C++ message."""
    name: str
    targets: Tuple[str, ...]
    mutate: Callable
    error: type
    py: Optional[str]
    cpp: str
    varlen: bool = False
    cpp_only: bool = False


def setter(**values):
    def mutate(a, target):
        a.update({n: (v(a, target) if callable(v) else v) for n, v in values.items()})
    return mutate


def on_key(fn):
    def mutate(a, target):
        a[key(target)] = fn(a[key(target)])
    return mutate


def on_value(fn):
    def mutate(a, target):
        a[value(target)] = fn(a[value(target)])
    return mutate


def three_kv_heads(a, target):
    """H = 3 key/value heads for HQ = 4 query heads (everything that has H changes with it)."""
    for n in ("k", "k_cmp", "v", "v_cmp"):
        a[n] = torch.cat([a[n], a[n][:, :, :1]], 2)
    a["block_indices"] = torch.cat([a["block_indices"], a["block_indices"][:, :, :1]], 2)


def no_tokens_no_query_heads(a, target):
    """T = 0 everywhere (no compressed rows either) and HQ = 0."""
    for n in ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_swa", "lse", "dlse", "o",
              "dout", "block_indices"):
        a[n] = a[n][:, :0]
    for n in ("q", "g_cmp", "g_slc", "g_swa", "lse", "dlse", "o", "dout"):
        a[n] = a[n][:, :, :0]


def non_contiguous_last(x):
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


def packed_with_b2(a, target):
    a["cu_seqlens"] = cu_seqlens_of([T])


def cu(*values):
    return setter(cu_seqlens=torch.tensor(values, dtype=torch.int32))


def indices(*row):
    def mutate(a, target):
        a["block_indices"][1, 5, 1] = torch.tensor(row, dtype=torch.int32)
    return mutate


SHAPE = r"\[2, \d+, 2, 16\]"
CHECKS = [
    # ---- tensors: rank, sizes, dtypes, layout, device
    Check("q-3d", ALL, setter(q=lambda a, t: a["q"][..., 0]), ValueError,
          r"q must be \[B, T, HQ, D\], got float32 \[2, 40, 4\]",
          r"q must be a 4-D tensor \[B, T, HQ, D\], got float32 \[2, 40, 4\]"),
    Check("k-3d", ALL, on_key(lambda x: x[..., 0]), ValueError,
          r"{k} must be \[B, Tk, H, D\], got float32 \[2, \d+, 2\]",
          r"{k} must be a 4-D tensor \[B, Tk, H, dim\], got float32 \[2, \d+, 2\]"),
    Check("k-batch", ALL, on_key(lambda x: x[:1]), ValueError,
          r"{k} must be \[B, \w+, H, D\] = " + SHAPE + r", got float32 \[1, \d+, 2, 16\]",
          r"{k} must be float32 \[B, \w+, H, D\] = " + SHAPE + r", got float32 \[1, \d+, 2, 16\]"),
    Check("k-seqlen", SAME_LEN, on_key(lambda x: x[:, :-1]), ValueError,
          r"k must be \[B, T, H, D\] = \[2, 40, 2, 16\], got float32 \[2, 39, 2, 16\]",
          r"k must be float32 \[B, T, H, D\] = \[2, 40, 2, 16\], got float32 \[2, 39, 2, 16\]"),
    Check("v-seqlen", WITH_V, on_value(lambda x: torch.cat([x, x[:, :1]], 1)), ValueError,
          r"{v} must be \[B, \w+, H, Dv\] = \[2, \d+, 2, \*\], got float32 \[2, \d+, 2, 8\]",
          r"{v} must be float32 \[B, \w+, H, Dv\] = \[2, \d+, 2, 8\]"
          r", got float32 \[2, \d+, 2, 8\]"),
    Check("k-headdim", ALL, on_key(lambda x: x[..., :-1]), ValueError,
          r"{k} must be \[B, \w+, H, D\] = " + SHAPE + r", got float32 \[2, \d+, 2, 15\]",
          r"{k} must be float32 \[B, \w+, H, D\] = " + SHAPE + r", got float32 \[2, \d+, 2, 15\]"),
    Check("v-heads", WITH_V, on_value(lambda x: x[:, :, :1]), ValueError,
          r"{v} must be \[B, \w+, H, Dv\] = \[2, \d+, 2, \*\], got float32 \[2, \d+, 1, 8\]",
          r"{v} must be float32 \[B, \w+, H, Dv\] = \[2, \d+, 2, 8\]"
          r", got float32 \[2, \d+, 1, 8\]"),
    Check("hq-not-multiple-of-h", ALL, three_kv_heads, ValueError,
          r"the number of query heads HQ = 4 must be a multiple of the number of key/value "
          r"heads H = 3",
          r"the number of query heads HQ must be a multiple of the number of key/value heads "
          r"H = 3, got HQ = 4"),
    Check("k-dtype", ALL, on_key(lambda x: x.double()), TypeError,
          r"{k} must be float32 \[B, \w+, H, D\] = " + SHAPE + r", got float64",
          r"{k} must be float32 \[B, \w+, H, D\] = " + SHAPE + r", got float64"),
    Check("v-dtype", WITH_V, on_value(lambda x: x.half()), TypeError,
          r"{v} must be float32 \[B, \w+, H, Dv\] = \[2, \d+, 2, \*\], got float16",
          r"{v} must be float32 \[B, \w+, H, Dv\] = \[2, \d+, 2, 8\], got float16"),
    Check("q-int", ALL, setter(q=lambda a, t: a["q"].to(torch.int32)), TypeError,
          r"q must be float32, float64, bfloat16 or float16, got int32",
          r"q must be float32, float64, bfloat16 or float16, got int32"),
    Check("all-int", ALL,
          lambda a, t: a.update({n: a[n].long() for n in ("q", "k", "v", "k_cmp", "v_cmp")}),
          TypeError, r"q must be float32, float64, bfloat16 or float16, got int64",
          r"q must be float32, float64, bfloat16 or float16, got int64"),
    Check("q-strided-last-dim", ALL, setter(q=lambda a, t: non_contiguous_last(a["q"])),
          ValueError, r"q must have a contiguous last dim, got strides \[",
          r"q must have a contiguous last dim \(stride 1\), got strides \["),
    Check("k-strided-last-dim", ALL, on_key(non_contiguous_last), ValueError,
          r"{k} must have a contiguous last dim, got strides \[",
          r"{k} must have a contiguous last dim \(stride 1\), got strides \["),
    # meta is a device other than q's; the ops would dispatch to their meta kernels, so the C++
    # device check is proven with CUDA tensors in test_cpp_device_mismatch.
    Check("k-device", PUBLIC, on_key(lambda x: x.to("meta")), ValueError,
          r"{k} must be on cpu \(the device of q\), got meta", ""),
    Check("v-device", tuple(t for t in PUBLIC if t in WITH_V), on_value(lambda x: x.to("meta")),
          ValueError, r"{v} must be on cpu \(the device of q\), got meta", ""),
    # ---- hyper-parameters
    Check("block_size", CMP, setter(block_size=40), ValueError,
          r"block_size must be a multiple of block_stride \(16\), got 40",
          r"block_size must be a positive multiple of block_stride \(16\), got 40"),
    Check("block_stride", CMP, setter(block_stride=0), ValueError,
          r"block_stride must be at least 1, got 0", r"block_stride must be at least 1, got 0"),
    Check("select_size-multiple", SEL, setter(select_size=40), ValueError,
          r"select_size must be a multiple of block_stride \(16\), got 40",
          r"select_size must be a positive multiple of block_stride \(16\), got 40"),
    Check("select_size-zero", SLC, setter(select_size=0), ValueError,
          r"select_size must be at least 1, got 0", r"select_size must be at least 1, got 0"),
    Check("num_selected", SEL, setter(num_selected=2), ValueError,
          r"num_selected must be at least num_initial \+ num_local = 3, got 2",
          r"num_selected must be at least 1 and at least num_initial \+ num_local = 3, got 2"),
    Check("num_initial", SEL, setter(num_initial=-1), ValueError,
          r"num_initial must be in \[0, num_selected\], got -1",
          r"num_initial must be in \[0, num_selected\], got -1"),
    Check("num_local", SEL, setter(num_local=-1), ValueError,
          r"num_local must be in \[0, num_selected\], got -1",
          r"num_local must be in \[0, num_selected\], got -1"),
    # ---- integers past int32 / int64: bounded before any narrowing or sum, never truncated
    Check("select_size-past-int32", SEL + SLC, setter(select_size=2**32 + 32), ValueError,
          r"select_size must be at most 1073741824, got 4294967328",
          r"select_size must be at most 1073741824, got 4294967328"),
    Check("block_size-past-int32", CMP, setter(block_size=2**32 + 32), ValueError,
          r"block_size must be at most 1073741824, got 4294967328",
          r"block_size must be at most 1073741824, got 4294967328"),
    Check("num_selected-past-int32", SEL, setter(num_selected=2**32 + 4), ValueError,
          r"num_selected must be at most 65536, got 4294967300",
          r"num_selected must be at most 65536, got 4294967300"),
    Check("num_selected-huge-allocation", SEL, setter(num_selected=10**9), ValueError,
          r"num_selected must be at most 65536, got 1000000000",
          r"num_selected must be at most 65536, got 1000000000"),
    # num_initial + num_local would overflow int64: each is bounded by num_selected first
    Check("num_initial-sum-overflow", SEL, setter(num_initial=2**62, num_local=2**62), ValueError,
          r"num_initial must be in \[0, num_selected\], got 4611686018427387904",
          r"num_initial must be in \[0, num_selected\], got 4611686018427387904"),
    Check("window_size-past-int64", tuple(t for t in PUBLIC if t in SWA),
          setter(window_size=2**64), ValueError,
          r"window_size must be at most 9223372036854775807, got 18446744073709551616", ""),
    Check("window_size-bool", tuple(t for t in PUBLIC if t in SWA), setter(window_size=True),
          TypeError, r"window_size must be an int, got bool", ""),
    Check("scale-str", PUBLIC, setter(scale="0.5"), TypeError,
          r"scale must be a float or None, got str", ""),
    # ---- zero sizes: an error, never a crash (HQ = 0 divided by zero in every op, also at T = 0)
    Check("zero-query-heads", ALL, lambda a, t: a.update(q=a["q"][:, :, :0]), ValueError,
          r"the number of query heads HQ must be at least 1, got HQ = 0",
          r"the number of query heads HQ must be at least 1, got HQ = 0"),
    Check("zero-query-heads-no-tokens", ALL, no_tokens_no_query_heads, ValueError,
          r"the number of query heads HQ must be at least 1, got HQ = 0",
          r"the number of query heads HQ must be at least 1, got HQ = 0"),
    Check("zero-head-dim", ALL,
          lambda a, t: a.update({n: a[n][..., :0] for n in ("q", "k", "k_cmp")}, scale=1.0),
          ValueError,
          r"the head dims must be at least 1, got D = 0",
          r"the head dims must be at least 1, got D = 0"),
    Check("window_size", SWA, setter(window_size=0), ValueError,
          r"window_size must be at least 1, got 0", r"window_size must be at least 1, got 0"),
    Check("scale-nan", ALL, setter(scale=float("nan")), ValueError,
          r"scale must be a finite number, got nan", r"scale must be a finite number, got -?nan"),
    Check("scale-inf", ALL, setter(scale=float("inf")), ValueError,
          r"scale must be a finite number, got inf", r"scale must be a finite number, got inf"),
    Check("block_size-float", tuple(t for t in PUBLIC if t in CMP), setter(block_size=32.0),
          TypeError, r"block_size must be an int, got float", ""),
    # ---- compressed rows
    Check("k_cmp-rows", CMP, lambda a, t: a.update(k_cmp=a["k_cmp"].repeat(1, 2, 1, 1),
                                                  v_cmp=a["v_cmp"].repeat(1, 2, 1, 1)),
          ValueError,
          r"k_cmp must be \[B, Nc, H, D\] with Nc = \(T - block_size\) // block_stride \+ 1 = 1 "
          r"compressed tokens for T = 40 \(0 when T < block_size\), got 2 rows",
          r"k_cmp must be \[B, Nc, H, D\] with Nc = \(T - block_size\) // block_stride \+ 1 = 1 "
          r"compressed tokens for T = 40 \(0 when T < block_size\), got 2 rows"),
    Check("v_cmp-rows", tuple(t for t in CMP if t in WITH_V),
          lambda a, t: a.update(v_cmp=a["v_cmp"].repeat(1, 2, 1, 1)), ValueError,
          r"v_cmp must be \[B, Nc, H, Dv\] = \[2, 1, 2, [*8]\], got float32 \[2, 2, 2, 8\]",
          r"v_cmp must be float32 \[B, Tk, H, Dv\] = \[2, 1, 2, 8\], got float32 \[2, 2, 2, 8\]"),
    Check("k_cmp-rows-packed", CMP, lambda a, t: a.update(k_cmp=a["k_cmp"][:, :1],
                                                         v_cmp=a["v_cmp"][:, :1]),
          ValueError, None,
          r"k_cmp must be \[1, Nc, H, D\] with Nc = sum over sequences of \(T_s - block_size\) "
          r"// block_stride \+ 1 = 2 packed compressed tokens, got 1 rows",
          varlen=True, cpp_only=True),
    # ---- cu_seqlens
    Check("cu_seqlens-int64", ALL, lambda a, t: a.update(cu_seqlens=a["cu_seqlens"].long()),
          TypeError, r"cu_seqlens must be int32 \[N \+ 1\], got int64 \[3\]",
          r"cu_seqlens must be int32 \[N \+ 1\] = \[\*\], got int64 \[3\]", varlen=True),
    Check("cu_seqlens-2d", ALL, lambda a, t: a.update(cu_seqlens=a["cu_seqlens"][None]),
          ValueError, r"cu_seqlens must be \[N \+ 1\], got int32 \[1, 3\]",
          r"cu_seqlens must be int32 \[N \+ 1\] = \[\*\], got int32 \[1, 3\]", varlen=True),
    Check("cu_seqlens-empty", ALL, cu(), ValueError,
          r"cu_seqlens must be int32 \[N \+ 1\] with N >= 0, got int32 \[0\]",
          r"cu_seqlens must be int32 \[N \+ 1\] with N >= 0, got int32 \[0\]", varlen=True),
    Check("cu_seqlens-start", ALL, cu(1, 40, 80), ValueError, None,
          r"cu_seqlens must be a tensor starting at 0, got cu_seqlens\[0\] = 1",
          varlen=True, cpp_only=True),
    Check("cu_seqlens-decreasing", ALL, cu(0, 50, 40, 80), ValueError, None,
          r"cu_seqlens must be non-decreasing, got cu_seqlens\[2\] = 40 < cu_seqlens\[1\] = 50",
          varlen=True, cpp_only=True),
    Check("cu_seqlens-end", ALL, cu(0, 40, 79), ValueError, None,
          r"cu_seqlens must be a tensor ending at the number of packed tokens T = 80, got "
          r"cu_seqlens\[-1\] = 79", varlen=True, cpp_only=True),
    Check("cu_seqlens-batch", ALL, packed_with_b2, ValueError,
          r"q must be packed with B == 1 when cu_seqlens is given, got B = 2",
          r"q must be packed with B == 1 when cu_seqlens is given, got B = 2"),
    Check("cu_seqlens-device", PUBLIC, lambda a, t: a.update(cu_seqlens=a["cu_seqlens"].to("meta")),
          ValueError, r"cu_seqlens must be on cpu \(the device of q\), got meta", "", varlen=True),
    # ---- block_indices
    Check("block_indices-int64", SLC, setter(block_indices=lambda a, t: a["block_indices"].long()),
          TypeError,
          r"block_indices must be int32 \[B, T, H, n\] = \[2, 40, 2, \*\]"
          r", got int64 \[2, 40, 2, 3\]",
          r"block_indices must be int32 \[B, T, H, n\] = \[2, 40, 2, 3\]"
          r", got int64 \[2, 40, 2, 3\]"),
    Check("block_indices-heads", SLC,
          setter(block_indices=lambda a, t: a["block_indices"][:, :, :1]),
          ValueError,
          r"block_indices must be \[B, T, H, n\] = \[2, 40, 2, \*\], got int32 \[2, 40, 1, 3\]",
          r"block_indices must be int32 \[B, T, H, n\] = \[2, 40, 2, 3\]"
          r", got int32 \[2, 40, 1, 3\]"),
    Check("block_indices-3d", SLC, setter(block_indices=lambda a, t: a["block_indices"][..., 0]),
          ValueError,
          r"block_indices must be \[B, T, H, n\] = \[2, 40, 2, \*\]"
          r", got int32 \[2, 40, 2\]",
          r"block_indices must be int32 \[B, T, H, n\], got int32 \[2, 40, 2\]"),
    Check("block_indices-device", ("fn:selected_attention",),
          setter(block_indices=lambda a, t: a["block_indices"].to("meta")), ValueError,
          r"block_indices must be on cpu \(the device of q\), got meta", ""),
    Check("block_indices-too-large", SLC, indices(0, 1, -1), ValueError, None,
          r"block_indices must be -1 or a block index in \[0, 1\) of the query's sequence "
          r"\(select_size = 64\), got block_indices\[1, 5, 1, 1\] = 1", cpp_only=True),
    Check("block_indices-below-minus-1", SLC, indices(-2, -1, -1), ValueError, None,
          r"block_indices must be -1 or a block index in \[0, 1\) of the query's sequence "
          r"\(select_size = 64\), got block_indices\[1, 5, 1, 0\] = -2", cpp_only=True),
    Check("block_indices-duplicate", SLC, indices(0, -1, 0), ValueError, None,
          r"block_indices must be free of duplicates within a row, got block_indices\[1, 5, 1, "
          r"\d\] = 0 listed twice", cpp_only=True),
    # Sequence-relative: block 2 exists in the packed T = 80 but not in a 40-token sequence.
    Check("block_indices-other-sequence", SLC,
          lambda a, t: a["block_indices"][0, 45, 0].copy_(torch.tensor([1, 2, -1])), ValueError,
          None, r"block_indices must be -1 or a block index in \[0, 2\) of the query's sequence "
          r"\(select_size = 32\), got block_indices\[0, 45, 0, 1\] = 2", varlen=True,
          cpp_only=True),
    # ---- lse and the backward inputs
    Check("lse-dtype", LSE, setter(lse=lambda a, t: a["lse"].double()), TypeError,
          r"lse must be float32 \[B, T, HQ\] = \[2, 40, 4\], got float64 \[2, 40, 4\]",
          r"lse must be float32 \[B, T, HQ\] = \[2, 40, 4\], got float64 \[2, 40, 4\]"),
    Check("lse-shape", LSE, setter(lse=lambda a, t: a["lse"][:, :, :2]), ValueError,
          r"lse must be \[B, T, HQ\] = \[2, 40, 4\], got float32 \[2, 40, 2\]",
          r"lse must be float32 \[B, T, HQ\] = \[2, 40, 4\], got float32 \[2, 40, 2\]"),
    Check("lse-device", ("fn:select_blocks",), setter(lse=lambda a, t: a["lse"].to("meta")),
          ValueError, r"lse must be on cpu \(the device of q\), got meta", ""),
    Check("dout-shape", BWD, setter(dout=lambda a, t: a["dout"][..., :7]), ValueError, None,
          r"dout must be float32 \[B, T, HQ, Dv\] = \[2, 40, 4, 8\], got float32 \[2, 40, 4, 7\]"),
    Check("dout-strided-last-dim", BWD, setter(dout=lambda a, t: non_contiguous_last(a["dout"])),
          ValueError, None, r"dout must have a contiguous last dim \(stride 1\), got strides"),
    Check("o-dtype", BWD, setter(o=lambda a, t: a["o"].double()), TypeError, None,
          r"o must be float32 \[B, T, HQ, Dv\] = \[2, 40, 4, 8\], got float64 \[2, 40, 4, 8\]"),
    Check("dlse-dtype", ("op:compressed_attention_bwd",),
          setter(dlse=lambda a, t: a["dlse"].double()), TypeError, None,
          r"dlse must be float32 \[B, T, HQ\] = \[2, 40, 4\], got float64 \[2, 40, 4\]"),
    Check("dlse-shape", ("op:compressed_attention_bwd",),
          setter(dlse=lambda a, t: a["dlse"][:1]), ValueError, None,
          r"dlse must be float32 \[B, T, HQ\] = \[2, 40, 4\], got float32 \[1, 40, 4\]"),
    # ---- nsa_attention's own arguments
    Check("gate-shape", ("fn:nsa_attention",), setter(g_cmp=lambda a, t: a["g_cmp"][..., :3]),
          ValueError, r"g_cmp must be \[B, T, HQ\] = \[2, 40, 4\], got float32 \[2, 40, 3\]", ""),
    Check("gate-int", ("fn:nsa_attention",), setter(g_slc=lambda a, t: a["g_slc"].long()),
          TypeError, r"g_slc must be a float tensor \[B, T, HQ\], got int64 \[2, 40, 4\]", ""),
    Check("gate-device", ("fn:nsa_attention",), setter(g_swa=lambda a, t: a["g_swa"].to("meta")),
          ValueError, r"g_swa must be on cpu \(the device of q\), got meta", ""),
    Check("k_cmp-heads-differ-from-k", ("fn:nsa_attention",),
          setter(k_cmp=lambda a, t: a["k_cmp"][:, :, :1], v_cmp=lambda a, t: a["v_cmp"][:, :, :1]),
          ValueError,
          r"k_cmp must be \[B, Nc, H, D\] = \[2, \*, 2, 16\]"
          r", got float32 \[2, 1, 1, 16\]",
          ""),
    Check("v_cmp-dim-differs-from-v", ("fn:nsa_attention",),
          setter(v_cmp=lambda a, t: a["v_cmp"][..., :1]), ValueError,
          r"v_cmp must be \[B, Nc, H, Dv\] = \[2, 1, 2, 8\], got float32 \[2, 1, 2, 1\]", ""),
]


def cases():
    for c in CHECKS:
        for t in c.targets:
            if (t[:3] == "op:" and not c.cpp) or (t[:3] == "fn:" and not c.py and not c.cpp_only):
                continue
            yield pytest.param(c, t, id=f"{c.name}-{t}")


@pytest.mark.parametrize("check,target", list(cases()))
def test_check(check, target):
    a = base(check.varlen)
    check.mutate(a, target)
    if target[:3] == "fn:" and not check.cpp_only:
        prefix, pattern = "nsa_torch." + target[3:], check.py
    else:
        prefix, pattern = "nsa." + FAMILY[target], check.cpp
    pattern = re.escape(prefix) + ": " + pattern.format(k=key(target), v=value(target))
    with pytest.raises(check.error, match=pattern):
        CALLS[target](a)


def test_valid_base_arguments_pass():
    """The unbroken arguments are accepted (so each check above fails for its own reason)."""
    for varlen in (False, True):
        for target, call in CALLS.items():
            call(base(varlen))


def test_every_check_is_exercised_on_both_paths():
    """Each tensor/hyper-parameter check that has a C++ twin is run through both paths."""
    ids = {(c.name, t[:3]) for c in CHECKS for t in c.targets}
    for c in CHECKS:
        if c.py and c.cpp:
            assert (c.name, "fn:") in ids and (c.name, "op:") in ids, c.name


# ------------------------------------------------------------------------------------ CUDA
# The CUDA kernels take bfloat16/float16 and the head dims (D, Dv) of the compiled module's list
# (csrc/nsa/cuda/head_dims.h; empty in a build without CUDA); anything else on CUDA is an error
# naming the op (never a silent fallback to the CPU or the reference).
CUDA_DTYPES = (torch.bfloat16, torch.float16)
CUDA_HEAD_DIMS = getattr(nsa_torch._C, "CUDA_HEAD_DIMS", ())
cuda_build = pytest.mark.skipif(not CUDA_HEAD_DIMS, reason="this build of nsa_torch has no CUDA kernels")
UNSUPPORTED_D = 80  # no pair has it


def head_dim_error(prefix, target, D, Dv, dims=CUDA_HEAD_DIMS):
    """The message of an unsupported head dim on CUDA: every supported pair listed (only the D for
    select_blocks, which reads no values)."""
    if "select_blocks" in target:
        ds = ", ".join(str(d) for d in sorted({d for d, _ in dims}))
        return re.escape(f"{prefix}{_name(target)}: head dim D must be one of {ds} on CUDA, got {D}")
    pairs = ", ".join(f"({d}, {dv})" for d, dv in dims)
    return re.escape(f"{prefix}{_name(target)}: head dims (D, Dv) must be one of {pairs} on CUDA, "
                     f"got ({D}, {Dv})")
OPS = tuple(t for t in ALL if t[:3] == "op:")
_D_NAMES = ("q", "k", "k_cmp")                    # [..., D]
_DV_NAMES = ("v", "v_cmp", "o", "dout")           # [..., Dv]
_LSE_NAMES = ("lse", "dlse")                      # float32 whatever the inputs' dtype


def on_cuda(a, dtype, D, Dv, keep_cpu=(), fake=False):
    """The arguments `a` on CUDA: float tensors in `dtype` (lse/dlse stay float32) with head dims
    (D, Dv); integer tensors keep their values. With fake=True (inside FakeTensorMode, no GPU
    needed) every tensor is a fresh torch.empty, values do not matter to the Python checks."""
    out = {}
    for n, x in a.items():
        if not torch.is_tensor(x) or n in keep_cpu:
            out[n] = x
            continue
        shape, dt = list(x.shape), x.dtype
        if n in _D_NAMES:
            shape[-1] = D
        elif n in _DV_NAMES:
            shape[-1] = Dv
        if x.is_floating_point():
            dt = torch.float32 if n in _LSE_NAMES else dtype
        if fake:
            out[n] = torch.empty(shape, dtype=dt, device="cuda")
        elif x.is_floating_point():
            out[n] = torch.randn(shape, device="cuda").to(dt)
        else:
            out[n] = x.cuda()
    return out


def _name(target):
    return target[3:] if target[:3] == "fn:" else FAMILY[target]


@pytest.mark.parametrize("target", PUBLIC)
def test_cuda_float32_is_rejected(target):
    """float32 CUDA inputs: TypeError naming the function. Fake CUDA tensors (no GPU needed)
    reach the Python checks, which run before any op."""
    with FakeTensorMode():
        a = on_cuda(base(), torch.float32, 64, 64, fake=True)
        with pytest.raises(TypeError, match=re.escape(f"nsa_torch.{_name(target)}: ")
                           + r".*bfloat16 or float16"):
            CALLS[target](a)


@cuda_build
@pytest.mark.parametrize("D,Dv", [(UNSUPPORTED_D, UNSUPPORTED_D), (UNSUPPORTED_D, 128), (256, 128)])
@pytest.mark.parametrize("target", PUBLIC)
def test_cuda_unsupported_head_dim_is_rejected(target, D, Dv):
    """An unlisted (D, Dv) on CUDA: ValueError naming the function and listing the supported
    pairs (select_blocks reads no values: its supported D)."""
    if "select_blocks" in target and D != UNSUPPORTED_D:
        pytest.skip("select_blocks reads no values: only D matters")
    with FakeTensorMode():
        a = on_cuda(base(), torch.bfloat16, D, Dv, fake=True)
        with pytest.raises(ValueError, match=head_dim_error("nsa_torch.", target, D, Dv)):
            CALLS[target](a)


@pytest.mark.parametrize("target", PUBLIC)
def test_cuda_head_dim_check_uses_the_module_list(target, monkeypatch):
    """The Python check takes its pairs from the compiled module's list (replaced here, so that it
    runs in a build without CUDA too): a listed pair passes, an unlisted one is rejected with the
    list."""
    from nsa_torch import _checks
    dims = ((64, 128), (96, 96))
    monkeypatch.setattr(_checks, "CUDA_HEAD_DIMS", dims)
    with FakeTensorMode():
        CALLS[target](on_cuda(base(), torch.bfloat16, 96, 96, fake=True))
        with pytest.raises(ValueError, match=head_dim_error("nsa_torch.", target, 80, 96, dims)):
            CALLS[target](on_cuda(base(), torch.bfloat16, 80, 96, fake=True))
        if "select_blocks" not in target:
            with pytest.raises(ValueError, match=head_dim_error("nsa_torch.", target, 64, 64, dims)):
                CALLS[target](on_cuda(base(), torch.bfloat16, 64, 64, fake=True))


@pytest.mark.skipif(bool(CUDA_HEAD_DIMS), reason="this build of nsa_torch has CUDA kernels")
@pytest.mark.parametrize("target", PUBLIC)
def test_cuda_inputs_need_a_cuda_build(target):
    """Without CUDA kernels the Python checks say so (the module's list is empty)."""
    with FakeTensorMode():
        a = on_cuda(base(), torch.bfloat16, 64, 64, fake=True)
        with pytest.raises(NotImplementedError, match=re.escape(f"nsa_torch.{_name(target)}: this build "
                                                                "of nsa_torch has no CUDA kernels")):
            CALLS[target](a)


@cuda_build
@pytest.mark.parametrize("D,Dv", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("target", PUBLIC)
def test_cuda_supported_arguments_pass_the_checks(target, dtype, D, Dv):
    """bf16/fp16 CUDA inputs with a supported (D, Dv) pass the Python checks and reach the
    ops' fake kernels."""
    with FakeTensorMode():
        for varlen in (False, True):
            CALLS[target](on_cuda(base(varlen), dtype, D, Dv, fake=True))


@pytest.mark.cuda
@pytest.mark.parametrize("target", OPS)
def test_cpp_cuda_float32_is_rejected(target):
    a = on_cuda(base(), torch.float32, 64, 64)
    with pytest.raises(TypeError, match=re.escape(f"nsa.{_name(target)}: ")
                       + r".*bfloat16 or float16"):
        CALLS[target](a)


@pytest.mark.cuda
@pytest.mark.parametrize("D,Dv", [(UNSUPPORTED_D, UNSUPPORTED_D), (256, 128)])
@pytest.mark.parametrize("target", OPS)
def test_cpp_cuda_unsupported_head_dim_is_rejected(target, D, Dv):
    """The ops' own check (C++, the same list): ValueError naming the op and the supported pairs."""
    if "select_blocks" in target and D != UNSUPPORTED_D:
        pytest.skip("select_blocks reads no values: only D matters")
    a = on_cuda(base(), torch.bfloat16, D, Dv)
    with pytest.raises(ValueError, match=head_dim_error("nsa.", target, D, Dv)):
        CALLS[target](a)


@pytest.mark.cuda
@pytest.mark.parametrize("target", [t for t in ALL if t[:3] == "op:"])
def test_cpp_device_mismatch(target):
    a = base()
    a[key(target)] = a[key(target)].cuda()
    with pytest.raises(ValueError, match=re.escape(f"nsa.{FAMILY[target]}: {key(target)} must be "
                                                   "on cpu (the device of q), got cuda")):
        CALLS[target](a)


# ------------------------------------------------------------------------------------ more
@pytest.mark.parametrize("B,T", [(2, 0), (0, 40)], ids=["no-tokens", "no-batch"])
def test_backward_through_an_empty_output(B, T):
    """o.sum().backward() through an empty output: its incoming gradient is an expanded empty
    tensor with zero strides, which is read by no kernel (it failed the stride check)."""
    a = make_inputs(B=B, T=T, HQ=HQ, H=H, D=D, Dv=DV, seed=5)
    names = ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_swa")
    x = {n: a[n].requires_grad_() for n in names}
    nsa_torch.nsa_attention(*x.values(), num_selected=3, window_size=16).sum().backward()
    for n in names:
        assert x[n].grad.shape == x[n].shape


def test_nsa_attention_checks_each_argument_once(monkeypatch):
    """One public call checks each argument once: nsa_attention runs its branches' unchecked
    internals, not the public branch functions (which would check q, k, v again)."""
    from collections import Counter

    from nsa_torch import _checks
    calls = Counter()
    for name in ("hyper", "qkv", "tensor", "seqlens", "num_cmp_rows", "gate", "scale"):
        f = getattr(_checks, name)

        def counted(fn, *args, _f=f, _name=name, **kwargs):
            calls[(_name, args[0] if _name == "tensor" else None)] += 1
            return _f(fn, *args, **kwargs)
        monkeypatch.setattr(_checks, name, counted)
    a = make_inputs(B=B, T=T, HQ=HQ, H=H, D=D, Dv=DV, seed=6)
    nsa_torch.nsa_attention(*(a[n] for n in ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc",
                                             "g_swa")), num_selected=3, window_size=16)
    assert calls[("qkv", None)] == 1 and calls[("hyper", None)] == 1
    assert calls[("scale", None)] == 1 and calls[("seqlens", None)] == 1
    assert calls[("tensor", "k_cmp")] == 1 and calls[("tensor", "v_cmp")] == 1


# On the GPU itself (the C++ checks behind the Python ones), every function and op.
@pytest.mark.cuda
@pytest.mark.parametrize("target", ALL)
def test_gpu_float32_is_rejected(target):
    """CUDA kernels take bfloat16/float16: float32 CUDA inputs raise a TypeError naming the op
    (never a silent CPU or reference fallback)."""
    a = on_cuda(base(), torch.float32, 64, 64)
    with pytest.raises(TypeError, match=rf"{_name(target)}.*bfloat16 or float16"):
        CALLS[target](a)


@pytest.mark.cuda
@pytest.mark.parametrize("target", ALL)
def test_gpu_unsupported_head_dim_is_rejected(target):
    a = on_cuda(base(), torch.bfloat16, UNSUPPORTED_D, UNSUPPORTED_D)
    with pytest.raises(ValueError, match=head_dim_error("nsa_torch." if target[:3] == "fn:" else "nsa.",
                                                        target, UNSUPPORTED_D, UNSUPPORTED_D)):
        CALLS[target](a)


@pytest.mark.cuda
@pytest.mark.parametrize("target", ALL)
def test_gpu_cpu_cu_seqlens_is_rejected(target):
    """cu_seqlens on the CPU with CUDA q: a device-mismatch ValueError naming cu_seqlens."""
    a = on_cuda(base(varlen=True), torch.bfloat16, 64, 64, keep_cpu=("cu_seqlens",))
    assert not a["cu_seqlens"].is_cuda and a["q"].is_cuda
    with pytest.raises(ValueError, match=r"cu_seqlens"):
        CALLS[target](a)


@pytest.mark.cuda
@pytest.mark.parametrize("target", ALL)
def test_gpu_valid_arguments_pass(target):
    """The arguments the error tests break are valid as they are (bf16, D = Dv = 64)."""
    for varlen in (False, True):
        CALLS[target](on_cuda(base(varlen), torch.bfloat16, 64, 64))


@pytest.mark.cuda
@pytest.mark.parametrize("target", ALL)
def test_cuda_bad_cu_seqlens_raises_at_synchronisation(target):
    """A decreasing CUDA cu_seqlens is never a silent result: the ops check its values on the
    device (no host sync) and the error surfaces at the next synchronisation. (It is a
    device-side assert, which leaves the CUDA context unusable: one case per process would be
    cleaner, so this test runs the checks in a subprocess.)"""
    import subprocess
    import sys
    code = (
        f"import sys, torch; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_errors as t\n"
        f"a = t.on_cuda(t.base(True), torch.bfloat16, 64, 64)\n"
        "a['cu_seqlens'] = torch.tensor([0, 50, 40, 80], dtype=torch.int32, device='cuda')\n"
        f"t.CALLS[{target!r}](a)\n"
        "torch.cuda.synchronize()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "cu_seqlens must start at 0, be non-decreasing" in r.stderr or \
        "device-side assert" in r.stderr, r.stderr[-2000:]
