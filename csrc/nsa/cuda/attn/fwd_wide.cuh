// Forward kernel of the contiguous branches (compressed, window) for D, DV <= 128: the kernel of
// fwd.cuh with two m-tiles (32 query rows) per warp and 128 rows per thread block, so that every
// K and V fragment read from shared memory feeds two products. With 16 rows per warp the
// shared-memory reads bound that kernel (ncu at 64k: L1/shared 61% busy, tensor pipe ~37%): per
// 64-key tile a warp read 32 KB of K and V for 16 rows. Q is read from shared memory per tile
// (its fragments for 32 rows would not fit in registers beside O).
#pragma once

#include "fwd.cuh"

namespace nsa::cuda {

constexpr int kWideRows = 128;  // query rows per thread block: 32 per warp

template <int D, int DV>
constexpr size_t fwd_wide_smem_bytes() {
  return size_t(2) * (kWideRows * D + 2 * kKeys * (D + DV));
}

template <typename T, int D, int DV, Branch B>
__global__ void __launch_bounds__(kThreads, 2) attn_fwd_wide_kernel(const typename BranchParams<B>::type p) {
  static_assert(B != Branch::kSlc && D <= 128 && DV <= 128, "contiguous branches, D, DV <= 128");
  using P = typename BranchParams<B>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // [kWideRows][D]
  T* sK = sQ + kWideRows * D;          // [2][kKeys][D]
  T* sV = sK + 2 * kKeys * D;          // [2][kKeys][DV]

  QueryRows rows;
  if (!locate_query_rows(p, rows, kWideRows)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  load_query_rows<D, kWideRows>(sQ, p.q, rows);
  const QueryKeys<T, D, DV, B> keys(p, rows, nullptr, sK, sV);
  // m-tile m of this warp is the 16-row group 2 warp + m.
  const ThreadRows tr[2] = {ThreadRows(rows, 2 * warp, lane), ThreadRows(rows, 2 * warp + 1, lane)};
  const bool warp_on = warp * 32 < rows.count;  // warp-uniform: rows past count are padding

  const float scale_log2 = float(p.scale * M_LOG2E);
  float acc[2][DV / 8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int j = 0; j < DV / 8; ++j) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.f;
  float m[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}}, l[2][2] = {{0.f, 0.f}, {0.f, 0.f}};

  for (int i = 0; i < keys.count; ++i) {
    const auto tile = keys.step(i);
    if (tile.ks < tile.ke && warp_on) {
      float s[2][kKeys / 8][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int j = 0; j < kKeys / 8; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
      warp_gemm_nt_x2<D, kKeys, T>(s, sQ, warp * 32, tile.k);
      const bool all = tile_all_visible<B>(p, tile.ks, tile.ke, rows.t_first, rows.t_last);
      uint32_t pa[2][kKeys / 16][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        // Mask, scale, online softmax, then P as A fragments (s is dead after this).
        const TileMask<B, P> visible(p, tr[mt], rows, tile.ks, tile.ke, ~0ull);
        float mx[2] = {-INFINITY, -INFINITY};
        mask_scale_max<kKeys>(s[mt], all, visible, scale_log2, mx);
        online_softmax_step<kKeys, DV>(s[mt], mx, m[mt], l[mt], acc[mt]);
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; ++kk) c_to_a<T>(pa[mt][kk], s[mt][2 * kk], s[mt][2 * kk + 1]);
      }
      warp_gemm_pn_x2<kKeys, DV, T>(acc, pa, tile.v);  // O += P V
    }
    __syncthreads();
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < 2; ++mt) store_rows_output<T, DV, B>(p, rows, tr[mt], acc[mt], m[mt], l[mt]);
}

}  // namespace nsa::cuda
