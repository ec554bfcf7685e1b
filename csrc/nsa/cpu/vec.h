// Small vector helpers of the CPU kernels, written so that GCC vectorizes them under strict IEEE
// arithmetic: a sum is split over kLanes independent partial sums (a single running sum is a
// dependency chain the compiler may not reorder). Inline so that NSA_CPU_MULTIVERSION clones
// compile them with the clone's instruction set.
#pragma once

#include <cstdint>

#include "numeric.h"

namespace nsa::cpu {

constexpr int kLanes = 16;

// sum_i a[i] * b[i]
template <typename A>
inline A dot(const A* __restrict a, const A* __restrict b, int64_t n) {
  A part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
  A tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  return part[0] + tail;
}

// y[i] += alpha * x[i]
template <typename A>
inline void axpy(A alpha, const A* __restrict x, A* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// y[i] *= alpha
template <typename A>
inline void scale_inplace(A alpha, A* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= alpha;
}

// dst[i] = float(src[i]) for a row of any element type.
template <typename A, typename T>
inline void load_row(const T* __restrict src, A* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = load<A>(src[i]);
}

// dst[i] = T(src[i])
template <typename T, typename A>
inline void store_row(const A* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store(dst[i], src[i]);
}

}  // namespace nsa::cpu
