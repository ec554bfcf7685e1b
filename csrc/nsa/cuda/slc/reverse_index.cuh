// The selected branch's reverse index: for each (KV head, block), the queries that chose it, in
// token order, built on the device without atomics:
//   1. one entry per (token, KV head, slot) of block_indices: key = g * vblocks + virtual block
//      (the numbering of seq_tiles.cuh with tiles of select_size tokens), or the sentinel
//      H * vblocks for padding, for blocks the token cannot see and for repeats of an entry;
//      value = b * T + token row;
//   2. a stable radix sort by key (cub): entries of a key stay in token order.
// The dkdv kernel finds its block's segment by binary search on the sorted keys.
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

__global__ void slc_reverse_index_entries_kernel(const SlcParams p, index_t vblocks, int32_t* keys,
                                                 int32_t* rows) {
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
  keys[e] = int32_t(valid ? g * vblocks + vb0 + j : index_t(H) * vblocks);
  rows[e] = int32_t(row);
}

}  // namespace nsa::cuda
