// Kernel B of the decoding step (decode.h): each query's lse over the compressed splits, its
// block scores from kernel A's per-tile slots, and the top-n selection with the training rule
// (topk/select.h's keys: forced blocks first, then higher scores, NaN as -inf, ties to the
// smaller block; topk_kernel.cuh's write_token for the ascending, -1 padded output).
#pragma once

#include <cmath>

#include "../topk/topk_kernel.cuh"
#include "decode.h"
#include "tile_attention.cuh"

namespace nsa::cuda::decode {

constexpr int kSelectThreads = 256;
constexpr int kSelectWarps = kSelectThreads / 32;

// Merge of split partials (m, l, O) (m in log2 units, l and O against m): the factor taking a
// split's sums to the common maximum mx. A split that saw no key ((-inf, 0, 0)) adds 0; one whose
// scores were all NaN (m = -inf, l NaN) keeps the merge NaN (0 x NaN).
__device__ __forceinline__ float split_factor(float m, float mx) { return m == -INFINITY ? 0.f : exp2f(m - mx); }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int d = 16; d >= 1; d /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, d));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int d = 16; d >= 1; d /= 2) x += __shfl_xor_sync(0xffffffffu, x, d);
  return x;
}

// The n best keys a warp has seen, descending: element e = 32 s + lane in v[s], 0 while empty
// (keys are never 0). LS = ceil(n / 32) registers per lane; elements past n - 1 are scratch
// (they may keep keys pushed out of the n best) and never read.
template <int LS>
struct WarpTopN {
  uint64_t v[LS];
  uint64_t theta;  // the n-th key (0 while fewer than n): a key must beat it to enter
  int n;

  __device__ __forceinline__ void init(int n_) {
    n = n_;
    theta = 0;
#pragma unroll
    for (int s = 0; s < LS; ++s) v[s] = 0;
  }

  // Inserts x (> theta, not present): elements below it move down one place.
  __device__ __forceinline__ void insert(uint64_t x) {
    const int lane = threadIdx.x & 31;
    uint64_t carry = 0;  // the last element of the previous register, before the move
#pragma unroll
    for (int s = 0; s < LS; ++s) {
      uint64_t up = __shfl_up_sync(0xffffffffu, v[s], 1);
      const uint64_t last = __shfl_sync(0xffffffffu, v[s], 31);
      if (lane == 0) up = carry;
      const bool first = s == 0 && lane == 0;
      v[s] = v[s] > x ? v[s] : (first || up > x ? x : up);
      carry = last;
    }
    // Element n - 1, selected by masks: a run-time register index would put v in local memory.
    uint64_t nth = 0;
#pragma unroll
    for (int s = 0; s < LS; ++s) nth |= v[s] & (uint64_t(0) - uint64_t(s == (n - 1) >> 5));
    theta = __shfl_sync(0xffffffffu, nth, (n - 1) & 31);
  }

  // Offers each lane's key (0: none), best lanes first.
  __device__ __forceinline__ void offer(uint64_t y) {
    unsigned take = __ballot_sync(0xffffffffu, y > theta);
    while (take) {
      const int src = __ffs(take) - 1;
      insert(__shfl_sync(0xffffffffu, y, src));
      take &= ~(1u << src);
      take &= __ballot_sync(0xffffffffu, y > theta);
    }
  }

  __device__ __forceinline__ void store(uint64_t* dst) const {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int s = 0; s < LS; ++s)
      if (s * 32 + lane < n) dst[s * 32 + lane] = v[s];
  }
};

// Candidate blocks scored at a time (their scores in shared memory).
constexpr int kScoreChunk = 2048;
// Rows of the group summed per pass of the tiles' slots (their loads all in flight).
constexpr int kRowStep = 16;

// Dynamic shared memory: lse [G] (log2 units) of the query's rows.
inline size_t select_smem_bytes(int G) { return size_t(G) * sizeof(float); }

