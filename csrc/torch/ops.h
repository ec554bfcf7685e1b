// The nsa:: torch ops (schemas in registration.cpp). Each validates its arguments, allocates its
// outputs, fills its op family's params struct and runs the kernel of the tensors' device.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace nsa_torch {

using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> compressed_attention_fwd(
    const at::Tensor& q, const at::Tensor& k_cmp, const at::Tensor& v_cmp,
    const OptTensor& cu_seqlens, int64_t block_size, int64_t block_stride, double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> compressed_attention_bwd(
    const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q, const at::Tensor& k_cmp,
    const at::Tensor& v_cmp, const at::Tensor& o, const at::Tensor& lse,
    const OptTensor& cu_seqlens, int64_t block_size, int64_t block_stride, double scale);

at::Tensor select_blocks(const at::Tensor& q, const at::Tensor& k_cmp, const at::Tensor& lse,
                         const OptTensor& cu_seqlens, int64_t block_size, int64_t block_stride,
                         int64_t select_size, int64_t num_selected, int64_t num_initial,
                         int64_t num_local, double scale);

std::tuple<at::Tensor, at::Tensor> selected_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& block_indices, const OptTensor& cu_seqlens, int64_t select_size,
    double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> selected_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& block_indices, const at::Tensor& o, const at::Tensor& lse,
    const OptTensor& cu_seqlens, int64_t select_size, double scale);

std::tuple<at::Tensor, at::Tensor> sliding_window_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& cu_seqlens,
    int64_t window_size, double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> sliding_window_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& o, const at::Tensor& lse, const OptTensor& cu_seqlens, int64_t window_size,
    double scale);

// o = g_cmp o_cmp + g_slc o_slc + g_swa o_swa (gates [B, T, HQ], outputs [B, T, HQ, Dv], one
// dtype) and its backward: (do_cmp, do_slc, do_swa, dg_cmp, dg_slc, dg_swa).
at::Tensor gated_sum(const at::Tensor& o_cmp, const at::Tensor& o_slc, const at::Tensor& o_swa,
                     const at::Tensor& g_cmp, const at::Tensor& g_slc, const at::Tensor& g_swa);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_sum_bwd(
    const at::Tensor& dout, const at::Tensor& o_cmp, const at::Tensor& o_slc, const at::Tensor& o_swa,
    const at::Tensor& g_cmp, const at::Tensor& g_slc, const at::Tensor& g_swa);

// One decoding step over a KV cache (inference, no backward): (o [B, S, HQ, Dv],
// block_indices int32 [B, S, H, n]).
std::tuple<at::Tensor, at::Tensor> decode_attention(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const OptTensor& k_swa_cache, const OptTensor& v_swa_cache, const at::Tensor& k_cmp_cache,
    const at::Tensor& v_cmp_cache, const at::Tensor& g_cmp, const at::Tensor& g_slc,
    const at::Tensor& g_swa, const at::Tensor& cache_seqlens, const OptTensor& block_table,
    int64_t block_size, int64_t block_stride, int64_t select_size, int64_t num_selected,
    int64_t num_initial, int64_t num_local, int64_t window_size, double scale);

}  // namespace nsa_torch
