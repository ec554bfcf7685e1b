// The fused top-n block selection kernel: one pass over the compressed keys per (query tile,
// KV head), block scores streamed into per-token running top-n lists; no score tensor in global
// memory.
//
// Thread block: P whole tokens of one sequence and KV head g (all G heads of a token are in the
// block, so the group sum stays local). Their (token, head) query rows, token-major, fill
// segments; a segment's rows past its last whole token are zero padding. Two modes:
//   resident (G <= 32): segments ("units") of 32 rows holding 32 / G tokens; warp w owns unit
//     w % U and keeps its Q fragments (the B operand) in registers for the whole pass, so per key
//     tile only the K fragments are read from shared memory. 8 warps (4 for D = 192, where Q
//     alone takes 96 registers); when U < warps, the warps of a unit split the tile's rows.
//   streamed (G > 32): 4 warps, chunks of 64 rows holding 64 / G tokens (G <= 64), or one token
//     in ceil(G / 64) chunks whose group sums are added in chunk order (G > 64); warp w owns rows
//     16w .. 16w + 15 of each key tile (A fragments loaded once per tile) and reads Q per chunk.
// The host (topk.cu) picks the most segments (up to 256 query rows) that fit its shared-memory
// budget, so that two blocks share an SM. Per key tile of 64 compressed rows (double-buffered
// cp.async):
//   1. S^T = K Q^T on the tensor cores; p = exp2(s scale log2e - lse log2e) where visible, summed
//      over the heads of each token (registers and quad shuffles for G a power of two, a per-warp
//      shared scratch in head order otherwise) into w_s[token][row].
//   2. Threads score the blocks whose cells the tile completes (select.h) and append those that
//      beat the token's current n-th best key to its candidate slots.
//   3. One warp per token merges its candidates into the token's list (rank by counting), once
//      the slots could not take another tile's (cap - merge_at), and after the last tile.
// Steps 2 and 3 need no block barrier when each warp owns a unit (resident, segs = warps): the
// warp scores, carries and merges its unit's tokens itself; one barrier per tile remains (the
// key double buffer). Otherwise the block does them, with barriers between the steps.
// After the last tile, the partial block at the edge, the zero-score blocks and the forced ones
// left are merged the same way, and each warp writes its tokens' lists in ascending block order.
// Both modes issue the same mma instructions on the same fragments and sum the heads in the same
// order, so the scores (and the selection) do not depend on the mode or on P.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../common/mma.cuh"
#include "../common/seq_tiles.cuh"
#include "../common/tiles.cuh"
#include "select.h"

