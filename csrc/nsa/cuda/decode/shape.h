// Shapes of the CUDA decoding step that its plan (nsa/plan.cpp, host C++) and its kernels share:
// key tiles, the query rows of a thread block, the key tiles of the selected and window branches
// and the block-score slots of a compressed key tile. Plain C++ (no CUDA), host and device.
#pragma once

#include "../../params.h"
#include "../../plan.h"

namespace nsa::cuda::decode {

// Keys (raw or compressed) per key tile.
inline constexpr int kTileKeys = kPlanKeyTile;
// Query rows per thread block at most: 4 m-tiles of 16. A (sequence, KV head) with more rows
// (S * G > 64) runs ceil(S * G / 64) row blocks.
inline constexpr int kBlockRows = 64;
// num_selected at most (the top-n lists keep 4 keys per lane).
inline constexpr int kMaxSelected = 128;

NSA_HOST_DEVICE int group_size(const DecodeParams& p) { return p.num_heads_k > 0 ? p.num_heads / p.num_heads_k : 0; }

// Query rows of one (sequence, KV head): row r is query r / G, head r % G of the group.
NSA_HOST_DEVICE int group_rows(const DecodeParams& p) { return p.num_queries * group_size(p); }

NSA_HOST_DEVICE int row_blocks(const DecodeParams& p) { return (group_rows(p) + kBlockRows - 1) / kBlockRows; }

// 16-row m-tiles of the scan's, window's and selected branch's thread blocks for `rows` query rows
// per (sequence, KV head): one for up to 16 rows, else four (a 64-row block).
NSA_HOST_DEVICE int m_tiles(int rows) { return rows <= 16 ? 1 : 4; }

// Compressed key tiles of a cache of `cmp_rows` compressed tokens.
NSA_HOST_DEVICE index_t cmp_tiles(index_t cmp_rows) { return (cmp_rows + kTileKeys - 1) / kTileKeys; }

// Block-score slots of a compressed key tile: the selection blocks its rows touch. Rows
// [i0, i0 + 64) cover the cells [i0, i0 + 62 + cpr] (cpr = l / d cells per row), blocks
// floor(i0 / cpb) .. floor((i0 + 62 + cpr) / cpb) (cpb = l' / d cells per block).
NSA_HOST_DEVICE int tile_slots(int cpr, int cpb) { return (kTileKeys - 2 + cpr) / cpb + 2; }

// Key tiles per selection block (a block longer than a tile spans several, the last partial).
NSA_HOST_DEVICE int tiles_per_block(int select_size) { return (select_size + kTileKeys - 1) / kTileKeys; }

// Queries with rows in one row block: all S when one block holds every row, else at most those
// that 64 consecutive rows touch (64 at most: a query has at least one row).
NSA_HOST_DEVICE int block_queries(const DecodeParams& p) {
  const int G = group_size(p), S = p.num_queries;
  if (row_blocks(p) <= 1 || G <= 0) return S;
  const int touched = (kBlockRows - 1) / G + 2, most = touched < kBlockRows ? touched : kBlockRows;
  return S < most ? S : most;
}

// Key tiles of the window branch of a row block: the selection blocks that the keys
// [pos_first - w + 1, pos_last] (w + nq - 1 keys, at most the capacity) touch, each cut into
// tiles.
NSA_HOST_DEVICE index_t window_tiles_max(const DecodeParams& p) {
  const index_t span = index_t(p.window_size) + block_queries(p) - 1;
  const index_t keys = span < p.capacity ? span : p.capacity;
  return index_t(tiles_per_block(p.select_size)) * ((keys - 1) / p.select_size + 2);
}

// Key tiles of the selected branch of a row block: the union of its queries' n blocks.
NSA_HOST_DEVICE index_t selected_tiles_max(const DecodeParams& p) {
  return index_t(tiles_per_block(p.select_size)) * block_queries(p) * p.num_selected;
}

}  // namespace nsa::cuda::decode
