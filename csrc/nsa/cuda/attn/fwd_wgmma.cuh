// Forward kernel of the contiguous branches (compressed, window) on Hopper's warpgroup products
// (wgmma, sm_90a). The thread block is attn_fwd_kernel's (4 warps = one warpgroup, 64 query
// rows, 64-key tiles double-buffered with cp.async), but the tensor cores read Q, K (S = Q K^T)
// and V (O += P V) from shared memory once per 64 rows; with mma.sync every warp read the whole
// K and V tile for its 16 rows through ldmatrix, which bound those kernels (benchmarks/NOTES.md).
// P stays in registers as the A operand. The default on sm_90 (fwd_kind in switches.h).
#pragma once

#include "fwd_wide.cuh"

namespace nsa::cuda {

template <typename T, int D, int DV, Branch B>
__global__ void __launch_bounds__(kThreads) attn_fwd_wgmma_kernel(const typename BranchParams<B>::type p) {
  static_assert(B != Branch::kSlc && D <= 128 && DV <= 128, "contiguous branches, D, DV <= 128");
  static_assert(kThreads == 128 && kRows == 64 && kKeys == 64, "one warpgroup, 64 rows, 64 keys");
  using P = typename BranchParams<B>::type;
  extern __shared__ __align__(1024) unsigned char smem_wg[];  // (its own name: other kernels declare 128)
  T* sQ = reinterpret_cast<T*>(smem_wg);  // [D / 64][kRows][64]         (Layout::kWgmma, 1024-aligned)
  T* sK = sQ + kRows * D;              // [2] x [D / 64][kKeys][64]
  T* sV = sK + 2 * kKeys * D;          // [2] x [DV / 64][kKeys][64]
  wgmma_check_alignment(smem_wg);

  QueryRows rows;
  if (!locate_query_rows(p, rows)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  load_query_rows<D, kRows, kThreads, Layout::kWgmma>(sQ, p.q, rows);
  const QueryKeys<T, D, DV, B, Layout::kWgmma> keys(p, rows, nullptr, sK, sV);
  const ThreadRows tr(rows, warp, lane);

  const float scale_log2 = float(p.scale * M_LOG2E);
  float acc[DV / 8][4];
#pragma unroll
  for (int j = 0; j < DV / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  for (int i = 0; i < keys.count; ++i) {
    const auto tile = keys.step(i);
    if (tile.ks < tile.ke) {  // block-uniform: the products are warpgroup-wide
      // S = Q K^T: both operands K-major.
      float s[kKeys / 8][4];
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      wgmma_run([&] {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
          wgmma_ss<kKeys, T>(s, kmajor_desc<kRows>(sQ, kk), kmajor_desc<kKeys>(tile.k, kk), kk > 0);
      }, s);

      // Mask, scale, online softmax (this warp's 16 rows, the mma.sync C-fragment layout).
      const TileMask<B, P> visible(p, tr, rows, tile.ks, tile.ke, ~0ull);
      float mx[2] = {-INFINITY, -INFINITY};
      mask_scale_max<kKeys>(s, tile_all_visible<B>(p, tile.ks, tile.ke, rows.t_first, rows.t_last), visible,
                            scale_log2, mx);
      online_softmax_step<kKeys, DV>(s, mx, m, l, acc);

      wgmma_run_cb<DV, T>(acc, s, tile.v);  // O += P V: P from registers, V MN-major
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  store_rows_output<T, DV>(p, rows, tr, acc, m, l);
}

}  // namespace nsa::cuda
