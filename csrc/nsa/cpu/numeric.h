// Element types of the CPU kernels and their conversions to the accumulation type.
// bf16 and fp16 are stored as raw 16-bit patterns (same layout as torch's BFloat16 / Half);
// conversions round to nearest even, NaN and infinities are preserved.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "../params.h"

// Hot loops are compiled twice, for x86-64-v3 (AVX2 + FMA) and for the baseline, and the loader
// picks one (GNU ifunc): one binary runs on any x86-64 and uses AVX2 where present. `flatten`
// inlines every helper into each clone so that the helpers get the clone's instruction set too.
// Put it on the non-template function that runs a chunk of work for one element type.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define NSA_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
#else
#define NSA_CPU_MULTIVERSION
#endif

namespace nsa::cpu {

struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float to_float(bf16 x) { return bits_float(uint32_t(x.bits) << 16); }

inline float to_float(fp16 x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu;
  const uint32_t mant = x.bits & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float mag = float(mant) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline bf16 to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

inline fp16 to_fp16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return fp16{uint16_t(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u))};
  if (a >= 0x477ff000u) return fp16{uint16_t(sign | 0x7c00u)};  // rounds past 65504: inf
  if (a < 0x38800000u) {
    // Below 2^-14 the result is subnormal with unit 2^-24. Adding 0.5 (whose ulp is 2^-24)
    // lets the FPU round to nearest even; the low mantissa bits are then the fp16 bits.
    const float t = bits_float(a) + 0.5f;
    return fp16{uint16_t(sign | (float_bits(t) - 0x3f000000u))};
  }
  // Normal: rebias the exponent by -112 and round the 13 dropped bits to nearest even.
  a += 0xc8000fffu + ((a >> 13) & 1u);
  return fp16{uint16_t(sign | (a >> 13))};
}

// Accumulation type of an element type: double for double, float otherwise.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

// load<A>(x): element -> accumulation type; store(x, a): accumulation type -> element.
template <typename A>
inline A load(float x) { return A(x); }
template <typename A>
inline A load(double x) { return A(x); }
template <typename A>
inline A load(bf16 x) { return A(to_float(x)); }
template <typename A>
inline A load(fp16 x) { return A(to_float(x)); }

inline void store(float& dst, double a) { dst = float(a); }
inline void store(double& dst, double a) { dst = a; }
inline void store(bf16& dst, double a) { dst = to_bf16(float(a)); }
inline void store(fp16& dst, double a) { dst = to_fp16(float(a)); }

// dst[i] = A(src[i]) for a row of any element type.
template <typename A, typename T>
inline void load_row(const T* __restrict src, A* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = load<A>(src[i]);
}

// dst[i] = T(src[i]), rounding to nearest even.
template <typename T, typename A>
inline void store_row(const A* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store(dst[i], src[i]);
}

// Output of a finished softmax row from its online state: accumulator acc[0 .. Dv), running
// max m and sum l of exp(s - m). Three cases (docs/design.md section 4, "Non-finite values"):
// - l > 0: o = acc / l, lse = m + log l;
// - l == 0: the row saw no key: o = 0 and lse = -inf, and no NaN;
// - l NaN: a score was NaN or +-inf (a non-finite input, or q.k overflowing the accumulation
//   type): o and lse are NaN, so that the input's NaN never vanishes into a finite output.
// Checking l once per row here keeps the per-element loops free of finiteness tests.
template <typename T, typename A>
inline void store_fwd_row(const A* acc, A m, A l, int Dv, T* o, A* lse) {
  if (l > A(0)) {
    const A inv = A(1) / l;
    for (int c = 0; c < Dv; ++c) store(o[c], acc[c] * inv);
    *lse = m + std::log(l);
  } else if (l == A(0)) {
    for (int c = 0; c < Dv; ++c) store(o[c], A(0));
    *lse = -std::numeric_limits<A>::infinity();
  } else {
    for (int c = 0; c < Dv; ++c) store(o[c], std::numeric_limits<A>::quiet_NaN());
    *lse = std::numeric_limits<A>::quiet_NaN();
  }
}

// Calls f(T{}) with T the element type of `dtype`; throws on any other value.
template <typename F>
decltype(auto) dispatch_dtype(Dtype dtype, const char* op, F&& f) {
  switch (dtype) {
    case Dtype::kFloat32: return f(float{});
    case Dtype::kFloat64: return f(double{});
    case Dtype::kBFloat16: return f(bf16{});
    case Dtype::kFloat16: return f(fp16{});
  }
  throw std::invalid_argument(std::string(op) + ": unsupported dtype code " +
                              std::to_string(int(dtype)));
}

}  // namespace nsa::cpu

// Defines chunk(const In<A>& in, index_t begin, index_t end, T) for every element type T, with
// A = acc_t<T>, each running items<T>(in, begin, end): NSA_CPU_MULTIVERSION needs a
// non-template function per element type.
#define NSA_CPU_CHUNKS(chunk, items, In)                                          \
  NSA_CPU_MULTIVERSION void chunk(const In<float>& in, index_t begin, index_t end,     \
                                  float) {                                              \
    items<float>(in, begin, end);                                                       \
  }                                                                                     \
  NSA_CPU_MULTIVERSION void chunk(const In<double>& in, index_t begin, index_t end,    \
                                  double) {                                             \
    items<double>(in, begin, end);                                                      \
  }                                                                                     \
  NSA_CPU_MULTIVERSION void chunk(const In<float>& in, index_t begin, index_t end,     \
                                  bf16) {                                               \
    items<bf16>(in, begin, end);                                                        \
  }                                                                                     \
  NSA_CPU_MULTIVERSION void chunk(const In<float>& in, index_t begin, index_t end,     \
                                  fp16) {                                               \
    items<fp16>(in, begin, end);                                                        \
  }
