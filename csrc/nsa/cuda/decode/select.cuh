// Kernel B of the decoding step (decode.h): each query's lse over the compressed splits, its
// block scores from kernel A's per-tile slots, and the top-n selection with the training rule
// (topk/select.h's keys: forced blocks first, then higher scores, NaN as -inf, ties to the
// smaller block; topk_kernel.cuh's write_token for the ascending, -1 padded output).
//
// A query's candidate blocks are split over sel_splits thread blocks (at B = 1 a thread block
// per query alone would leave the GPU idle while it reads every tile's slots). Each keeps the n
// best of its share and publishes them; the last one to finish (a counter per query that kernel Z
// zeroes) merges the lists, writes the query's blocks and counts the query selected (sel_done).
#pragma once

#include <cmath>

#include "../topk/topk_kernel.cuh"
#include "choices.h"
#include "counters.cuh"
#include "decode.h"
#include "split_merge.cuh"
#include "tile_attention.cuh"

namespace nsa::cuda::decode {

constexpr int kSelectWarps = kSelectThreads / 32;

// The counter's increment of a split that found a page outside the pool (the low 16 bits count
// the splits done).
constexpr unsigned kBadSplit = 1u << 16;

// keys[0, kept) hold the best keys so far, best first; keys[kept, kept + m) new ones (0: none).
// Leaves the n best of both, best first, in keys[0, result) (0 after them up to n), and returns
// their count; best [n] is scratch. Keys are unique (they hold the block), so a key's rank is
// the number of keys above it, and the ranks below n fill 0 .. result - 1. Every thread of the
// block calls it; keys is written after a barrier and read again only after the one at the end.
// A thread ranks one key at a time (a loop, not unrolled over its keys): the kernel runs once per
// step, so its code is fetched cold each time, and every unrolled copy costs fetches.
__device__ __forceinline__ int keep_best(uint64_t* keys, uint64_t* best, int kept, int m, int n) {
  static_assert(kMaxSelected <= kSelectThreads, "a thread per slot of the result");
  const int total = kept + m, tid = threadIdx.x, padded = (total + 31) / 32 * 32;
  if (tid < n) best[tid] = 0;
  // Zeros up to the chunk's end count for nothing (keys are > 0), so the chunks need no bounds.
  if (total + tid < padded) keys[total + tid] = 0;
  __syncthreads();
#pragma unroll 1
  for (int i = tid; i < total; i += kSelectThreads) {
    const uint64_t key = keys[i];
    if (key == 0) continue;
    // Stops counting once the key is out, checked every 32 keys; a chunk's 16 loads of two keys
    // are independent, so that they are in flight together.
    int r = 0;
    for (int k0 = 0; k0 < total && r < n; k0 += 32) {
#pragma unroll
      for (int k = 0; k < 32; k += 2) {
        const ulonglong2 x = *reinterpret_cast<const ulonglong2*>(keys + k0 + k);
        r += int(x.x > key) + int(x.y > key);
      }
    }
    if (r < n) best[r] = key;
  }
  __syncthreads();
  const uint64_t b = tid < n ? best[tid] : 0;
  if (tid < n) keys[tid] = b;
  return __syncthreads_count(b != 0);
}

// The sums w[i] = sum over g < G of f[i / slots][g] u_i[g] for the rows i < rows of a round's
// tiles, u_i = u + i R (a tile's NS slot rows follow each other, R apart). A term with f = 0 is
// 0 whatever the slot holds (NaN where the row saw no key). Lanes take consecutive chunks of a
// row (float4 where G % 4 == 0, P lanes per row) and add them with shuffles, so that a warp's
// loads are contiguous; kSumBatch rows per thread are in flight at once.
constexpr int kSumBatch = 4;
__device__ __forceinline__ void tile_sums(const float* u, index_t R, int G, int slots, int rows, const float* f,
                                          float* w) {
  const bool vec = G % 4 == 0;
  const int chunks = vec ? G / 4 : G;
  int P = 1;
  while (P < chunks && P < 32) P *= 2;
  const int tid = threadIdx.x, c0 = tid % P, per_pass = kSelectThreads / P;
  auto chunk = [&](const float* x, int c, bool global) {
    if (vec) {
      const float4* x4 = reinterpret_cast<const float4*>(x) + c;
      return global ? __ldcg(x4) : *x4;
    }
    return make_float4(global ? __ldcg(x + c) : x[c], 0.f, 0.f, 0.f);
  };
  auto term = [](float fk, float uk) { return fk != 0.f ? fk * uk : 0.f; };
  for (int base = 0; base < rows; base += kSumBatch * per_pass) {
    float sum[kSumBatch];
#pragma unroll
    for (int k = 0; k < kSumBatch; ++k) sum[k] = 0.f;
    for (int c = c0; c < chunks; c += P) {
      float4 x[kSumBatch];
#pragma unroll
      for (int k = 0; k < kSumBatch; ++k) {
        const int i = base + k * per_pass + tid / P;
        x[k] = i < rows ? chunk(u + index_t(i) * R, c, true) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int k = 0; k < kSumBatch; ++k) {
        const int i = base + k * per_pass + tid / P;
        const float4 y = i < rows ? chunk(f + (i / slots) * G, c, false) : make_float4(0.f, 0.f, 0.f, 0.f);
        sum[k] += term(y.x, x[k].x) + term(y.y, x[k].y) + term(y.z, x[k].z) + term(y.w, x[k].w);
      }
    }
#pragma unroll
    for (int k = 0; k < kSumBatch; ++k) {
      for (int off = P / 2; off > 0; off /= 2) sum[k] += __shfl_xor_sync(0xffffffffu, sum[k], off);
      const int i = base + k * per_pass + tid / P;
      if (c0 == 0 && i < rows) w[i] = sum[k];
    }
  }
}

// Grid (sel_splits * S, H, B): split c of query s scores the candidates [c per, (c + 1) per) of
// the blocks 0 .. bpos its position can see (per = ceil((bpos + 1) / sel_splits)), summing each
// over the tiles that hold its cells (ascending) and in each tile over the group's rows f u with
// f = 2^(m_t - lse) (a row whose lse is not finite, or whose tile saw no key, adds nothing: its
// slots may hold NaN, as the reference's p = 0 there). Candidates come in rounds of
// ws.sel_round; the factors f of a round's tiles, then each tile slot's sum over the rows, are
// computed once into shared memory, and a block adds its tiles' sums. Waits for the scan blocks of
// its (sequence, KV head) or for the previous grid (plan.dep_wait); the kernel below waits for the
// previous grid after it in any case.
__device__ __forceinline__ void select_split(const DecodeParams& p, const Workspace& ws) {
  // (whole chunks of 32 keys, 16-byte aligned: keep_best reads them so)
  static_assert((kMaxSelected + kSelectRound) % 32 == 0, "keep_best reads whole chunks");
  __shared__ __align__(16) uint64_t keys[kMaxSelected + kSelectRound];
  __shared__ __align__(16) uint64_t best[kMaxSelected];
  __shared__ unsigned done;
  extern __shared__ __align__(16) float lse_s[];  // [G]
  const int splits = p.plan.sel_splits;
  const int c = blockIdx.x % splits, s = blockIdx.x / splits, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = p.num_heads / p.num_heads_k, S = p.num_queries, R = ws.rows, n = p.num_selected;
  trace_event(p.plan, kTraceSelect, kTraceStart);
  allow_next_grid();

  // The sequence: its length within [S, capacity], and this split's share of its pages within the
  // pool (inputs only, so before the wait).
  const int L = p.seqlens[b];
  const bool ok = L >= S && L <= p.capacity;
  bool bad_pages = false;
  if (p.block_table != nullptr && ok) {
    const index_t pages = (L + p.page_size - 1) / p.page_size, share = (pages + splits - 1) / splits;
    const index_t end = min(pages, (c + 1) * share);
    bool bad = false;
    for (index_t i = c * share + tid; i < end; i += kSelectThreads) {
      const int32_t page = p.block_table[b * p.block_table_stride + i];
      bad = bad || page < 0 || page >= p.num_pages;
    }
    bad_pages = __syncthreads_or(bad);
  }
  const index_t bh = index_t(b) * p.num_heads_k + h;
  const int row0 = s * G, cmp_splits = p.plan.cmp_splits;
  // (A's blocks count in key_done once their key tiles are done when it runs its keys first.)
  const unsigned* scanned = p.plan.scan_order == ScanOrder::kKeysFirst ? ws.key_done : ws.scan_done;
  wait_inputs(p.plan, scanned + bh, unsigned(cmp_splits * ws.row_blocks));
  trace_event(p.plan, kTraceSelect, kTraceWaited);
  const index_t query = (index_t(b) * S + s) * p.num_heads_k + h;
  int32_t* out = p.block_indices.ptr<int32_t>(b, s, h);
  if (!ok) {  // every split sees it; the first one answers
    if (c == 0) {
      if (tid == 0) ws.bad[query] = 1;
      if (tid < n) out[tid] = -1;  // (n <= kSelectThreads: keep_best)
      count_done(ws.sel_done + bh);
    }
    return;
  }

  // This split's candidates, scored and kept in rounds below.
  const int pos = L - S + s, bpos = pos / p.select_size, cand = bpos + 1;
  const int nts = int((num_cmp_tokens(pos + 1, p.block_size, p.block_stride) + kTileKeys - 1) / kTileKeys);
  const int cpr = ws.cpr, cpb = ws.cpb, slots = ws.slots;
  const float* tile_m = ws.tile_m + bh * ws.tiles * R + row0;                // [T][R]
  const float* tile_u = ws.tile_u + bh * ws.tiles * slots * R + row0;        // [T][NS][R]
  float* f_s = lse_s + G;                                                    // [round tiles][G]
  float* w_s = f_s + ws.sel_tiles * G;                                       // [round tiles][NS]
  // Tiles holding rows with cells in block j (rows j cpb - cpr + 1 .. (j + 1) cpb - 1): one or
  // two but for long windows (cpr + cpb > 66).
  auto first_tile = [&](int j) { return max(0, j * cpb - cpr + 1) / kTileKeys; };
  auto last_tile = [&](int j) { return min(nts - 1, ((j + 1) * cpb - 1) / kTileKeys); };
  const int per = (cand + splits - 1) / splits, j0 = min(cand, c * per), j1 = min(cand, j0 + per);
  // The tiles [ta0, ta0 + ntr) of the round from r0; the row maximum of (tile ta0 + i / G, row
  // i % G) and its factor.
  auto round_tiles = [&](int r0, int& ta0, int& ntr) {
    const int m = min(ws.sel_round, j1 - r0);
    ta0 = first_tile(r0);
    ntr = m > 0 ? last_tile(r0 + m - 1) - ta0 + 1 : 0;
  };
  auto tile_max = [&](int ta0, int i) { return __ldcg(tile_m + index_t(ta0 + i / G) * R + i % G); };
  auto factor = [&](int i, float mt) {
    const float lse = lse_s[i % G];
    return isfinite(lse) && mt != -INFINITY ? exp2f(mt - lse) : 0.f;
  };
  // The first round's first tile maxima, loaded beside the lse's (m, l) below: the factors need
  // both, and the kernel is a chain of memory round trips.
  constexpr int kMtAhead = 2;
  float mt_ahead[kMtAhead];
  {
    int ta0, ntr;
    round_tiles(j0, ta0, ntr);
#pragma unroll
    for (int k = 0; k < kMtAhead; ++k) {
      const int i = tid + k * kSelectThreads;
      mt_ahead[k] = i < ntr * G ? tile_max(ta0, i) : -INFINITY;
    }
  }

  // lse of the query's rows s G .. s G + G - 1 (log2 units), a warp per row over the compressed
  // splits, two rows (g, g + kSelectWarps) per pass so that their loads are in flight together;
  // -inf: the row saw no compressed token, NaN: a NaN score.
  const float* ml = ws.cmp_ml + (bh * cmp_splits * R + row0) * 2;  // [cmp_splits][R][2]
  for (int g0 = warp; g0 < G; g0 += 2 * kSelectWarps) {
    // Each lane merges its splits online, their loads issued four per row at a time; then the warp.
    float mx[2] = {-INFINITY, -INFINITY}, lsum[2] = {0.f, 0.f};
    for (int sp0 = lane; sp0 < cmp_splits; sp0 += 4 * 32) {
      float2 x[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int sp = sp0 + 32 * k, g = g0 + i * kSelectWarps;
          x[i][k] = sp < cmp_splits && g < G
                        ? __ldcg(reinterpret_cast<const float2*>(ml + (index_t(sp) * R + g) * 2))
                        : make_float2(-INFINITY, 0.f);
        }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float m_new = fmaxf(mx[i], x[i][k].x);
          lsum[i] = lsum[i] * split_factor(mx[i], m_new) + split_factor(x[i][k].x, m_new) * x[i][k].y;
          mx[i] = m_new;
        }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m_all = warp_max(mx[i]);
      const float l_all = warp_sum(split_factor(mx[i], m_all) * lsum[i]);
      const int g = g0 + i * kSelectWarps;
      if (lane == 0 && g < G) lse_s[g] = m_all + log2f(l_all);
    }
  }
  __syncthreads();
  trace_event(p.plan, kTraceSelect, kTraceStep1);

