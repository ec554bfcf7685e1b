// Forward and dq kernels of the selected branch with one warp per thread block and 16 query rows
// per warp, each warp walking only the blocks its own tokens chose (the paper's per-token loop).
//
// Why not the shared kernels (fwd.cuh, bwd.cuh): there, 4 warps share the union of the blocks of
// the 64 rows' tokens. With G = 16 those are 4 tokens that share little more than the forced
// blocks, so each union tile is computed by one warp while three wait at the barriers. Here a
// warp holds 16 (token, head) rows (one token for G = 16, 16 / G tokens for smaller G), has its
// own shared memory and cp.async pipeline, and never waits for another warp. Used for G < 64;
// for G >= 64 one thread block of the shared kernel is one token, which is this loop already.
//
// Per warp: the list of (block, token) items (a block a token chose, repeats dropped), each cut
// into sub-tiles of kWarpKeys keys, streamed through kWarpStages stages with cp.async; rows of other
// tokens masked.
// Shared memory: K [kWarpStages][kWarpKeys][D], V [kWarpStages][kWarpKeys][DV] (swizzled), then the
// items; the
// forward's Q [16][D] in K's last stage until it is in registers, the dq kernel's Q [16][D] and
// dO [16][DV] ahead of K.
#pragma once

#include <cmath>

#include "bwd.cuh"

namespace nsa::cuda {

constexpr int kWarpRows = 16;  // query rows per warp (one m16 tile)

// Keys per sub-tile. One warp per thread block is the whole resident state of an SM's share of the
// work, so the sub-tiles' shared memory sets how many warps an SM holds: 16 keys take half the
// shared memory of 32, twice the warps per SM for a latency-bound kernel (benchmarks/NOTES.md).
constexpr int kWarpKeys = 16;
// Stages of K and V: one load in flight per warp while a sub-tile is computed (a third stage,
// fewer warps per SM, measured slower).
constexpr int kWarpStages = 2;

// Bytes of the tiles: `query_cols` = 0 (forward: Q in a stage of K) or D + DV (dq: Q and dO);
// kWarpStages sub-tiles of K and V.
template <int D, int DV>
constexpr size_t slc_warp_tiles_bytes(int query_cols) {
  return size_t(2) * (kWarpRows * query_cols + kWarpStages * kWarpKeys * (D + DV));
}

inline size_t slc_warp_smem_bytes(size_t tiles_bytes, int num_selected) {
  return tiles_bytes + size_t(2) * kWarpRows * size_t(num_selected) * sizeof(int32_t);
}

// Fills block[i], token[i] (token relative to rows.t_first) with the blocks the warp's tokens
// chose, token by token in slot order, skipping padding, blocks a token cannot see and repeats
// within a token's list. Returns the item count. One warp; ends with __syncwarp.
__device__ __forceinline__ int warp_block_items(const SlcParams& p, const QueryRows& rows,
                                                int32_t* block, int32_t* token) {
  const int lane = threadIdx.x & 31, n = p.num_selected;
  const int entries = int(rows.t_last - rows.t_first + 1) * n;
  int count = 0;
  for (int e0 = 0; e0 < entries; e0 += 32) {
    const int e = e0 + lane;
    int32_t j = -1;
    if (e < entries) {
      const index_t t = rows.t_first + e / n;
      const int slot = e % n;
      j = selected_block(p, rows.seq, rows.g, t, slot);
      for (int s = 0; s < slot && j >= 0; ++s)
        if (selected_block(p, rows.seq, rows.g, t, s) == j) j = -1;
    }
    const unsigned keep = __ballot_sync(0xffffffffu, j >= 0);
    if (j >= 0) {
      const int pos = count + __popc(keep & ((1u << lane) - 1u));
      block[pos] = j;
      token[pos] = e / n;
    }
    count += __popc(keep);
  }
  __syncwarp();
  return count;
}

// The warp's sub-tiles in STAGES stages sK [STAGES][KEYS][D], sV [STAGES][KEYS][DV] (STAGES - 1
// loads in flight while one is computed): tile i is part i % per_block of the block of item
// i / per_block, per_block = ceil(select_size / KEYS) rounded up to a power of two (a shift, not a
// division, per tile; parts past the block are empty).
template <typename T, int D, int DV>
struct WarpBlockTiles {
  static constexpr int KEYS = kWarpKeys, STAGES = kWarpStages;

