// Pieces shared by the kernels that merge split partials of the decoding step (select.cuh's lse,
// combine.cuh's outputs): the merge factor and the warp reductions.
#pragma once

#include <cmath>

namespace nsa::cuda::decode {

// Merge of split partials (m, l, O) (m in log2 units, l and O against m): the factor taking a
// split's sums to the common maximum mx. A split that saw no key ((-inf, 0, 0)) adds 0; one whose
// scores were all NaN (m = -inf, l NaN) keeps the merge NaN (0 x NaN).
__device__ __forceinline__ float split_factor(float m, float mx) { return m == -INFINITY ? 0.f : exp2f(m - mx); }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int d = 16; d >= 1; d /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, d));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int d = 16; d >= 1; d /= 2) x += __shfl_xor_sync(0xffffffffu, x, d);
  return x;
}

}  // namespace nsa::cuda::decode
