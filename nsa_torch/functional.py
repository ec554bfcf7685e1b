"""The public functions of nsa-torch (docs/design.md section 1). Each checks its arguments, then
calls the nsa:: torch ops (whose autograd and fake kernels are in ops.py).

Layout is flash-attn's: q [B, T, HQ, D], k [B, T, H, D], v [B, T, H, Dv], compressed keys/values
[B, Nc, H, D|Dv], gates [B, T, HQ]; with cu_seqlens (int32 [N + 1]) everything is packed, B = 1.
"""
import torch

from . import _checks as check

_NS = "nsa_torch."


def _ops():
    from . import _C, _C_ERROR
    if _C is None:
        raise RuntimeError("nsa_torch: the compiled ops are not available (nsa_torch._C failed to "
                           f"load: {_C_ERROR}); only nsa_torch.reference works")
    return torch.ops.nsa


def _autocast(*tensors):
    """Under torch.autocast, float tensors are cast to the autocast dtype (the kernels run in one
    dtype). Outside autocast, inputs are used as given."""
    q = tensors[0]
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


# Each public function checks its arguments once (_checks.py), then runs its unchecked internal
# (the leading underscore), which calls the op. nsa_attention checks all of its arguments itself
# and calls the internals straight away: its branches never check again.

def compressed_attention(q, k_cmp, v_cmp, *, block_size=32, block_stride=16, scale=None,
                         cu_seqlens=None):
    """Attention of each query over the compressed tokens whose whole window is in its past.

    Returns (o [B, T, HQ, Dv], lse [B, T, HQ]); lse is float32 (float64 for float64 inputs), and
    -inf (with o = 0) for queries that see no compressed token yet. Both are differentiable.
    A NaN or Inf in an input, or scores that overflow, give NaN in the rows that read it
    (forward and backward), never a finite row.
    """
    fn = _NS + "compressed_attention"
    q, k_cmp, v_cmp = _autocast(q, k_cmp, v_cmp)
    check.hyper(fn, block_size=block_size, block_stride=block_stride)
    check.qkv(fn, q, k_cmp, v_cmp, "k_cmp", "v_cmp", same_len=False)
    check.seqlens(fn, q, cu_seqlens)
    check.num_cmp_rows(fn, q, k_cmp, block_size, block_stride, cu_seqlens)
    return _compressed_attention(q, k_cmp, v_cmp, block_size, block_stride,
                                 check.scale(fn, q, scale), cu_seqlens)


def _compressed_attention(q, k_cmp, v_cmp, block_size, block_stride, scale, cu_seqlens):
    return _ops().compressed_attention_fwd(q, k_cmp, v_cmp, cu_seqlens, block_size, block_stride,
                                           scale)


def select_blocks(q, k_cmp, lse, *, block_size=32, block_stride=16, select_size=64,
                  num_selected=16, num_initial=1, num_local=2, scale=None, cu_seqlens=None):
    """Top-n selection blocks per (token, KV head) from the compressed attention scores.

    Returns int32 [B, T, H, num_selected]: ascending block indices of the query's sequence,
    padded with -1. Not differentiable. NaN block scores rank last.
    """
    fn = _NS + "select_blocks"
    q, k_cmp = _autocast(q, k_cmp)
    check.hyper(fn, block_size=block_size, block_stride=block_stride, select_size=select_size,
                num_selected=num_selected, num_initial=num_initial, num_local=num_local)
    check.qkv(fn, q, k_cmp, None, "k_cmp", same_len=False)
    B, T, HQ, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    check.tensor(fn, "lse", lse, ("B", "T", "HQ"), (B, T, HQ), lse_dtype, q.device)
    check.seqlens(fn, q, cu_seqlens)
    check.num_cmp_rows(fn, q, k_cmp, block_size, block_stride, cu_seqlens)
    return _select_blocks(q, k_cmp, lse, block_size, block_stride, select_size, num_selected,
                          num_initial, num_local, check.scale(fn, q, scale), cu_seqlens)


def _select_blocks(q, k_cmp, lse, block_size, block_stride, select_size, num_selected,
                   num_initial, num_local, scale, cu_seqlens):
    return _ops().select_blocks(q.detach(), k_cmp.detach(), lse.detach(), cu_seqlens, block_size,
                                block_stride, select_size, num_selected, num_initial, num_local,
                                scale)


