// Launch choices of the decoding step's kernels (decode.h) that depend on the plan and the shape
// alone: host C++ without CUDA, so that tests/cpp/test_kernel_plan.cpp states them.
#pragma once

#include <cstddef>
#include <cstdint>

#include "shape.h"

namespace nsa::cuda::decode {

// Kernel A with its keys first (plan.scan_order = keys_first, cmp_scan.cuh): a split's key tiles
// stream through a ring of kScanRing slots; each tile's probabilities stay in shared memory as
// the products' 16-bit A fragments, with the factors that move O to the tile's maxima; then the
// split's value tiles stream through the same ring. The byte offsets of its shared memory for
// `rows` = 16 (one m-tile) or 64 (four) and splits of up to `tiles` key tiles (K, V 2 bytes):
// Q [rows][D]; the ring [kScanRing][64][max(D, DV)]; the row-maximum exchange [64] (fp32, slices
// x rows); two tiles' probabilities for the block scores [2][rows][kProbLd] (fp32); the tiles'
// factors [tiles][rows] (fp32); the tiles' fragments [tiles][rows * 64] (2 bytes each).
constexpr int kScanRing = 3;
// Row stride (floats) of a key tile's probabilities in shared memory: odd, so that the threads
// scoring 32 consecutive rows read 32 banks.
constexpr int kProbLd = kTileKeys + 1;
struct KeysFirstLayout {
  size_t ring = 0, red = 0, probs = 0, corr = 0, frags = 0, bytes = 0;
};
NSA_HOST_DEVICE KeysFirstLayout keys_first_layout(int D, int DV, int rows, int tiles) {
  KeysFirstLayout l;
  l.ring = size_t(rows) * size_t(D) * 2;
  l.red = l.ring + size_t(kScanRing) * kTileKeys * size_t(D > DV ? D : DV) * 2;
  l.probs = l.red + 64 * sizeof(float);
  l.corr = l.probs + 2 * size_t(rows) * kProbLd * sizeof(float);
  l.frags = l.corr + size_t(tiles) * size_t(rows) * sizeof(float);
  l.bytes = l.frags + size_t(tiles) * size_t(rows) * kTileKeys * 2;
  return l;
}

// Kernel B (select.cuh).
constexpr int kSelectThreads = 256;
// Keys ranked per round beside the list kept so far (the candidates of a split, or the splits'
// lists in the merge, come in rounds of this many).
constexpr int kSelectRound = 1024;
// Candidates of a round of a split whose tiles' factors and sums (below) take at most
// kSelectFactorBytes of shared memory, and those tiles: the candidates [j, j + m) have cells from
// j cpb - cpr + 1 to (j + m) cpb - 1, in at most (m cpb + cpr + 63) / 64 + 2 key tiles. Host
// and device.
constexpr int kSelectFactorBytes = 32 * 1024;
NSA_HOST_DEVICE int select_round_tiles(int round, int cpb, int cpr) {
  return int((int64_t(round) * cpb + cpr + kTileKeys - 1) / kTileKeys) + 2;
}
inline int select_round(int G, int cpb, int cpr) {
  const int64_t per_tile = (int64_t(G) + tile_slots(cpr, cpb)) * 4;
  int round = kSelectRound;
  while (round > 32 && select_round_tiles(round, cpb, cpr) * per_tile > kSelectFactorBytes) round /= 2;
  return round;
}

// Static shared memory of kernel B at most: its key lists (keys, best) and a margin for the
// top-n helpers' scratch; with select_smem_bytes below, what a block of B takes beside the scan.
constexpr size_t kSelectStaticBytes = (2 * size_t(kMaxSelected) + kSelectRound) * sizeof(uint64_t) + 2048;
// Dynamic shared memory: lse [G] (log2 units) of the query's rows, the factors f [round tiles][G]
// of a round's tiles (2^(m_t - lse), 0 where the row adds nothing), then their sums
// w [round tiles][NS] (slot k of tile t: sum over rows of f u).
inline size_t select_smem_bytes(int G, int round_tiles, int slots) {
  return (size_t(G) + size_t(round_tiles) * (size_t(G) + size_t(slots))) * sizeof(float);
}

// Kernel D (combine.cuh).
constexpr int kCombineThreads = 256;
constexpr int kCombineWarps = kCombineThreads / 32;
// Warps per row: enough that no warp merges more than kCombineSplitsPerWarp splits of a branch
// (then the kernel's first batches hold every split of the row's three branches).
constexpr int kCombineSplitsPerWarp = 4;

// The most splits any branch of a row has (the compressed branch's or the selected and window
// branches').
inline int combine_most_splits(const DecodePlan& plan) {
  return plan.cmp_splits > plan.slc_splits ? plan.cmp_splits : plan.slc_splits;
}

// Warps per row for the plan's splits.
inline int combine_warps_per_row(const DecodePlan& plan) {
  const int most = combine_most_splits(plan);
  int wpr = 1;
  while (wpr < kCombineWarps && wpr * kCombineSplitsPerWarp < most) wpr *= 2;
  return wpr;
}

// Splits a warp loads per batch: kCombineSplitsPerWarp, or 1 where no warp has more than
// one split of a branch. The batch's registers bound how many thread blocks an SM holds, which
// matters where there are many rows (large B) and few splits.
inline int combine_batch(const DecodePlan& plan) {
  return combine_most_splits(plan) <= combine_warps_per_row(plan) ? 1 : kCombineSplitsPerWarp;
}

}  // namespace nsa::cuda::decode
