"""Pure-PyTorch reference of Native Sparse Attention: the test oracle of every kernel.

This module follows docs/design.md section 1 literally, with dense masked matrices per sequence:
every branch builds a boolean "query t may see key s" mask and runs one masked softmax. It is
meant to be obviously right, not fast, and it imports nothing compiled, so it works without
the extension.

Conventions (those of the public API, docs/design.md section 1):
- Tensors are [B, T, heads, dim]; query head h reads key/value head h // G, G = HQ // H.
- Arithmetic runs in float64 for float64 inputs, else in float32; o comes back in the input
  dtype, lse in the accumulation dtype (float32, or float64 for float64 inputs).
- Varlen: cu_seqlens int32 [N+1] with B == 1; k_cmp/v_cmp are packed too, sequence s owning
  rows cmp_seqlens_offsets(...)[s] .. [s+1]. Block indices are sequence-relative.
- A query that sees no key gets o = 0 and lse = -inf, and its gradients are 0, never NaN.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional

import torch

__all__ = [
    "num_cmp_tokens",
    "num_select_blocks",
    "cmp_seqlens_offsets",
    "compressed_attention",
    "block_scores",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
    "nsa_attention",
    "cache_tokens",
    "decode_attention",
]

_PREFIX = "nsa_torch.reference"


# ----------------------------------------------------------------------------------------------
# Sizes


def num_cmp_tokens(T: int, block_size: int, block_stride: int) -> int:
    """Nc(T): compressed tokens of a sequence of T tokens (window i = [i*d, i*d + l - 1])."""
    return (T - block_size) // block_stride + 1 if T >= block_size else 0


def num_select_blocks(T: int, select_size: int) -> int:
    """Selection blocks of a sequence of T tokens (the last one may be partial)."""
    return (T + select_size - 1) // select_size


def cmp_seqlens_offsets(cu_seqlens: torch.Tensor, block_size: int, block_stride: int) -> torch.Tensor:
    """int32 [N+1] exclusive prefix sum of Nc(T_s): where each sequence's compressed rows start.

    Pure tensor ops (no host synchronisation), so it is usable under torch.compile.
    """
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    # The floor division is negative for short sequences; the where() discards those.
    nc = torch.where(lens >= block_size, (lens - block_size) // block_stride + 1, torch.zeros_like(lens))
    zero = torch.zeros(1, dtype=torch.int64, device=cu_seqlens.device)
    return torch.cat([zero, torch.cumsum(nc, 0)]).to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Argument checks (ValueError naming the op and the argument)


def _fail(op: str, message: str):
    raise ValueError(f"{_PREFIX}.{op}: {message}")


def _check_positive(op: str, **sizes: int) -> None:
    for name, value in sizes.items():
        if int(value) != value or value <= 0:
            _fail(op, f"{name} ({value}) must be a positive integer")


def _check_non_negative(op: str, **sizes: int) -> None:
    for name, value in sizes.items():
        if int(value) != value or value < 0:
            _fail(op, f"{name} ({value}) must be a non-negative integer")


def _check_multiple(op: str, name: str, value: int, of_name: str, of: int) -> None:
    if value % of != 0:
        _fail(op, f"{name} ({value}) must be a multiple of {of_name} ({of})")


def _check_cmp_sizes(op: str, block_size: int, block_stride: int) -> None:
    _check_positive(op, block_size=block_size, block_stride=block_stride)
    _check_multiple(op, "block_size", block_size, "block_stride", block_stride)


def _check_select_sizes(op, block_stride, select_size, num_selected, num_initial, num_local) -> None:
    _check_positive(op, select_size=select_size, num_selected=num_selected)
    _check_non_negative(op, num_initial=num_initial, num_local=num_local)
    _check_multiple(op, "select_size", select_size, "block_stride", block_stride)
    if num_selected < num_initial + num_local:
        _fail(op, f"num_selected ({num_selected}) must be >= num_initial + num_local "
                  f"({num_initial} + {num_local})")


def _check_shape(op: str, name: str, x: torch.Tensor, expected, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        _fail(op, f"{name} must be a tensor {layout}, got {type(x).__name__}")
    if tuple(x.shape) != tuple(expected):
        _fail(op, f"{name} must be {layout} = {list(expected)}, got {list(x.shape)}")


def _check_q(op: str, q: torch.Tensor) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        got = list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        _fail(op, f"q must be a 4-D tensor [B, T, HQ, D], got {got}")
    if not q.is_floating_point():
        _fail(op, f"q must be a floating-point tensor, got {q.dtype}")


def _check_kv(op: str, q, k, v, k_name: str, v_name: str, rows: str) -> None:
    """k [B, rows, H, D] and v [B, rows, H, Dv] matching q [B, T, HQ, D]; rows == 'T' pins them."""
    B, T, HQ, D = q.shape
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        _fail(op, f"{k_name} must be a 4-D tensor [B, {rows}, H, D]")
    H = k.shape[2]
    n = T if rows == "T" else k.shape[1]
    _check_shape(op, k_name, k, (B, n, H, D), f"[B, {rows}, H, D]")
    if H == 0 or HQ % H != 0:
        _fail(op, f"the key/value heads of {k_name} (H = {H}) must divide the query heads (HQ = {HQ})")
    if not isinstance(v, torch.Tensor) or v.dim() != 4:
        _fail(op, f"{v_name} must be a 4-D tensor [B, {rows}, H, Dv]")
    _check_shape(op, v_name, v, (B, n, H, v.shape[3]), f"[B, {rows}, H, Dv]")
    for name, x in ((k_name, k), (v_name, v)):
        if x.dtype != q.dtype:
            _fail(op, f"{name} must have q's dtype {q.dtype}, got {x.dtype}")


# ----------------------------------------------------------------------------------------------
# Sequences: the fixed-length batch or the packed varlen batch, one entry per sequence


class _Seq(NamedTuple):
    batch: int      # row of the B axis
    start: int      # first token on the T axis
    len: int        # tokens
    cmp_start: int  # first compressed row on the Nc axis
    cmp_len: int    # compressed rows, Nc(len)


def _sequences(op: str, q: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
               block_size: int = 0, block_stride: int = 1) -> List[_Seq]:
    """The sequences of the batch. block_size = 0 means "no compressed rows"."""
    B, T = q.shape[:2]

    def nc(n: int) -> int:
        return num_cmp_tokens(n, block_size, block_stride) if block_size else 0

    if cu_seqlens is None:
        return [_Seq(b, 0, T, 0, nc(T)) for b in range(B)]
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        got = (f"{cu_seqlens.dtype} {list(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor)
               else type(cu_seqlens).__name__)
        _fail(op, f"cu_seqlens must be an int32 tensor [N + 1], got {got}")
    if B != 1:
        _fail(op, f"with cu_seqlens the batch must be packed (B == 1), got B = {B}")
    bounds = cu_seqlens.tolist()
    if len(bounds) < 1 or bounds[0] != 0 or bounds[-1] != T or any(a > b for a, b in zip(bounds, bounds[1:])):
        _fail(op, f"cu_seqlens must start at 0, be non-decreasing and end at the total number of "
                  f"tokens ({T}), got {bounds}")
    seqs, cmp_start = [], 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        seqs.append(_Seq(0, a, b - a, cmp_start, nc(b - a)))
        cmp_start += nc(b - a)
    return seqs


def _check_cmp_rows(op: str, name: str, x: torch.Tensor, seqs: List[_Seq], varlen: bool) -> None:
    rows = sum(s.cmp_len for s in seqs) if varlen else (seqs[0].cmp_len if seqs else x.shape[1])
    if x.shape[1] != rows:
        what = ("the sum of Nc(T_s) over the sequences" if varlen
                else "Nc(T) = (T - block_size) // block_stride + 1")
        _fail(op, f"{name} must have {what} = {rows} rows, got {x.shape[1]}")


def _tokens(x: torch.Tensor, s: _Seq) -> torch.Tensor:
    return x[s.batch, s.start:s.start + s.len]


def _cmp_rows(x: torch.Tensor, s: _Seq) -> torch.Tensor:
    return x[s.batch, s.cmp_start:s.cmp_start + s.cmp_len]


def _assemble(pieces: List[torch.Tensor], varlen: bool) -> torch.Tensor:
    """Per-sequence results back into [B, T, ...]: packed along T (varlen) or stacked along B."""
    return torch.cat(pieces, 0).unsqueeze(0) if varlen else torch.stack(pieces, 0)


# ----------------------------------------------------------------------------------------------
# Numerics


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _attend(q, k, v, visible, scale, with_lse=False):
    """Masked softmax attention of one sequence, in the accumulation dtype.

    q [T, HQ, D], k [S, H, D], v [S, H, Dv], visible [H or 1, T, S] bool (shared by the G query
    heads of a group). Returns o [T, HQ, Dv] and, with with_lse, lse [T, HQ] (else None).
    Rows that see nothing get o = 0 and lse = -inf.
    """
    acc = _acc_dtype(q.dtype)
    T, HQ, D = q.shape
    S, H, Dv = v.shape
    G = HQ // H
    qg = (q.to(acc) * scale).reshape(T, H, G, D).permute(1, 2, 0, 3)       # [H, G, T, D]
    logits = torch.matmul(qg, k.to(acc).permute(1, 2, 0).unsqueeze(1))     # [H, G, T, S]
    # A row that sees nothing is left unmasked so that softmax and logsumexp stay finite (no NaN
    # forward or backward); its o is then multiplied by 0 and its lse replaced by -inf, which
    # also zeroes its gradients.
    seen = visible.any(-1, keepdim=True)                                      # [H|1, T, 1]
    # In place: matmul does not keep its output for the backward, and this is the largest tensor.
    logits.masked_fill_((~visible & seen).unsqueeze(1), -math.inf)
    p = torch.softmax(logits, -1)
    o = torch.matmul(p, v.to(acc).permute(1, 0, 2).unsqueeze(1))           # [H, G, T, Dv]
    o = o * seen.unsqueeze(1)
    o = o.permute(2, 0, 1, 3).reshape(T, HQ, Dv)
    if not with_lse:
        return o, None
    lse = torch.logsumexp(logits, -1)                                         # [H, G, T]
    lse = torch.where(seen.squeeze(-1).unsqueeze(1), lse, torch.full_like(lse, -math.inf))
    return o, lse.permute(2, 0, 1).reshape(T, HQ)


def _cmp_visible(T: int, Nc: int, block_size: int, block_stride: int, device) -> torch.Tensor:
    """[T, Nc] bool: query t sees compressed token i iff its whole window is in its past."""
    t = torch.arange(T, device=device)
    window_end = torch.arange(Nc, device=device) * block_stride + block_size - 1
    return window_end[None, :] <= t[:, None]


def _overlap_weights(Nc: int, NB: int, block_size: int, block_stride: int, select_size: int,
                     dtype, device) -> torch.Tensor:
    """[Nc, NB]: |W_i ∩ block j| / d, W_i = [i*d, i*d + l - 1], block j = [j*l', (j+1)*l' - 1]."""
    w_start = torch.arange(Nc, device=device) * block_stride
    w_end = w_start + block_size - 1
    b_start = torch.arange(NB, device=device) * select_size
    b_end = b_start + select_size - 1
    overlap = (torch.minimum(w_end[:, None], b_end[None, :])
               - torch.maximum(w_start[:, None], b_start[None, :]) + 1).clamp(min=0)
    return overlap.to(dtype) / block_stride


# ----------------------------------------------------------------------------------------------
# Per-sequence branches (accumulation dtype in, accumulation dtype out)


def _compressed_seq(q, k_cmp, v_cmp, block_size, block_stride, scale):
    visible = _cmp_visible(q.shape[0], k_cmp.shape[0], block_size, block_stride, q.device)
    return _attend(q, k_cmp, v_cmp, visible.unsqueeze(0), scale, with_lse=True)


def _block_scores_seq(q, k_cmp, lse, NB, block_size, block_stride, select_size, scale):
    """S [T, H, NB] of one sequence: group-summed, overlap-weighted compressed probabilities;
    -inf for the non-candidates j > t // l'."""
    acc = _acc_dtype(q.dtype)
    T, HQ, D = q.shape
    Nc, H, _ = k_cmp.shape
    G = HQ // H
    logits = torch.einsum("thgd,ihd->thgi", q.to(acc).reshape(T, H, G, D), k_cmp.to(acc)) * scale
    lse = lse.to(acc).reshape(T, H, G, 1)
    visible = _cmp_visible(T, Nc, block_size, block_stride, q.device)[:, None, None, :]
    visible = visible & torch.isfinite(lse)  # lse = -inf: the query sees nothing, p = 0
    p = torch.exp(torch.where(visible, logits - lse, torch.full_like(logits, -math.inf)))
    weights = _overlap_weights(Nc, NB, block_size, block_stride, select_size, acc, q.device)
    scores = torch.einsum("thgi,ij->thj", p, weights)
    j = torch.arange(NB, device=q.device)
    last_block = torch.arange(T, device=q.device) // select_size
    candidate = j[None, :] <= last_block[:, None]
    return scores.masked_fill(~candidate[:, None, :], -math.inf)