def selected_attention(q, k, v, block_indices, *, select_size=64, scale=None, cu_seqlens=None):
    """Attention of query t, head h over the causal keys of the blocks listed in
    block_indices[t, h // G] (int32 [B, T, H, n], -1 = empty slot, no duplicates).
    A NaN or Inf in an input, or scores that overflow, give NaN in the rows that read it."""
    fn = _NS + "selected_attention"
    q, k, v = _autocast(q, k, v)
    check.hyper(fn, select_size=select_size)
    check.qkv(fn, q, k, v)
    B, T, _, _ = q.shape
    check.tensor(fn, "block_indices", block_indices, ("B", "T", "H", "n"),
                 (B, T, k.shape[2], None), torch.int32, q.device)
    check.seqlens(fn, q, cu_seqlens)
    return _selected_attention(q, k, v, block_indices, select_size, check.scale(fn, q, scale),
                               cu_seqlens)


def _selected_attention(q, k, v, block_indices, select_size, scale, cu_seqlens):
    o, _ = _ops().selected_attention_fwd(q, k, v, block_indices, cu_seqlens, select_size, scale)
    return o


def sliding_window_attention(q, k, v, *, window_size=512, scale=None, cu_seqlens=None):
    """Causal attention of query t over keys max(0, t - window_size + 1) .. t
    (flash-attn's window_size=(window_size - 1, 0)).
    A NaN or Inf in an input, or scores that overflow, give NaN in the rows that read it."""
    fn = _NS + "sliding_window_attention"
    q, k, v = _autocast(q, k, v)
    check.hyper(fn, window_size=window_size)
    check.qkv(fn, q, k, v)
    check.seqlens(fn, q, cu_seqlens)
    return _sliding_window_attention(q, k, v, window_size, check.scale(fn, q, scale), cu_seqlens)


def _sliding_window_attention(q, k, v, window_size, scale, cu_seqlens):
    o, _ = _ops().sliding_window_attention_fwd(q, k, v, cu_seqlens, window_size, scale)
    return o


def nsa_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_swa, *, block_size=32, block_stride=16,
                  select_size=64, num_selected=16, num_initial=1, num_local=2, window_size=512,
                  scale=None, cu_seqlens=None, return_block_indices=False):
    """Native Sparse Attention: o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa, the selected
    branch attending the blocks chosen from the compressed branch's scores.

    Gradients reach q, k, v, k_cmp, v_cmp and the gates. Returns o [B, T, HQ, Dv] in q's dtype,
    or (o, block_indices) with return_block_indices=True.

    Non-finite values never vanish: a NaN or Inf in an input shows as NaN in every output row
    that depends on it, forward and backward (it may reach more rows, as in any tiled attention),
    and scores that overflow the accumulation type give NaN rows, never zeros. A query that sees
    no key of a branch gets 0 from it, without NaN. With cu_seqlens on CUDA, its values are
    checked on the device (a bad one raises at the next synchronisation).
    """
    fn = _NS + "nsa_attention"
    check.hyper(fn, block_size=block_size, block_stride=block_stride, select_size=select_size,
                num_selected=num_selected, num_initial=num_initial, num_local=num_local,
                window_size=window_size)
    # Checked here as a whole, so that errors name the function the caller used, and so that
    # k_cmp/v_cmp agree with k/v (each branch alone cannot see a mismatch between them, and
    # o_cmp with Dv = 1 would silently broadcast). The branches below are the unchecked internals.
    check.qkv(fn, q, k, v)
    B, _, _, D = q.shape
    H, Dv = k.shape[2], v.shape[3]
    check.tensor(fn, "k_cmp", k_cmp, ("B", "Nc", "H", "D"), (B, None, H, D), q.dtype, q.device)
    check.tensor(fn, "v_cmp", v_cmp, ("B", "Nc", "H", "Dv"), (B, k_cmp.shape[1], H, Dv), q.dtype,
                 q.device)
    check.seqlens(fn, q, cu_seqlens)
    check.num_cmp_rows(fn, q, k_cmp, block_size, block_stride, cu_seqlens)
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        check.gate(fn, name, g, q)
    scale = check.scale(fn, q, scale)
    q, k, v, k_cmp, v_cmp = _autocast(q, k, v, k_cmp, v_cmp)
    o_cmp, lse = _compressed_attention(q, k_cmp, v_cmp, block_size, block_stride, scale,
                                       cu_seqlens)
    block_indices = _select_blocks(q, k_cmp, lse, block_size, block_stride, select_size,
                                   num_selected, num_initial, num_local, scale, cu_seqlens)
    o_slc = _selected_attention(q, k, v, block_indices, select_size, scale, cu_seqlens)
    o_swa = _sliding_window_attention(q, k, v, window_size, scale, cu_seqlens)
    o = gated_sum(o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa)
    return (o, block_indices) if return_block_indices else o