namespace nsa::cuda::topk {

constexpr int kRows = 64;            // query rows per chunk (streamed mode)
constexpr int kUnitRows = 32;        // query rows per unit (resident mode): 4 n-tiles of a warp
constexpr int kMaxResidentGroup = 32;  // G <= 32: no token straddles two units
constexpr int kMaxSelected = 128;    // n: list slots are 4 per lane
constexpr int kListSlots = kMaxSelected / 32;
constexpr int kMaxCand = 64;         // candidates per token per merge: 2 per lane
constexpr int kScratchLd = 20;       // generic group sum: [query rows][kScratchLd] floats per warp;
                                     // 20 = 4 mod 32 keeps the fragment stores conflict-free
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWgRows = 128;         // select_topk_wgmma_kernel: query rows per thread block
constexpr int kWgThreads = 128;      // and threads (one warpgroup)

// Warps per thread block. Resident with D <= 128: 8 (two blocks of 256 threads per SM at <= 128
// registers); D = 192 resident: 4 (its Q fragments need 96 registers); streamed: 4, one per 16 rows
// of the key tile.
__host__ __device__ constexpr int kernel_warps(int D, bool resident) {
  return resident && D <= 128 ? 8 : 4;
}

// Per-launch constants, computed on the host (topk.cu).
struct Shape {
  int group;        // G
  int tokens;       // P: tokens per thread block
  int wgmma;        // 1: select_topk_wgmma_kernel (topk_wgmma.cuh: one segment of 128 rows, Q and K
                    // in shared memory for the tensor cores); 0: select_topk_kernel
  int resident;     // 1: Q fragments in registers (G <= 32), segments are units; 0: streamed chunks
  int segs;         // segments: units (resident; a power of two <= warps) or chunks (streamed)
  int seg_rows;     // query rows per segment: kUnitRows or kRows
  int seg_tokens;   // tokens per segment: seg_rows / G, or 1 (G > 64: a token spans all chunks)
  int reduce;       // rows per token summed in registers: G (a power of two <= 64) or 64
                    // (G > 64, one token per chunk); 0: generic group sum through shared memory
  int cpr, cpb;     // cells per compressed row (l / d) and per selection block (l' / d)
  int cap;          // candidate slots per token: at least the blocks touching one tile and the
                    // whole tail (<= kMaxCand), more when shared memory allows
  int merge_at;     // a token's candidates are merged once more than this many wait (cap minus
                    // the most one tile appends), and after the last tile
  int ws;           // row stride of w_s in floats (odd: conflict-free block scoring)
  float scale_log2; // scale * log2(e)
  // Byte offsets of the shared-memory arrays; q_s is at 0. Resident: scratch .. open_s start at 0
  // too (over q_s, dead once Q is in registers); streamed and wgmma: after q_s (wgmma: q_s and k_s
  // 1024-aligned).
  int off_scratch, off_w, off_list, off_cand, off_theta, off_cnt, off_nacc, off_open, off_k,
      off_lse, off_nv, smem;
};

// Merges the candidates of one token (cand[0 .. nacc), unordered, all beating theta) into its
// list (cnt keys, descending; n slots). One warp. Keys are unique, so an element's new position
// is the number of elements of the union above it. In place, one 32-key slot at a time from the
// last: keys only move to later positions, and a slot's keys land in its own or later slots,
// whose old keys have been read already (few registers: the merge runs while the resident mode
// holds Q in registers).
__device__ __forceinline__ void merge_token(uint64_t* list, const uint64_t* cand, int* cnt_p,
                                            uint64_t* theta_p, int* nacc_p, int n) {
  const int lane = threadIdx.x & 31;
  const int cnt = *cnt_p, m = *nacc_p;
  uint64_t cv[2];
  int cr[2];
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int i = s * 32 + lane;
    cv[s] = i < m ? cand[i] : 0;
    int lo = 0, hi = i < m ? cnt : 0;  // list keys above cv[s]: binary search (descending)
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (list[mid] > cv[s]) lo = mid + 1; else hi = mid;
    }
    cr[s] = lo;
  }
  for (int i = 0; i < m; ++i) {
    const uint64_t x = cand[i];
#pragma unroll
    for (int s = 0; s < 2; ++s) cr[s] += x > cv[s];
  }
  for (int s = (cnt - 1) >> 5; s >= 0; --s) {  // cnt = 0: none
    const int i = s * 32 + lane;
    const uint64_t lv = i < cnt ? list[i] : 0;
    int lr = i;
    for (int k = 0; k < m; ++k) lr += cand[k] > lv;
    __syncwarp();  // every lane has read its key (and, for the last slot, finished its search)
    if (i < cnt && lr < n) list[lr] = lv;
    __syncwarp();
  }
#pragma unroll
  for (int s = 0; s < 2; ++s)
    if (s * 32 + lane < m && cr[s] < n) list[cr[s]] = cv[s];
  __syncwarp();
  if (lane == 0) {
    const int c = min(n, cnt + m);
    *cnt_p = c;
    *theta_p = c == n ? list[n - 1] : 0;
    *nacc_p = 0;
  }
  __syncwarp();
}

// Writes the blocks of a list (cnt keys) in ascending order, then -1 up to n. One warp.
__device__ __forceinline__ void write_token(const uint64_t* list, int cnt, int n, int32_t* out) {
  const int lane = threadIdx.x & 31;
  int jv[kListSlots], pos[kListSlots];
#pragma unroll
  for (int s = 0; s < kListSlots; ++s) {
    const int i = s * 32 + lane;
    jv[s] = i < cnt ? key_block(list[i]) : 0x7fffffff;
    pos[s] = 0;
  }
  for (int i = 0; i < cnt; ++i) {
    const int j = key_block(list[i]);
#pragma unroll
    for (int s = 0; s < kListSlots; ++s) pos[s] += j < jv[s];
  }
#pragma unroll
  for (int s = 0; s < kListSlots; ++s) {
    const int i = s * 32 + lane;
    if (i < cnt) out[pos[s]] = jv[s];
    else if (i < n) out[i] = -1;
  }
}