  // Step i's tile: keys [ks, ks + kend) of token t in k, v (kend <= 0: nothing to do, a part past
  // the block, or past the token in its own block).
  struct Tile {
    int kend;
    index_t t;
    const T* k;
    const T* v;
  };

  const SlcParams& p;
  const QueryRows& rows;
  T* sK;
  T* sV;
  const int32_t* block;  // [count] the items (warp_block_items)
  const int32_t* token;
  int shift = 0, count = 0;

  // Builds the items in `items` ([2][16 n] int32) and starts loading tiles 0 .. STAGES - 2 (a
  // cp.async group each).
  __device__ WarpBlockTiles(const SlcParams& p_, const QueryRows& rows_, T* sK_, T* sV_, int32_t* items)
      : p(p_), rows(rows_), sK(sK_), sV(sV_), block(items), token(items + kWarpRows * p_.num_selected) {
    while ((KEYS << shift) < p.select_size) ++shift;
    count = warp_block_items(p, rows, items, items + kWarpRows * p.num_selected) << shift;
#pragma unroll
    for (int j = 0; j < STAGES - 1; ++j) {
      if (j < count) load(j);
      cp_async_commit();
    }
  }

  __device__ static int stage(int i) { return int(unsigned(i) % STAGES); }

  // Keys [ks, ke) of tile i (ks >= ke: empty) and its token t_first + tl.
  __device__ void keys(int i, index_t& ks, index_t& ke, int& tl) const {
    const int it = i >> shift;
    tl = token[it];
    const index_t start = index_t(block[it]) * p.select_size;
    ks = start + index_t(i - (it << shift)) * KEYS;
    ke = min(min(start + p.select_size, ks + KEYS), rows.t_first + tl + 1);
  }

  // cp.async of tile i into stage i % STAGES.
  __device__ void load(int i) const {
    index_t ks, ke;
    int tl;
    keys(i, ks, ke, tl);
    const int valid = int(max(index_t(0), ke - ks));
    const index_t row = rows.seq.start + ks;
    load_strided_async<KEYS, D, 32>(sK + stage(i) * KEYS * D,
                                    p.k.template ptr<const T>(rows.seq.batch, row, rows.g), p.k.row_stride, valid);
    load_strided_async<KEYS, DV, 32>(sV + stage(i) * KEYS * DV,
                                     p.v.template ptr<const T>(rows.seq.batch, row, rows.g), p.v.row_stride, valid);
  }

