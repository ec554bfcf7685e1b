// Kernel D of the decoding step (decode.h): merges each output row's split partials of the three
// branches and writes the gated sum. A row (b, s, query head) is taken by `wpr` warps (a power of
// two up to 8, enough that no warp merges more than kCombineSplitsPerWarp splits of a branch where
// it can: choices.h), each merging its splits' (m, l, O) online, then the row's first warp merges
// theirs in warp order: a fixed order, so the bits do not depend on timing. The kernel is a chain
// of memory round trips after kernel C ends, so each warp issues the loads of a batch of splits
// together before it adds any of them, reads its inputs (gates, length) before it waits, and
// under plan.dep_wait = head merges the compressed and window branches as soon as its rows'
// heads' blocks of A and W are done (while B and C run), the selected branch once their
// selection and blocks of C are; under grid all three after the whole of C. The kernel below
// waits for all of C after it in any case.
#pragma once

#include "../attn/fwd.cuh"  // softmax_inv
#include "choices.h"
#include "counters.cuh"
#include "decode.h"
#include "split_merge.cuh"
#include "trace.cuh"

namespace nsa::cuda::decode {

// A warp's batch of split partials of one branch of a row: splits first + k wpr (k < kBatch) of
// n, O at o + sp * o_step ([DV] fp32, lane holding columns lane + 32 c) and (m, l) at
// ml + sp * ml_step, written by earlier kernels (read through L2); past the last split
// (-inf, 0, 0), which adds 0. load() issues every load of the batch; merge() waits for them.
template <int DV, int kPerWarp>
struct SplitBatch {
  static constexpr int kCols = DV / 32, kBatch = kCols <= 4 || kPerWarp < 2 ? kPerWarp : 2;
  float2 part[kBatch];
  float x[kBatch][kCols];

  __device__ __forceinline__ void load(const float* o, index_t o_step, const float* ml, index_t ml_step, int n,
                                       int first, int wpr) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int sp = first + k * wpr;
      const bool in = sp < n;
      part[k] = in ? __ldcg(reinterpret_cast<const float2*>(ml + index_t(sp) * ml_step)) : make_float2(-INFINITY, 0.f);
#pragma unroll
      for (int c = 0; c < kCols; ++c) x[k][c] = in ? __ldcg(o + index_t(sp) * o_step + lane + 32 * c) : 0.f;
    }
  }

  // Adds the batch into the running (mx, lsum, acc), acc against mx.
  __device__ __forceinline__ void merge(float& mx, float& lsum, float (&acc)[kCols]) const {
    float mx_new = mx;
#pragma unroll
    for (int k = 0; k < kBatch; ++k) mx_new = fmaxf(mx_new, part[k].x);
    const float old = split_factor(mx, mx_new);
    lsum *= old;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[c] *= old;
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const float f = split_factor(part[k].x, mx_new);
      lsum = fmaf(f, part[k].y, lsum);
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[c] = fmaf(f, x[k][c], acc[c]);
    }
    mx = mx_new;
  }
};

// One branch's splits of a row as seen by one warp: splits sub, sub + wpr, ... < n.
struct BranchSplits {
  const float* o;
  index_t o_step;
  const float* ml;
  index_t ml_step;
  int n;
};

// Warp 0: waits until the blocks of the heads of rows [first, last] (at most kCombineWarps rows)
// are counted done: those of A and W (`late` false: the compressed and window branches), or B's
// selection and C's blocks (true: the selected branch). Lanes 2i and 2i + 1 poll the two counters
// of row first + i's head, so that the polls' round trips overlap (rows of one head repeat them).
__device__ __forceinline__ void wait_heads(const DecodeParams& p, const Workspace& ws, index_t first, index_t last,
                                           bool late) {
  static_assert(2 * kCombineWarps <= 32, "a lane per counter of each row");
  const int HQ = p.num_heads, S = p.num_queries, H = p.num_heads_k, G = HQ / H, lane = threadIdx.x & 31;
  const index_t row = first + lane / 2;
  if (row > last) return;
  const index_t bh = row / HQ / S * H + int(row % HQ) / G;
  const unsigned cmp_blocks = unsigned(p.plan.cmp_splits * ws.row_blocks);
  const unsigned slc_blocks = unsigned(p.plan.slc_splits * ws.row_blocks);
  if (late)
    spin_until(lane % 2 ? ws.slc_done + bh : ws.sel_done + bh, lane % 2 ? slc_blocks : unsigned(S));
  else
    spin_until(lane % 2 ? ws.win_done + bh : ws.scan_done + bh, lane % 2 ? slc_blocks : cmp_blocks);
}