// Group sum of a warp's probabilities for G a power of two: v holds the C fragments of
// p^T [16 rows of the tile][NT * 8 query rows]; R consecutive query rows (columns) form a token,
// the first at w. Writes (or, for later head chunks, adds) w[token * ws + row]. The addition tree
// of a token is fixed by R alone (the pairs of a fragment, then n-tiles, then the quad), so a
// token gives the same bits whether a warp holds 4 n-tiles or 8. R is a compile-time constant:
// with a run-time R this ran as branches on R per 16 key rows (ncu: 17% of the kernel's stalls).
template <int NT, int R>
__device__ __forceinline__ void group_sum_pow2(float (&acc)[NT][4], float* w, int ws, int row0, bool add) {
  static_assert(R >= 1 && R <= 64 && (R & (R - 1)) == 0, "R: a power of two <= 64");
  static_assert(R <= NT * 8, "a token's rows lie in the warp's n-tiles");
  const int lane = threadIdx.x & 31, c = (lane & 3) * 2;
  float* wr = w + row0 + (lane >> 2);
  if constexpr (R == 1) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) wr[(nt * 8 + c + (i & 1)) * ws + (i >> 1) * 8] = acc[nt][i];
  } else {
    float v[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) v[nt][h] = acc[nt][2 * h] + acc[nt][2 * h + 1];
    // Tokens spanning several n-tiles (R >= 16) first add them in the thread.
    if constexpr (R >= 16) {
#pragma unroll
      for (int q = 0; q < NT / 2; ++q) v[2 * q][0] += v[2 * q + 1][0], v[2 * q][1] += v[2 * q + 1][1];
    }
    if constexpr (R >= 32) {
#pragma unroll
      for (int q = 0; q < NT / 4; ++q) v[4 * q][0] += v[4 * q + 2][0], v[4 * q][1] += v[4 * q + 2][1];
    }
    if constexpr (R >= 64) v[0][0] += v[4][0], v[0][1] += v[4][1];  // all 8 n-tiles (NT = 8)
    constexpr int step = R >= 8 ? R / 8 : 1;  // n-tiles per token
#pragma unroll
    for (int nt = 0; nt < NT; nt += step) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if constexpr (R >= 4) v[nt][h] += __shfl_xor_sync(0xffffffffu, v[nt][h], 1);
        if constexpr (R >= 8) v[nt][h] += __shfl_xor_sync(0xffffffffu, v[nt][h], 2);
        const int col = nt * 8 + c;
        if (col % R == 0) {
          float* dst = wr + (col / R) * ws + h * 8;
          *dst = add ? *dst + v[nt][h] : v[nt][h];
        }
      }
    }
  }
}

// Group sum for any G (the tokens of the warp's NT * 8 query rows, none straddling another warp)
// through the warp's scratch [NT * 8 query rows][kScratchLd]: heads summed in order, one
// (token, row) pair per lane at a time; P tokens, the first at w.
template <int NT>
__device__ __forceinline__ void group_sum_generic(const float (&acc)[NT][4], float* scratch,
                                                  float* w, int ws, int G, int P, int row0) {
  const int lane = threadIdx.x & 31, c = (lane & 3) * 2, r = lane >> 2;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) scratch[(nt * 8 + c + (i & 1)) * kScratchLd + r + (i >> 1) * 8] = acc[nt][i];
  __syncwarp();
  for (int it = lane; it < P * 16; it += 32) {
    const int row = it & 15, tok = it >> 4;
    const float* src = scratch + tok * G * kScratchLd + row;
    float sum = 0.f;
    for (int h = 0; h < G; ++h) sum += src[h * kScratchLd];
    w[tok * ws + row0 + row] = sum;
  }
  __syncwarp();  // the scratch is rewritten by the warp's next fragments
}

// p = exp2(s * scale log2(e) - lse log2(e)) in place, for the C fragments acc[NT] of S^T: this
// thread's key rows key, key + 8 against query columns col0 + 8 nt, + 1 (lse_s holds lse log2(e),
// nv_s the rows each column sees); 0 where the key is not visible.
template <int NT>
__device__ __forceinline__ void masked_probs(float (&acc)[NT][4], const float* lse_s, const int* nv_s, int col0,
                                             int key, float scale_log2) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const float2 lse2 = *reinterpret_cast<const float2*>(lse_s + col0 + nt * 8);
    const int2 nv2 = *reinterpret_cast<const int2*>(nv_s + col0 + nt * 8);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool vis = key + (i >> 1) * 8 < ((i & 1) ? nv2.y : nv2.x);
      const float x = fmaf(acc[nt][i], scale_log2, -((i & 1) ? lse2.y : lse2.x));
      acc[nt][i] = vis ? exp2f(x) : 0.f;
    }
  }
}

