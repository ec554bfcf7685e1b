// The attention core of the decoding step's streaming kernels (the compressed scan, the window
// and the selected attention: A, W and C in decode.h): a thread block of 4 warps holds the query
// rows of one (sequence, KV head, row block) as MT m-tiles of 16 rows and streams key tiles of
// 64 keys through shared memory with cp.async, several stages deep. The 4 / MT warps of an
// m-tile split each key tile into slices (MT = 1: four slices of 16 keys, so that every warp
// works on a single 16-row tile) and share the running row maxima, exchanged through shared
// memory once per tile: their partial sums then add up without rescaling, and the compressed
// scan's per-tile block scores have one reference maximum per row.
#pragma once

#include <cmath>

#include "../common/warp_gemm.cuh"
#include "shape.h"
#include "trace.cuh"

namespace nsa::cuda::decode {

constexpr int kThreads = 128;

// Programmatic dependent launch (sm_90; no-ops elsewhere). A kernel launched with it may start
// while the previous kernel of the stream runs: everything it reads from that kernel (or writes
// where that kernel reads) must come after wait_prior_grid(), which returns once the previous
// grid has completed and its writes are visible. Every thread block of such a kernel calls it
// before exiting, so that a kernel's completion implies its predecessors' (kernel D reads what A
// and B wrote, and the next step's kernels follow D). allow_next_grid() lets the next kernel's
// thread blocks start once every block of this grid has called it (or exited).
__device__ __forceinline__ void wait_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// The warps' roles: MT m-tiles (1 for up to 16 query rows, 4 for up to 64), kSlices warps per
// m-tile, each taking kKeys keys of every key tile.
template <int MT>
struct Warps {
  static_assert(MT == 1 || MT == 4, "one m-tile, or four");
  static constexpr int kRows = 16 * MT;
  static constexpr int kSlices = 4 / MT;
  static constexpr int kKeys = kTileKeys / kSlices;
};

// Shared memory of the streaming kernels, in this order: Q [kRows][D], K [kStages][64][D] and
// V [kStages][64][DV] (T, swizzled tiles), the row-maximum exchange [kSlices][kRows] (fp32), then
// the kernel's own arrays. kExtra: those arrays' bytes (an allowance where they vary); three
// stages when the block then stays within 112 KB (two blocks per SM), else two. The split's
// partial sums are reduced over the stages once the key loop is done (reduce_bytes).
template <typename T, int D, int DV, int MT, size_t kExtra>
struct TileSmem {
  static constexpr int kRows = Warps<MT>::kRows;
  static constexpr size_t kQ = size_t(kRows) * D * sizeof(T);
  static constexpr size_t kStage = size_t(kTileKeys) * (D + DV) * sizeof(T);
  static constexpr size_t kRed = size_t(Warps<MT>::kSlices) * kRows * sizeof(float);
  static constexpr int kStages = kQ + 3 * kStage + kRed + kExtra <= 112 * 1024 ? 3 : 2;
  static constexpr size_t kOffK = kQ;
  static constexpr size_t kOffV = kOffK + size_t(kStages) * kTileKeys * D * sizeof(T);
  static constexpr size_t kOffRed = kOffV + size_t(kStages) * kTileKeys * DV * sizeof(T);
  static constexpr size_t kOffExtra = kOffRed + kRed;
  // The reduction of the slices' O (WarpSoftmax::finish_o) lives over the stages.
  static constexpr size_t kReduceBytes = size_t(Warps<MT>::kSlices) * kRows * DV * sizeof(float);
  static_assert(kReduceBytes <= kOffRed - kOffK, "the reduction fits the stages");
  static_assert(kOffExtra % 16 == 0, "the kernel's arrays start 16-byte aligned");