  // Step i: prefetches tile i + STAGES - 1 (its stage was last read in step i - 1), waits for
  // tile i.
  __device__ Tile step(int i) const {
    __syncwarp();
    if (i + STAGES - 1 < count) load(i + STAGES - 1);
    cp_async_commit();
    cp_async_wait<STAGES - 1>();
    __syncwarp();
    index_t ks, ke;
    int tl;
    keys(i, ks, ke, tl);
    return Tile{int(max(index_t(0), ke - ks)), rows.t_first + tl, sK + stage(i) * KEYS * D,
                sV + stage(i) * KEYS * DV};
  }
};

// Is element e of C fragment column block j of this thread visible in a tile of `kend` keys whose
// token is t? (Row r = e / 2 of the thread's two rows.)
struct WarpTileMask {
  bool row_on[2];
  int kend;
  __device__ WarpTileMask(const ThreadRows& tr, index_t t, int kend_) : kend(kend_) {
    for (int r = 0; r < 2; ++r) row_on[r] = tr.valid[r] && tr.tok[r] == t;
  }
  __device__ bool operator()(int j, int e) const {
    return row_on[e >> 1] && j * 8 + (threadIdx.x & 3) * 2 + (e & 1) < kend;
  }
};

// Q lives in K's last stage (STAGES - 1, first written by step 0's prefetch) until it is in
// registers: 4 KB less per warp at D = 128, 12 warps per SM instead of 9 (ncu at 64k: the kernel
// is latency-bound, its occupancy set by shared memory).
template <typename T, int D, int DV>
__global__ void __launch_bounds__(32) slc_fwd_warp_kernel(const SlcParams p) {
  constexpr int KEYS = kWarpKeys, STAGES = kWarpStages;
  static_assert(KEYS >= kWarpRows, "Q [16][D] fits in a stage of K");
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + STAGES * KEYS * D;
  T* sQ = sK + (STAGES - 1) * KEYS * D;
  int32_t* items = reinterpret_cast<int32_t*>(smem + slc_warp_tiles_bytes<D, DV>(0));

  QueryRows rows;
  if (!locate_query_rows(p, rows, kWarpRows)) return;
  load_query_rows<D, kWarpRows, 32>(sQ, p.q, rows);
  cp_async_commit();
  const WarpBlockTiles<T, D, DV> tiles(p, rows, sK, sV, items);  // STAGES - 1 groups
  const ThreadRows tr(rows, 0, threadIdx.x & 31);
  uint32_t qf[D / 16][4];
  cp_async_wait<STAGES - 1>();  // Q
  __syncwarp();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a<D>(qf[kk], sQ, 0, kk * 16);
  __syncwarp();  // (step 0's prefetch overwrites sQ)

  const float scale_log2 = float(p.scale * M_LOG2E);
  float acc[DV / 8][4];
  for (int j = 0; j < DV / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  for (int i = 0; i < tiles.count; ++i) {
    const auto tile = tiles.step(i);
    if (tile.kend <= 0) continue;
    const WarpTileMask visible(tr, tile.t, tile.kend);
    float s[KEYS / 8][4];
#pragma unroll
    for (int j = 0; j < KEYS / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    warp_gemm_nt<D, KEYS, T>(s, qf, tile.k);  // S = Q K^T
    // A whole sub-tile of this thread's token needs no per-element mask. (The skipped rescale
    // saves 64 multiplies per 8 probabilities per thread here.)
    const bool all = visible.row_on[0] && visible.row_on[1] && tile.kend == KEYS;
    masked_softmax_step<KEYS, DV>(s, all, visible, scale_log2, m, l, acc);
    warp_gemm_pn<KEYS, DV, T>(acc, s, tile.v);  // O += P V
  }
  cp_async_wait<0>();
  store_rows_output<T, DV, Branch::kSlc>(p, rows, tr, acc, m, l);
}

// dQ = scale * sum dS K over the warp's tiles, dS = P (dP - delta), P = exp(scale q.k - lse),
// dP = dO V^T (the shared dq kernel's math, per warp).
template <typename T, int D, int DV>
__global__ void __launch_bounds__(32) slc_dq_warp_kernel(const SlcParams p, const float* __restrict__ delta) {
  constexpr int KEYS = kWarpKeys, STAGES = kWarpStages;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kWarpRows * D;
  T* sK = sdO + kWarpRows * DV;
  T* sV = sK + STAGES * KEYS * D;
  int32_t* items = reinterpret_cast<int32_t*>(smem + slc_warp_tiles_bytes<D, DV>(D + DV));

  QueryRows rows;
  if (!locate_query_rows(p, rows, kWarpRows)) return;
  load_query_rows<D, kWarpRows, 32>(sQ, p.q, rows);
  load_query_rows<DV, kWarpRows, 32>(sdO, p.dout, rows);
  cp_async_commit();
  const WarpBlockTiles<T, D, DV> tiles(p, rows, sK, sV, items);
  const ThreadRows tr(rows, 0, threadIdx.x & 31);
  float lse2[2], dlt[2];
  load_row_stats(p, rows, tr, delta, lse2, dlt);

  const float scale_log2 = float(p.scale * M_LOG2E);
  float dq[D / 8][4];
  for (int j = 0; j < D / 8; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;

  for (int i = 0; i < tiles.count; ++i) {
    const auto tile = tiles.step(i);
    if (tile.kend <= 0) continue;
    const WarpTileMask visible(tr, tile.t, tile.kend);
    float s[KEYS / 8][4], dp[KEYS / 8][4];
#pragma unroll
    for (int j = 0; j < KEYS / 8; ++j)
      for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
    warp_gemm_nt<D, KEYS>(s, sQ, 0, tile.k);     // S = Q K^T
    warp_gemm_nt<DV, KEYS>(dp, sdO, 0, tile.v);  // dP = dO V^T
#pragma unroll
    for (int j = 0; j < KEYS / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const float pr = visible(j, e) ? exp2f(s[j][e] * scale_log2 - lse2[r]) : 0.f;
        s[j][e] = pr * (dp[j][e] - dlt[r]);  // dS
      }
    }
    warp_gemm_pn<KEYS, D>(dq, s, tile.k);  // dQ += dS K
  }
  cp_async_wait<0>();
  store_rows_dq<T, D>(p, rows, tr, dq);
}

}  // namespace nsa::cuda
