// Kernel A of the decoding step (decode.h): the compressed branch's scan, split over thread
// blocks (flash-decoding), and the raw material of the block scores.
//
// Block scores need p = 2^(s - lse) with the row's final lse, known only once every split is
// done. Instead of the logits (one float per row and compressed token), each key tile leaves its
// probabilities against the rows' running maxima m_t already summed into the selection blocks
// they overlap: u[slot][row] = sum_i cells(i, j) p_i, where cells(i, j) = |W_i ∩ block j| / d
// counts the d-token cells of compressed token i inside block j. Kernel B scales each tile's
// slots by 2^(m_t - lse) and adds them up: about NS / 64 (~1/4 at the paper's sizes) of the
// logits' bytes, and no exp per logit there.
//
// The split's tiles run in the plan's scan_order: each key tile with its value tile, or every key
// tile first (their probabilities kept in shared memory as the products' operands, choices.h),
// then every value tile. The second order counts the block in key_done once its key tiles are
// done, so that kernel B selects while the value tiles stream; both give the same bits.
#pragma once

#include <climits>

#include "choices.h"
#include "counters.cuh"
#include "decode.h"
#include "tile_attention.cuh"

namespace nsa::cuda::decode {

// Two buffers of a tile's probabilities: tile k's slots are summed during tile k + 1, from
// buffer k % 2, while tile k + 1 writes the other (the key loop's barrier at the start of each
// tile orders the two).
template <int MT>
constexpr size_t kProbBytes = 2 * size_t(16 * MT) * kProbLd * sizeof(float);

template <typename T, int D, int DV, int MT>
struct ScanSmem : TileSmem<T, D, DV, MT, kProbBytes<MT>> {
  using Base = TileSmem<T, D, DV, MT, kProbBytes<MT>>;
  static constexpr size_t kBytes = Base::kOffExtra + kProbBytes<MT>;
  using Base::Base;
  // [2][kRows][kProbLd]
  __device__ float* probs(int k) const {
    return reinterpret_cast<float*>(this->extra()) + (k & 1) * (16 * MT) * kProbLd;
  }
};

// The tiles of a split with its keys first (choices.h's layout): where each lives in shared memory.
template <typename T, int D, int DV, int MT>
struct KeysFirstSmem {
  static constexpr int kRows = Warps<MT>::kRows;
  static constexpr int kSlot = kTileKeys * (D > DV ? D : DV);  // elements of a ring slot
  unsigned char* base;
  KeysFirstLayout l;
  __device__ KeysFirstSmem(unsigned char* smem, int tiles) : base(smem), l(keys_first_layout(D, DV, kRows, tiles)) {}
  __device__ T* q() const { return reinterpret_cast<T*>(base); }
  __device__ T* slot(int stage) const { return reinterpret_cast<T*>(base + l.ring) + stage * kSlot; }
  __device__ float* red() const { return reinterpret_cast<float*>(base + l.red); }
  __device__ float* reduce() const { return reinterpret_cast<float*>(base + l.ring); }
  __device__ float* probs(int k) const { return reinterpret_cast<float*>(base + l.probs) + (k & 1) * kRows * kProbLd; }
  __device__ float* corr(int k) const { return reinterpret_cast<float*>(base + l.corr) + k * kRows; }
  // Tile k's A fragments: [kKeys / 16][kThreads] 16-byte words, one per thread and k-step.
  __device__ uint4* frags(int k) const {
    return reinterpret_cast<uint4*>(base + l.frags) + k * (Warps<MT>::kKeys / 16) * kThreads;
  }
};

template <typename T, int D, int DV, int MT, bool kKeysFirst>
__global__ void __launch_bounds__(kThreads, 2) decode_cmp_kernel(const DecodeParams p, const Workspace ws) {
  using W = Warps<MT>;
  using Smem = ScanSmem<T, D, DV, MT>;
  extern __shared__ __align__(128) unsigned char smem[];
  const Smem sm(smem);
  const KeysFirstSmem<T, D, DV, MT> kf(smem, ws.split_tiles);
  float* const red = kKeysFirst ? kf.red() : sm.red();
  trace_event(p.plan, kTraceScan, kTraceStart);
  // Kernel B's checks of the sequence need nothing from here, so the next kernel may start at
  // once, or once Z has completed where A follows it (decode.h; below, its first tiles issued).
  if (!ws.after_reset) allow_next_grid();
  // Runs beside kernel W (the window), whose results it neither reads nor overwrites. Each block
  // waits for the kernel before it (Z, or W launched before A) before it counts itself done and
  // exits, so that A's completion implies W's, and its count comes after Z's zeroing.

  const int split = blockIdx.x, b = blockIdx.z;
  const int h = blockIdx.y / ws.row_blocks, rb = blockIdx.y % ws.row_blocks;
  const int G = p.num_heads / p.num_heads_k, S = p.num_queries, R = ws.rows;
  const int r0 = rb * kBlockRows, nrows = min(kBlockRows, R - r0);
  const int L = p.seqlens[b];
  const bool ok = L >= S && L <= p.capacity;  // else kernel B flags the sequence; nothing is read
  const int nc = ok ? int(num_cmp_tokens(L, p.block_size, p.block_stride)) : 0;
  const int nt = (nc + kTileKeys - 1) / kTileKeys;
  const int splits = p.plan.cmp_splits, per = (nt + splits - 1) / splits;
  const int t_begin = split * per, count = max(0, min(per, nt - t_begin));
  const index_t bh = index_t(b) * p.num_heads_k + h;
  const index_t part = (bh * splits + split) * R + r0;  // the split's first row
  float* o_dst = ws.cmp_o + part * DV;
  float* ml_dst = ws.cmp_ml + part * 2;
  if (count == 0) {
    write_empty<DV>(o_dst, ml_dst, nrows);
    wait_prior_grid();
    if (kKeysFirst) count_done(ws.key_done + bh);
    count_done(ws.scan_done + bh);
    return;
  }

  load_query_rows<T, D, MT>(sm.q(), p, b, h, G, r0, nrows);  // (at 0 in both layouts)
  WarpSoftmax<T, D, DV, MT> acc;
  acc.reset();
  // Compressed tokens each of this thread's rows sees (0 for padding rows), and the fewest any
  // real row of the warp sees: tiles below that need no mask.
  int nvis[2], nv_min = INT_MAX;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = acc.row(i);
    nvis[i] = r < nrows ? int(num_cmp_tokens(L - S + (r0 + r) / G + 1, p.block_size, p.block_stride)) : 0;
    if (r < nrows) nv_min = min(nv_min, nvis[i]);
  }
  nv_min = __reduce_min_sync(0xffffffffu, nv_min);

