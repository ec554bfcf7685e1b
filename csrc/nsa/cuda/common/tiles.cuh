// Shared-memory tiles of 2-byte elements and the fragment loads the attention kernels use.
//
// A tile [R][COLS] is stored row-major with its 16-byte chunks swizzled: chunk c of row r lives at
// chunk c ^ (r % 8). ldmatrix reads 8 rows at one logical chunk; the swizzle spreads them over the
// 8 bank groups of a 128-byte line (COLS is a multiple of 64, so a row is a multiple of 128 bytes).
#pragma once

#include "mma.cuh"

namespace nsa::cuda {

template <int COLS>
__device__ __forceinline__ int swz(int row, int col) {
  static_assert(COLS % 64 == 0, "tile rows must be a multiple of 64 elements");
  return row * COLS + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// Copies R rows of COLS elements into a swizzled tile with cp.async. row_ptr(r) gives the global
// address of row r, or nullptr for a row to zero-fill (rows past the data must be zeros: a NaN
// there would survive a zero probability).
template <int R, int COLS, int NT, typename T, typename RowPtr>
__device__ __forceinline__ void load_tile_async(T* tile, RowPtr row_ptr) {
  constexpr int kChunks = COLS / 8;
  for (int i = threadIdx.x; i < R * kChunks; i += NT) {
    const int r = i / kChunks, c = i % kChunks;
    const T* src = row_ptr(r);
    cp_async_16(tile + swz<COLS>(r, c * 8), src ? src + c * 8 : tile, src != nullptr);
  }
}

// A fragment (16 x 16, rows row0.., cols k0..) of a row-major [rows][COLS] tile.
template <int COLS, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int k0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(a, tile + swz<COLS>(row0 + (lane & 15), k0 + (lane >> 4) * 8));
}

// B fragments of two n8 tiles (n0..n0+15) at k0..k0+15 from a tile stored [n][k] (e.g. K for
// q.k^T): b[0], b[1] for n-tile n0, b[2], b[3] for n0 + 8.
template <int COLS, typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* tile, int n0, int k0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(b, tile + swz<COLS>(n0 + (lane >> 4) * 8 + (lane & 7), k0 + ((lane >> 3) & 1) * 8));
}

// The same from a tile stored [k][n] (e.g. V for p.V), transposed on the fly.
template <int COLS, typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* tile, int k0, int n0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4_trans(b, tile + swz<COLS>(k0 + ((lane >> 3) & 1) * 8 + (lane & 7), n0 + (lane >> 4) * 8));
}

// C fragments of a 16 x 16 product slice (n-tiles 2j, 2j+1) repacked as the A fragment of the
// next product (flash attention's P.V trick: no trip through shared memory).
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

}  // namespace nsa::cuda
