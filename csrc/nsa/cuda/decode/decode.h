// One decoding step on CUDA (nsa::cuda::decode_attention; DecodeParams and DecodePlan in
// params.h, the plan in nsa/plan.cpp). The step is memory-bound: it reads each sequence's
// compressed keys and values (about 3/4 of its bytes), its n selected blocks and its window once.
// Rows: the S * G query rows (s, g) of a (sequence b, KV head h), row r = s * G + g, in row blocks
// of up to 64 (R = S * G, ceil(R / 64) blocks). Six kernels, each after the first launched with
// programmatic dependent launch (it starts while the previous one runs and waits for its results
// where it needs them); launch shapes depend on the plan and the capacity, never on the lengths.
// Every block of a dependent kernel waits for the previous grid before it exits, so that a
// kernel's completion implies that of all before it (D reads what every kernel wrote). B and C
// wait for their inputs either so (plan.dep_wait = grid) or on counters per (sequence, KV head)
// (head; counters.cuh): then B scores a head as soon as its scan blocks are done, while other
// heads' scans and the window run, C starts a head once its queries are selected, and D merges
// a row's compressed and window splits once its head's scan and window blocks are done, its
// selected splits once its head's selection and selected blocks are.
//
//   Z. decode_reset_kernel (decode.cu), launched plainly: zeroes the step's counters. The first
//      kernel after it (A, or W launched before A) lets the next kernel start only once Z has
//      completed (Workspace::after_reset), so every counter waiter starts after the zeroing.
//   W. decode_window_kernel (sparse.cuh), grid (slc_splits, H * row blocks, B), 128 threads: the
//      window branch (keys [pos - w + 1, pos] of each query, in tiles cut at selection-block
//      edges), which needs the length alone, so it runs beside A, launched just after it (it
//      fills the SMs A leaves), just before, or just after B (plan.window_order; then it counts
//      itself done before its wait for B); its tiles spread evenly over the splits, raw keys
//      through page_of / row_of; partial O, m, l per split.
//   A. decode_cmp_kernel (cmp_scan.cuh), grid (cmp_splits, H * row blocks, B), 128 threads:
//      flash-decoding over the compressed tokens. The sequence's ceil(Nc(len) / 64) key tiles
//      are spread evenly over the splits; a thread block streams its tiles (cp.async, 2-3
//      stages) against its rows (tile_attention.cuh), and writes per tile each row's running
//      maximum and its block-score slots (the tile's probabilities summed into the selection
//      blocks they overlap, with the overlap weights), then the split's partial O, m and l.
//      Each block counts itself done in scan_done once past its wait (on Z, or on W before it).
//      With plan.scan_order = keys_first it streams its key tiles first (their probabilities
//      kept in shared memory) and counts itself in key_done once it has written the selection's
//      inputs (tile maxima and slots, the split's m and l), then streams its value tiles.
//   B. decode_select_kernel (select.cuh), grid (sel_splits * S, H, B), 256 threads (waiting on
//      key_done after a scan with its keys first, else on scan_done): checks the
//      sequence (length in [S, capacity], pages in the pool), merges the splits' (m, l) into each
//      row's lse, scores its share of the query's candidate blocks (per tile, the group's rows'
//      slots scaled by 2^(m_t - lse); per block, its tiles) and keeps their top n as the training
//      kernels do (forced initial and local blocks, ties to the smaller block). The last split of
//      a query to finish merges the splits' lists, writes block_indices [B, S, H, n] and the
//      sequence's validity, and counts the query in sel_done.
//   C. decode_sparse_kernel (sparse.cuh), grid (slc_splits, H * row blocks, B), 128 threads:
//      the selected branch over the union of the row block's chosen blocks (each row sees its
//      own query's blocks), as W's tiles; partial O, m, l per split.
//   D. decode_combine_kernel (combine.cuh), 256 threads, up to 8 rows per block: merges each
//      row's splits of the three branches and writes o = g_cmp o_cmp + g_slc o_slc + g_swa o_swa
//      in q's dtype (NaN for an invalid sequence).
//
// Workspace (fp32 unless said; m in log2 units, sums l against m; one buffer after another,
// each 256-byte aligned; T = ceil(cmp_capacity / 64) tiles, NS = tile_slots(l / d, l' / d)):
//   cmp_o   [B, H, cmp_splits, R, Dv]      A's unnormalised partial O
//   cmp_ml  [B, H, cmp_splits, R, 2]       A's (m, l); (-inf, 0) for a split without tiles
//   tile_m  [B, H, T, R]                   A: row maximum after tile t
//   tile_u  [B, H, T, NS, R]               A: slot k of tile t is block floor(64 t / cpb) + k
//   sel_keys  [B, S, H, sel_splits, n] u64 B: each split's n best keys (topk/select.h), 0-padded
//   counters: zeroed by Z, uint32
//     sel_count [B, S, H]                  B: splits done (+ 2^16 for one that saw a bad page)
//     scan_done [B, H]                     A: blocks done (cmp_splits * row blocks in all)
//     sel_done  [B, H]                     B: queries whose block_indices are written (S in all)
//     slc_done  [B, H]                     C: blocks done (slc_splits * row blocks in all)
//     win_done  [B, H]                     W: blocks done (slc_splits * row blocks in all)
//     key_done  [B, H]                     A with its keys first: blocks whose key tiles are done
//   sp_o    [B, H, slc_splits, 2, R, Dv]   partial O: branch 0 selected (C), 1 window (W)
//   sp_ml   [B, H, slc_splits, 2, R, 2]    their (m, l)
//   bad     [B, S, H] int32                B: 1 where the sequence is invalid
// Only tiles below ceil(Nc(len) / 64) are written and read. Nothing is expected of the
// workspace's content on entry.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "shape.h"

