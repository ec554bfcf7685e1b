// The merge of kernel B's split lists (decode.h), done by kernel C as it reads them: each query's
// sel_splits lists of its n best keys (best first, 0-padded; the splits score disjoint candidate
// blocks, so no key appears twice) become the query's n chosen blocks.
//
// A key's rank in the union is its index in its own list plus, for every other list, the keys
// there above it (a binary search in a descending list). The ranks below n are the result, as
// ranking all the splits' candidates together would give. A key's count stops once it reaches n,
// which most keys do after a list or two.
#pragma once

#include "../topk/topk_kernel.cuh"
#include "decode.h"
#include "tile_attention.cuh"

namespace nsa::cuda::decode {

// Shared memory of the merge (it runs between the sparse kernel's two branches, over their key
// stages): the lists of up to kMergeKeys / (sel_splits n) queries at a time, their merged keys,
// and their splits' bad-page flags.
constexpr int kMergeKeys = kMaxSelectListKeys;
constexpr size_t kMergeScratchBytes = (size_t(kMergeKeys) + kMaxSelected) * 8 + size_t(kMergeKeys) * 4;

// dst[e] = load(e) for e < count, the block's threads issuing kBatch loads each before storing
// any: the loads are round trips to L2, and a plain loop would wait for each before the next.
template <typename V, typename Load>
__device__ __forceinline__ void stage_in(V* dst, int count, Load&& load) {
  constexpr int kBatch = 4;
  for (int e0 = threadIdx.x; e0 < count; e0 += kBatch * kThreads) {
    V v[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int e = e0 + k * kThreads;
      v[k] = e < count ? load(e) : V(0);
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k)
      if (e0 + k * kThreads < count) dst[e0 + k * kThreads] = v[k];
  }
}

// Keys of a descending, 0-padded list of n above x (x > 0).
__device__ __forceinline__ int count_above(const uint64_t* list, int n, uint64_t x) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (list[mid] > x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// The chosen blocks of queries q_first .. q_first + nq - 1 of (sequence b, KV head h) into
// lists [nq][n] (shared; ascending, -1 padded; all -1 where a split saw a page outside the pool).
// Queries from `owned` on (their first row lies in this row block) and only when `owner` (split 0)
// also get their block_indices and ws.bad written. Every thread of the block calls it, with the
// scratch free (after a barrier); it ends with a barrier.
__device__ __forceinline__ void merge_lists(const DecodeParams& p, const Workspace& ws, int b, int h, int q_first,
                                            int nq, int owned, bool owner, unsigned char* scratch, int* lists) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n = p.num_selected, sp = p.plan.sel_splits, per_q = sp * n, H = p.num_heads_k;
  const int chunk = max(1, min(nq, kMergeKeys / per_q));
  uint64_t* keys = reinterpret_cast<uint64_t*>(scratch);  // [chunk][sp][n]
  uint64_t* best = keys + chunk * per_q;                   // [chunk][n]
  int* flags = reinterpret_cast<int*>(best + chunk * n);   // [chunk][sp]
  auto query = [&](int q) { return (index_t(b) * p.num_queries + q_first + q) * H + h; };
  for (int c0 = 0; c0 < nq; c0 += chunk) {
    const int cq = min(chunk, nq - c0);
    stage_in(keys, cq * per_q, [&](int e) { return __ldcg(ws.sel_keys + query(c0 + e / per_q) * per_q + e % per_q); });
    stage_in(flags, cq * sp, [&](int e) { return __ldcg(ws.sel_bad + query(c0 + e / sp) * sp + e % sp); });
    for (int e = tid; e < cq * n; e += kThreads) best[e] = 0;
    __syncthreads();
    for (int e = tid; e < cq * per_q; e += kThreads) {
      const uint64_t x = keys[e];
      if (x == 0) continue;
      const int q = e / per_q, own = e % per_q / n;
      const uint64_t* qk = keys + q * per_q;
      int rank = e % n;
      // Four lists' searches at a time, independent of each other.
      for (int l0 = 0; l0 < sp && rank < n; l0 += 4) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int l = l0 + k;
          if (l < sp && l != own) rank += count_above(qk + l * n, n, x);
        }
      }
      if (rank < n) best[q * n + rank] = x;
    }
    __syncthreads();
    for (int q = warp; q < cq; q += kThreads / 32) {
      // The ranks below n fill 0 .. cnt - 1.
      int cnt = 0, bad = 0;
      for (int i = lane; i < n; i += 32) cnt += best[q * n + i] != 0;
      for (int k = lane; k < sp; k += 32) bad |= flags[q * sp + k];
      bad = __any_sync(0xffffffffu, bad != 0);
      cnt = bad ? 0 : __reduce_add_sync(0xffffffffu, cnt);
      int* dst = lists + (c0 + q) * n;
      topk::write_token(best + q * n, cnt, n, dst);
      __syncwarp();
      if (owner && c0 + q >= owned) {
        int32_t* out = p.block_indices.ptr<int32_t>(b, q_first + c0 + q, h);
        for (int i = lane; i < n; i += 32) out[i] = dst[i];
        if (lane == 0) ws.bad[query(c0 + q)] = bad;
      }
    }
    __syncthreads();
  }
}

}  // namespace nsa::cuda::decode
