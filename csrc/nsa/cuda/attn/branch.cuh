// What distinguishes the three attention branches inside the shared CUDA attention kernels:
// which keys a query tile iterates over and which (query, key) pairs are visible.
//
// Query rows. A thread block of the forward and dq kernels owns kRows (token, head) rows of one
// sequence and one KV head g, enumerated token-major: row e <-> token e / G, query head
// g * G + e % G. The G heads of a token share their keys (and, in the selected branch, their
// blocks), so packing them as rows loads each key tile once for all of them, for any G.
//
// Keys. The compressed and window branches see a contiguous key range per tile; the selected
// branch iterates over the union of the blocks its tokens chose, each block carrying a bit mask
// of the tokens (of the tile) that chose it.
#pragma once

#include <cstdint>

#include "../common/seq_tiles.cuh"
#include "../common/tiles.cuh"
#include "../../plan.h"

namespace nsa::cuda {

enum class Branch { kCmp, kSlc, kSwa };

template <Branch B>
struct BranchParams;
template <>
struct BranchParams<Branch::kCmp> { using type = CmpParams; };
template <>
struct BranchParams<Branch::kSlc> { using type = SlcParams; };
template <>
struct BranchParams<Branch::kSwa> { using type = SwaParams; };

constexpr int kThreads = 128;  // 4 warps
constexpr int kRows = 64;      // query rows per tile: 16 per warp
constexpr int kKeys = 64;      // keys per key tile
static_assert(kKeys == kPlanKeyTile, "the plan's chunks of the selected branch by blocks count these tiles");

// Key tiles per selection block (a block of select_size > kKeys keys spans several).
NSA_HOST_DEVICE int tiles_per_block(int select_size) { return (select_size + kKeys - 1) / kKeys; }

// The query rows of this thread block (see above).
struct QueryRows {
  SeqRange seq;
  int g = 0, G = 1;
  int h_first = 0;  // head (within the group) of row 0, whose token is t_first
  int count = 0;    // valid rows, <= the tile's rows
  index_t t_first = 0, t_last = 0;