  unsigned char* base;
  __device__ explicit TileSmem(unsigned char* smem) : base(smem) {}
  __device__ T* q() const { return reinterpret_cast<T*>(base); }
  __device__ T* k(int stage) const { return reinterpret_cast<T*>(base + kOffK) + stage * kTileKeys * D; }
  __device__ T* v(int stage) const { return reinterpret_cast<T*>(base + kOffV) + stage * kTileKeys * DV; }
  __device__ float* red() const { return reinterpret_cast<float*>(base + kOffRed); }
  __device__ float* reduce() const { return reinterpret_cast<float*>(base + kOffK); }
  __device__ unsigned char* extra() const { return base + kOffExtra; }
};

// Copies rows [0, valid) of `src` (row stride `stride` elements) into the first rows of a 64-row
// swizzled tile, zero-filling the rest: whole-tile fast path where the 128 threads take whole
// rows (COLS = 64, 128, 256), else the generic copy (COLS = 96, 192).
template <int COLS, typename T>
__device__ __forceinline__ void copy_tile(T* tile, const T* src, index_t stride, int valid) {
  if constexpr (kThreads % (COLS / 8) == 0)
    StridedTileStream<T, kTileKeys, COLS, kThreads, Layout::kRowSwizzled>(src, stride).copy(tile, 0, valid);
  else
    load_strided_async<kTileKeys, COLS, kThreads>(tile, src, stride, valid);
}

// Runs the key tiles 0 .. count-1 through kStages stages: issue(k, stage) starts the copies of
// tile k into a stage, body(k, stage) computes on it once it has landed (every thread of the
// block calls both). Whatever the caller issued before (the query rows) lands with tile 0.
// issued() runs once the first tiles' copies are issued, before anything waits for them. On
// return every copy has landed and every thread is past its last body: the stages are free.
struct NoHook {
  __device__ void operator()() const {}
};
template <int kStages, typename Issue, typename Body, typename Issued = NoHook>
__device__ __forceinline__ void run_tiles(int count, Issue&& issue, Body&& body, Issued&& issued = Issued{}) {
#pragma unroll
  for (int k = 0; k < kStages - 1; ++k) {
    if (k < count) issue(k, k);
    cp_async_commit();
  }
  issued();
  for (int k = 0; k < count; ++k) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile k landed for all threads; everyone left tile k - 1's stage
    const int next = k + kStages - 1;
    if (next < count) issue(next, next % kStages);
    cp_async_commit();
    body(k, k % kStages);
  }
  cp_async_wait<0>();
  __syncthreads();
}

// One warp's online softmax over its key slices, for this thread's two rows (C-fragment rows
// lane / 4 and lane / 4 + 8 of the warp's m-tile): O (fp32, its slices' share), the row maxima m
// (log2 units, shared by the m-tile's warps) and this thread's part of the row sums l.
template <typename T, int D, int DV, int MT>
struct WarpSoftmax {
  using W = Warps<MT>;
  float o[DV / 8][4];
  float m[2], l[2];

  __device__ int mtile() const { return int(threadIdx.x >> 5) / W::kSlices; }
  __device__ int slice() const { return int(threadIdx.x >> 5) % W::kSlices; }
  // Row (of the block's kRows) of this thread's row i.
  __device__ int row(int i) const { return mtile() * 16 + int(threadIdx.x & 31) / 4 + 8 * i; }

  __device__ void reset() {
#pragma unroll
    for (int j = 0; j < DV / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.f;
  }

  // One key tile (k_t [64][D], v_t [64][DV]; q_s [kRows][D]): probs() on k_t, then O moved to
  // the new maxima and O += P V. On return p holds the warp's probabilities (fp32, 0 where
  // masked) against the new m.
  template <typename Visible>
  __device__ __forceinline__ void tile(const T* q_s, const T* k_t, const T* v_t, float* red, float scale_log2,
                                       bool all, const Visible& visible, float (&p)[W::kKeys / 8][4]) {
    float corr[2];
    probs(q_s, k_t, red, scale_log2, all, visible, p, corr);
    rescale(corr);
    warp_gemm_pn<W::kKeys, DV, T>(o, p, v_t + slice() * W::kKeys * DV);
  }

  // The key half of a tile: S = Q K^T on the warp's slice, masked where !visible(i, key) (this
  // thread's row i, key 0 .. 63 of the tile; not asked when `all`, which must be uniform over
  // the warp), scaled to log2 units; the rows' tile maxima shared with the m-tile's other warps
  // through red (one __syncthreads, which every thread of the block must reach when kSlices > 1);
  // m and l moved to the new maxima. Leaves in p the probabilities against the new m (fp32, 0
  // where masked) and in corr the factors O must be scaled by before P V is added (O is not
  // touched).
  template <typename Visible>
  __device__ __forceinline__ void probs(const T* q_s, const T* k_t, float* red, float scale_log2, bool all,
                                        const Visible& visible, float (&p)[W::kKeys / 8][4], float (&corr)[2]) {
    const int lane = threadIdx.x & 31, ks = slice();
#pragma unroll
    for (int j = 0; j < W::kKeys / 8; ++j) p[j][0] = p[j][1] = p[j][2] = p[j][3] = 0.f;
    warp_gemm_nt<D, W::kKeys, T>(p, q_s, mtile() * 16, k_t + ks * W::kKeys * D);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < W::kKeys / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = ks * W::kKeys + j * 8 + (lane & 3) * 2 + (e & 1);
        p[j][e] = all || visible(e >> 1, key) ? p[j][e] * scale_log2 : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], p[j][e]);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) mx[i] = quad_max(mx[i]);
    if constexpr (W::kSlices > 1) {
      if ((lane & 3) == 0) {
        red[ks * W::kRows + row(0)] = mx[0];
        red[ks * W::kRows + row(1)] = mx[1];
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mx[i] = red[row(i)];
#pragma unroll
        for (int s = 1; s < W::kSlices; ++s) mx[i] = fmaxf(mx[i], red[s * W::kRows + row(i)]);
      }
    }
    float base[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m_new = fmaxf(m[i], mx[i]);
      base[i] = m_new == -INFINITY ? 0.f : m_new;  // no key seen yet: exp2(-inf - 0) = 0
      corr[i] = exp2f(m[i] - base[i]);
      m[i] = m_new;
      l[i] *= corr[i];
    }