// lse * log2(e) and the number of visible compressed rows of query row (token t of seq, query
// head) for the probabilities; 0 and 0 for a padding row (real = false) or one with lse = -inf
// (it sees nothing).
__device__ __forceinline__ void load_row_stats(const TopkParams& p, const SeqRange& seq, int t, int head, bool real,
                                               float& lse_s, int& nv_s) {
  float lse = -__builtin_huge_valf();
  if (real) lse = *p.lse.ptr<const float>(seq.batch, seq.start + t, head);
  const bool live = lse != -__builtin_huge_valf();
  lse_s = live ? lse * kLog2e : 0.f;
  nv_s = live ? visible_rows(t, p.block_size, p.block_stride, seq.cmp_len) : 0;
}

// masked_probs for this warp's 16 key rows key0 .. key0 + 15, without the visibility test when
// every real column sees all of them (key0 + 16 <= nv_min, warp-uniform; padding columns then get
// values that feed no score).
template <int NT>
__device__ __forceinline__ void tile_probs(float (&acc)[NT][4], const float* lse_s, const int* nv_s, int col0,
                                           int key0, int nv_min, float scale_log2) {
  if (key0 + 16 <= nv_min) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const float2 lse2 = *reinterpret_cast<const float2*>(lse_s + col0 + nt * 8);
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = exp2f(fmaf(acc[nt][i], scale_log2, -((i & 1) ? lse2.y : lse2.x)));
    }
  } else {
    masked_probs<NT>(acc, lse_s, nv_s, col0, key0 + ((threadIdx.x & 31) >> 2), scale_log2);
  }
}

// A thread block's per-token state in shared memory (P tokens).
struct TokenState {
  float* w;          // [P][ws]: group-summed probabilities, cpr - 1 carried rows, then a tile's 64
  uint64_t* list;    // [P][n] top-n keys, descending
  uint64_t* cand;    // [P][cap] candidates
  uint64_t* theta;   // [P] key to beat (0: list not full)
  int* cnt;          // [P] list lengths
  int* nacc;         // [P] candidates waiting
  float* open;       // [2][P] partial score of the block cut by the tile edge
};

__device__ __forceinline__ TokenState token_state(unsigned char* smem, const Shape& s) {
  return TokenState{reinterpret_cast<float*>(smem + s.off_w),        reinterpret_cast<uint64_t*>(smem + s.off_list),
                    reinterpret_cast<uint64_t*>(smem + s.off_cand),  reinterpret_cast<uint64_t*>(smem + s.off_theta),
                    reinterpret_cast<int*>(smem + s.off_cnt),        reinterpret_cast<int*>(smem + s.off_nacc),
                    reinterpret_cast<float*>(smem + s.off_open)};
}

// Empty lists, no candidates, no open parts, zero carried rows (before the first tile; a barrier
// must follow).
template <int kThreads>
__device__ __forceinline__ void init_tokens(const TokenState& ts, int P, const Shape& s) {
  const int cpr = s.cpr;
  for (int i = threadIdx.x; i < P; i += kThreads) {
    ts.cnt[i] = 0;
    ts.nacc[i] = 0;
    ts.theta[i] = 0;
    ts.open[i] = ts.open[P + i] = 0.f;
  }
  for (int i = threadIdx.x; i < P * (cpr - 1); i += kThreads) ts.w[(i / (cpr - 1)) * s.ws + i % (cpr - 1)] = 0.f;
}

// Merges token tok's candidates into its list once more than `above` wait. One warp.
__device__ __forceinline__ void merge_if_due(const TokenState& ts, int n, int cap, int above, int tok) {
  if (ts.nacc[tok] > above)
    merge_token(ts.list + tok * n, ts.cand + tok * cap, ts.cnt + tok, ts.theta + tok, ts.nacc + tok, n);
}

