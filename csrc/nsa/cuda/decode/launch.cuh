// Launches of the decoding step's kernels (decode.h): head-dim and m-tile dispatch, shared-memory
// opt-in, programmatic dependent launch. The per-dtype kernels (W, A, C, D) are instantiated in
// decode_bf16.cu and decode_fp16.cu; B, which reads no tensor of the dtype, in decode.cu.
#pragma once

#include "../head_dims.h"
#include "cmp_scan.cuh"
#include "combine.cuh"
#include "launch_kernel.h"
#include "sparse.cuh"

namespace nsa::cuda::decode {

// Grid of kernels W, A and C: splits x (KV head, row block) x sequence.
inline dim3 split_grid(const DecodeParams& p, const Workspace& ws, int splits) {
  return dim3(unsigned(splits), unsigned(p.num_heads_k * ws.row_blocks), unsigned(p.batch));
}

// f(integral_constant<int, MT>), MT = m_tiles(rows per (sequence, KV head)).
template <typename F>
void dispatch_mtiles(const Workspace& ws, F&& f) {
  if (m_tiles(ws.rows) == 1) return f(std::integral_constant<int, 1>{});
  f(std::integral_constant<int, 4>{});
}

template <typename T>
void launch_cmp(const DecodeParams& p, const Workspace& ws, cudaStream_t stream) {
  dispatch_head_dims(kOp, p.head_dim, p.head_dim_v, [&](auto d, auto dv) {
    dispatch_mtiles(ws, [&](auto mt) {
      constexpr int D = decltype(d)::value, DV = decltype(dv)::value, MT = decltype(mt)::value;
      const dim3 grid = split_grid(p, ws, p.plan.cmp_splits);
      if (p.plan.scan_order == ScanOrder::kKeysFirst) {
        launch_kernel(p, decode_cmp_kernel<T, D, DV, MT, true>, grid, kThreads,
                      keys_first_layout(D, DV, 16 * MT, ws.split_tiles).bytes, true, stream, p, ws);
      } else {
        launch_kernel(p, decode_cmp_kernel<T, D, DV, MT, false>, grid, kThreads, ScanSmem<T, D, DV, MT>::kBytes,
                      true, stream, p, ws);
      }
    });
  });
}

// Kernel W (kWindow) or C: one grid and shared memory for both.
template <typename T, bool kWindow>
void launch_raw_branch(const DecodeParams& p, const Workspace& ws, cudaStream_t stream) {
  dispatch_head_dims(kOp, p.head_dim, p.head_dim_v, [&](auto d, auto dv) {
    dispatch_mtiles(ws, [&](auto mt) {
      constexpr int D = decltype(d)::value, DV = decltype(dv)::value, MT = decltype(mt)::value;
      auto kernel = kWindow ? decode_window_kernel<T, D, DV, MT> : decode_sparse_kernel<T, D, DV, MT>;
      launch_kernel(p, kernel, split_grid(p, ws, p.plan.slc_splits), kThreads,
                    SparseSmem<T, D, DV, MT>::kOffExtra + size_t(sparse_arrays(p).bytes), true, stream, p, ws);
    });
  });
}

template <typename T>
void launch_window(const DecodeParams& p, const Workspace& ws, cudaStream_t stream) {
  launch_raw_branch<T, true>(p, ws, stream);
}

template <typename T>
void launch_sparse(const DecodeParams& p, const Workspace& ws, cudaStream_t stream) {
  launch_raw_branch<T, false>(p, ws, stream);
}

template <typename T>
void launch_combine(const DecodeParams& p, const Workspace& ws, cudaStream_t stream) {
  dispatch_head_dims(kOp, p.head_dim, p.head_dim_v, [&](auto, auto dv) {
    constexpr int DV = decltype(dv)::value;
    const int wpr = combine_warps_per_row(p.plan), rows_per_block = kCombineWarps / wpr;
    const index_t rows = index_t(p.batch) * p.num_queries * p.num_heads;
    const dim3 grid(unsigned((rows + rows_per_block - 1) / rows_per_block));
    if (combine_batch(p.plan) == 1)
      launch_kernel(p, decode_combine_kernel<T, DV, 1>, grid, kCombineThreads, 0, true, stream, p, ws, wpr);
    else
      launch_kernel(p, decode_combine_kernel<T, DV, kCombineSplitsPerWarp>, grid, kCombineThreads, 0, true, stream, p,
                    ws, wpr);
  });
}

}  // namespace nsa::cuda::decode