#pragma unroll
    for (int j = 0; j < W::kKeys / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        p[j][e] = exp2f(p[j][e] - base[e >> 1]);
        l[e >> 1] += p[j][e];
      }
    }
  }

  // O *= corr per row (skipped where the warp's factors are all 1).
  __device__ __forceinline__ void rescale(const float (&corr)[2]) {
    if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
      for (int j = 0; j < DV / 8; ++j) {
        o[j][0] *= corr[0];
        o[j][1] *= corr[0];
        o[j][2] *= corr[1];
        o[j][3] *= corr[1];
      }
    }
  }

  // The split's partial result for rows [0, nrows) of the block: write_ml(), then finish_o().
  __device__ void finish(float* red, float* reduce, float* o_dst, float* ml_dst, int nrows) const {
    write_ml(red, ml_dst, nrows);
    finish_o(reduce, o_dst, nrows);
  }

  // The (m, l) pairs of rows [0, nrows) at ml_dst, the slices' l added in slice order through red
  // (the row-maximum exchange, free once the key tiles are done). Every thread of the block calls
  // it; it ends with a barrier.
  __device__ void write_ml(float* red, float* ml_dst, int nrows) const {
    const int lane = threadIdx.x & 31, ks = slice();
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float lsum = quad_sum(l[i]);
      if ((lane & 3) == 0) {
        red[ks * W::kRows + row(i)] = lsum;
        if (ks == 0 && row(i) < nrows) ml_dst[2 * row(i)] = m[i];  // the same in every slice
      }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < nrows; r += kThreads) {
      float lsum = red[r];
#pragma unroll
      for (int s = 1; s < W::kSlices; ++s) lsum += red[s * W::kRows + r];
      ml_dst[2 * r + 1] = lsum;
    }
    __syncthreads();
  }

  // The split's unnormalised O (fp32 [nrows][DV] at o_dst, against m), the slices' O added in
  // slice order through `reduce` (kReduceBytes of shared memory). Every thread of the block calls
  // it; it ends with a barrier (reduce may alias the stages).
  __device__ void finish_o(float* reduce, float* o_dst, int nrows) const {
    const int lane = threadIdx.x & 31, ks = slice(), c = (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float* orow = reduce + (ks * W::kRows + row(i)) * DV;  // [kSlices][kRows][DV]
#pragma unroll
      for (int j = 0; j < DV / 8; ++j)
        *reinterpret_cast<float2*>(orow + j * 8 + c) = make_float2(o[j][2 * i], o[j][2 * i + 1]);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nrows * (DV / 4); idx += kThreads) {
      const int r = idx / (DV / 4), c4 = idx % (DV / 4);
      float4 sum = reinterpret_cast<const float4*>(reduce + r * DV)[c4];
#pragma unroll
      for (int s = 1; s < W::kSlices; ++s) {
        const float4 x = reinterpret_cast<const float4*>(reduce + (s * W::kRows + r) * DV)[c4];
        sum.x += x.x;
        sum.y += x.y;
        sum.z += x.z;
        sum.w += x.w;
      }
      reinterpret_cast<float4*>(o_dst + index_t(r) * DV)[c4] = sum;
    }
    __syncthreads();
  }
};

// A split that saw no key tile: O = 0 and (m, l) = (-inf, 0) for rows [0, nrows), so that the
// merges read every split alike.
template <int DV>
__device__ __forceinline__ void write_empty(float* o_dst, float* ml_dst, int nrows) {
  for (int idx = threadIdx.x; idx < nrows * (DV / 4); idx += kThreads)
    reinterpret_cast<float4*>(o_dst)[idx] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int r = threadIdx.x; r < nrows; r += kThreads) {
    ml_dst[2 * r] = -INFINITY;
    ml_dst[2 * r + 1] = 0.f;
  }
}

// The query rows of this thread block (row block rb of the S * G rows of a (sequence, KV head))
// in q_s: row r is query (r0 + r) / G, head h * G + (r0 + r) % G; rows past nrows zero.
template <typename T, int D, int MT>
__device__ __forceinline__ void load_query_rows(T* q_s, const DecodeParams& p, int b, int h, int G, int r0,
                                                int nrows) {
  load_pairs_async<Warps<MT>::kRows, D, kThreads>(q_s, p.q.ptr<const T>(b, 0, h * G), p.q.row_stride,
                                                  p.q.head_stride, r0, G, nrows, [](int i) { return index_t(i); });
}

}  // namespace nsa::cuda::decode
