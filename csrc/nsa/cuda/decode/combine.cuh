// Kernel D of the decoding step (decode.h): merges each output row's split partials of the three
// branches and writes the gated sum. A row (b, s, query head) is taken by `wpr` warps (a power of
// two up to 8, enough that no warp merges more than 8 splits of a branch), each merging its
// splits' (m, l, O) online, then the row's first warp merges theirs in warp order: a fixed order,
// so the bits do not depend on timing. The kernel is a chain of memory round trips after kernel
// C ends, so each warp issues the loads of a batch of splits together before it adds any of them,
// and reads its inputs (gates, length) before it waits for C.
#pragma once

#include "../attn/fwd.cuh"  // softmax_inv
#include "decode.h"
#include "split_merge.cuh"
#include "trace.cuh"

namespace nsa::cuda::decode {

constexpr int kCombineThreads = 256;
constexpr int kCombineWarps = kCombineThreads / 32;
// Warps per row: enough that no warp merges more than kCombineSplitsPerWarp splits of a branch.
constexpr int kCombineSplitsPerWarp = 8;

// Warps per row for the plan's splits (host).
inline int combine_warps_per_row(const DecodePlan& plan) {
  const int most = plan.cmp_splits > plan.slc_splits ? plan.cmp_splits : plan.slc_splits;
  int wpr = 1;
  while (wpr < kCombineWarps && wpr * kCombineSplitsPerWarp < most) wpr *= 2;
  return wpr;
}

// One warp's share of a row's splits sub, sub + wpr, ... < n: O at o + sp * o_step ([DV] fp32),
// (m, l) at ml + sp * ml_step (written by earlier kernels: read through L2). Returns the warp's
// (m, l) and its O against m (in every lane, lane holding columns lane + 32 c). The splits come
// in batches of kBatch whose loads are all issued before the first is used; past the last split a
// batch holds (-inf, 0, 0), which adds 0.
template <int DV>
__device__ __forceinline__ void merge_splits(const float* o, index_t o_step, const float* ml, index_t ml_step, int n,
                                             int sub, int wpr, float& m_out, float& l_out, float (&acc)[DV / 32]) {
  constexpr int kCols = DV / 32, kBatch = kCols <= 4 ? kCombineSplitsPerWarp : 4;
  const int lane = threadIdx.x & 31;
  float mx = -INFINITY, lsum = 0.f;
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] = 0.f;
  for (int k0 = sub; k0 < n; k0 += kBatch * wpr) {
    float2 part[kBatch];
    float x[kBatch][kCols];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int sp = k0 + k * wpr;
      const bool in = sp < n;
      part[k] = in ? __ldcg(reinterpret_cast<const float2*>(ml + index_t(sp) * ml_step)) : make_float2(-INFINITY, 0.f);
#pragma unroll
      for (int c = 0; c < kCols; ++c) x[k][c] = in ? __ldcg(o + index_t(sp) * o_step + lane + 32 * c) : 0.f;
    }
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
  m_out = mx;
  l_out = lsum;
}

template <typename T, int DV>
__global__ void __launch_bounds__(kCombineThreads) decode_combine_kernel(const DecodeParams p, const Workspace ws,
                                                                          int wpr) {
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
  wait_prior_grid();
  trace_event(p.plan, kTraceCombine, kTraceWaited);

  bool bad = false;
  if (real) {
    if (sub == 0) bad = __ldcg(ws.bad + (index_t(b) * S + s) * H + h) != 0;
    const int cs = p.plan.cmp_splits, ss = p.plan.slc_splits;
    float m, l, acc[kCols];
    // Branch 0: compressed ([cs][R] rows), 1: selected, 2: window ([ss][2][R] rows).
#pragma unroll
    for (int br = 0; br < 3; ++br) {
      if (br == 0)
        merge_splits<DV>(ws.cmp_o + (bh * cs * R + r) * DV, index_t(R) * DV, ws.cmp_ml + (bh * cs * R + r) * 2,
                         index_t(R) * 2, cs, sub, wpr, m, l, acc);
      else
        merge_splits<DV>(ws.sp_o + ((bh * ss * 2 + br - 1) * R + r) * DV, index_t(2) * R * DV,
                         ws.sp_ml + ((bh * ss * 2 + br - 1) * R + r) * 2, index_t(2) * R * 2, ss, sub, wpr, m, l, acc);
#pragma unroll
      for (int c = 0; c < kCols; ++c) red[warp][br][lane + 32 * c] = acc[c];
      if (lane == 0) {
        red[warp][br][DV] = m;
        red[warp][br][DV + 1] = l;
      }
    }
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
#pragma unroll
  for (int br = 0; br < 3; ++br) {
    float mx = -INFINITY;
    for (int w = warp; w < warp + wpr; ++w) mx = fmaxf(mx, red[w][br][DV]);
    float lsum = 0.f, o[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) o[c] = 0.f;
    for (int w = warp; w < warp + wpr; ++w) {
      const float f = split_factor(red[w][br][DV], mx);
      lsum += f * red[w][br][DV + 1];
#pragma unroll
      for (int c = 0; c < kCols; ++c) o[c] = fmaf(f, red[w][br][lane + 32 * c], o[c]);
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

}  // namespace nsa::cuda::decode