template <typename T, int DV, int kPerWarp>
__device__ __forceinline__ void combine_rows(const DecodeParams& p, const Workspace& ws, int wpr) {
  constexpr int kCols = DV / 32;
  __shared__ float red[kCombineWarps][3][DV + 2];  // per warp and branch: O, then m and l
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, sub = warp % wpr;
  const index_t row = index_t(blockIdx.x) * (kCombineWarps / wpr) + warp / wpr;
  const int HQ = p.num_heads, S = p.num_queries, H = p.num_heads_k, G = HQ / H, R = ws.rows;
  const bool real = row < index_t(p.batch) * S * HQ;
  const int hq = int(row % HQ), s = int(row / HQ % S), b = int(row / HQ / S);
  const int h = hq / G, r = s * G + hq % G;
  const index_t bh = index_t(b) * H + h;
  trace_event(p.plan, kTraceCombine, kTraceStart);
  // Inputs, read while kernel C still runs.
  float gate[3] = {0.f, 0.f, 0.f};
  int L = 0;
  if (real && sub == 0) {
#pragma unroll
    for (int br = 0; br < 3; ++br) gate[br] = to_float(*p.gate[br].ptr<const T>(b, s, hq));
    L = p.seqlens[b];
  }
  // Under dep_wait = head the compressed and window branches are merged while B and C still
  // run, and only the selected branch after them; else all three after the previous grid.
  const bool by_head = p.plan.dep_wait == DepWait::kHead;
  const index_t all_rows = index_t(p.batch) * S * HQ, first_row = index_t(blockIdx.x) * (kCombineWarps / wpr);
  const index_t last_row = min(all_rows, first_row + kCombineWarps / wpr) - 1;
  auto wait = [&](bool late) {
    if (by_head) {
      if (warp == 0) wait_heads(p, ws, first_row, last_row, late);
      __syncthreads();
    } else if (!late) {
      wait_prior_grid();
    }
  };
  wait(false);
  trace_event(p.plan, kTraceCombine, kTraceStep1);

  const int cs = p.plan.cmp_splits, ss = p.plan.slc_splits;
  // Branch 0: compressed ([cs][R] rows), 1: selected, 2: window ([ss][2][R] rows).
  // (a function, not an array: recomputed where used rather than held in registers)
  auto branch = [&](int i) {
    if (i == 0)
      return BranchSplits{ws.cmp_o + (bh * cs * R + r) * DV, index_t(R) * DV, ws.cmp_ml + (bh * cs * R + r) * 2,
                          index_t(R) * 2, cs};
    const index_t row = (bh * ss * 2 + i - 1) * R + r;
    return BranchSplits{ws.sp_o + row * DV, index_t(2) * R * DV, ws.sp_ml + row * 2, index_t(2) * R * 2, ss};
  };
  using Batch = SplitBatch<DV, kPerWarp>;
  // Merges branch i's splits of the row, its first batch loaded, into red[warp][i]: the warp's
  // (m, l, O).
  auto merge_branch = [&](int i, const Batch& first) {
    float m = -INFINITY, l = 0.f, acc[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[c] = 0.f;
    first.merge(m, l, acc);
    const BranchSplits br = branch(i);
    for (int k0 = sub + Batch::kBatch * wpr; k0 < br.n; k0 += Batch::kBatch * wpr) {
      Batch more;
      more.load(br.o, br.o_step, br.ml, br.ml_step, br.n, k0, wpr);
      more.merge(m, l, acc);
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) red[warp][i][lane + 32 * c] = acc[c];
    if (lane == 0) {
      red[warp][i][DV] = m;
      red[warp][i][DV + 1] = l;
    }
  };
  auto load_first = [&](Batch& batch, int i) {
    const BranchSplits br = branch(i);
    batch.load(br.o, br.o_step, br.ml, br.ml_step, br.n, sub, wpr);
  };
  if (real) {  // the first batches of both branches in flight at once, then further batches
    Batch cmp, win;
    load_first(cmp, 0);
    load_first(win, 2);
    merge_branch(0, cmp);
    merge_branch(2, win);
  }
  wait(true);
  trace_event(p.plan, kTraceCombine, kTraceWaited);

  bool bad = false;
  if (real) {
    if (sub == 0) bad = __ldcg(ws.bad + (index_t(b) * S + s) * H + h) != 0;
    Batch slc;
    load_first(slc, 1);
    merge_branch(1, slc);
  }
  __syncthreads();
  trace_event(p.plan, kTraceCombine, kTraceMid);
  if (!real || sub != 0) return;

  const int pos = L - S + s;
  // Does the row see a key whatever the scores (then a zero sum means overflow: NaN)? The
  // compressed branch once its first window is complete, the window always, the selected
  // branch not knowably (fwd.cuh's row_sees_key).
  const bool sees_cmp = num_cmp_tokens(pos + 1, p.block_size, p.block_stride) > 0;
  float out[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) out[c] = 0.f;
  // The row's warps' sums in warp order, unrolled so that their shared-memory loads are in
  // flight together rather than one after another.
#pragma unroll
  for (int br = 0; br < 3; ++br) {
    float mx = -INFINITY;
#pragma unroll
    for (int k = 0; k < kCombineWarps; ++k)
      if (k < wpr) mx = fmaxf(mx, red[warp + k][br][DV]);
    float lsum = 0.f, o[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) o[c] = 0.f;
#pragma unroll
    for (int k = 0; k < kCombineWarps; ++k) {
      if (k >= wpr) break;
      const float f = split_factor(red[warp + k][br][DV], mx);
      lsum += f * red[warp + k][br][DV + 1];
#pragma unroll
      for (int c = 0; c < kCols; ++c) o[c] = fmaf(f, red[warp + k][br][lane + 32 * c], o[c]);
    }
    const float scale = gate[br] * softmax_inv(lsum, br == 0 ? sees_cmp : br == 2);
#pragma unroll
    for (int c = 0; c < kCols; ++c) out[c] = fmaf(scale, o[c], out[c]);
  }
  T* dst = p.o.ptr<T>(b, s, hq);
#pragma unroll
  for (int c = 0; c < kCols; ++c) dst[lane + 32 * c] = from_float<T>(bad ? __int_as_float(0x7fffffff) : out[c]);
  trace_event(p.plan, kTraceCombine, kTraceEnd);
}

// (min. blocks 1: ptxas otherwise spilled at DV = 64)
template <typename T, int DV, int kPerWarp>
__global__ void __launch_bounds__(kCombineThreads, 1) decode_combine_kernel(const DecodeParams p, const Workspace ws,
                                                                          int wpr) {
  combine_rows<T, DV, kPerWarp>(p, ws, wpr);
  wait_prior_grid();
}

}  // namespace nsa::cuda::decode