namespace nsa::cuda::decode {

inline constexpr const char* kOp = "nsa.decode_attention";

// The workspace's buffers (decode.h's comment) and the shapes the kernels index them with.
struct Workspace {
  float* cmp_o = nullptr;
  float* cmp_ml = nullptr;
  float* tile_m = nullptr;
  float* tile_u = nullptr;
  uint64_t* sel_keys = nullptr;
  unsigned* counters = nullptr;   // sel_count, scan_done, sel_done, slc_done, win_done, key_done
  unsigned* sel_count = nullptr;
  unsigned* scan_done = nullptr;
  unsigned* sel_done = nullptr;
  unsigned* slc_done = nullptr;
  unsigned* win_done = nullptr;
  unsigned* key_done = nullptr;
  int num_counters = 0;
  float* sp_o = nullptr;
  float* sp_ml = nullptr;
  int32_t* bad = nullptr;
  int rows = 0;        // R = S * G
  int row_blocks = 0;  // ceil(R / 64)
  int tiles = 0;       // T: compressed key tiles of a full cache
  int split_tiles = 0; // key tiles of a scan split at most: ceil(T / cmp_splits)
  int slots = 0;       // NS: block-score slots per tile
  int cpr = 0;         // cells per compressed token: block_size / block_stride
  int cpb = 0;         // cells per selection block: select_size / block_stride
  int sel_round = 0;   // kernel B: candidate blocks scored per round (select_round)
  int sel_tiles = 0;   // kernel B: key tiles of a round at most (select_round_tiles)
  size_t bytes = 0;    // the whole workspace
  // Set on the launch of the step's first kernel after Z alone: it lets the next kernel start
  // only once Z has completed, so that no kernel reads a counter before Z zeroed it.
  bool after_reset = false;
};

// The buffers of a workspace at `base` (nullptr: the layout and size only). decode.cu.
Workspace make_workspace(const DecodeParams& p, void* base);

// The kernels' launches (W, A, C, D per dtype in decode_bf16.cu / decode_fp16.cu, Z and B in
// decode.cu).
template <typename T>
void launch_window(const DecodeParams& p, const Workspace& ws, cudaStream_t stream);
template <typename T>
void launch_cmp(const DecodeParams& p, const Workspace& ws, cudaStream_t stream);
void launch_select(const DecodeParams& p, const Workspace& ws, cudaStream_t stream);
template <typename T>
void launch_sparse(const DecodeParams& p, const Workspace& ws, cudaStream_t stream);
template <typename T>
void launch_combine(const DecodeParams& p, const Workspace& ws, cudaStream_t stream);

}  // namespace nsa::cuda::decode