// The scores come in three passes over global memory, each with many independent loads per
// thread (a thread block per query: at B = 1 a handful of them read every tile's slots):
//   1. each tile's factors f = 2^(m_t - lse) in place of its maxima (0 for a row whose lse is
//      not finite: it adds nothing, as the reference's p = 0 there);
//   2. each tile's slot sums w = sum over the group's rows of f u, two slots per thread and
//      kRowStep rows unrolled, in place of the slot's first row;
//   3. each candidate block's score, the sum of its tiles' slots (ascending tiles), into shared
//      memory kScoreChunk blocks at a time, then offered to the warps' top-n lists.
template <int LS>
__global__ void __launch_bounds__(kSelectThreads) decode_select_kernel(const DecodeParams p, const Workspace ws) {
  __shared__ uint64_t lists[kSelectWarps][LS * 32];
  __shared__ float scores[kScoreChunk];
  extern __shared__ float lse_s[];  // [G]
  const int s = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = p.num_heads / p.num_heads_k, S = p.num_queries, R = ws.rows, n = p.num_selected;
  allow_next_grid();

  // The sequence: its length within [S, capacity], its pages within the pool (inputs only, so
  // before the wait).
  const int L = p.seqlens[b];
  bool ok = L >= S && L <= p.capacity;
  if (p.block_table != nullptr && ok) {
    const index_t pages = (L + p.page_size - 1) / p.page_size;
    bool bad = false;
    for (index_t i = tid; i < pages; i += kSelectThreads) {
      const int32_t page = p.block_table[b * p.block_table_stride + i];
      bad = bad || page < 0 || page >= p.num_pages;
    }
    ok = !__syncthreads_or(bad);
  }
  wait_prior_grid();
  int32_t* out = p.block_indices.ptr<int32_t>(b, s, h);
  if (tid == 0) ws.bad[(index_t(b) * S + s) * p.num_heads_k + h] = ok ? 0 : 1;
  if (!ok) {
    for (int i = tid; i < n; i += kSelectThreads) out[i] = -1;
    return;
  }

  // lse of the query's rows s G .. s G + G - 1 (log2 units), a warp per row over the splits;
  // -inf: the row saw no compressed token, NaN: a NaN score.
  const index_t bh = index_t(b) * p.num_heads_k + h;
  const int row0 = s * G, splits = p.plan.cmp_splits;
  const float* ml = ws.cmp_ml + (bh * splits * R + row0) * 2;  // [splits][R][2]
  for (int g = warp; g < G; g += kSelectWarps) {
    float mx = -INFINITY;
    for (int sp = lane; sp < splits; sp += 32) mx = fmaxf(mx, ml[(index_t(sp) * R + g) * 2]);
    mx = warp_max(mx);
    float lsum = 0.f;
    for (int sp = lane; sp < splits; sp += 32) {
      const float* x = ml + (index_t(sp) * R + g) * 2;
      lsum += split_factor(x[0], mx) * x[1];
    }
    lsum = warp_sum(lsum);
    if (lane == 0) lse_s[g] = mx + log2f(lsum);
  }
  __syncthreads();

  // 1. Factors, for the tiles this query sees.
  const int pos = L - S + s;
  const int nv = int(num_cmp_tokens(pos + 1, p.block_size, p.block_stride));
  const int nts = (nv + kTileKeys - 1) / kTileKeys;
  const int cpr = ws.cpr, cpb = ws.cpb, slots = ws.slots;
  float* f = ws.tile_m + bh * ws.tiles * R + row0;      // [T][R]
  float* u = ws.tile_u + bh * ws.tiles * slots * R + row0;  // [T][NS][R]
#pragma unroll 4
  for (int idx = tid; idx < nts * G; idx += kSelectThreads) {
    const int t = idx / G, g = idx - t * G;
    float* x = f + index_t(t) * R + g;
    const float lse = lse_s[g];
    *x = isfinite(lse) && *x != -INFINITY ? exp2f(*x - lse) : 0.f;
  }
  __syncthreads();

  // 2. Slot sums (f = 0 rows skipped, not multiplied: their slots may hold NaN).
  const int pairs = nts * slots;
  for (int q0 = tid; q0 < pairs; q0 += 2 * kSelectThreads) {
    const int q1 = q0 + kSelectThreads < pairs ? q0 + kSelectThreads : q0;  // (past the end: again q0)
    const int t0 = q0 / slots, t1 = q1 / slots;
    const float* f0 = f + index_t(t0) * R;
    const float* f1 = f + index_t(t1) * R;
    float* u0 = u + (index_t(t0) * slots + q0 - t0 * slots) * R;
    float* u1 = u + (index_t(t1) * slots + q1 - t1 * slots) * R;
    float w0 = 0.f, w1 = 0.f;
    for (int g0 = 0; g0 < G; g0 += kRowStep) {
      float a0[kRowStep], b0[kRowStep], a1[kRowStep], b1[kRowStep];
#pragma unroll
      for (int k = 0; k < kRowStep; ++k) {
        const bool in = g0 + k < G;
        a0[k] = in ? f0[g0 + k] : 0.f;
        b0[k] = in ? u0[g0 + k] : 0.f;
        a1[k] = in ? f1[g0 + k] : 0.f;
        b1[k] = in ? u1[g0 + k] : 0.f;
      }
#pragma unroll
      for (int k = 0; k < kRowStep; ++k) {
        w0 += a0[k] != 0.f ? a0[k] * b0[k] : 0.f;
        w1 += a1[k] != 0.f ? a1[k] * b1[k] : 0.f;
      }
    }
    u0[0] = w0;
    if (q1 != q0) u1[0] = w1;
  }
  __syncthreads();

  // 3. Scores of the candidates 0 .. bpos, and each warp's top n of them.
  const int bpos = pos / p.select_size, cand = bpos + 1;
  WarpTopN<LS> top;
  top.init(n);
  for (int c0 = 0; c0 < cand; c0 += kScoreChunk) {
#pragma unroll
    for (int i = 0; i < kScoreChunk / kSelectThreads; ++i) {
      const int j = c0 + i * kSelectThreads + tid;
      if (j >= cand) break;
      // Tiles holding rows with cells in block j (rows j cpb - cpr + 1 .. (j + 1) cpb - 1): one or
      // two but for long windows (cpr + cpb > 66).
      const int ta = max(0, j * cpb - cpr + 1) / kTileKeys;
      const int tb = min(nts - 1, ((j + 1) * cpb - 1) / kTileKeys);
      auto slot_sum = [&](int t) { return u[(index_t(t) * slots + j - t * kTileKeys / cpb) * R]; };
      float score = ta <= tb ? slot_sum(ta) : 0.f;
      if (ta + 1 <= tb) score += slot_sum(ta + 1);
      for (int t = ta + 2; t <= tb; ++t) score += slot_sum(t);
      scores[j - c0] = score;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kScoreChunk / kSelectThreads; ++i) {
      const int j = c0 + i * kSelectThreads + warp * 32 + lane;  // warp-uniform bound below
      if (c0 + i * kSelectThreads + warp * 32 >= cand) break;
      top.offer(j < cand ? topk::block_key(scores[j - c0], j, topk::is_forced(j, bpos, p.num_initial, p.num_local))
                         : 0);
    }
    __syncthreads();  // the scores are rewritten by the next chunk
  }
  top.store(lists[warp]);
  __syncthreads();
  if (warp == 0) {
    for (int w = 1; w < kSelectWarps; ++w)
      for (int e0 = 0; e0 < n; e0 += 32) top.offer(e0 + lane < n ? lists[w][e0 + lane] : 0);
    top.store(lists[0]);
    __syncwarp();
    topk::write_token(lists[0], min(n, cand), n, out);
  }
}

}  // namespace nsa::cuda::decode
