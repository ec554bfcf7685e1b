// 256-bit vectors of the CPU kernels' accumulation type (GCC/Clang vector extensions), their
// unaligned loads/stores and a vectorised exp. Shared by the tile helpers (cmp_tiles.h,
// attn_tile.h).
//
// Why vector types: with plain local arrays GCC 12 keeps register-tile accumulators in memory
// (measured 2x to 20x slower); vector-typed locals stay in registers. Vectors are passed by
// reference only: by value, a 32-byte vector changes the ABI between the AVX2 and the baseline
// clones of NSA_CPU_MULTIVERSION.
#pragma once

#include <cmath>
#include <cstdint>

#include "numeric.h"

namespace nsa::cpu::simd {

template <typename A>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef float unaligned __attribute__((vector_size(32), aligned(alignof(float))));
  typedef int32_t lane_t;
  typedef lane_t mask __attribute__((vector_size(32)));
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef double unaligned __attribute__((vector_size(32), aligned(alignof(double))));
  typedef int64_t lane_t;
  typedef lane_t mask __attribute__((vector_size(32)));
};
template <typename A>
using vec = typename Simd<A>::type;
template <typename A>
constexpr int kVecLen = int(sizeof(vec<A>) / sizeof(A));

// Unaligned vector loads and stores through the vector type itself (GCC gives vector types the
// alias set of their elements). Not memcpy: GCC may split a 32-byte memcpy into two 16-byte
// stores to the stack and reload them as one vector, a store-forwarding stall per load.
template <typename A>
inline void vload(vec<A>& v, const A* p) {
  v = *reinterpret_cast<const typename Simd<A>::unaligned*>(p);
}
template <typename A>
inline void vstore(A* p, const vec<A>& v) {
  *reinterpret_cast<typename Simd<A>::unaligned*>(p) = v;
}

// In-place exp of every lane; -inf (and anything below -87) gives exactly 0, NaN stays NaN.
// Floats use a polynomial so that the loop stays vectorised (glibc's vector exp needs
// -ffast-math): exp(x) = 2^n e^r with |r| <= ln2/2 and a degree-7 Taylor polynomial (relative
// error below 1e-8 before rounding). Callers pass x <= 0 up to rounding (scores minus a max or
// an lse); the clamp at 88 only keeps 2^n a finite float.
inline void vexp(vec<float>& x) {
  using mask = Simd<float>::mask;
  const vec<float> lo = vec<float>{} - 87.0f, hi = vec<float>{} + 88.0f;
  const mask under = x < lo;
  vec<float> xc = under ? lo : x;
  xc = xc > hi ? hi : xc;
  // Adding 1.5 * 2^23 rounds to an integer (exact under IEEE arithmetic); n then sits in the
  // low mantissa bits of `t`.
  const vec<float> t = xc * 1.44269504088896341f + 12582912.0f;
  const vec<float> n = t - 12582912.0f;
  // ln2 split in two so that n * ln2_hi is exact (ln2_hi has 9 significant bits, |n| < 2^7).
  const vec<float> r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  vec<float> p = r * (1.0f / 5040) + (1.0f / 720);
  p = p * r + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n as float bits (0x4b400000: the bits of 1.5 * 2^23). A cast between vector types of
  // one size reinterprets the bits.
  const mask two_n = ((mask)t - 0x4b400000 + 127) << 23;
  const vec<float> y = p * (vec<float>)two_n;
  x = under ? vec<float>{} : y;
}
// float64 must reach 1e-9 in the tests and is not the fast path: libm.
inline void vexp(vec<double>& x) {
  for (int i = 0; i < kVecLen<double>; ++i) x[i] = std::exp(x[i]);
}

}  // namespace nsa::cpu::simd
