"""Fake (meta) kernels and autograd of the nsa:: ops defined in C++ (csrc/torch/registration.cpp).

Each attention branch is one forward op returning (o, lse) and one backward op returning the
input gradients; `register_autograd` ties them together, so the ops work under autograd and
`torch.compile(fullgraph=True)` without a torch.autograd.Function. decode_attention (inference)
has a fake kernel and no autograd.
"""
import torch
from torch.library import register_autograd, register_fake


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _attn_outputs(q, v):
    B, T, HQ, _ = q.shape
    return q.new_empty(B, T, HQ, v.shape[-1]), q.new_empty(B, T, HQ, dtype=_lse_dtype(q))


def _grad(g, like):
    """The incoming gradient as the kernels want it: materialised, last dim contiguous."""
    if g is None:
        return torch.zeros_like(like)
    return g if g.stride(-1) == 1 else g.contiguous()


# ---------------------------------------------------------------- fake kernels
@register_fake("nsa::compressed_attention_fwd")
def _(q, k_cmp, v_cmp, cu_seqlens, block_size, block_stride, scale):
    return _attn_outputs(q, v_cmp)


@register_fake("nsa::compressed_attention_bwd")
def _(dout, dlse, q, k_cmp, v_cmp, o, lse, cu_seqlens, block_size, block_stride, scale):
    return torch.empty_like(q), torch.empty_like(k_cmp), torch.empty_like(v_cmp)


@register_fake("nsa::select_blocks")
def _(q, k_cmp, lse, cu_seqlens, block_size, block_stride, select_size, num_selected,
      num_initial, num_local, scale):
    B, T = q.shape[:2]
    return q.new_empty(B, T, k_cmp.shape[2], num_selected, dtype=torch.int32)


@register_fake("nsa::selected_attention_fwd")
def _(q, k, v, block_indices, cu_seqlens, select_size, scale):
    return _attn_outputs(q, v)


@register_fake("nsa::selected_attention_bwd")
def _(dout, q, k, v, block_indices, o, lse, cu_seqlens, select_size, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@register_fake("nsa::sliding_window_attention_fwd")
def _(q, k, v, cu_seqlens, window_size, scale):
    return _attn_outputs(q, v)


@register_fake("nsa::sliding_window_attention_bwd")
def _(dout, q, k, v, o, lse, cu_seqlens, window_size, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@register_fake("nsa::gated_sum")
def _(o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa):
    return torch.empty_like(o_cmp)


@register_fake("nsa::gated_sum_bwd")
def _(dout, o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa):
    grads_o = tuple(torch.empty_like(o_cmp) for _ in range(3))
    grads_g = tuple(o_cmp.new_empty(g_cmp.shape) for _ in range(3))
    return grads_o + grads_g


@register_fake("nsa::decode_attention")
def _(q, k_cache, v_cache, k_swa_cache, v_swa_cache, k_cmp_cache, v_cmp_cache, g_cmp, g_slc,
      g_swa, cache_seqlens, block_table, block_size, block_stride, select_size, num_selected,
      num_initial, num_local, window_size, scale):
    B, S, HQ, _ = q.shape
    return (q.new_empty(B, S, HQ, v_cache.shape[-1]),
            q.new_empty(B, S, k_cache.shape[2], num_selected, dtype=torch.int32))


# ---------------------------------------------------------------- autograd
# Forward inputs are (q, k, v, [block_indices,] cu_seqlens, *hyper-parameters); the backward op
# takes (dout, q, k, v, [block_indices,] o, lse, cu_seqlens, *hyper-parameters).

def _setup_cmp(ctx, inputs, output):
    q, k_cmp, v_cmp, cu_seqlens, *hyper = inputs
    o, lse = output
    ctx.save_for_backward(q, k_cmp, v_cmp, o, lse, cu_seqlens)
    ctx.hyper = hyper


def _backward_cmp(ctx, dout, dlse):
    q, k_cmp, v_cmp, o, lse, cu_seqlens = ctx.saved_tensors
    # lse is differentiable here (the public compressed_attention returns it): dlse joins dS.
    dlse = None if dlse is None else (dlse if dlse.stride(-1) == 1 else dlse.contiguous())
    dq, dk, dv = torch.ops.nsa.compressed_attention_bwd(
        _grad(dout, o), dlse, q, k_cmp, v_cmp, o, lse, cu_seqlens, *ctx.hyper)
    return dq, dk, dv, None, None, None, None


def _setup_slc(ctx, inputs, output):
    q, k, v, block_indices, cu_seqlens, *hyper = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)  # internal to the branch; the public API returns o only
    ctx.save_for_backward(q, k, v, block_indices, o, lse, cu_seqlens)
    ctx.hyper = hyper


def _backward_slc(ctx, dout, _dlse):
    q, k, v, block_indices, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = torch.ops.nsa.selected_attention_bwd(
        _grad(dout, o), q, k, v, block_indices, o, lse, cu_seqlens, *ctx.hyper)
    return dq, dk, dv, None, None, None, None


def _setup_swa(ctx, inputs, output):
    q, k, v, cu_seqlens, *hyper = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.hyper = hyper


def _backward_swa(ctx, dout, _dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = torch.ops.nsa.sliding_window_attention_bwd(
        _grad(dout, o), q, k, v, o, lse, cu_seqlens, *ctx.hyper)
    return dq, dk, dv, None, None, None


def _setup_gate(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_gate(ctx, dout):
    saved = ctx.saved_tensors
    return torch.ops.nsa.gated_sum_bwd(_grad(dout, saved[0]), *saved)


register_autograd("nsa::compressed_attention_fwd", _backward_cmp, setup_context=_setup_cmp)
register_autograd("nsa::gated_sum", _backward_gate, setup_context=_setup_gate)
register_autograd("nsa::selected_attention_fwd", _backward_slc, setup_context=_setup_slc)
register_autograd("nsa::sliding_window_attention_fwd", _backward_swa, setup_context=_setup_swa)