def _top_n(scores, select_size, num_selected, num_initial, num_local):
    """int64 [T, H, n] from S [T, H, NB] of one sequence: forced blocks, then the best-scoring
    other candidates (ties to the smaller j); ascending, padded with -1."""
    T, H, NB = scores.shape
    device = scores.device
    j = torch.arange(NB, device=device)[None, :]
    b = (torch.arange(T, device=device) // select_size)[:, None]
    candidate = j <= b
    forced = candidate & ((j < num_initial) | (j > b - num_local))
    key = scores.masked_fill(forced[:, None, :], math.inf)
    key = key.masked_fill(~candidate[:, None, :], -math.inf)
    # A stable descending sort keeps equal scores in ascending j: ties go to the smaller j.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :num_selected]
    taken = candidate[:, None, :].expand(T, H, NB).gather(-1, order)
    # Non-candidates sort after every real block (as NB), then become -1.
    blocks = torch.where(taken, order, torch.full_like(order, NB)).sort(-1).values
    blocks = torch.where(blocks == NB, torch.full_like(blocks, -1), blocks)
    if blocks.shape[-1] < num_selected:  # fewer blocks than slots in the whole sequence
        pad = torch.full((T, H, num_selected - blocks.shape[-1]), -1, dtype=blocks.dtype, device=device)
        blocks = torch.cat([blocks, pad], -1)
    return blocks


def _check_block_indices_seq(op, block_indices, s: _Seq, select_size) -> None:
    """Entries are -1 or a block of the sequence, listed at most once per row."""
    NB = num_select_blocks(s.len, select_size)
    bad = (block_indices < -1) | (block_indices >= NB)
    if bool(bad.any()):
        t, h, slot = bad.nonzero()[0].tolist()
        _fail(op, f"block_indices[{s.batch}, {s.start + t}, {h}, {slot}] = {int(block_indices[t, h, slot])} "
                  f"is out of range: its sequence has {NB} blocks of select_size {select_size} "
                  f"(valid: -1 .. {NB - 1})")
    ordered = block_indices.sort(-1).values
    dup = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    if bool(dup.any()):
        t, h, _ = dup.nonzero()[0].tolist()
        _fail(op, f"block_indices[{s.batch}, {s.start + t}, {h}] lists a block twice: "
                  f"{block_indices[t, h].tolist()}")


def _selected_seq(q, k, v, block_indices, select_size, scale):
    T = q.shape[0]
    H = k.shape[1]
    NB = num_select_blocks(T, select_size)
    # chosen[g, t, j]: block j is listed for query t, group g (-1 slots go to a dropped column).
    slots = block_indices.to(torch.int64).permute(1, 0, 2)
    slots = torch.where(slots < 0, torch.full_like(slots, NB), slots)
    chosen = torch.zeros(H, T, NB + 1, dtype=torch.bool, device=q.device)
    chosen = chosen.scatter(-1, slots, True)[..., :NB]
    s = torch.arange(T, device=q.device)
    causal = s[None, :] <= s[:, None]
    visible = chosen[:, :, s // select_size] & causal                       # [H, T, T]
    return _attend(q, k, v, visible, scale)


def _sliding_seq(q, k, v, window_size, scale):
    s = torch.arange(q.shape[0], device=q.device)
    visible = (s[None, :] <= s[:, None]) & (s[None, :] > s[:, None] - window_size)
    return _attend(q, k, v, visible.unsqueeze(0), scale)


# ----------------------------------------------------------------------------------------------
# Batched branches (accumulation dtype), shared by the public functions and nsa_attention


def _compressed(q, k_cmp, v_cmp, seqs, varlen, block_size, block_stride, scale):
    outs = [_compressed_seq(_tokens(q, s), _cmp_rows(k_cmp, s), _cmp_rows(v_cmp, s),
                            block_size, block_stride, scale) for s in seqs]
    return _assemble([o for o, _ in outs], varlen), _assemble([lse for _, lse in outs], varlen)


def _block_scores(q, k_cmp, lse, seqs, block_size, block_stride, select_size, scale):
    """Per-sequence scores, each padded with -inf to the blocks of the longest sequence."""
    NB = max((num_select_blocks(s.len, select_size) for s in seqs), default=0)
    return [_block_scores_seq(_tokens(q, s), _cmp_rows(k_cmp, s), _tokens(lse, s), NB,
                              block_size, block_stride, select_size, scale) for s in seqs]


def _select(q, k_cmp, lse, seqs, varlen, block_size, block_stride, select_size, num_selected,
            num_initial, num_local, scale):
    with torch.no_grad():  # selection is not differentiable
        scores = _block_scores(q, k_cmp, lse.detach(), seqs, block_size, block_stride, select_size, scale)
        blocks = [_top_n(S, select_size, num_selected, num_initial, num_local) for S in scores]
        return _assemble(blocks, varlen).to(torch.int32)


def _selected(op, q, k, v, block_indices, seqs, varlen, select_size, scale):
    outs = []
    for s in seqs:
        indices = _tokens(block_indices, s)
        _check_block_indices_seq(op, indices, s, select_size)
        o, _ = _selected_seq(_tokens(q, s), _tokens(k, s), _tokens(v, s), indices, select_size, scale)
        outs.append(o)
    return _assemble(outs, varlen)


def _sliding(q, k, v, seqs, varlen, window_size, scale):
    outs = [_sliding_seq(_tokens(q, s), _tokens(k, s), _tokens(v, s), window_size, scale)[0] for s in seqs]
    return _assemble(outs, varlen)


# ----------------------------------------------------------------------------------------------
# Public functions (same names and arguments as nsa_torch's ops)


def compressed_attention(q, k_cmp, v_cmp, *, block_size=32, block_stride=16, scale=None, cu_seqlens=None):
    """Compressed branch: query t attends compressed token i iff i*d + l - 1 <= t.

    q [B, T, HQ, D], k_cmp [B, Nc, H, D], v_cmp [B, Nc, H, Dv] -> o [B, T, HQ, Dv] (q's dtype),
    lse [B, T, HQ] (float32, float64 for float64 inputs).
    """
    op = "compressed_attention"
    _check_cmp_sizes(op, block_size, block_stride)
    _check_q(op, q)
    _check_kv(op, q, k_cmp, v_cmp, "k_cmp", "v_cmp", "Nc")
    seqs = _sequences(op, q, cu_seqlens, block_size, block_stride)
    varlen = cu_seqlens is not None
    _check_cmp_rows(op, "k_cmp", k_cmp, seqs, varlen)
    o, lse = _compressed(q, k_cmp, v_cmp, seqs, varlen, block_size, block_stride, _scale(q, scale))
    return o.to(q.dtype), lse


def block_scores(q, k_cmp, lse, *, block_size, block_stride, select_size, scale=None, cu_seqlens=None):
    """Selection scores S [B, T, H, NB] in the accumulation dtype (not differentiable).

    S[t, g, j] = sum_{h in group g} sum_{i visible} p_cmp[t, h, i] * |W_i ∩ block j| / d with
    p_cmp = exp(scale * q.k_cmp - lse). NB = blocks of the longest sequence; entries of
    non-candidates (j > t // select_size) are -inf.
    """
    op = "block_scores"
    _check_cmp_sizes(op, block_size, block_stride)
    _check_positive(op, select_size=select_size)
    _check_multiple(op, "select_size", select_size, "block_stride", block_stride)
    _check_q(op, q)
    _check_kv(op, q, k_cmp, k_cmp, "k_cmp", "k_cmp", "Nc")
    _check_shape(op, "lse", lse, q.shape[:3], "[B, T, HQ]")
    seqs = _sequences(op, q, cu_seqlens, block_size, block_stride)
    varlen = cu_seqlens is not None
    _check_cmp_rows(op, "k_cmp", k_cmp, seqs, varlen)
    with torch.no_grad():
        scores = _block_scores(q, k_cmp, lse.detach(), seqs, block_size, block_stride, select_size,
                               _scale(q, scale))
        return _assemble(scores, varlen)


def select_blocks(q, k_cmp, lse, *, block_size=32, block_stride=16, select_size=64, num_selected=16,
                  num_initial=1, num_local=2, scale=None, cu_seqlens=None):
    """Top-n block selection: int32 [B, T, H, n], sequence-relative, ascending, -1 padded.

    Candidates of query t are the blocks 0 .. t // select_size. Forced: j < num_initial and the
    num_local blocks ending at t's own; the other slots take the best block_scores, ties to the
    smaller j.
    """
    op = "select_blocks"
    _check_cmp_sizes(op, block_size, block_stride)
    _check_select_sizes(op, block_stride, select_size, num_selected, num_initial, num_local)
    _check_q(op, q)
    _check_kv(op, q, k_cmp, k_cmp, "k_cmp", "k_cmp", "Nc")
    _check_shape(op, "lse", lse, q.shape[:3], "[B, T, HQ]")
    seqs = _sequences(op, q, cu_seqlens, block_size, block_stride)
    varlen = cu_seqlens is not None
    _check_cmp_rows(op, "k_cmp", k_cmp, seqs, varlen)
    return _select(q, k_cmp, lse, seqs, varlen, block_size, block_stride, select_size, num_selected,
                   num_initial, num_local, _scale(q, scale))


def selected_attention(q, k, v, block_indices, *, select_size=64, scale=None, cu_seqlens=None):
    """Selected branch: query t, head h attends keys s <= t whose block s // select_size is
    listed in block_indices[t, h // G] (-1 slots ignored).

    q [B, T, HQ, D], k [B, T, H, D], v [B, T, H, Dv], block_indices integer [B, T, H, n]
    -> o [B, T, HQ, Dv].
    """
    op = "selected_attention"
    _check_positive(op, select_size=select_size)
    _check_q(op, q)
    _check_kv(op, q, k, v, "k", "v", "T")
    B, T, _, _ = q.shape
    H = k.shape[2]
    if not isinstance(block_indices, torch.Tensor) or block_indices.dim() != 4:
        _fail(op, "block_indices must be a 4-D integer tensor [B, T, H, n]")
    _check_shape(op, "block_indices", block_indices, (B, T, H, block_indices.shape[3]), "[B, T, H, n]")
    if block_indices.is_floating_point() or block_indices.is_complex() or block_indices.dtype == torch.bool:
        _fail(op, f"block_indices must be an integer tensor (int32), got {block_indices.dtype}")
    seqs = _sequences(op, q, cu_seqlens)
    o = _selected(op, q, k, v, block_indices, seqs, cu_seqlens is not None, select_size, _scale(q, scale))
    return o.to(q.dtype)


def sliding_window_attention(q, k, v, *, window_size=512, scale=None, cu_seqlens=None):
    """Sliding-window branch: query t attends keys max(0, t - w + 1) .. t.

    q [B, T, HQ, D], k [B, T, H, D], v [B, T, H, Dv] -> o [B, T, HQ, Dv].
    """
    op = "sliding_window_attention"
    _check_positive(op, window_size=window_size)
    _check_q(op, q)
    _check_kv(op, q, k, v, "k", "v", "T")
    seqs = _sequences(op, q, cu_seqlens)
    o = _sliding(q, k, v, seqs, cu_seqlens is not None, window_size, _scale(q, scale))
    return o.to(q.dtype)


def nsa_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_swa, *, block_size=32, block_stride=16,
                  select_size=64, num_selected=16, num_initial=1, num_local=2, window_size=512,
                  scale=None, cu_seqlens=None, return_block_indices=False):
    """Native Sparse Attention: o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa.

    The selected branch uses the blocks chosen from the compressed branch's probabilities
    (through lse.detach(): selection is not differentiable). Gates are [B, T, HQ]. Returns o
    [B, T, HQ, Dv] in q's dtype, or (o, block_indices) with return_block_indices=True.
    """
    op = "nsa_attention"
    _check_cmp_sizes(op, block_size, block_stride)
    _check_select_sizes(op, block_stride, select_size, num_selected, num_initial, num_local)
    _check_positive(op, window_size=window_size)
    _check_q(op, q)
    _check_kv(op, q, k, v, "k", "v", "T")
    _check_kv(op, q, k_cmp, v_cmp, "k_cmp", "v_cmp", "Nc")
    if k_cmp.shape[2] != k.shape[2] or v_cmp.shape[3] != v.shape[3]:
        _fail(op, f"k_cmp/v_cmp must have k's heads and v's head dim ({k.shape[2]}, {v.shape[3]}), "
                  f"got ({k_cmp.shape[2]}, {v_cmp.shape[3]})")
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        _check_shape(op, name, g, q.shape[:3], "[B, T, HQ]")
    seqs = _sequences(op, q, cu_seqlens, block_size, block_stride)
    varlen = cu_seqlens is not None
    _check_cmp_rows(op, "k_cmp", k_cmp, seqs, varlen)
    scale = _scale(q, scale)

    o_cmp, lse = _compressed(q, k_cmp, v_cmp, seqs, varlen, block_size, block_stride, scale)
    block_indices = _select(q, k_cmp, lse, seqs, varlen, block_size, block_stride, select_size,
                            num_selected, num_initial, num_local, scale)
    o_slc = _selected(op, q, k, v, block_indices, seqs, varlen, select_size, scale)
    o_swa = _sliding(q, k, v, seqs, varlen, window_size, scale)
    acc = o_cmp.dtype
    o = (g_cmp.to(acc).unsqueeze(-1) * o_cmp + g_slc.to(acc).unsqueeze(-1) * o_slc
         + g_swa.to(acc).unsqueeze(-1) * o_swa).to(q.dtype)
    return (o, block_indices) if return_block_indices else o


# ----------------------------------------------------------------------------------------------
# Decoding: a step over a KV cache (docs/design.md, "Decoding")


def cache_tokens(cache: torch.Tensor, length: int, batch: int,
                 block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tokens 0 .. length-1 of sequence `batch` of a KV cache: [length, H, C].

    cache is contiguous [B, capacity, H, C] (block_table None), or a page pool
    [num_pages, page_size, H, C] with block_table int [B, max_pages]: token t of sequence b is
    row t % page_size of page block_table[b, t // page_size]."""
    if block_table is None:
        return cache[batch, :length]
    page_size = cache.shape[1]
    t = torch.arange(length, device=cache.device)
    pages = block_table[batch].to(device=cache.device, dtype=torch.int64)[t // page_size]
    return cache[pages, t % page_size]


def decode_attention(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, g_cmp, g_slc, g_swa,
                     cache_seqlens, *, block_table=None, k_swa_cache=None, v_swa_cache=None,
                     block_size=32, block_stride=16, select_size=64, num_selected=16,
                     num_initial=1, num_local=2, window_size=512, scale=None,
                     return_block_indices=False):
    """One decoding step: the S newest tokens of each sequence attend its cache.

    q [B, S, HQ, D]: query s of sequence b sits at position cache_seqlens[b] - S + s; its own key
    and value are already in the cache. k_cache/v_cache: the raw (rotated) keys and values of the
    selected branch, and of the window branch unless k_swa_cache/v_swa_cache are given (same
    layout): contiguous [B, capacity, H, D|Dv], or page pools [num_pages, page_size, H, D|Dv]
    with block_table [B, max_pages]. k_cmp_cache [B, cmp_capacity, H, D], v_cmp_cache
    [B, cmp_capacity, H, Dv]: row i is compressed token i of the sequence (rows >= Nc(length)
    are not read). Gates [B, S, HQ]; cache_seqlens int [B]: tokens in each sequence's cache, the
    S new ones included (>= S).

    Output: row s of sequence b equals row cache_seqlens[b] - S + s of nsa_attention over the
    sequence's whole cached prefix. Returns o [B, S, HQ, Dv] in q's dtype, or (o, block_indices
    int32 [B, S, H, n]) with return_block_indices=True.
    """
    op = "decode_attention"
    _check_cmp_sizes(op, block_size, block_stride)
    _check_select_sizes(op, block_stride, select_size, num_selected, num_initial, num_local)
    _check_positive(op, window_size=window_size)
    _check_q(op, q)
    B, S, HQ, _ = q.shape
    lengths = [int(n) for n in cache_seqlens.tolist()]
    if len(lengths) != B:
        _fail(op, f"cache_seqlens must be [B] = [{B}], got {list(cache_seqlens.shape)}")
    k_swa_cache = k_cache if k_swa_cache is None else k_swa_cache
    v_swa_cache = v_cache if v_swa_cache is None else v_swa_cache
    scale = _scale(q, scale)
    acc = _acc_dtype(q.dtype)
    outs, blocks = [], []
    for b, L in enumerate(lengths):
        if L < S:
            _fail(op, f"cache_seqlens[{b}] = {L} must count the S = {S} new tokens")
        k, v = (cache_tokens(c, L, b, block_table).to(acc) for c in (k_cache, v_cache))
        k_w, v_w = (cache_tokens(c, L, b, block_table).to(acc) for c in (k_swa_cache, v_swa_cache))
        Nc = num_cmp_tokens(L, block_size, block_stride)
        k_c, v_c = k_cmp_cache[b, :Nc].to(acc), v_cmp_cache[b, :Nc].to(acc)
        # The whole prefix's queries, of which only the last S are real: every branch computes row
        # t from query t alone, so the other rows do not change the last S.
        q_full = q.new_zeros((L,) + tuple(q.shape[2:]), dtype=acc)
        q_full[L - S:] = q[b].to(acc)
        o_cmp, lse = _compressed_seq(q_full, k_c, v_c, block_size, block_stride, scale)
        NB = num_select_blocks(L, select_size)
        scores = _block_scores_seq(q_full, k_c, lse, NB, block_size, block_stride, select_size, scale)
        idx = _top_n(scores, select_size, num_selected, num_initial, num_local)
        o_slc, _ = _selected_seq(q_full, k, v, idx, select_size, scale)
        o_swa, _ = _sliding_seq(q_full, k_w, v_w, window_size, scale)
        g = [x[b].to(acc).unsqueeze(-1) for x in (g_cmp, g_slc, g_swa)]
        outs.append(g[0] * o_cmp[L - S:] + g[1] * o_slc[L - S:] + g[2] * o_swa[L - S:])
        blocks.append(idx[L - S:].to(torch.int32))
    o = torch.stack(outs, 0).to(q.dtype) if outs else q.new_zeros(0, S, HQ, v_cache.shape[-1])
    if not return_block_indices:
        return o
    H = k_cache.shape[2]
    idx = (torch.stack(blocks, 0) if blocks
           else torch.zeros(0, S, H, num_selected, dtype=torch.int32, device=q.device))
    return o, idx
