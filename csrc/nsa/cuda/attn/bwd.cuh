// Backward kernels shared by the three attention branches. Two passes, so that every gradient
// element has one owner and no float atomics are needed (deterministic bits):
//   dq:   the forward's tiling (query rows outer, key tiles inner): dQ = sum dS K * scale;
//   dkdv: key tiles outer (64 keys, 16 per warp), the query rows that see them inner:
//         dV = sum P^T dO, dK = sum dS^T Q * scale.
// with P = exp(scale q.k - lse), dP = dO V^T, dS = P (dP - delta), delta = rowsum(dO o) - dlse.
#pragma once

#include <cmath>
#include <type_traits>

#include "../head_dims.h"
#include "fwd.cuh"

namespace nsa::cuda {

// delta[b, t, h] = sum_j dout[b, t, h, j] * o[b, t, h, j] - dlse[b, t, h] (dlse optional).
// delta is a contiguous float [B, T, HQ]. One warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_bwd_delta_kernel(const AttnParams p, View dlse,
                                                                  float* delta) {
  const index_t rows = index_t(p.seqs.batch) * p.seqs.seqlen * p.num_heads;
  const index_t r = index_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  const int h = int(r % p.num_heads);
  const index_t t = (r / p.num_heads) % p.seqs.seqlen, b = r / (index_t(p.num_heads) * p.seqs.seqlen);
  const T* o = p.o.ptr<const T>(b, t, h);
  const T* dout = p.dout.ptr<const T>(b, t, h);
  float sum = 0.f;
  for (int j = lane; j < p.head_dim_v; j += 32) sum += to_float(o[j]) * to_float(dout[j]);
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) delta[r] = sum - (dlse.data ? *dlse.ptr<const float>(b, t, h) : 0.f);
}

template <int D, int DV>
constexpr size_t dq_smem_tiles_bytes() {
  return size_t(2) * (kRows * (D + DV) + 2 * kKeys * (D + DV));
}

// This thread's two rows' lse * log2(e) and delta (0 for padding rows).
__device__ __forceinline__ void load_row_stats(const AttnParams& p, const QueryRows& rows,
                                               const ThreadRows& tr, const float* delta,
                                               float (&lse2)[2], float (&dlt)[2]) {
  for (int i = 0; i < 2; ++i) {
    lse2[i] = dlt[i] = 0.f;
    if (tr.valid[i]) {
      const index_t t = rows.seq.start + tr.tok[i];
      const int h = rows.head(tr.row[i]);
      lse2[i] = *p.lse.template ptr<const float>(rows.seq.batch, t, h) * float(M_LOG2E);
      dlt[i] = delta[(index_t(rows.seq.batch) * p.seqs.seqlen + t) * p.num_heads + h];
    }
  }
}

// Epilogue of the dq kernels: this thread's two rows of dq = acc * scale.
template <typename T, int D>
__device__ __forceinline__ void store_rows_dq(const AttnParams& p, const QueryRows& rows,
                                              const ThreadRows& tr, const float (&dq)[D / 8][4]) {
  const int lane = threadIdx.x & 31;
  const float scale = float(p.scale);
  for (int r = 0; r < 2; ++r) {
    if (!tr.valid[r]) continue;
    T* out = p.dq.template ptr<T>(rows.seq.batch, rows.seq.start + tr.tok[r], rows.head(tr.row[r]));
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const int col = j * 8 + (lane & 3) * 2;
      *reinterpret_cast<uint32_t*>(out + col) = pack2<T>(dq[j][2 * r] * scale, dq[j][2 * r + 1] * scale);
    }
  }
}