  // Block j's score: its tiles' sums, in tile order (tiles of the round from ta0).
  auto score_of = [&](int j, int ta0) {
    const int ta = first_tile(j), tb = last_tile(j);
    float score = 0.f;
    for (int t = ta; t <= tb; ++t) {
      const float w = w_s[(t - ta0) * slots + j - t * kTileKeys / cpb];
      score = t == ta ? w : score + w;
    }
    return score;
  };
  int kept = 0;
  for (int r0 = j0; r0 < j1; r0 += ws.sel_round) {
    const int m = min(ws.sel_round, j1 - r0);
    // The round's tiles' factors, once per (tile, row) rather than per block.
    int ta0, ntr;
    round_tiles(r0, ta0, ntr);
    int i = tid;
    if (r0 == j0) {
#pragma unroll
      for (int k = 0; k < kMtAhead; ++k, i += kSelectThreads)
        if (i < ntr * G) f_s[i] = factor(i, mt_ahead[k]);
    }
    for (; i < ntr * G; i += kSelectThreads) f_s[i] = factor(i, tile_max(ta0, i));
    __syncthreads();
    tile_sums(tile_u + index_t(ta0) * slots * R, R, G, slots, ntr * slots, f_s, w_s);
    __syncthreads();
    for (int i = tid; i < m; i += kSelectThreads) {
      const int j = r0 + i;
      keys[kept + i] = topk::block_key(score_of(j, ta0), j, topk::is_forced(j, bpos, p.num_initial, p.num_local));
    }
    __syncthreads();
    kept = keep_best(keys, best, kept, m, n);
  }

