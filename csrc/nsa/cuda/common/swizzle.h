// Shared-memory layout of the tiles the mma.sync kernels read with ldmatrix (tiles.cuh), as plain
// host + device arithmetic (a Catch2 test checks that every ldmatrix read is free of bank
// conflicts for each tile width the kernels use).
//
// A tile [R][COLS] is stored row-major with its 16-byte chunks swizzled: chunk c of row r lives at
// chunk c ^ (r % 8). ldmatrix reads 8 rows (r0 .. r0 + 7, r0 a multiple of 8) at one logical chunk;
// the swizzle spreads them over the 8 bank groups (16-byte units) of a 128-byte line. COLS = 64 m
// + 32 (D = 96): a row is 8 m + 4 chunks, so row r starts at bank group 4 (r % 2); its first 8 m
// chunks keep c ^ (r % 8) (r % 8 ^ 4 (r % 2) still takes each group once over 8 rows), its last 4
// lie at 8 m + ((c - 8 m) ^ (r / 2 % 4)) (that and r % 2 tell the 8 rows apart).
#pragma once

#include "../../params.h"

namespace nsa::cuda {

// Element offset of (row, col) in a [R][COLS] tile.
template <int COLS>
NSA_HOST_DEVICE int swz(int row, int col) {
  static_assert(COLS % 32 == 0, "tile rows must be a multiple of 32 elements");
  const int c = col >> 3;
  int chunk = c ^ (row & 7);
  if constexpr (COLS % 64 != 0) {
    if (c >= COLS / 8 - 4) chunk = c ^ ((row >> 1) & 3);
  }
  return row * COLS + (chunk << 3) + (col & 7);
}

}  // namespace nsa::cuda
