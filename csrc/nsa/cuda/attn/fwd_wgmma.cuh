// Forward kernel of the contiguous branches (compressed, window) on Hopper's warpgroup products
// (wgmma, sm_90a). The thread block is attn_fwd_kernel's (4 warps = one warpgroup, 64 query
// rows, 64-key tiles streamed with cp.async: K in two stages, V in one), but
// the tensor cores read Q, K (S = Q K^T) and V (O += P V) from shared memory once per 64 rows;
// with mma.sync every warp read the whole K and V tile for its 16 rows through ldmatrix, which
// bound those kernels (benchmarks/NOTES.md). P stays in registers as the A operand. The default
// on sm_90 for D, Dv in {64, 128} (nsa/plan.cpp).
#pragma once

#include "fwd_wide.cuh"

namespace nsa::cuda {

// Shared memory of attn_fwd_wgmma_kernel: Q, two stages of K, one stage of V.
template <int D, int DV>
constexpr size_t fwd_wgmma_smem_bytes() {
  return size_t(2) * (kRows * D + 2 * kKeys * D + kKeys * DV);
}

// One stage of V, loaded at the top of the step that uses it (its product comes after S = Q K^T
// and the softmax, which hide the load) behind a second barrier per step. 64 KB instead of 80 KB
// (two stages) at D = Dv = 128, so 3 thread blocks fit on an SM instead of 2: ncu at 64k found
// the kernel latency-bound (issue slots 41% busy, 5.4 cycles per instruction at 2 warps per
// scheduler, a third of the stall samples in the softmax's dependent chains).
template <typename T, int D, int DV, Branch B>
__global__ void __launch_bounds__(kThreads, 3) attn_fwd_wgmma_kernel(const typename BranchParams<B>::type p) {
  static_assert(B != Branch::kSlc && wgmma_head_dims(D, DV), "contiguous branches, D, DV in {64, 128}");
  static_assert(kThreads == 128 && kRows == 64 && kKeys == 64, "one warpgroup, 64 rows, 64 keys");
  using P = typename BranchParams<B>::type;
  extern __shared__ __align__(1024) unsigned char smem_wg[];  // (its own name: other kernels declare 128)
  T* sQ = reinterpret_cast<T*>(smem_wg);  // [D / 64][kRows][64]         (Layout::kWgmma, 1024-aligned)
  T* sK = sQ + kRows * D;              // [2] x [D / 64][kKeys][64]
  T* sV = sK + 2 * kKeys * D;          // [DV / 64][kKeys][64]
  wgmma_check_alignment(smem_wg);

  QueryRows rows;
  if (!locate_query_rows(p, rows)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  load_query_rows<D, kRows, kThreads, Layout::kWgmma>(sQ, p.q, rows);
  index_t lo, hi;  // the keys some row sees; every tile of [lo, hi) holds keys
  key_range<B>(p, rows.seq, rows.t_first, rows.t_last, lo, hi);
  const int count = int((hi - lo + kKeys - 1) / kKeys);
  const index_t row0 = key_row<B>(rows.seq, 0);
  // The key tiles streamed into their stages (tiles.cuh).
  const StridedTileStream<T, kKeys, D, kThreads, Layout::kWgmma> k_stream(
      p.k.template ptr<const T>(rows.seq.batch, row0, rows.g), p.k.row_stride);
  const StridedTileStream<T, kKeys, DV, kThreads, Layout::kWgmma> v_stream(
      p.v.template ptr<const T>(rows.seq.batch, row0, rows.g), p.v.row_stride);
  auto keys_of = [&](int i, index_t& ks) {  // tile i's first key and its number of keys
    ks = lo + index_t(i) * kKeys;
    return int(min(index_t(kKeys), hi - ks));
  };
  auto load_k = [&](int i) {  // K of tile i into stage i % 2
    index_t ks;
    const int valid = keys_of(i, ks);
    k_stream.copy(sK + (i & 1) * kKeys * D, ks, valid);
  };
  auto load_v = [&](int i) {  // V of tile i
    index_t ks;
    const int valid = keys_of(i, ks);
    v_stream.copy(sV, ks, valid);
  };
  if (count > 0) load_k(0);
  cp_async_commit();  // one group with Q
  const ThreadRows tr(rows, warp, lane);

  // The descriptors of k-step 0 (Q; each stage of K; V), built once: a k-step adds a constant.
  // (Two scalars for K, not an array: a run-time index would put the array in local memory.)
  const uint64_t q_desc = kmajor_desc<kRows>(sQ, 0);
  const uint64_t k_desc0 = kmajor_desc<kKeys>(sK, 0), k_desc1 = kmajor_desc<kKeys>(sK + kKeys * D, 0);
  const uint64_t v_desc = mnmajor_desc<kKeys>(sV, 0);

  const float scale_log2 = float(p.scale * M_LOG2E);
  float acc[DV / 8][4];
#pragma unroll
  for (int j = 0; j < DV / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  for (int i = 0; i < count; ++i) {
    // Stages written here were last read in step i - 1, before its closing barrier: V by P V,
    // K_{i+1}'s by S = Q K^T.
    load_v(i);
    cp_async_commit();
    if (i + 1 < count) load_k(i + 1);
    cp_async_commit();
    cp_async_wait<2>();  // K_i
    fence_proxy_async();  // the tensor cores read it next
    __syncthreads();
    const index_t ks = lo + index_t(i) * kKeys, ke = min(ks + kKeys, hi);

    // S = Q K^T: both operands K-major.
    float s[kKeys / 8][4];
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    const uint64_t kd = (i & 1) ? k_desc1 : k_desc0;
    wgmma_run([&] {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        wgmma_ss<kKeys, T>(s, q_desc + kmajor_step<kRows, T>(kk), kd + kmajor_step<kKeys, T>(kk), kk > 0);
    }, s);

    // Mask, online softmax (this warp's 16 rows, the mma.sync C-fragment layout).
    const TileMask<B, P> visible(p, tr, rows, ks, ke, ~0ull);
    masked_softmax_step<kKeys, DV>(s, tile_all_visible<B>(p, ks, ke, rows.t_first, rows.t_last), visible,
                                   scale_log2, m, l, acc);

    cp_async_wait<1>();  // V_i, every thread's part
    fence_proxy_async();
    __syncthreads();
    wgmma_run_cb<DV, T>(acc, s, v_desc);  // O += P V: P from registers, V MN-major
    __syncthreads();
  }
  cp_async_wait<0>();

  store_rows_output<T, DV, B>(p, rows, tr, acc, m, l);
}

}  // namespace nsa::cuda
