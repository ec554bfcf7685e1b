// The selected branch's reverse index: for each (KV head, block), the queries that chose it, in
// token order, built on the device without atomics:
//   1. one entry per (token, KV head, slot) of block_indices: key = g * vblocks + virtual block
//      (the numbering of seq_tiles.cuh with tiles of select_size tokens), or the sentinel for
//      padding, for blocks the token cannot see and for repeats of an entry; value = b * T + token
//      row. With chunk_rows > 0 (the forward by blocks, slc_blocks.cuh) the key also leads with the
//      chunk of the row, (b * T + t) / chunk_rows, so that each chunk's tokens of a block form a
//      segment of their own: key = chunk * H * vblocks + g * vblocks + virtual block;
//   2. a stable radix sort by key (cub): entries of a key stay in token order.
// The dkdv kernel finds its block's segment by binary search on the sorted keys, the forward by
// the table of segment starts (slc_segment_starts_kernel).
#pragma once

#include <cub/device/device_radix_sort.cuh>

#include "../attn/bwd.cuh"

namespace nsa::cuda {

// Virtual blocks per KV head.
inline index_t reverse_index_vblocks(const SlcParams& p) {
  if (p.seqs.cu_seqlens) return num_virtual_tiles(p.seqs, p.seqs.seqlen, 1, p.select_size);
  return index_t(p.seqs.batch) * num_select_blocks(p.seqs.seqlen, p.select_size);
}

inline index_t reverse_index_entries(const SlcParams& p) {
  return index_t(p.seqs.batch) * p.seqs.seqlen * p.num_heads_k * p.num_selected;
}

// sentinel = the number of keys (chunks * H * vblocks); chunk_rows = 0: one chunk.
__global__ void slc_reverse_index_entries_kernel(const SlcParams p, index_t vblocks, index_t chunk_rows,
                                                 int32_t sentinel, int32_t* keys, int32_t* rows) {
  const index_t e = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int n = p.num_selected, H = p.num_heads_k;
  if (e >= index_t(p.seqs.batch) * p.seqs.seqlen * H * n) return;
  const int slot = int(e % n), g = int((e / n) % H);
  const index_t row = e / (index_t(n) * H);  // b * T + token row
  const index_t b = row / p.seqs.seqlen, t_row = row % p.seqs.seqlen;
  index_t t = t_row, vb0 = b * num_select_blocks(p.seqs.seqlen, p.select_size);
  if (p.seqs.cu_seqlens) {  // sequence of this row: largest s with cu[s] <= t_row and a token
    int lo = 0, hi = p.seqs.num_seqs - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (p.seqs.cu_seqlens[mid] <= t_row) lo = mid; else hi = mid - 1;
    }
    t = t_row - p.seqs.cu_seqlens[lo];
    vb0 = index_t(p.seqs.cu_seqlens[lo]) / p.select_size + lo;
  }
  const int32_t* list = p.block_indices.ptr<const int32_t>(b, t_row, g);
  const int32_t j = list[slot];
  bool valid = j >= 0 && index_t(j) * p.select_size <= t;
  for (int i = 0; valid && i < slot; ++i) valid = list[i] != j;  // a repeat counts once, as in the forward
  const index_t chunk = chunk_rows > 0 ? row / chunk_rows : 0;
  keys[e] = valid ? int32_t((chunk * H + g) * vblocks + vb0 + j) : sentinel;
  rows[e] = int32_t(row);
}

// starts[k] = the first sorted entry with key >= k, for k in [0, num_keys]: segment k is
// [starts[k], starts[k + 1]). One thread per entry e in [0, entries] fills the keys in
// (keys[e - 1], keys[e]] (the sentinel, num_keys, ends the table).
__global__ void slc_segment_starts_kernel(const int32_t* keys, index_t entries, int32_t num_keys,
                                          int32_t* starts) {
  const index_t e = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e > entries) return;
  const int32_t prev = e > 0 ? keys[e - 1] : -1;
  const int32_t cur = e < entries ? keys[e] : num_keys;
  for (int32_t k = prev + 1; k <= cur && k <= num_keys; ++k) starts[k] = int32_t(e);
}

}  // namespace nsa::cuda