  const T* k_src = p.k_cmp.ptr<const T>(b, 0, h);
  const T* v_src = p.v_cmp.ptr<const T>(b, 0, h);
  const float scale_log2 = float(p.scale * M_LOG2E);
  float* tile_m = ws.tile_m + bh * ws.tiles * R + r0;              // [T][R], from row r0
  float* tile_u = ws.tile_u + bh * ws.tiles * ws.slots * R + r0;   // [T][NS][R]
  const int cpr = ws.cpr, cpb = ws.cpb, slots = ws.slots;
  const int lane = threadIdx.x & 31, ks = acc.slice();
  // Tile t's block-score slots from its probabilities: slot k is block jlo + k, fed by the
  // tile's rows i with cells in it.
  auto slot_sums = [&](int k) {
    const int t = t_begin + k, i0 = t * kTileKeys, jlo = i0 / cpb;
    const float* probs = kKeysFirst ? kf.probs(k) : sm.probs(k);
    float* u_t = tile_u + index_t(t) * slots * R;
    for (int idx = threadIdx.x; idx < slots * nrows; idx += kThreads) {
      const int slot = idx / nrows, r = idx - slot * nrows;
      const int j = jlo + slot, c0 = j * cpb, c1 = c0 + cpb;  // the block's cells [c0, c1)
      const int first = max(i0, c0 - cpr + 1), last = min(i0 + kTileKeys, c1) - 1;
      const float* pr_row = probs + r * kProbLd - i0;
      float u = 0.f;
      for (int i = first; i <= last; ++i) u += float(min(i + cpr, c1) - max(i, c0)) * pr_row[i];
      u_t[index_t(slot) * R + r] = u;
    }
  };