  // 32-bit divisions: these run per row of every load.
  __device__ index_t token(int r) const { return t_first + (h_first + r) / G; }
  __device__ int head(int r) const { return g * G + (h_first + r) % G; }
};

// Grid: x = query tiles of `tile_rows` rows (virtual when packed), y = KV head, z = batch.
__device__ __forceinline__ bool locate_query_rows(const AttnParams& p, QueryRows& rows,
                                                  int tile_rows = kRows) {
  const int G = p.num_heads / p.num_heads_k;
  SeqTile st;
  if (!locate_tile(p.seqs, blockIdx.x, blockIdx.z, G, tile_rows, false, st)) return false;
  rows.seq = st.seq;
  rows.g = blockIdx.y;
  rows.G = G;
  const index_t e0 = st.tile * tile_rows;  // first (token, head) pair
  rows.count = int(min(index_t(tile_rows), st.seq.len * G - e0));
  rows.t_first = e0 / G;
  rows.h_first = int(e0 - rows.t_first * G);
  rows.t_last = (e0 + rows.count - 1) / G;
  return true;
}

inline dim3 query_grid(const AttnParams& p, int tile_rows = kRows) {
  const int G = p.num_heads / p.num_heads_k;
  return dim3(unsigned(num_virtual_tiles(p.seqs, p.seqs.seqlen, G, tile_rows)), unsigned(p.num_heads_k),
              unsigned(p.seqs.cu_seqlens ? 1 : p.seqs.batch));
}

// Is key `key` (sequence-relative; a compressed row for kCmp) visible to the query at token t?
// The selected branch's block membership is checked separately.
template <Branch B, typename P>
__device__ __forceinline__ bool key_visible(const P& p, index_t t, index_t key) {
  if constexpr (B == Branch::kCmp) {
    return key * p.block_stride + p.block_size - 1 <= t;
  } else if constexpr (B == Branch::kSwa) {
    return key <= t && key > t - p.window_size;
  } else {
    return key <= t;
  }
}

// Do all tokens of [t_first, t_last] see all keys of [ks, ks + kKeys)? Then a forward or dq tile
// needs no per-element mask (most tiles of the compressed and window branches; never the
// selected branch's, whose rows depend on the tokens' choices).
template <Branch B, typename P>
__device__ __forceinline__ bool tile_all_visible(const P& p, index_t ks, index_t ke, index_t t_first,
                                                 index_t t_last) {
  if constexpr (B == Branch::kSlc) {
    return false;
  } else {
    return ke - ks == kKeys && key_visible<B>(p, t_first, ke - 1) && key_visible<B>(p, t_last, ks);
  }
}

// Global row of key `key` of the sequence.
template <Branch B>
__device__ __forceinline__ index_t key_row(const SeqRange& seq, index_t key) {
  return (B == Branch::kCmp ? seq.cmp_start : seq.start) + key;
}

// Keys [lo, hi) that some query of tokens [t_first, t_last] sees (contiguous branches).
template <Branch B, typename P>
__device__ __forceinline__ void key_range(const P& p, const SeqRange& seq, index_t t_first,
                                          index_t t_last, index_t& lo, index_t& hi) {
  if constexpr (B == Branch::kCmp) {
    lo = 0;
    hi = t_last >= p.block_size - 1 ? (t_last - p.block_size + 1) / p.block_stride + 1 : 0;
    hi = min(hi, seq.cmp_len);
  } else {
    lo = max(index_t(0), t_first - p.window_size + 1);
    hi = t_last + 1;
  }
}

// Tokens [lo, hi) that see some key of [k_first, k_last] (contiguous branches, dK/dV side).
template <Branch B, typename P>
__device__ __forceinline__ void token_range(const P& p, const SeqRange& seq, index_t k_first,
                                            index_t k_last, index_t& lo, index_t& hi) {
  if constexpr (B == Branch::kCmp) {
    lo = k_first * p.block_stride + p.block_size - 1;
    hi = seq.len;
  } else {
    lo = k_first;
    hi = min(seq.len, k_last + p.window_size);
  }
  lo = min(lo, hi);
}

// ------------------------------------------------------------------ selected branch: block union

// Shared memory of the union, carved from the dynamic buffer.
struct BlockUnion {
  uint32_t* bitmap;            // [bitmap_words] one bit per block of the sequence
  int32_t* blocks;             // [kRows * n] the union, ascending
  unsigned long long* tokens;  // [kRows * n] bit k: token t_first + k chose the block
  int* scan;                   // [kThreads / 32 + 1]
  int count;
};

// Bytes of the union's shared memory for sequences of up to `seqlen` tokens.
inline size_t block_union_bytes(index_t seqlen, int select_size, int num_selected) {
  const index_t words = (num_select_blocks(seqlen, select_size) + 31) / 32;
  return size_t(kRows) * num_selected * (sizeof(unsigned long long) + sizeof(int32_t)) +
         size_t(words) * sizeof(uint32_t) + (kThreads / 32 + 1) * sizeof(int);
}

__device__ __forceinline__ BlockUnion carve_block_union(unsigned char* base, int num_selected) {
  BlockUnion u;
  u.tokens = reinterpret_cast<unsigned long long*>(base);
  u.blocks = reinterpret_cast<int32_t*>(u.tokens + kRows * num_selected);
  u.scan = u.blocks + kRows * num_selected;
  u.bitmap = reinterpret_cast<uint32_t*>(u.scan + kThreads / 32 + 1);
  u.count = 0;
  return u;
}

// Entry `slot` of token t's list, or -1 when it names no block that t can see (padding, a block
// past t, or a value out of range: user indices are not validated on the device).
__device__ __forceinline__ int32_t selected_block(const SlcParams& p, const SeqRange& seq, int g,
                                                  index_t t, int slot) {
  const int32_t j = p.block_indices.ptr<const int32_t>(seq.batch, seq.start + t, g)[slot];
  return (j >= 0 && index_t(j) * p.select_size <= t) ? j : -1;
}

// Builds the union of the blocks chosen by tokens [t_first, t_last] (at most 64 tokens) of KV
// head g, ascending, with each block's token mask. All threads of the block call it.
__device__ __forceinline__ void build_block_union(const SlcParams& p, const QueryRows& rows,
                                                  BlockUnion& u) {
  const int n = p.num_selected;
  const int ntok = int(rows.t_last - rows.t_first + 1);
  const int words = int((rows.t_last / p.select_size + 1 + 31) / 32);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int w = tid; w < words; w += kThreads) u.bitmap[w] = 0;
  __syncthreads();
  for (int e = tid; e < ntok * n; e += kThreads) {
    const int32_t j = selected_block(p, rows.seq, rows.g, rows.t_first + e / n, e % n);
    if (j >= 0) atomicOr(&u.bitmap[j >> 5], 1u << (j & 31));
  }
  __syncthreads();
  // Compaction in block order: thread tid owns words [w0, w1).
  const int per = (words + kThreads - 1) / kThreads;
  const int w0 = min(words, tid * per), w1 = min(words, w0 + per);
  int cnt = 0;
  for (int w = w0; w < w1; ++w) cnt += __popc(u.bitmap[w]);
  int incl = cnt;  // inclusive warp scan
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) u.scan[warp] = incl;
  __syncthreads();
  if (tid == 0) {
    int run = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      const int c = u.scan[w];
      u.scan[w] = run;
      run += c;
    }
    u.scan[kThreads / 32] = run;
  }
  __syncthreads();
  int pos = u.scan[warp] + incl - cnt;
  for (int w = w0; w < w1; ++w) {
    for (uint32_t bits = u.bitmap[w]; bits; bits &= bits - 1) u.blocks[pos++] = w * 32 + __ffs(bits) - 1;
  }
  u.count = u.scan[kThreads / 32];
  for (int i = tid; i < u.count; i += kThreads) u.tokens[i] = 0;
  __syncthreads();
  for (int e = tid; e < ntok * n; e += kThreads) {
    const int32_t j = selected_block(p, rows.seq, rows.g, rows.t_first + e / n, e % n);
    if (j < 0) continue;
    int lo = 0, hi = u.count - 1;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (u.blocks[mid] < j) lo = mid + 1; else hi = mid;
    }
    atomicOr(&u.tokens[lo], 1ull << (e / n));
  }
  __syncthreads();
}

}  // namespace nsa::cuda