// kWgmma (D, DV in {64, 128}, sm_90a): the three products on warpgroup instructions, tiles in
// Layout::kWgmma (the sm_90 default, see plan_contiguous in nsa/plan.cpp).
template <typename T, int D, int DV, Branch B, bool kWgmma = false>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dq_kernel(const typename BranchParams<B>::type p, const float* __restrict__ delta) {
  using P = typename BranchParams<B>::type;
  static_assert(!kWgmma || (wgmma_head_dims(D, DV) && kThreads == 128 && kRows == 64), "wgmma: one warpgroup");
  constexpr Layout L = kWgmma ? Layout::kWgmma : Layout::kRowSwizzled;
  extern __shared__ __align__(128) unsigned char smem[];
  if constexpr (kWgmma) wgmma_check_alignment(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kRows * D;
  T* sK = sdO + kRows * DV;
  T* sV = sK + 2 * kKeys * D;

  QueryRows rows;
  if (!locate_query_rows(p, rows)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  load_query_rows<D, kRows, kThreads, L>(sQ, p.q, rows);
  load_query_rows<DV, kRows, kThreads, L>(sdO, p.dout, rows);
  const QueryKeys<T, D, DV, B, L> keys(p, rows, smem + dq_smem_tiles_bytes<D, DV>(), sK, sV);
  const ThreadRows tr(rows, warp, lane);
  float lse2[2], dlt[2];
  load_row_stats(p, rows, tr, delta, lse2, dlt);

  const float scale_log2 = float(p.scale * M_LOG2E);
  float dq[D / 8][4];
  for (int j = 0; j < D / 8; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;

  for (int i = 0; i < keys.count; ++i) {
    const auto tile = keys.step(i);
    // (wgmma: the whole warpgroup, rows of tokens that did not choose the tile are masked)
    if (tile.ks < tile.ke && (kWgmma || (tile.tokens & tr.warp_tokens))) {
      float s[kKeys / 8][4], dp[kKeys / 8][4];
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j)
        for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
      if constexpr (kWgmma) {  // S = Q K^T, dP = dO V^T: all four operands K-major
        wgmma_run([&] {
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk)
            wgmma_ss<kKeys, T>(s, kmajor_desc<kRows>(sQ, kk), kmajor_desc<kKeys>(tile.k, kk), kk > 0);
#pragma unroll
          for (int kk = 0; kk < DV / 16; ++kk)
            wgmma_ss<kKeys, T>(dp, kmajor_desc<kRows>(sdO, kk), kmajor_desc<kKeys>(tile.v, kk), kk > 0);
        }, s, dp);
      } else {
        warp_gemm_nt<D, kKeys>(s, sQ, warp * 16, tile.k);     // S = Q K^T
        warp_gemm_nt<DV, kKeys>(dp, sdO, warp * 16, tile.v);  // dP = dO V^T
      }
      const TileMask<B, P> visible(p, tr, rows, tile.ks, tile.ke, tile.tokens);
      with_all_visible(tile_all_visible<B>(p, tile.ks, tile.ke, rows.t_first, rows.t_last), [&](auto all) {
#pragma unroll
        for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e >> 1;
            const float pr = decltype(all)::value || visible(j, e) ? exp2f(s[j][e] * scale_log2 - lse2[r]) : 0.f;
            s[j][e] = pr * (dp[j][e] - dlt[r]);  // dS
          }
        }
      });
      if constexpr (kWgmma) {
        wgmma_run_cb<D, T>(dq, s, tile.k);  // dQ += dS K: dS from registers, K MN-major
      } else {
        warp_gemm_pn<kKeys, D>(dq, s, tile.k);  // dQ += dS K
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  store_rows_dq<T, D>(p, rows, tr, dq);
}

// ------------------------------------------------------------------------------------- dK, dV

// Query rows per tile of the dkdv kernel: fewer for D = 192 to keep dK, dV, S^T, dP^T in registers.
template <int D>
constexpr int dkdv_rows() { return D > 128 ? 32 : 64; }

// Which gradients a dkdv thread block accumulates: both, or (dkdv_two_passes) one per launch, where
// dK and dV together would not fit the registers (per thread 2 keys x (D + DV) / 4 floats, 256 at
// D = DV = 256); the dV pass skips dP, the dK pass recomputes P.
enum class DkdvOut { kBoth, kDk, kDv };
template <int D, int DV>
constexpr bool dkdv_two_passes() { return D + DV > 320; }

template <int D, int DV>
constexpr size_t dkdv_smem_bytes() {
  constexpr int R = dkdv_rows<D>();
  return size_t(2) * (kKeys * (D + DV) + 2 * R * (D + DV)) + size_t(2) * R * 4 * sizeof(float);
}

// The selected branch's reverse index: entries sorted by key = g * vblocks + virtual block (see
// seq_tiles.cuh, tiles of select_size tokens), each carrying the global token row b * T + t of a
// query that chose the block, ascending within a key.
struct ReverseIndex {
  const int32_t* keys = nullptr;  // [entries] ascending
  const int32_t* rows = nullptr;  // [entries]
  index_t entries = 0;
  index_t vblocks = 0;            // virtual blocks per KV head
};

// Splitting the query rows of one key tile over several thread blocks. Without it, a key tile
// that many queries see (every compressed key tile early in a long sequence; the selected
// branch's forced first blocks, chosen by every token) is one long serial loop. Split s of
// `count` takes the queries at tokens [s * len / count, (s + 1) * len / count) of the sequence
// and writes fp32 partial dK, dV to `partial`; attn_bwd_dkdv_reduce_kernel then sums the
// splits in order (deterministic) into dk, dv. Only key tiles with a slot (see split_slot) are
// split; the others are owned by split 0 alone, which writes dk, dv directly.
struct DkdvSplit {
  int count = 1;              // splits (grid.z = batch rows * count)
  int lead_tiles = 0;         // kSlc: key tiles per sequence that are split (the first blocks)
  int seq_slots = 1;          // kSlc: sequences per batch row (N when packed, else 1)
  index_t slots = 0;          // slots per split
  float* partial = nullptr;   // [count][slots][kKeys][D + DV] fp32
};

// Slot of key tile x (tile index `tile` within its sequence, sequence `seq_index`) of KV head g,
// batch row zb, or -1 when the tile is not split.
template <Branch B>
__device__ __forceinline__ index_t split_slot(const DkdvSplit& sp, int num_heads_k, int zb, int g,
                                              index_t x, index_t tile, int seq_index) {
  if (sp.count <= 1) return -1;
  if constexpr (B == Branch::kCmp) {
    return (index_t(zb) * num_heads_k + g) * gridDim.x + x;
  } else if constexpr (B == Branch::kSlc) {
    if (tile >= sp.lead_tiles) return -1;
    return ((index_t(zb) * num_heads_k + g) * sp.seq_slots + seq_index) * sp.lead_tiles + tile;
  } else {
    return -1;
  }
}

__device__ __forceinline__ index_t lower_bound(const int32_t* a, index_t n, int32_t x) {
  index_t lo = 0, hi = n;
  while (lo < hi) {
    const index_t mid = (lo + hi) / 2;
    if (a[mid] < x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// The key tile of dkdv block x of batch row zb, KV head g: its sequence, keys [ks, ke) (ks >= ke:
// none) and split slot (-1: not split). False for a virtual tile of no sequence.
template <Branch B, typename P>
__device__ __forceinline__ bool locate_key_tile(const P& p, const DkdvSplit& split, int zb, int g,
                                                SeqTile& st, index_t& ks, index_t& ke, index_t& slot) {
  if constexpr (B == Branch::kSlc) {
    const int per_block = tiles_per_block(p.select_size);
    if (!locate_tile(p.seqs, blockIdx.x / per_block, zb, 1, p.select_size, false, st)) return false;
    const index_t start = st.tile * p.select_size;
    ks = start + index_t(blockIdx.x % per_block) * kKeys;
    ke = min(min(start + p.select_size, ks + kKeys), st.seq.len);
    slot = split_slot<B>(split, p.num_heads_k, zb, g, blockIdx.x,
                         st.tile * per_block + blockIdx.x % per_block, st.index);
  } else {
    constexpr bool kCmpKeys = B == Branch::kCmp;
    if (!locate_tile(p.seqs, blockIdx.x, zb, 1, kKeys, kCmpKeys, st)) return false;
    ks = st.tile * kKeys;
    ke = min(ks + kKeys, kCmpKeys ? st.seq.cmp_len : st.seq.len);
    slot = split_slot<B>(split, p.num_heads_k, zb, g, blockIdx.x, st.tile, st.index);
  }
  return true;
}

// Grid: x = key tiles (virtual when packed; for kSlc virtual blocks * tiles per block),
// y = KV head, z = batch row. kWgmma (D, DV in {64, 128}, sm_90a): the four products on Hopper's
// warpgroup instructions (the thread block is one warpgroup; the tensor cores read K, V, Q and dO
// from shared memory once per 64 keys instead of once per warp), tiles in Layout::kWgmma (the
// sm_90 default, see plan_contiguous in nsa/plan.cpp).
template <typename T, int D, int DV, Branch B, bool kWgmma = false, DkdvOut kOut = DkdvOut::kBoth>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dkdv_kernel(const typename BranchParams<B>::type p, const float* __restrict__ delta,
                         const ReverseIndex rix, const DkdvSplit split) {
  constexpr int R = dkdv_rows<D>();
  static_assert(!kWgmma || (wgmma_head_dims(D, DV) && R == 64 && kThreads == 128), "wgmma: one warpgroup");
  static_assert(kOut == DkdvOut::kBoth || !kWgmma, "one gradient per pass: mma.sync only");
  // Columns of dK and dV this block accumulates (0: the other pass's).
  constexpr int kDkCols = kOut == DkdvOut::kDv ? 0 : D, kDvCols = kOut == DkdvOut::kDk ? 0 : DV;
  constexpr Layout L = kWgmma ? Layout::kWgmma : Layout::kRowSwizzled;
  extern __shared__ __align__(128) unsigned char smem[];
  if constexpr (kWgmma) wgmma_check_alignment(smem);
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kKeys * D;
  T* sQ = sV + kKeys * DV;     // [2][R][D]
  T* sdO = sQ + 2 * R * D;     // [2][R][DV]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * R * DV);  // [2][R] lse * log2(e)
  float* sDelta = sLse + 2 * R;                               // [2][R]
  int* sTok = reinterpret_cast<int*>(sDelta + 2 * R);         // [2][R] token, -1 past the end
  int* sIdx = sTok + 2 * R;  // [2][R] kSlc: the tokens of each row tile's token indices

  const int G = p.num_heads / p.num_heads_k;
  const int g = blockIdx.y;
  const int zb = blockIdx.z / split.count, sp = blockIdx.z % split.count;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // The owned keys [ks, ke) and the (token, head) pairs that may see them.
  SeqTile st;
  index_t ks, ke, slot, seg_lo = 0, pairs_lo = 0, pairs_hi = 0;
  if (!locate_key_tile<B>(p, split, zb, g, st, ks, ke, slot) || ks >= ke) return;
  if (slot < 0 && sp > 0) return;
  if constexpr (B == Branch::kSlc) {
    // This block's virtual index, as the reverse index numbers it.
    const int per_block = tiles_per_block(p.select_size);
    const index_t vb = p.seqs.cu_seqlens ? index_t(blockIdx.x / per_block)
                                         : index_t(zb) * num_select_blocks(p.seqs.seqlen, p.select_size) + st.tile;
    const int32_t key = int32_t(g * rix.vblocks + vb);
    seg_lo = lower_bound(rix.keys, rix.entries, key);
    index_t seg_hi = lower_bound(rix.keys, rix.entries, key + 1);
    if (slot >= 0) {  // this split's tokens: entries are in token order within the segment
      const int32_t base = int32_t(index_t(st.seq.batch) * p.seqs.seqlen + st.seq.start);
      const index_t n = seg_hi - seg_lo;
      const index_t a = lower_bound(rix.rows + seg_lo, n, base + int32_t(sp * st.seq.len / split.count));
      const index_t b = lower_bound(rix.rows + seg_lo, n, base + int32_t((sp + 1) * st.seq.len / split.count));
      seg_hi = seg_lo + b;
      seg_lo += a;
    }
    pairs_hi = (seg_hi - seg_lo) * G;
  } else {
    index_t t_lo, t_hi;
    token_range<B>(p, st.seq, ks, ke - 1, t_lo, t_hi);
    if (slot >= 0) {
      t_lo = max(t_lo, sp * st.seq.len / split.count);
      t_hi = max(t_lo, min(t_hi, (sp + 1) * st.seq.len / split.count));
    }
    pairs_lo = t_lo * G;
    pairs_hi = t_hi * G;
  }
  const SeqRange seq = st.seq;
  const int ntiles = int((pairs_hi - pairs_lo + R - 1) / R);

  load_strided_async<kKeys, D, kThreads, L>(sK, p.k.template ptr<const T>(seq.batch, key_row<B>(seq, ks), g),
                                            p.k.row_stride, int(ke - ks));
  load_strided_async<kKeys, DV, kThreads, L>(sV, p.v.template ptr<const T>(seq.batch, key_row<B>(seq, ks), g),
                                             p.v.row_stride, int(ke - ks));

  // Pairs are numbered from pairs_lo in int32 (fewer than T * G), as they are walked for every row
  // of every row tile.
  const index_t t_lo = pairs_lo / G;
  const T* q_seq = p.q.template ptr<const T>(seq.batch, seq.start, g * G);
  const T* do_seq = p.dout.template ptr<const T>(seq.batch, seq.start, g * G);
  // Rows [e0, e0 + n) of row tile i; its pair e0 + r has token index (e0 + r) / G = i0 + (h0 + r)
  // / G with i0 = e0 / G, h0 = e0 % G.
  auto tile_rows = [&](int i, int& e0, int& n, int& i0, int& h0) {
    e0 = i * R;
    n = int(min(index_t(R), pairs_hi - pairs_lo - e0));
    i0 = e0 / G;
    h0 = e0 - i0 * G;
  };
  // The selected branch's tokens come from the reverse index: a dependent global load in front
  // of every row address, so each tile's tokens (token indices i0 ..) are fetched two tiles ahead
  // into sIdx[i % 2] (thread j: index i0 + j) and read from there.
  auto fetch_tokens = [&](int i) -> int {
    int e0, n, i0, h0;
    tile_rows(i, e0, n, i0, h0);
    return tid <= (h0 + n - 1) / G ? int(index_t(rix.rows[seg_lo + i0 + tid]) - index_t(seq.batch) * p.seqs.seqlen -
                                         seq.start)
                                   : 0;
  };
  auto store_tokens = [&](int i, int t) {
    if (tid < R) sIdx[(i & 1) * R + tid] = t;
  };
  // Token of token index i0 + j of row tile i.
  auto token_of = [&](int i, int i0, int j) -> index_t {
    if constexpr (B == Branch::kSlc) {
      (void)i0;
      return sIdx[(i & 1) * R + j];
    } else {
      (void)i;
      return t_lo + i0 + j;
    }
  };
  // cp.async of row tile i's Q and dO into stage i % 2.
  auto load_rows = [&](int i) {
    int e0, n, i0, h0;
    tile_rows(i, e0, n, i0, h0);
    auto tok = [&](int j) { return token_of(i, i0, j); };
    load_pairs_async<R, D, kThreads, L>(sQ + (i & 1) * R * D, q_seq, p.q.row_stride, p.q.head_stride, h0, G, n,
                                        tok);
    load_pairs_async<R, DV, kThreads, L>(sdO + (i & 1) * R * DV, do_seq, p.dout.row_stride, p.dout.head_stride, h0,
                                         G, n, tok);
  };
  // Row tid's lse * log2(e), delta and token (-1 past the end) of row tile i, fetched into
  // registers one tile ahead and stored to stage i % 2 after the current tile's products, so that
  // the latency of these plain loads hides behind them.
  struct RowStats {
    float lse2 = 0.f, dlt = 0.f;
    int t = -1;
  };
  auto fetch_stats = [&](int i) {
    RowStats st;
    int e0, n, i0, h0;
    tile_rows(i, e0, n, i0, h0);
    if (tid < n) {
      const index_t tk = token_of(i, i0, (h0 + tid) / G);
      const int h = g * G + (e0 + tid) % G;
      st.lse2 = *p.lse.template ptr<const float>(seq.batch, seq.start + tk, h) * float(M_LOG2E);
      st.dlt = delta[(index_t(seq.batch) * p.seqs.seqlen + seq.start + tk) * p.num_heads + h];
      st.t = int(tk);
    }
    return st;
  };
  auto store_stats = [&](int i, const RowStats& st) {
    if (tid < R) {
      sLse[(i & 1) * R + tid] = st.lse2;
      sDelta[(i & 1) * R + tid] = st.dlt;
      sTok[(i & 1) * R + tid] = st.t;
    }
  };
  static_assert(dkdv_rows<D>() <= kThreads, "one thread per row fetches the row statistics");
  if constexpr (B == Branch::kSlc) {
    for (int i = 0; i < 2 && i < ntiles; ++i) store_tokens(i, fetch_tokens(i));
    __syncthreads();
  }
  if (ntiles > 0) {
    load_rows(0);
    store_stats(0, fetch_stats(0));
  }
  cp_async_commit();

  const float scale_log2 = float(p.scale * M_LOG2E);
  float dk[kDkCols ? kDkCols / 8 : 1][4], dv[kDvCols ? kDvCols / 8 : 1][4];
  for (int j = 0; j < kDkCols / 8; ++j) dk[j][0] = dk[j][1] = dk[j][2] = dk[j][3] = 0.f;
  for (int j = 0; j < kDvCols / 8; ++j) dv[j][0] = dv[j][1] = dv[j][2] = dv[j][3] = 0.f;
  // This thread's two keys.
  index_t key[2];
  for (int i = 0; i < 2; ++i) key[i] = ks + warp * 16 + lane / 4 + 8 * i;

  for (int i = 0; i < ntiles; ++i) {
    RowStats next;
    if (i + 1 < ntiles) {
      load_rows(i + 1);
      next = fetch_stats(i + 1);
    }
    int next_tokens = 0;
    if constexpr (B == Branch::kSlc) {
      if (i + 2 < ntiles) next_tokens = fetch_tokens(i + 2);
    }
    cp_async_commit();
    cp_async_wait<1>();
    if constexpr (kWgmma) fence_proxy_async();  // the tensor cores read tile i next
    __syncthreads();
    const T* q_tile = sQ + (i & 1) * R * D;
    const T* do_tile = sdO + (i & 1) * R * DV;
    const float* lse2 = sLse + (i & 1) * R;
    const float* dlt = sDelta + (i & 1) * R;
    const int* tok = sTok + (i & 1) * R;
    if (kWgmma || ks + warp * 16 < ke) {  // (wgmma: the whole warpgroup; keys >= ke are masked)
      float s[R / 8][4], dp[R / 8][4];
#pragma unroll
      for (int j = 0; j < R / 8; ++j)
        for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
      if constexpr (kWgmma) {  // S^T = K Q^T, dP^T = V dO^T: all four operands K-major
        wgmma_run([&] {
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk)
            wgmma_ss<R, T>(s, kmajor_desc<kKeys>(sK, kk), kmajor_desc<R>(q_tile, kk), kk > 0);
#pragma unroll
          for (int kk = 0; kk < DV / 16; ++kk)
            wgmma_ss<R, T>(dp, kmajor_desc<kKeys>(sV, kk), kmajor_desc<R>(do_tile, kk), kk > 0);
        }, s, dp);
      } else {
        warp_gemm_nt<D, R>(s, sK, warp * 16, q_tile);                         // S^T = K Q^T
        if constexpr (kDkCols > 0) warp_gemm_nt<DV, R>(dp, sV, warp * 16, do_tile);  // dP^T = V dO^T
      }
      // s <- P^T, dp <- dS^T; without masks when every row sees every key (tokens ascend in the
      // contiguous branches' row tiles, so the first and last rows bound them).
      auto to_ds = [&](auto all_visible) {
#pragma unroll
        for (int j = 0; j < R / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int c = j * 8 + (lane & 3) * 2 + (e & 1);
            const index_t kv = key[e >> 1];
            const int t = tok[c];
            const bool vis = decltype(all_visible)::value || (t >= 0 && kv < ke && key_visible<B>(p, index_t(t), kv));
            const float pr = vis ? exp2f(s[j][e] * scale_log2 - lse2[c]) : 0.f;
            s[j][e] = pr;
            dp[j][e] = pr * (dp[j][e] - dlt[c]);
          }
        }
      };
      with_all_visible(tok[R - 1] >= 0 && tile_all_visible<B>(p, ks, ke, index_t(tok[0]), index_t(tok[R - 1])),
                       to_ds);
      if constexpr (kWgmma) {  // dV += P^T dO, dK += dS^T Q: P^T, dS^T from registers, dO, Q MN-major
        uint32_t pa[R / 16][4], da[R / 16][4];
#pragma unroll
        for (int kk = 0; kk < R / 16; ++kk) {
          c_to_a<T>(pa[kk], s[2 * kk], s[2 * kk + 1]);
          c_to_a<T>(da[kk], dp[2 * kk], dp[2 * kk + 1]);
        }
        wgmma_run([&] {
#pragma unroll
          for (int kk = 0; kk < R / 16; ++kk) wgmma_rs<DV, T>(dv, pa[kk], mnmajor_desc<R>(do_tile, kk), true);
#pragma unroll
          for (int kk = 0; kk < R / 16; ++kk) wgmma_rs<D, T>(dk, da[kk], mnmajor_desc<R>(q_tile, kk), true);
        }, dv, dk);
      } else {
        if constexpr (kDvCols > 0) warp_gemm_pn<R, DV>(dv, s, do_tile);  // dV += P^T dO
        if constexpr (kDkCols > 0) warp_gemm_pn<R, D>(dk, dp, q_tile);   // dK += dS^T Q
      }
    }
    // Stage (i + 1) % 2 of the statistics was last read in step i - 1, and tile i's tokens (slot
    // i % 2, replaced by tile i + 2's) in step i - 1 too; the barrier below publishes both.
    if (i + 1 < ntiles) store_stats(i + 1, next);
    if constexpr (B == Branch::kSlc) {
      if (i + 2 < ntiles) store_tokens(i + 2, next_tokens);
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  if (slot >= 0) {  // fp32 partials of this split, summed by attn_bwd_dkdv_reduce_kernel
    float* out = split.partial + ((index_t(sp) * split.slots + slot) * kKeys) * (D + DV);
    for (int r = 0; r < 2; ++r) {
      float* row = out + index_t(warp * 16 + lane / 4 + 8 * r) * (D + DV);
#pragma unroll
      for (int j = 0; j < kDkCols / 8; ++j)
        *reinterpret_cast<float2*>(row + j * 8 + (lane & 3) * 2) = make_float2(dk[j][2 * r], dk[j][2 * r + 1]);
#pragma unroll
      for (int j = 0; j < kDvCols / 8; ++j)
        *reinterpret_cast<float2*>(row + D + j * 8 + (lane & 3) * 2) = make_float2(dv[j][2 * r], dv[j][2 * r + 1]);
    }
    return;
  }
  const float scale = float(p.scale);
  for (int r = 0; r < 2; ++r) {
    if (key[r] >= ke) continue;
    const index_t row = key_row<B>(seq, key[r]);
    T* dk_out = p.dk.template ptr<T>(seq.batch, row, g);
    T* dv_out = p.dv.template ptr<T>(seq.batch, row, g);
#pragma unroll
    for (int j = 0; j < kDkCols / 8; ++j) {
      const int col = j * 8 + (lane & 3) * 2;
      *reinterpret_cast<uint32_t*>(dk_out + col) = pack2<T>(dk[j][2 * r] * scale, dk[j][2 * r + 1] * scale);
    }
#pragma unroll
    for (int j = 0; j < kDvCols / 8; ++j) {
      const int col = j * 8 + (lane & 3) * 2;
      *reinterpret_cast<uint32_t*>(dv_out + col) = pack2<T>(dv[j][2 * r], dv[j][2 * r + 1]);
    }
  }
}

// Sums the splits of every split key tile, in split order, into dk (times scale) and dv.
// Grid: the dkdv grid with z = batch rows (no split axis).
template <typename T, int D, int DV, Branch B>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dkdv_reduce_kernel(const typename BranchParams<B>::type p, const DkdvSplit split) {
  const int g = blockIdx.y, zb = blockIdx.z;
  SeqTile st;
  index_t ks, ke, slot;
  if (!locate_key_tile<B>(p, split, zb, g, st, ks, ke, slot)) return;
  if (slot < 0 || ks >= ke) return;
  const float scale = float(p.scale);
  const int n = int(ke - ks) * (D + DV);
  for (int e = threadIdx.x * 2; e < n; e += kThreads * 2) {  // pairs of columns (D, DV even)
    const int r = e / (D + DV), c = e % (D + DV);
    float2 sum = make_float2(0.f, 0.f);
    for (int s = 0; s < split.count; ++s) {
      const float2 v = *reinterpret_cast<const float2*>(
          split.partial + ((index_t(s) * split.slots + slot) * kKeys + r) * (D + DV) + c);
      sum.x += v.x;
      sum.y += v.y;
    }
    const index_t row = key_row<B>(st.seq, ks + r);
    if (c < D)
      *reinterpret_cast<uint32_t*>(p.dk.template ptr<T>(st.seq.batch, row, g) + c) = pack2<T>(sum.x * scale, sum.y * scale);
    else
      *reinterpret_cast<uint32_t*>(p.dv.template ptr<T>(st.seq.batch, row, g) + (c - D)) = pack2<T>(sum.x, sum.y);
  }
}

}  // namespace nsa::cuda