  // Tile k's probabilities into the slot sums' buffer, and the row maxima after it.
  auto keep_probs = [&](int k, float* probs, const float (&pr)[W::kKeys / 8][4]) {
    const int t = t_begin + k;
#pragma unroll
    for (int j = 0; j < W::kKeys / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        probs[acc.row(e >> 1) * kProbLd + ks * W::kKeys + j * 8 + (lane & 3) * 2 + (e & 1)] = pr[j][e];
    if (ks == 0 && (lane & 3) == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
        if (acc.row(i) < nrows) tile_m[index_t(t) * R + acc.row(i)] = acc.m[i];
    }
  };
  auto first_issued = [&] {
    if (ws.after_reset) {
      wait_prior_grid();
      allow_next_grid();
    }
  };

  if constexpr (!kKeysFirst) {
    run_tiles<Smem::kStages>(
        count,
        [&](int k, int stage) {
          const int i0 = (t_begin + k) * kTileKeys, valid = min(kTileKeys, nc - i0);
          copy_tile<D>(sm.k(stage), k_src + i0 * p.k_cmp.row_stride, p.k_cmp.row_stride, valid);
          copy_tile<DV>(sm.v(stage), v_src + i0 * p.v_cmp.row_stride, p.v_cmp.row_stride, valid);
        },
        [&](int k, int stage) {
          // The previous tile's slots first: its probabilities were complete at the loop's
          // barrier, and summing them here saves a barrier per tile.
          if (k > 0) slot_sums(k - 1);
          else trace_event(p.plan, kTraceScan, kTraceStep1);
          const int i0 = (t_begin + k) * kTileKeys;
          float pr[W::kKeys / 8][4];
          acc.tile(sm.q(), sm.k(stage), sm.v(stage), red, scale_log2, i0 + kTileKeys <= nv_min,
                   [&](int i, int key) { return i0 + key < nvis[i]; }, pr);
          keep_probs(k, sm.probs(k), pr);
        },
        first_issued);
    slot_sums(count - 1);  // run_tiles ends with a barrier
    trace_event(p.plan, kTraceScan, kTraceMid);
    acc.finish(red, sm.reduce(), o_dst, ml_dst, nrows);
  } else {
    // Steps 0 .. count-1 take the key tiles, count .. 2 count - 1 the value tiles, all through
    // the ring.
    run_tiles<kScanRing>(
        2 * count,
        [&](int k, int stage) {
          const int kv = k < count ? k : k - count;
          const int i0 = (t_begin + kv) * kTileKeys, valid = min(kTileKeys, nc - i0);
          if (k < count) copy_tile<D>(kf.slot(stage), k_src + i0 * p.k_cmp.row_stride, p.k_cmp.row_stride, valid);
          else copy_tile<DV>(kf.slot(stage), v_src + i0 * p.v_cmp.row_stride, p.v_cmp.row_stride, valid);
        },
        [&](int k, int stage) {
          if (k < count) {
            if (k > 0) slot_sums(k - 1);
            else trace_event(p.plan, kTraceScan, kTraceStep1);
            const int i0 = (t_begin + k) * kTileKeys;
            float pr[W::kKeys / 8][4], corr[2];
            acc.probs(kf.q(), kf.slot(stage), red, scale_log2, i0 + kTileKeys <= nv_min,
                      [&](int i, int key) { return i0 + key < nvis[i]; }, pr, corr);
            keep_probs(k, kf.probs(k), pr);
            uint4* frags = kf.frags(k);
#pragma unroll
            for (int kk = 0; kk < W::kKeys / 16; ++kk) {
              uint32_t a[4];
              c_to_a<T>(a, pr[2 * kk], pr[2 * kk + 1]);
              frags[kk * kThreads + threadIdx.x] = make_uint4(a[0], a[1], a[2], a[3]);
            }
            if (ks == 0 && (lane & 3) == 0) {
              kf.corr(k)[acc.row(0)] = corr[0];
              kf.corr(k)[acc.row(1)] = corr[1];
            }
            return;
          }
          const int kv = k - count;
          if (kv == 0) {  // the keys are done: the selection's inputs out, counted
            slot_sums(count - 1);
            acc.write_ml(red, ml_dst, nrows);
            wait_prior_grid();  // (Z before the count; a no-op past first_issued's)
            trace_event(p.plan, kTraceScan, kTraceStep2);
            count_done(ws.key_done + bh);
          }
          const float corr[2] = {kf.corr(kv)[acc.row(0)], kf.corr(kv)[acc.row(1)]};
          const uint4* frags = kf.frags(kv);
          uint32_t a[W::kKeys / 16][4];
#pragma unroll
          for (int kk = 0; kk < W::kKeys / 16; ++kk) {
            const uint4 f = frags[kk * kThreads + threadIdx.x];
            a[kk][0] = f.x;
            a[kk][1] = f.y;
            a[kk][2] = f.z;
            a[kk][3] = f.w;
          }
          acc.rescale(corr);
          warp_gemm_pn<W::kKeys, DV, T>(acc.o, a, kf.slot(stage) + ks * W::kKeys * DV);
        },
        first_issued);
    trace_event(p.plan, kTraceScan, kTraceMid);
    acc.finish_o(kf.reduce(), o_dst, nrows);
  }
  wait_prior_grid();
  trace_event(p.plan, kTraceScan, kTraceEnd);  // (before the count: the waiters come after it)
  count_done(ws.scan_done + bh);
}

}  // namespace nsa::cuda::decode
