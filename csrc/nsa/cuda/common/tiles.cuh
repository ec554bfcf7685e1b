// Shared-memory tiles of 2-byte elements and the fragment loads the attention kernels use; the
// layout of the mma.sync kernels' tiles (swz) is in swizzle.h.
#pragma once

#include "../../params.h"
#include "mma.cuh"
#include "swizzle.h"
#include "wgmma_layout.h"

namespace nsa::cuda {

// Where the loaders below put element (row, col) of an R x COLS tile.
//   kRowSwizzled: swz (swizzle.h; ldmatrix reads it, every mma.sync kernel).
//   kWgmma: [COLS / 64][R][64], each 128-byte row's chunk c at c ^ (row % 8): the 128-byte
//   swizzle atoms (8 rows x 128 bytes) that wgmma's shared-memory descriptors address
//   (wgmma_layout.h); such tiles must start at a multiple of 1024 bytes.
enum class Layout { kRowSwizzled, kWgmma };

template <Layout L, int R, int COLS>
__device__ __forceinline__ int tile_offset(int row, int col) {
  if constexpr (L == Layout::kWgmma) {
    static_assert(COLS % 64 == 0, "tile rows must be a multiple of 64 elements");
    return wgmma_tile_offset(R, row, col);
  } else {
    return swz<COLS>(row, col);
  }
}

// Copies R rows of COLS elements into a tile (layout L) with cp.async (NT threads; when they do
// not divide the R * COLS / 8 chunks evenly, the last pass leaves some idle), rows that walk a
// [token][head] grid in groups of G heads: row r is head hh = (h0 + r) % G of token index
// i = (h0 + r) / G, at src + token_of(i) * token_stride + hh * head_stride (the (token, head) query
// rows of a KV head). Rows >= valid are zero-filled (rows past the data must be zeros: a NaN there
// would survive a zero probability). One division and one 64-bit address per thread, the rows
// after it stepped incrementally: a per-chunk row callback cost ~40 instructions per 16-byte copy.
template <int R, int COLS, int NT, Layout L = Layout::kRowSwizzled, typename T, typename TokenOf>
__device__ __forceinline__ void load_pairs_async(T* tile, const T* src, index_t token_stride,
                                                 index_t head_stride, int h0, int G, int valid,
                                                 TokenOf token_of) {
  constexpr int kChunks = COLS / 8;
  const int tid = threadIdx.x % NT;
  if constexpr (NT % kChunks == 0) {
    constexpr int kRowStep = NT / kChunks;
    static_assert(R % kRowStep == 0, "every thread copies the same number of rows");
    const int c = tid % kChunks;
    int r = tid / kChunks;
    int i = (h0 + r) / G, hh = (h0 + r) - i * G;
    const int di = kRowStep / G, dh = kRowStep - di * G;
#pragma unroll
    for (int k = 0; k < R / kRowStep; ++k) {
      const bool ok = r < valid;
      const T* from = ok ? src + token_of(i) * token_stride + hh * head_stride + c * 8 : tile;
      cp_async_16(tile + tile_offset<L, R, COLS>(r, c * 8), from, ok);
      r += kRowStep;
      i += di;
      hh += dh;
      if (hh >= G) hh -= G, ++i;
    }
  } else {
#pragma unroll
    for (int k = 0; k < (R * kChunks + NT - 1) / NT; ++k) {
      const int e = tid + k * NT;
      if ((R * kChunks) % NT != 0 && e >= R * kChunks) break;
      const int r = e / kChunks, c = e % kChunks;
      const int i = (h0 + r) / G, hh = (h0 + r) - i * G;
      const bool ok = r < valid;
      const T* from = ok ? src + token_of(i) * token_stride + hh * head_stride + c * 8 : tile;
      cp_async_16(tile + tile_offset<L, R, COLS>(r, c * 8), from, ok);
    }
  }
}

// Rows evenly spaced in memory (row r at src + r * stride, e.g. consecutive keys of one head),
// the first `valid` of them real. The grid above with G = 1, written out: the thread's pointer
// steps down the rows (the general form costs ~25% more instructions in the per-warp kernels).
template <int R, int COLS, int NT, Layout L = Layout::kRowSwizzled, typename T>
__device__ __forceinline__ void load_strided_async(T* tile, const T* src, index_t stride, int valid) {
  constexpr int kChunks = COLS / 8;
  static_assert((R * kChunks) % NT == 0, "every thread copies the same number of chunks");
  const int tid = threadIdx.x % NT;
  if constexpr (NT % kChunks == 0) {
    constexpr int kRowStep = NT / kChunks;
    const int c = tid % kChunks;
    int r = tid / kChunks;
    const T* from = src + r * stride + c * 8;
    const index_t step = kRowStep * stride;
#pragma unroll
    for (int k = 0; k < R / kRowStep; ++k, r += kRowStep, from += step)
      cp_async_16(tile + tile_offset<L, R, COLS>(r, c * 8), r < valid ? from : tile, r < valid);
  } else {
#pragma unroll
    for (int k = 0; k < R * kChunks / NT; ++k) {
      const int i = tid + k * NT;
      const int r = i / kChunks, c = i % kChunks;
      cp_async_16(tile + tile_offset<L, R, COLS>(r, c * 8), r < valid ? src + r * stride + c * 8 : tile, r < valid);
    }
  }
}

// Rows evenly spaced in memory streamed tile after tile (the key tiles of one head): R rows of COLS
// elements, NT threads, layout L. Thread tid copies chunk tid % (COLS / 8) of rows r0, r0 +
// kRowStep, ...: its source is recomputed per tile from the tile's first row (one 64-bit
// multiply-add), full tiles copy without per-row predicates, and only a partial tile takes
// load_strided_async's zero-filling path (per tile the generic copy cost the warpgroup forward
// ~190 of its ~660 instructions per warp, ncu at 64k).
template <typename T, int R, int COLS, int NT, Layout L>
struct StridedTileStream {
  static constexpr int kChunks = COLS / 8, kRowStep = NT / kChunks;
  static_assert(NT % kChunks == 0 && R % kRowStep == 0, "whole rows per pass");
  const T* base;   // row 0
  index_t stride;  // elements between rows
  int r0, c;

  __device__ StridedTileStream(const T* base_, index_t stride_)
      : base(base_), stride(stride_), r0(int(threadIdx.x % NT) / kChunks), c(int(threadIdx.x % NT) % kChunks) {}

  // Rows [first, first + valid) into tile (rows past valid zero-filled; valid >= R: a full tile).
  __device__ __forceinline__ void copy(T* tile, index_t first, int valid) const {
    if (valid >= R) {
      const T* from = base + (first + r0) * stride + c * 8;
      const index_t step = kRowStep * stride;
#pragma unroll
      for (int k = 0; k < R / kRowStep; ++k, from += step)
        cp_async_16(tile + tile_offset<L, R, COLS>(r0 + k * kRowStep, c * 8), from, true);
    } else {
      load_strided_async<R, COLS, NT, L>(tile, base + first * stride, stride, valid);
    }
  }
};

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