// Step 3's carry: each owned token's last cpr - 1 rows of w move to its front, in rounds of 64
// when they overlap (for_own_items(per, f): f(tok, i) over the owned tokens and i < per; sync:
// the owners' barrier).
template <typename ForOwn, typename Sync>
__device__ __forceinline__ void carry_rows(const TokenState& ts, const Shape& s, ForOwn&& for_own_items, Sync&& sync) {
  for (int r0 = 0; r0 < s.cpr - 1; r0 += kTileRows) {
    if (r0 > 0) sync();
    for_own_items(min(kTileRows, s.cpr - 1 - r0), [&](int tok, int i) {
      float* wt = ts.w + tok * s.ws + r0 + i;
      *wt = wt[kTileRows];
    });
  }
}

// Step 2 of key tile kt for token tok and the jj-th block touching the tile's cells [i0, i0 + 64):
// its score from w (plus the part carried in open), kept in open if the tile edge cuts it, else
// offered as a candidate if it beats theta. b: the token's own block ((t0 + tok) / select_size,
// which callers can hoist out of their item loops). kCpr, kCpb: s.cpr and s.cpb as compile-time
// constants (0: read from s at run time). When kCpb divides the tile, no block straddles its
// edge: the block's cells_score has fixed bounds and unrolls into constant weights (1 2 2 2 1 over
// 5 rows for cpr = 2, cpb = 4) with the same additions in the same order, so both give the same
// bits, and the divisions by cpb become shifts.
template <int kCpr = 0, int kCpb = 0>
__device__ __forceinline__ void score_block(const TopkParams& p, const Shape& s, const TokenState& ts, int P,
                                            int kt, int tok, int jj, int b) {
  static_assert((kCpr == 0) == (kCpb == 0), "both compile-time or both run-time");
  constexpr bool kWhole = kCpb > 0 && kTileRows % kCpb == 0;  // every block inside the tile
  const int cpr = kCpr > 0 ? kCpr : s.cpr, cpb = kCpb > 0 ? kCpb : s.cpb;
  const int i0 = kt * kTileRows;
  const int j = i0 / cpb + jj;
  const float* w = ts.w + tok * s.ws;  // w[r - (i0 - cpr + 1)]: row r
  float sc;
  if constexpr (kWhole) {
    sc = cells_score(w + (j * cpb - i0), 0, cpr - 1, cpr - 1 + cpb, cpr);  // rows j cpb - cpr + 1 ..
  } else {
    const int ka = max(j * cpb, i0), kb = min((j + 1) * cpb, i0 + kTileRows);
    sc = cells_score(w, i0 - (cpr - 1), ka, kb, cpr);
    if (j * cpb < i0) sc += ts.open[((kt + 1) & 1) * P + tok];
    if ((j + 1) * cpb > i0 + kTileRows) {
      ts.open[(kt & 1) * P + tok] = sc;
      return;
    }
  }
  if (j > b) return;
  const uint64_t k = block_key(sc, j, is_forced(j, b, p.num_initial, p.num_local));
  if (k > ts.theta[tok]) ts.cand[tok * s.cap + atomicAdd(&ts.nacc[tok], 1)] = k;
}

// Blocks touching the cells of key tile kt (the jj range of score_block).
__device__ __forceinline__ int blocks_of_tile(int kt, int cpb) {
  const int i0 = kt * kTileRows;
  return (i0 + kTileRows - 1) / cpb - i0 / cpb + 1;
}

// After the tiles (every thread of the block, which is synchronised on entry): the candidates
// the tiles left (cut block, zero-score blocks, forced ones; in rounds of cap) merged, then each
// token's list written to out (row stride out_stride) in ascending block order.
template <int kThreads>
__device__ __forceinline__ void finish_tokens(const TopkParams& p, const Shape& s, const TokenState& ts, int P,
                                              int ntiles, int t0, int ntok, int32_t* out, index_t out_stride) {
  const int tid = threadIdx.x, warp = tid >> 5, n = p.num_selected, cap = s.cap;
  constexpr int kWarps = kThreads / 32;
  const int cells = ntiles * kTileRows;
  const float* open_last = ts.open + ((ntiles + 1) & 1) * P;  // written by tile ntiles - 1
  for (int r0 = 0; r0 < 1 + n + p.num_local; r0 += cap) {
    for (int it = tid; it < ntok * cap; it += kThreads) {
      const int tok = it % ntok, idx = r0 + it / ntok;
      const int b = (t0 + tok) / p.select_size;
      const Tail tail = tail_of(b, cells, s.cpb, n, p.num_local);
      if (idx >= tail.count()) continue;
      bool open;
      const int j = tail.block(idx, open);
      const uint64_t k = block_key(open ? open_last[tok] : 0.f, j, is_forced(j, b, p.num_initial, p.num_local));
      if (k > ts.theta[tok]) ts.cand[tok * cap + atomicAdd(&ts.nacc[tok], 1)] = k;
    }
    __syncthreads();
    for (int tok = warp; tok < ntok; tok += kWarps) merge_if_due(ts, n, cap, 0, tok);
    __syncthreads();
  }
  for (int tok = warp; tok < ntok; tok += kWarps)
    write_token(ts.list + tok * n, ts.cnt[tok], n, out + tok * out_stride);
}

