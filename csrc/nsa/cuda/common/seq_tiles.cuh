// Mapping thread blocks to tiles of a batch of sequences, fixed-length or packed, without a host
// sync (the host never reads cu_seqlens).
//
// A sequence of `len` tokens holds len * mult items (mult = G for the (token, head) rows of a KV
// head, 1 for keys or blocks), cut into tiles of `tile` items. A fixed-length batch runs
// ceil(T * mult / tile) blocks along x and B along z. A packed batch gives sequence s the virtual
// tiles starting at S_s = floor(off_s * mult / tile) + s, where off_s is its first token (or
// compressed row); S_{s+1} - S_s >= ceil(len_s * mult / tile), so the ranges never overlap and
// floor(total * mult / tile) + N virtual tiles cover all of them. Virtual tiles past the end of
// their sequence do nothing.
#pragma once

#include "../../params.h"

namespace nsa::cuda {

// Number of blocks along x for `total` tokens (or compressed rows) in the batch.
inline index_t num_virtual_tiles(const Seqs& seqs, index_t total, index_t mult, index_t tile) {
  if (seqs.cu_seqlens == nullptr) return (total * mult + tile - 1) / tile;
  return total * mult / tile + seqs.num_seqs + 1;
}

struct SeqTile {
  SeqRange seq;
  index_t tile;  // index of the tile within its sequence
  int index;     // sequence number among those of its batch row (0 for a fixed-length batch)
};

// The tile of block (x, z). With `cmp` the offsets and lengths are the compressed rows'.
// Returns false for a virtual tile that belongs to no sequence.
// Host-callable too, so that the mapping is unit-tested on the CPU (tests/cpp).
NSA_HOST_DEVICE bool locate_tile(const Seqs& seqs, index_t x, int z, index_t mult, index_t tile,
                                 bool cmp, SeqTile& out) {
  if (seqs.cu_seqlens == nullptr) {
    out.seq = seqs.range(z);
    out.tile = x;
    out.index = 0;
  } else {
    const int32_t* off = cmp ? seqs.cu_seqlens_cmp : seqs.cu_seqlens;
    int lo = 0, hi = seqs.num_seqs - 1;  // largest s with S_s <= x
    if (hi < 0) return false;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (index_t(off[mid]) * mult / tile + mid <= x) lo = mid; else hi = mid - 1;
    }
    out.seq = seqs.range(lo);
    out.index = lo;
    out.tile = x - (index_t(off[lo]) * mult / tile + lo);
    if (out.tile < 0) return false;
  }
  const index_t items = (cmp ? out.seq.cmp_len : out.seq.len) * mult;
  return out.tile * tile < items;
}

}  // namespace nsa::cuda
