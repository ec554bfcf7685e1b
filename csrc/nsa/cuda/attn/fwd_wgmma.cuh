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

// attn_fwd_wgmma_kernel with the softmax under the products (opt-in,
// NSA_CUDA_FWD_KERNEL=wgmma_overlap, until checked on a GPU). There every step waited for
// S = Q K^T, did the softmax, then waited for O += P V: the tensor cores idled during the
// softmax and the CUDA cores during the products. Here step i issues S_{i+1} = Q K_{i+1}^T and
// O += P_i V_i back to back, waits for S_{i+1} only, does tile i + 1's softmax while P_i V_i runs,
// and rescales O (to the new maxima) before issuing the next product into it. That needs K_{i+1} and V_i at once, so keys and values
// are loaded apart: after step i's barrier, K_{i+2} goes to K_i's stage and V_{i+1} to V_{i-1}'s
// (every warp waited for S_i and for P_{i-1} V_{i-1} in step i - 1), one cp.async group per
// step, waited for at the top of the next.
// Open (compile-checked only): in the SASS of nvcc 13.0, ptxas still places the wait for
// P_i V_i (WARPGROUP.DEPBAR 0) right after the wait for S_{i+1}, before the exps, whatever the
// order in the PTX (with or without a barrier or branches between them), so the softmax does
// not yet run under the product. To be checked on the GPU (ncu) before this kernel is timed.
template <typename T, int D, int DV, Branch B>
__global__ void __launch_bounds__(kThreads)
    attn_fwd_wgmma_overlap_kernel(const typename BranchParams<B>::type p) {
  static_assert(B != Branch::kSlc && D <= 128 && DV <= 128, "contiguous branches, D, DV <= 128");
  static_assert(kThreads == 128 && kRows == 64 && kKeys == 64, "one warpgroup, 64 rows, 64 keys");
  using P = typename BranchParams<B>::type;
  extern __shared__ __align__(1024) unsigned char smem_wg[];
  T* sQ = reinterpret_cast<T*>(smem_wg);  // [D / 64][kRows][64]         (Layout::kWgmma, 1024-aligned)
  T* sK = sQ + kRows * D;              // [2] x [D / 64][kKeys][64]
  T* sV = sK + 2 * kKeys * D;          // [2] x [DV / 64][kKeys][64]
  wgmma_check_alignment(smem_wg);

  QueryRows rows;
  if (!locate_query_rows(p, rows)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  load_query_rows<D, kRows, kThreads, Layout::kWgmma>(sQ, p.q, rows);
  const QueryKeys<T, D, DV, B, Layout::kWgmma> keys(p, rows, nullptr, sK, sV);  // commits {Q, K_0, V_0}
  const ThreadRows tr(rows, warp, lane);
  const int count = keys.count;  // contiguous branches: every tile holds keys
  if (count > 1) keys.load_k(1);
  cp_async_commit();  // groups: {Q, K_0, V_0}, K_1, then {K_{i+2}, V_{i+1}} per step

  const float scale_log2 = float(p.scale * M_LOG2E);
  float acc[DV / 8][4];
#pragma unroll
  for (int j = 0; j < DV / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  // S_i = Q K_i^T into s (K_i in stage i % 2); then masked, scaled, turned into probabilities
  // against the new row maxima (corr: the factor for O).
  auto issue_s = [&](float (&s)[kKeys / 8][4], int i) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      wgmma_ss<kKeys, T>(s, kmajor_desc<kRows>(sQ, kk), kmajor_desc<kKeys>(sK + (i & 1) * kKeys * D, kk), kk > 0);
  };
  // Always masked (no unmasked fast path): no branch between the two waits.
  auto softmax = [&](float (&s)[kKeys / 8][4], int i, float (&corr)[2]) {
    index_t ks, ke;
    unsigned long long tok;
    keys.tiles.tile(p, keys.u, i, ks, ke, tok);
    const TileMask<B, P> visible(p, tr, rows, ks, ke, ~0ull);
    float mx[2] = {-INFINITY, -INFINITY};
    mask_scale_max<kKeys>(s, false, visible, scale_log2, mx);
    softmax_probs_step<kKeys>(s, mx, m, l, corr);
  };

  float s[kKeys / 8][4];
  float corr[2] = {1.f, 1.f};  // takes O to the maxima of the tile whose P is in s
  if (count > 0) {
    cp_async_wait<1>();  // {Q, K_0, V_0}
    fence_proxy_async();
    __syncthreads();
    wgmma_run([&] { issue_s(s, 0); }, s);
    softmax(s, 0, corr);  // (O is still zero)
  }
  // O += P_i V_i (P_i from s, V_i in stage i % 2), issued as one wgmma group after its own fence.
  auto issue_pv = [&](int i) { wgmma_issue_cb<DV, T>(acc, s, sV + (i & 1) * kKeys * DV); };
  // Every tile but the last: no product is conditional inside the loop (ptxas serializes the
  // stages when it cannot see which accumulators a branch leaves in flight).
  for (int i = 0; i + 1 < count; ++i) {
    cp_async_wait<0>();  // K_{i+1} and V_i
    fence_proxy_async();
    __syncthreads();
    if (i + 2 < count) keys.load_k(i + 2);
    keys.load_v(i + 1);  // (step 0: V_1's stage was never used)
    cp_async_commit();

    // One fence per group: ptxas delimits the pipeline stages by them, and reading S_{i+1} while
    // P_i V_i runs must not fall inside P_i V_i's stage.
    float sn[kKeys / 8][4];
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j) sn[j][0] = sn[j][1] = sn[j][2] = sn[j][3] = 0.f;
    wgmma_fence_operands(sn);
    wgmma_fence();
    issue_s(sn, i + 1);
    wgmma_commit();
    rescale_rows<DV>(acc, corr);  // to tile i's maxima (P_{i-1} V_{i-1} completed in step i - 1)
    issue_pv(i);
    wgmma_wait<1>();  // S_{i+1}; P_i V_i may still run
    wgmma_fence_operands(sn);
    softmax(sn, i + 1, corr);
    wgmma_fence_operands(sn);
    wgmma_wait<0>();
    wgmma_fence_operands(acc);
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = sn[j][e];
  }
  if (count > 0) {  // the last tile: O += P V only
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    rescale_rows<DV>(acc, corr);
    issue_pv(count - 1);
    wgmma_wait<0>();
    wgmma_fence_operands(acc);
  }
  cp_async_wait<0>();

  store_rows_output<T, DV>(p, rows, tr, acc, m, l);
}

}  // namespace nsa::cuda