// kReduce = s.reduce (0: the generic group sum).
template <typename T, int D, bool kResident, int kReduce>
__global__ void __launch_bounds__(32 * kernel_warps(D, kResident), 2)
select_topk_kernel(const TopkParams p, const Shape s) {
  constexpr int kWarps = kernel_warps(D, kResident);
  constexpr int kThreads = 32 * kWarps;
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);                                // [segs * seg_rows][D] swizzled
  T* k_s = reinterpret_cast<T*>(smem + s.off_k);                      // [2][64][D] swizzled
  float* scratch = reinterpret_cast<float*>(smem + s.off_scratch);    // [warps][seg_rows][kScratchLd]
                                                                      // (reduce == 0)
  float* lse_s = reinterpret_cast<float*>(smem + s.off_lse);          // [segs * seg_rows] lse * log2e
  int* nv_s = reinterpret_cast<int*>(smem + s.off_nv);                // [segs * seg_rows] rows visible
  const TokenState ts = token_state(smem, s);
  float* w_s = ts.w;

  SeqTile st;
  // Heavy (late) tiles first: the light ones fill the tail of the grid.
  if (!locate_tile(p.seqs, index_t(gridDim.x) - 1 - blockIdx.x, blockIdx.z, 1, s.tokens, false, st))
    return;
  const SeqRange seq = st.seq;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = blockIdx.y, G = s.group, P = s.tokens, n = p.num_selected;
  const int cpr = s.cpr, cpb = s.cpb, ws = s.ws, cap = s.cap;
  const int rows = s.segs * s.seg_rows;
  const int t0 = int(st.tile) * P;
  const int ntok = min(P, int(seq.len) - t0);
  const int nvis_max = visible_rows(t0 + ntok - 1, p.block_size, p.block_stride, seq.cmp_len);
  // Tiles until every nonzero cell (k < nvis + cpr - 1) is complete.
  const int ntiles = nvis_max > 0 ? (nvis_max + cpr - 1 + kTileRows - 1) / kTileRows : 0;

  // Token and head of query row e; false for a padding row (past the segment's last whole token,
  // past the last token of the sequence, or past G in the last chunk of a G > 64 token).
  auto row_of = [&](int e, int& tok, int& h) {
    const int seg = e / s.seg_rows, r = e - seg * s.seg_rows;
    if (G > kRows) {
      tok = 0;
      h = seg * kRows + r;
      return h < G;
    }
    const int lt = r / G;
    tok = seg * s.seg_tokens + lt;
    h = r - lt * G;
    return lt < s.seg_tokens && tok < ntok;
  };

  // Q, one segment at a time: its rows walk the (token, head) grid from its first token (G > 64:
  // token 0's heads from 64 u on); rows past its valid ones are zeros (as row_of has them).
  if (ntiles > 0) {
    constexpr int kSegRows = kResident ? kUnitRows : kRows;  // = s.seg_rows
    const T* q_t0 = p.q.ptr<const T>(seq.batch, seq.start + t0, g * G);
    for (int u = 0; u < s.segs; ++u) {
      const int h0 = G > kRows ? u * kRows : 0, tok0 = G > kRows ? 0 : u * s.seg_tokens;
      const int valid = G > kRows ? min(kRows, G - h0) : max(0, min(s.seg_tokens, ntok - tok0)) * G;
      load_pairs_async<kSegRows, D, kThreads>(q_s + u * kSegRows * D, q_t0 + tok0 * p.q.row_stride, p.q.row_stride,
                                              p.q.head_stride, h0, G, valid, [](int i) { return index_t(i); });
    }
  }
  // Row 0 of the sequence's keys and the block's first output: the only parts of seq the tile
  // loop needs (fewer live registers).
  const T* k_g = p.k.ptr<const T>(seq.batch, seq.cmp_start, g);
  int32_t* out_g = p.indices.ptr<int32_t>(seq.batch, seq.start + t0, g);
  auto load_keys = [&](int kt) {
    const int i0 = kt * kTileRows;
    load_strided_async<kTileRows, D, kThreads>(k_s + (kt & 1) * kTileRows * D, k_g + i0 * p.k.row_stride,
                                                p.k.row_stride, nvis_max - i0);
  };
  if (ntiles > 0) load_keys(0);
  cp_async_commit();

  for (int e = tid; e < rows; e += kThreads) {
    int tok, h;
    const bool real = row_of(e, tok, h);
    load_row_stats(p, seq, t0 + tok, g * G + h, real, lse_s[e], nv_s[e]);
  }

  // Resident mode: the warp's unit, its Q fragments qf[ks][np] (n-tiles 2np, 2np + 1 at k-slice
  // ks), and the fewest rows any of its real columns sees (tiles below that
  // need no visibility test; padding columns feed no score, so they do not count).
  const int unit = warp % s.segs;
  uint32_t qf[kResident ? D / 16 : 1][2][4];
  int nv_min = 0;
  if constexpr (kResident) {
    cp_async_wait<0>();
    __syncthreads();  // q_s, lse_s, nv_s complete
    if (ntiles > 0) {
      const T* qu_s = q_s + unit * kUnitRows * D;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks)
#pragma unroll
        for (int np = 0; np < 2; ++np) load_b_nk<D>(qf[ks][np], qu_s, np * 16, ks * 16);
    }
    int tok, h;
    const int e = unit * kUnitRows + lane;
    nv_min = __reduce_min_sync(0xffffffffu, row_of(e, tok, h) ? nv_s[e] : INT_MAX);
    __syncthreads();  // q_s is dead: the per-token state below lives over it
  }

  init_tokens<kThreads>(ts, P, s);
  __syncthreads();

  // Who scores, carries and merges which tokens: in the resident mode with one unit per warp, each
  // warp its own unit's tokens (synchronised by the warp alone); otherwise the whole block all
  // tokens, one warp per token for the merges.
  const bool per_warp = kResident && s.segs == kWarps;
  const int u0 = unit * s.seg_tokens;
  const int tok0 = per_warp ? u0 : 0;                                   // owned tokens:
  const int tokn = per_warp ? max(0, min(s.seg_tokens, ntok - u0)) : ntok;  // tok0 .. tok0 + tokn - 1
  auto own_sync = [&] {
    if (per_warp) __syncwarp(); else __syncthreads();
  };
  // f(tok, i) for every owned token and i < per (no divisions on the per-warp path).
  auto for_own_items = [&](int per, auto&& f) {
    if (per_warp) {
      for (int tk = 0; tk < tokn; ++tk)
        for (int i = lane; i < per; i += 32) f(tok0 + tk, i);
    } else {
      for (int it = tid; it < tokn * per; it += kThreads) f(it % tokn, it / tokn);
    }
  };
  // The warps of a unit (warps / U of them) take its 16-row m-tiles in turn.
  const int mt_first = warp / s.segs, mt_step = kWarps / s.segs;

  for (int kt = 0; kt < ntiles; ++kt) {
    const int i0 = kt * kTileRows;
    // Tile kt landed and every warp is done with tile kt - 1's buffer, which tile kt + 1 reuses
    // (the one barrier per tile when the warps keep their own tokens).
    cp_async_wait<0>();
    __syncthreads();
    if ((kt + 1) * kTileRows < nvis_max) load_keys(kt + 1);
    cp_async_commit();

    // 1. Group-summed probabilities of the tile's rows.
    if (i0 < nvis_max) {
      const T* kt_s = k_s + (kt & 1) * kTileRows * D;
      if constexpr (kResident) {
        float* wu = w_s + unit * s.seg_tokens * ws;
        float* scr = scratch + warp * kUnitRows * kScratchLd;
        for (int mt = mt_first; mt < kTileRows / 16; mt += mt_step) {
          float acc[4][4];
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll
          for (int ks = 0; ks < D / 16; ++ks) {
            uint32_t a[4];
            load_a<D>(a, kt_s, mt * 16, ks * 16);
#pragma unroll
            for (int np = 0; np < 2; ++np) {
              mma<T>(acc[2 * np], a, qf[ks][np][0], qf[ks][np][1]);
              mma<T>(acc[2 * np + 1], a, qf[ks][np][2], qf[ks][np][3]);
            }
          }
          // Fragment columns: query rows 8 nt + c2, + 1 of the unit (lse read here: registers are
          // short).
          const int col0 = unit * kUnitRows + (lane & 3) * 2;
          tile_probs<4>(acc, lse_s, nv_s, col0, i0 + mt * 16, nv_min, s.scale_log2);
          const int row0 = cpr - 1 + mt * 16;  // the m-tile's rows in w_s
          if constexpr (kReduce > 0)
            group_sum_pow2<4, kReduce>(acc, wu, ws, row0, false);
          else
            group_sum_generic<4>(acc, scr, wu, ws, G, s.seg_tokens, row0);
        }
      } else {
        const int row0 = cpr - 1 + warp * 16;  // this warp's tile rows in w_s
        const int key = i0 + warp * 16 + (lane >> 2);  // fragment rows key, key + 8
        uint32_t af[D / 16][4];  // the warp's K fragments, shared by all chunks
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) load_a<D>(af[ks], kt_s, warp * 16, ks * 16);
        for (int c = 0; c < s.segs; ++c) {
          const T* qc_s = q_s + c * kRows * D;
          float acc[8][4];
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll
          for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
            for (int np = 0; np < 4; ++np) {
              uint32_t b[4];
              load_b_nk<D>(b, qc_s, np * 16, ks * 16);
              mma<T>(acc[2 * np], af[ks], b[0], b[1]);
              mma<T>(acc[2 * np + 1], af[ks], b[2], b[3]);
            }
          }
          // Fragment columns: query rows 8 nt + c2, + 1 (read here rather than kept in registers).
          masked_probs<8>(acc, lse_s, nv_s, c * kRows + (lane & 3) * 2, key, s.scale_log2);
          // G <= 64: the chunk's own tokens; G > 64: one token, chunks added in order.
          float* wc = w_s + (G > kRows ? 0 : c * s.seg_tokens * ws);
          if constexpr (kReduce > 0)
            group_sum_pow2<8, kReduce>(acc, wc, ws, row0, G > kRows && c > 0);
          else
            group_sum_generic<8>(acc, scratch + warp * kRows * kScratchLd, wc, ws, G, s.seg_tokens, row0);
        }
      }
    } else {  // past every visible row: the tile only completes cells from the carried rows
      for_own_items(kTileRows, [&](int tok, int i) { w_s[tok * ws + cpr - 1 + i] = 0.f; });
    }
    own_sync();

    // 2. Blocks touching cells [i0, i0 + 64): score, keep the cut one's part, filter by theta.
    // The paper's shape (cpr = 2, cpb = 4): 16 whole blocks per tile, compile-time weights.
    if (cpr == 2 && cpb == 4)
      for_own_items(kTileRows / 4, [&](int tok, int jj) {
        score_block<2, 4>(p, s, ts, P, kt, tok, jj, (t0 + tok) / p.select_size);
      });
    else
      for_own_items(blocks_of_tile(kt, cpb),
                    [&](int tok, int jj) { score_block(p, s, ts, P, kt, tok, jj, (t0 + tok) / p.select_size); });
    own_sync();

    // 3. Carry the last cpr - 1 rows (in rounds of 64 when they overlap), then merge the tokens
    // whose slots could not take another tile's candidates (the list is the top n of all
    // candidates whenever merged, so merging late changes nothing but theta's freshness).
    carry_rows(ts, s, for_own_items, own_sync);
    const int last = kt + 1 == ntiles;
    for (int tok = tok0 + (per_warp ? 0 : warp); tok < tok0 + tokn; tok += per_warp ? 1 : kWarps)
      merge_if_due(ts, n, cap, last ? 0 : s.merge_at, tok);
  }
  __syncthreads();

  finish_tokens<kThreads>(p, s, ts, P, ntiles, t0, ntok, out_g, p.indices.row_stride);
}

}  // namespace nsa::cuda::topk
