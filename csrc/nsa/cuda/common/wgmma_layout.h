// Shared-memory layout of the wgmma operand tiles and the descriptor fields that address them,
// as plain host + device arithmetic (wgmma.cuh builds the descriptors from these; a Catch2 test
// checks them against the canonical layouts of the PTX ISA).
//
// Layout::kWgmma (tiles.cuh): a tile of R rows x COLS (a multiple of 64) 2-byte elements is
// stored as [COLS / 64][R][64]: 64-column slabs, each row of a slab one 128-byte line whose
// 16-byte chunk c sits at chunk c ^ (row % 8). Eight lines form a 1024-byte swizzle atom, the
// unit of the hardware's 128-byte swizzle (address bits 4-6 XOR bits 7-9), so tiles start at a
// multiple of 1024 bytes.
#pragma once

#include "../../params.h"

namespace nsa::cuda {

// Element offset of (row, col) in an R-row Layout::kWgmma tile.
NSA_HOST_DEVICE int wgmma_tile_offset(int R, int row, int col) {
  return (col >> 6) * (R * 64) + row * 64 + ((((col & 63) >> 3) ^ (row & 7)) << 3) + (col & 7);
}

// What one wgmma descriptor holds besides the swizzle mode (128 bytes): where the operand starts
// (elements from the tile's start), the leading and the stride byte offsets.
struct WgmmaOperand {
  int start;
  int lbo, sbo;
};

// k-step kk (16 elements of the reduction dimension) of an R-row tile whose columns are the
// reduction dimension: K-major (e.g. Q or K for S = Q K^T). The 16 columns lie inside one
// 64-column slab, 32 bytes per step; rows advance by 1024 bytes per 8 (SBO); LBO is unused.
NSA_HOST_DEVICE WgmmaOperand kmajor_operand(int R, int kk) {
  return WgmmaOperand{(kk >> 2) * R * 64 + (kk & 3) * 16, 16, 1024};
}

// k-step kk of an R-row tile whose rows are the reduction dimension: MN-major (e.g. V [keys][Dv]
// for O += P V). The step's 16 rows start 2048 bytes apart; SBO steps 8 rows (1024 bytes), LBO
// steps 64 columns (one slab, R * 128 bytes).
NSA_HOST_DEVICE WgmmaOperand mnmajor_operand(int R, int kk) {
  return WgmmaOperand{kk * 16 * 64, R * 128, 1024};
}

}  // namespace nsa::cuda
