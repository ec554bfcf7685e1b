// Warp-level products on 16 rows, the building blocks of the attention kernels. Operands come
// from swizzled shared-memory tiles (tiles.cuh) or, for the left operand, from C fragments of a
// previous product (P or dS), the accumulators stay in registers as C fragments:
// acc[j] holds columns 8j .. 8j + 7 of the 16 x N result.
#pragma once

#include "tiles.cuh"

namespace nsa::cuda {

// One k-step of A B^T: acc (16 x N) += a B_k^T, a the A fragment of A's columns k0 .. k0 + 15 and
// B_k columns k0 .. k0 + 15 of b_tile [N][K].
template <int K, int N, typename T>
__device__ __forceinline__ void nt_kstep(float (&acc)[N / 8][4], const uint32_t (&a)[4], const T* b_tile, int k0) {
#pragma unroll
  for (int np = 0; np < N / 16; ++np) {
    uint32_t b[4];
    load_b_nk<K>(b, b_tile, np * 16, k0);
    mma<T>(acc[2 * np], a, b[0], b[1]);
    mma<T>(acc[2 * np + 1], a, b[2], b[3]);
  }
}

// acc (16 x N) += A B^T: A = rows a_row0 .. a_row0 + 15 of a_tile [*][K], B = rows 0 .. N-1 of
// b_tile [N][K] (e.g. S = Q K^T, dP = dO V^T).
template <int K, int N, typename T>
__device__ __forceinline__ void warp_gemm_nt(float (&acc)[N / 8][4], const T* a_tile, int a_row0,
                                             const T* b_tile) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    load_a<K>(a, a_tile, a_row0, kk * 16);
    nt_kstep<K, N, T>(acc, a, b_tile, kk * 16);
  }
}

// The same with A already in registers as A fragments (a[kk] for columns 16kk .. 16kk + 15).
template <int K, int N, typename T>
__device__ __forceinline__ void warp_gemm_nt(float (&acc)[N / 8][4], const uint32_t (&a)[K / 16][4],
                                             const T* b_tile) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) nt_kstep<K, N, T>(acc, a[kk], b_tile, kk * 16);
}

// One k-step of P B: acc (16 x N) += a B_k, a the A fragment of P's columns k0 .. k0 + 15 and
// B_k rows k0 .. k0 + 15 of b_tile [K][N].
template <int N, typename T>
__device__ __forceinline__ void pn_kstep(float (&acc)[N / 8][4], const uint32_t (&a)[4], const T* b_tile, int k0) {
#pragma unroll
  for (int np = 0; np < N / 16; ++np) {
    uint32_t b[4];
    load_b_kn<N>(b, b_tile, k0, np * 16);
    mma<T>(acc[2 * np], a, b[0], b[1]);
    mma<T>(acc[2 * np + 1], a, b[2], b[3]);
  }
}

// acc (16 x N) += P B: P (16 x K) given as A fragments pa[kk] (columns 16kk .. 16kk + 15, see
// c_to_a), B = b_tile [K][N].
template <int K, int N, typename T>
__device__ __forceinline__ void warp_gemm_pn(float (&acc)[N / 8][4], const uint32_t (&pa)[K / 16][4],
                                             const T* b_tile) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) pn_kstep<N, T>(acc, pa[kk], b_tile, kk * 16);
}

// The same with P given as C fragments p[K / 8], rounded to T here one k-step at a time (e.g. O +=
// P V, dQ += dS K, dV += P^T dO).
template <int K, int N, typename T>
__device__ __forceinline__ void warp_gemm_pn(float (&acc)[N / 8][4], const float (&p)[K / 8][4],
                                             const T* b_tile) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    c_to_a<T>(a, p[2 * kk], p[2 * kk + 1]);
    pn_kstep<N, T>(acc, a, b_tile, kk * 16);
  }
}

// Two m-tiles per warp (32 rows): acc[m] (16 x N) += A_m B^T, A_m = rows a_row0 + 16m .. + 15 of
// a_tile [*][K], B = rows 0 .. N-1 of b_tile [N][K]. Each B fragment read from shared memory
// feeds both m-tiles, half the reads per product of warp_gemm_nt.
template <int K, int N, typename T>
__device__ __forceinline__ void warp_gemm_nt_x2(float (&acc)[2][N / 8][4], const T* a_tile, int a_row0,
                                                const T* b_tile) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[2][4];
    load_a<K>(a[0], a_tile, a_row0, kk * 16);
    load_a<K>(a[1], a_tile, a_row0 + 16, kk * 16);
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      uint32_t b[4];
      load_b_nk<K>(b, b_tile, np * 16, kk * 16);
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        mma<T>(acc[m][2 * np], a[m], b[0], b[1]);
        mma<T>(acc[m][2 * np + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// Two m-tiles per warp: acc[m] (16 x N) += P_m B, P_m (16 x K) given as A fragments pa[m][kk]
// (columns 16kk .. 16kk + 15, see c_to_a), B = b_tile [K][N]; each B fragment is read once.
template <int K, int N, typename T>
__device__ __forceinline__ void warp_gemm_pn_x2(float (&acc)[2][N / 8][4], const uint32_t (&pa)[2][K / 16][4],
                                                const T* b_tile) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      uint32_t b[4];
      load_b_kn<N>(b, b_tile, kk * 16, np * 16);
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        mma<T>(acc[m][2 * np], pa[m][kk], b[0], b[1]);
        mma<T>(acc[m][2 * np + 1], pa[m][kk], b[2], b[3]);
      }
    }
  }
}

}  // namespace nsa::cuda