  trace_event(p.plan, kTraceSelect, kTraceStep2);
  // Publish the list (0-padded to n), then count this split done; the last one merges.
  uint64_t* lists = ws.sel_keys + query * splits * n;  // [splits][n]
  if (tid < n) lists[c * n + tid] = tid < kept ? keys[tid] : 0;
  __syncthreads();  // the block's writes of the list come before thread 0's fence (cumulativity)
  if (tid == 0) {
    const unsigned add = 1u + (bad_pages ? kBadSplit : 0u);
    fence_acq_rel_gpu();  // release: the list before the count
    done = atomicAdd(ws.sel_count + query, add) + add;
    fence_acq_rel_gpu();  // acquire: the last split reads the lists counted before its own
  }
  __syncthreads();
  trace_event(p.plan, kTraceSelect, kTraceMid);
  if ((done & (kBadSplit - 1)) != unsigned(splits)) return trace_event(p.plan, kTraceSelect, kTraceEnd);
  const bool bad = done >= kBadSplit;
  if (tid == 0) ws.bad[query] = bad ? 1 : 0;
  if (bad) {
    if (tid < n) out[tid] = -1;  // (n <= kSelectThreads: keep_best)
    count_done(ws.sel_done + bh);
    return;
  }
  if (splits > 1) {
    const int all = splits * n;
    kept = 0;
    for (int r0 = 0; r0 < all; r0 += kSelectRound) {
      const int m = min(kSelectRound, all - r0);
      __syncthreads();  // the previous round's keys are read before they are overwritten
      for (int i = tid; i < m; i += kSelectThreads) keys[kept + i] = __ldcg(lists + r0 + i);
      __syncthreads();
      kept = keep_best(keys, best, kept, m, n);
    }
  }
  if (warp == 0) topk::write_token(keys, kept, n, out);
  count_done(ws.sel_done + bh);
  trace_event(p.plan, kTraceSelect, kTraceEnd);
}

__global__ void __launch_bounds__(kSelectThreads, 4) decode_select_kernel(const DecodeParams p, const Workspace ws) {
  select_split(p, ws);
  wait_prior_grid();
}

}  // namespace nsa::cuda::decode