def decode_attention(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, g_cmp, g_slc, g_swa,
                     cache_seqlens, *, block_table=None, k_swa_cache=None, v_swa_cache=None,
                     block_size=32, block_stride=16, select_size=64, num_selected=16,
                     num_initial=1, num_local=2, window_size=512, scale=None,
                     return_block_indices=False):
    """One decoding step: the S newest tokens of each sequence attend its KV cache (inference:
    no gradients).

    q [B, S, HQ, D]: query s of sequence b sits at position cache_seqlens[b] - S + s, and its own
    key and value are already in the cache. k_cache/v_cache: the raw (rotated) keys and values of
    the selected branch, and of the window branch unless k_swa_cache/v_swa_cache are given (same
    layout): contiguous [B, capacity, H, D|Dv], or page pools [num_pages, page_size, H, D|Dv] with
    block_table int32 [B, max_pages] (token t of sequence b is row t % page_size of page
    block_table[b, t // page_size]; page_size a multiple of select_size). k_cmp_cache
    [B, cmp_capacity, H, D], v_cmp_cache [B, cmp_capacity, H, Dv]: row i is compressed token i of
    the sequence, cmp_capacity >= Nc(capacity) (rows >= Nc(length) are not read). Gates
    [B, S, HQ] and every cache in q's dtype; cache_seqlens int32 [B] on q's device: tokens in
    each sequence's cache, the S new ones included.

    Row s of sequence b equals row cache_seqlens[b] - S + s of nsa_attention over the sequence's
    whole cached prefix (same compressed tokens, same selected blocks, same window). Returns
    o [B, S, HQ, Dv] in q's dtype, or (o, block_indices int32 [B, S, H, n]) with
    return_block_indices=True.

    Never syncs with the host: cache_seqlens stays on the device, so a CUDA step can be captured
    in a CUDA graph and replayed with new lengths. A length outside [S, capacity] or a page
    outside the pool raises a ValueError on the CPU; on CUDA that sequence's rows of o are NaN
    (nothing outside the caches is read).
    """
    fn = _NS + "decode_attention"
    (q, k_cache, v_cache, k_swa_cache, v_swa_cache, k_cmp_cache, v_cmp_cache, g_cmp, g_slc,
     g_swa) = _autocast(q, k_cache, v_cache, k_swa_cache, v_swa_cache, k_cmp_cache, v_cmp_cache,
                        g_cmp, g_slc, g_swa)
    check.hyper(fn, block_size=block_size, block_stride=block_stride, select_size=select_size,
                num_selected=num_selected, num_initial=num_initial, num_local=num_local,
                window_size=window_size)
    check.decode(fn, q, k_cache, v_cache, k_swa_cache, v_swa_cache, k_cmp_cache, v_cmp_cache,
                 (g_cmp, g_slc, g_swa), cache_seqlens, block_table, block_size=block_size,
                 block_stride=block_stride, select_size=select_size)
    o, block_indices = _ops().decode_attention(
        q, k_cache, v_cache, k_swa_cache, v_swa_cache, k_cmp_cache, v_cmp_cache, g_cmp, g_slc,
        g_swa, cache_seqlens, block_table, block_size, block_stride, select_size, num_selected,
        num_initial, num_local, window_size, check.scale(fn, q, scale))
    return (o, block_indices) if return_block_indices else o


def gated_sum(o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa):
    """g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa for branch outputs [B, T, HQ, Dv] and gates
    [B, T, HQ], in the outputs' dtype (nsa_attention's last step, for callers that run the
    branches themselves)."""
    if all(g.dtype == o_cmp.dtype for g in (g_cmp, g_slc, g_swa)):
        # One pass over the rows (sums in float32, or float64 for float64) instead of five
        # element-wise ops and their temporaries.
        return _ops().gated_sum(o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa)
    # gates in another float dtype (e.g. float32 gates under bf16 autocast)
    o = g_cmp.unsqueeze(-1) * o_cmp + g_slc.unsqueeze(-1) * o_slc + g_swa.unsqueeze(-1) * o_swa
    return o.to(o_cmp.dtype)
