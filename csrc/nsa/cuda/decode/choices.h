// Launch choices of the decoding step's kernels (decode.h) that depend on the plan and the shape
// alone: host C++ without CUDA, so that tests/cpp/test_kernel_plan.cpp states them.
#pragma once

#include <cstddef>
#include <cstdint>

#include "shape.h"

namespace nsa::cuda::decode {

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
