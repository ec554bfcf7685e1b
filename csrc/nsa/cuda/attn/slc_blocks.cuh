// The selected branch's forward by blocks (sm_90a, D, DV in {64, 128}): key tiles outer, the queries
// that chose them inner, as the dK/dV kernel walks them (the reverse index, slc/reverse_index.cuh).
//
// Why: the per-token kernels (slc_warp.cuh, fwd.cuh) read every chosen block from L2 once per
// (token, KV head); at G = 4, 64k tokens that is 64k x 16 KV heads x 512 KB of K and V, ~540 GB,
// and L2 bandwidth bounds them (benchmarks/NOTES.md). Here each thread block loads one 64-key tile
// once and multiplies it with the query rows of every token that chose its block (64 (token,
// head) rows per step, double-buffered), so K and V are read about once and the queries, 16 times
// smaller per token at G = 4, are gathered instead.
//
// The softmax of a query runs over its num_selected blocks, which now sit in different thread
// blocks: each writes the partial result of its tile (o normalized over the tile's keys, in the
// output dtype, and the tile's log-sum-exp), and slc_merge_kernel combines the partials of a row
// in slot order into o and lse. One writer per element and a fixed order: deterministic bits.
// The partials of all rows would be 16x the output, so the host runs both kernels over chunks of
// rows that bound them (slc/slc.cu).
//
// The backward's dQ by blocks (kDq; the default where the forward runs by blocks) walks the same
// way: per row tile S = Q K^T, dP = dO V^T, dS = P (dP - delta), and the
// tile's share of dQ, dS K, goes to a bf16 partial per (row, head, slot) that slc_dq_merge_kernel
// sums in slot order.
#pragma once

#include "bwd.cuh"

namespace nsa::cuda {

// The partials of the rows [row0, row0 + rows) (global rows b * T + t) of one chunk.
struct SlcPartials {
  index_t row0 = 0, rows = 0;
  const int32_t* starts = nullptr;  // [num_keys + 1] segment starts of the reverse index
  int32_t key0 = 0;                 // this chunk's first key: chunk * H * vblocks
  int slots = 0;        // S = num_selected * tiles_per_block(select_size): slot k * tiles + i is
                        // tile i of the block in list entry k
  int splits = 1;       // thread blocks per key tile at most (grid.z = batch rows * splits); a
                        // tile chosen by many tokens (the first blocks, chosen by every later
                        // token when num_initial > 0; blocks that training makes popular) is
                        // split over up to this many, kSplitRows rows each at least
  void* o = nullptr;    // forward: [rows][HQ][S][DV] output dtype, the tile's o normalized by its
                        // own sum; dQ: [rows][HQ][S][D] bf16, the tile's dS K * scale
  float* lse = nullptr; // forward: [rows][HQ][S] the tile's log-sum-exp (-inf: no key visible)
};

// Rows ((token, head) pairs) of a key tile per thread block at least, when the tile is split:
// 8 row tiles, against one load of the tile's keys and values.
constexpr index_t kSplitRows = 8 * kRows;

template <int D, int DV, bool kDq>
constexpr size_t slc_blocks_smem_bytes() {
  return size_t(2) * (kKeys * (D + DV) + 2 * kRows * (kDq ? D + DV : D)) + size_t(6) * kRows * sizeof(int);
}

// Grid: x = virtual blocks * tiles per block (the dK/dV kernel's), y = KV head, z = batch row *
// splits. The thread block owns keys [ks, ke) of block jb of its sequence and KV head g.
// kDq: the dQ partials (delta: attn_bwd_delta_kernel's [B * T * HQ]); else the forward's.
template <typename T, int D, int DV, bool kDq>
__global__ void __launch_bounds__(kThreads)
    slc_blocks_kernel(const SlcParams p, const ReverseIndex rix, const SlcPartials part, const float* delta) {
  static_assert(wgmma_head_dims(D, DV) && kThreads == 128 && kRows == 64 && kKeys == 64,
                "one warpgroup, 64 rows, 64 keys");
  constexpr int R = kRows;
  extern __shared__ __align__(1024) unsigned char smem_sb[];  // (its own name: see fwd_wgmma.cuh)
  T* sK = reinterpret_cast<T*>(smem_sb);  // [D / 64][kKeys][64]     (Layout::kWgmma)
  T* sV = sK + kKeys * D;                 // [DV / 64][kKeys][64]
  T* sQ = sV + kKeys * DV;                // [2] x [D / 64][R][64]
  T* sdO = sQ + 2 * R * D;                // kDq: [2] x [DV / 64][R][64]
  int* sTok = reinterpret_cast<int*>(sdO + (kDq ? 2 * R * DV : 0));  // [3][R] token (in its sequence) of token index j
  int* sSlot = sTok + 3 * R;                           // [3][R] its list entry naming this block
  wgmma_check_alignment(smem_sb);

  const int G = p.num_heads / p.num_heads_k, g = blockIdx.y;
  const int zb = blockIdx.z / part.splits, sp = blockIdx.z % part.splits;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int per_block = tiles_per_block(p.select_size);

  SeqTile st;
  if (!locate_tile(p.seqs, blockIdx.x / per_block, zb, 1, p.select_size, false, st)) return;
  const SeqRange seq = st.seq;
  const int sub = int(blockIdx.x % per_block);
  const index_t ks = st.tile * p.select_size + index_t(sub) * kKeys;
  const index_t ke = min(min((st.tile + 1) * p.select_size, ks + kKeys), seq.len);
  if (ks >= ke) return;

  // The tokens of this chunk that chose the block: a segment of the reverse index (token order),
  // of which split sp of the tile's `parts` takes its share. The work of a tile follows how many
  // tokens chose it, so one chosen by most of them would otherwise be one thread block's long
  // loop while the others are done.
  const index_t vb = p.seqs.cu_seqlens ? index_t(blockIdx.x / per_block)
                                       : index_t(zb) * num_select_blocks(p.seqs.seqlen, p.select_size) + st.tile;
  const index_t key = part.key0 + g * rix.vblocks + vb;
  index_t lo = part.starts[key];
  index_t n_all = part.starts[key + 1] - lo;
  const int parts = int(min(index_t(part.splits), max(index_t(1), n_all * G / kSplitRows)));
  if (sp >= parts) return;
  if (parts > 1) {
    const index_t a = sp * n_all / parts;
    n_all = (sp + 1) * n_all / parts - a;
    lo += a;
  }
  if (n_all == 0) return;
  const int pairs = int(n_all) * G;  // (token, head) rows, < T * G
  const int ntiles = (pairs + R - 1) / R;

  load_strided_async<kKeys, D, kThreads, Layout::kWgmma>(sK, p.k.template ptr<const T>(seq.batch, seq.start + ks, g),
                                                          p.k.row_stride, int(ke - ks));
  load_strided_async<kKeys, DV, kThreads, Layout::kWgmma>(sV, p.v.template ptr<const T>(seq.batch, seq.start + ks, g),
                                                           p.v.row_stride, int(ke - ks));

  const index_t row_base = index_t(seq.batch) * p.seqs.seqlen + seq.start;  // global row of token 0
  // Row tile i: rows [e0, e0 + n); row r is head (h0 + r) % G of token index i0 + (h0 + r) / G.
  auto tile_rows = [&](int i, int& e0, int& n, int& i0, int& h0) {
    e0 = i * R;
    n = min(R, pairs - e0);
    i0 = e0 / G;
    h0 = e0 - i0 * G;
  };
  // Thread j's token of row tile i (token index i0 + j) and the list entry that names the block
  // (its first: a repeat counts once), fetched two tiles ahead into registers, then to stage i % 3
  // of sTok/sSlot: step i reads stage i % 3 (masks, partial addresses) and (i + 1) % 3 (the Q
  // rows of tile i + 1) and writes (i + 2) % 3, last read in step i - 1.
  struct TokenSlot {
    int t = 0, slot = 0;
  };
  auto fetch_token = [&](int i) {
    TokenSlot ts;
    int e0, n, i0, h0;
    tile_rows(i, e0, n, i0, h0);
    if (tid <= (h0 + n - 1) / G) {
      ts.t = int(index_t(rix.rows[lo + i0 + tid]) - row_base);
      const int32_t* list = p.block_indices.template ptr<const int32_t>(seq.batch, seq.start + ts.t, g);
      for (int k = p.num_selected - 1; k >= 0; --k)
        if (list[k] == int32_t(st.tile)) ts.slot = k;
    }
    return ts;
  };
  auto store_token = [&](int i, const TokenSlot& ts) {
    if (tid < R) {
      sTok[(i % 3) * R + tid] = ts.t;
      sSlot[(i % 3) * R + tid] = ts.slot;
    }
  };
  auto load_rows = [&](int i) {
    int e0, n, i0, h0;
    tile_rows(i, e0, n, i0, h0);
    const int* tok = sTok + (i % 3) * R;
    auto token = [&](int j) { return index_t(tok[j]); };
    load_pairs_async<R, D, kThreads, Layout::kWgmma>(sQ + (i & 1) * R * D, p.q.template ptr<const T>(seq.batch, seq.start, g * G),
                                                      p.q.row_stride, p.q.head_stride, h0, G, n, token);
    if constexpr (kDq)
      load_pairs_async<R, DV, kThreads, Layout::kWgmma>(sdO + (i & 1) * R * DV,
                                                         p.dout.template ptr<const T>(seq.batch, seq.start, g * G),
                                                         p.dout.row_stride, p.dout.head_stride, h0, G, n, token);
  };

  for (int i = 0; i < 2 && i < ntiles; ++i) store_token(i, fetch_token(i));
  __syncthreads();
  load_rows(0);
  cp_async_commit();

  const float scale_log2 = float(p.scale * M_LOG2E);
  for (int i = 0; i < ntiles; ++i) {
    if (i + 1 < ntiles) load_rows(i + 1);
    TokenSlot next;
    if (i + 2 < ntiles) next = fetch_token(i + 2);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();  // the tensor cores read tile i (and, at i = 0, K and V) next
    __syncthreads();

    int e0, n, i0, h0;
    tile_rows(i, e0, n, i0, h0);
    const T* q_tile = sQ + (i & 1) * R * D;
    const int* tok = sTok + (i % 3) * R;
    // This thread's two rows: their tokens (-1 past the tile) and the mask key <= t, key < ke.
    int row[2], t[2];
    for (int r = 0; r < 2; ++r) {
      row[r] = warp * 16 + lane / 4 + 8 * r;
      t[r] = row[r] < n ? tok[(h0 + row[r]) / G] : -1;
    }
    const bool all = n == R && ke - ks == kKeys && index_t(tok[0]) >= ke - 1;  // tokens ascend
    auto visible = [&](int j, int e) {
      const index_t kv = ks + j * 8 + (lane & 3) * 2 + (e & 1);
      return kv < ke && kv <= index_t(t[e >> 1]);
    };
    // Partial index of row r: (row - row0, head, slot).
    auto partial_index = [&](int r) {
      const int h = g * G + (h0 + row[r]) % G;
      const int slot = sSlot[(i % 3) * R + (h0 + row[r]) / G] * per_block + sub;
      return ((row_base + t[r] - part.row0) * p.num_heads + h) * part.slots + slot;
    };
    float s[kKeys / 8][4];
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    if constexpr (kDq) {
      // The rows' lse (log2 units) and delta, loaded before the products that hide their latency.
      float lse2[2], dlt[2];
      for (int r = 0; r < 2; ++r) {
        lse2[r] = dlt[r] = 0.f;
        if (t[r] >= 0) {
          const int h = g * G + (h0 + row[r]) % G;
          lse2[r] = *p.lse.template ptr<const float>(seq.batch, seq.start + t[r], h) * float(M_LOG2E);
          dlt[r] = delta[(row_base + t[r]) * p.num_heads + h];
        }
      }
      // S = Q K^T, dP = dO V^T: all four operands K-major.
      const T* do_tile = sdO + (i & 1) * R * DV;
      float dp[kKeys / 8][4];
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
      wgmma_run([&] {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
          wgmma_ss<kKeys, T>(s, kmajor_desc<R>(q_tile, kk), kmajor_desc<kKeys>(sK, kk), kk > 0);
#pragma unroll
        for (int kk = 0; kk < DV / 16; ++kk)
          wgmma_ss<kKeys, T>(dp, kmajor_desc<R>(do_tile, kk), kmajor_desc<kKeys>(sV, kk), kk > 0);
      }, s, dp);
      // s <- dS = P (dP - delta).
      with_all_visible(all, [&](auto all_visible) {
#pragma unroll
        for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e >> 1;
            const float pr = decltype(all_visible)::value || visible(j, e) ? exp2f(s[j][e] * scale_log2 - lse2[r]) : 0.f;
            s[j][e] = pr * (dp[j][e] - dlt[r]);
          }
        }
      });
      // The tile's dQ = dS K: dS from registers, K MN-major.
      float dq[D / 8][4];
#pragma unroll
      for (int j = 0; j < D / 8; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;
      wgmma_run_cb<D, T>(dq, s, sK);
      const float scale = float(p.scale);
      for (int r = 0; r < 2; ++r) {
        if (t[r] < 0) continue;
        __nv_bfloat16* out = static_cast<__nv_bfloat16*>(part.o) + partial_index(r) * D;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          const int col = j * 8 + (lane & 3) * 2;
          *reinterpret_cast<uint32_t*>(out + col) =
              pack2<__nv_bfloat16>(dq[j][2 * r] * scale, dq[j][2 * r + 1] * scale);
        }
      }
    } else {
      // S = Q K^T, both operands K-major.
      wgmma_run([&] {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
          wgmma_ss<kKeys, T>(s, kmajor_desc<R>(q_tile, kk), kmajor_desc<kKeys>(sK, kk), kk > 0);
      }, s);
      float mx[2] = {-INFINITY, -INFINITY};
      mask_scale_max<kKeys>(s, all, visible, scale_log2, mx);
      float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
      float acc[DV / 8][4];
#pragma unroll
      for (int j = 0; j < DV / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
      online_softmax_step<kKeys, DV>(s, mx, m, l, acc);

      wgmma_run_cb<DV, T>(acc, s, sV);  // O = P V: P from registers, V MN-major

      // The partials of this thread's two rows.
      for (int r = 0; r < 2; ++r) {
        const float lsum = quad_sum(l[r]);
        if (t[r] < 0) continue;
        const index_t idx = partial_index(r);
        const float inv = softmax_inv(lsum);
        T* o = static_cast<T*>(part.o) + idx * DV;
#pragma unroll
        for (int j = 0; j < DV / 8; ++j) {
          const int col = j * 8 + (lane & 3) * 2;
          *reinterpret_cast<uint32_t*>(o + col) = pack2<T>(acc[j][2 * r] * inv, acc[j][2 * r + 1] * inv);
        }
        if ((lane & 3) == 0) part.lse[idx] = softmax_lse(lsum, (m[r] + log2f(lsum)) * float(M_LN2));
      }
    }
    if (i + 2 < ntiles) store_token(i + 2, next);
    __syncthreads();  // publishes tile i + 2's tokens; frees Q stage i % 2 for tile i + 2
  }
  cp_async_wait<0>();
}

// The (row, query head) of merge warp w of the chunk: false for rows outside every sequence (past
// cu_seqlens[N]), which the other kernels leave alone too. t: the token within its sequence.
__device__ __forceinline__ bool locate_merge_row(const SlcParams& p, const SlcPartials& part, index_t w,
                                                 index_t& b, index_t& trow, index_t& t, int& h) {
  if (w >= part.rows * p.num_heads) return false;
  h = int(w % p.num_heads);
  const index_t grow = part.row0 + w / p.num_heads;
  b = grow / p.seqs.seqlen;
  trow = grow % p.seqs.seqlen;
  t = trow;
  if (p.seqs.cu_seqlens) {  // the sequence of this row: largest s with cu[s] <= trow
    if (p.seqs.num_seqs <= 0) return false;
    int lo = 0, hi = p.seqs.num_seqs - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (p.seqs.cu_seqlens[mid] <= trow) lo = mid; else hi = mid - 1;
    }
    t = trow - p.seqs.cu_seqlens[lo];
    if (t < 0 || t >= p.seqs.cu_seqlens[lo + 1] - p.seqs.cu_seqlens[lo]) return false;
  }
  return true;
}

// Calls f(partial index) for each partial of merge warp w's row, in slot order (all lanes, the
// same calls): a slot counts when its list entry names a block the token sees (not padding, not a
// repeat) and its tile starts at or before the token.
template <typename F>
__device__ __forceinline__ void for_each_partial(const SlcParams& p, const SlcPartials& part, index_t w, index_t b,
                                                 index_t trow, index_t t, int h, F&& f) {
  const int lane = threadIdx.x & 31;
  const int32_t* list = p.block_indices.template ptr<const int32_t>(b, trow, h / (p.num_heads / p.num_heads_k));
  const int per_block = tiles_per_block(p.select_size);
  const index_t base = w * part.slots;  // w = (grow - row0) * HQ + h
  for (int k0 = 0; k0 < p.num_selected; k0 += 32) {
    // Lane k: does entry k0 + k count?
    const int k = k0 + lane;
    int32_t j = -1;
    if (k < p.num_selected) {
      j = list[k];
      if (j < 0 || index_t(j) * p.select_size > t) j = -1;
      for (int i = 0; j >= 0 && i < k; ++i)
        if (list[i] == j) j = -1;
    }
    for (unsigned on = __ballot_sync(0xffffffffu, j >= 0); on; on &= on - 1) {
      const int src = __ffs(on) - 1;
      const index_t start = index_t(__shfl_sync(0xffffffffu, j, src)) * p.select_size;
      for (int i = 0; i < per_block && start + index_t(i) * kKeys <= t; ++i) f(base + (k0 + src) * per_block + i);
    }
  }
}

// Loads COLS / 32 consecutive values of lane `lane` from a row of T as floats.
template <int COLS, typename T>
__device__ __forceinline__ void load_lane_cols(const T* row, int lane, float (&v)[COLS / 32]) {
  static_assert(COLS == 64 || COLS == 128, "64 or 128 columns");
  const T* src = row + lane * (COLS / 32);
  if constexpr (COLS == 128) {
    const uint2 raw = *reinterpret_cast<const uint2*>(src);
    unpack2<T>(raw.x, v[0], v[1]);
    unpack2<T>(raw.y, v[2], v[3]);
  } else {
    unpack2<T>(*reinterpret_cast<const uint32_t*>(src), v[0], v[1]);
  }
}

template <int COLS, typename T>
__device__ __forceinline__ void store_lane_cols(T* row, int lane, const float (&v)[COLS / 32]) {
  T* dst = row + lane * (COLS / 32);
  if constexpr (COLS == 128)
    *reinterpret_cast<uint2*>(dst) = make_uint2(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]));
  else
    *reinterpret_cast<uint32_t*>(dst) = pack2<T>(v[0], v[1]);
}

// o and lse of each (row, query head) of the chunk from its partials, in slot order: one warp per
// row, DV / 32 columns per lane.
template <typename T, int DV>
__global__ void __launch_bounds__(kThreads) slc_merge_kernel(const SlcParams p, const SlcPartials part) {
  constexpr int kCols = DV / 32;
  const index_t w = index_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  index_t b, trow, t;
  int h;
  if (!locate_merge_row(p, part, w, b, trow, t, h)) return;
  float m = -INFINITY, sum = 0.f, acc[kCols] = {};
  for_each_partial(p, part, w, b, trow, t, h, [&](index_t idx) {
    const float ls = part.lse[idx];
    float v[kCols];
    load_lane_cols<DV>(static_cast<const T*>(part.o) + idx * DV, lane, v);
    if (ls == -INFINITY) return;
    const float m_new = fmaxf(m, ls);
    const float corr = expf(m - m_new), wgt = expf(ls - m_new);
    sum = sum * corr + wgt;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[c] = acc[c] * corr + wgt * v[c];
    m = m_new;
  });
  const float inv = softmax_inv(sum);  // a NaN partial lse makes sum NaN
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] *= inv;
  store_lane_cols<DV>(p.o.template ptr<T>(b, trow, h), lane, acc);
  if (lane == 0) *p.lse.template ptr<float>(b, trow, h) = softmax_lse(sum, m + logf(sum));
}

// dq of each (row, query head) of the chunk: the sum of its bf16 partials in slot order (0 when it
// chose nothing it can see).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) slc_dq_merge_kernel(const SlcParams p, const SlcPartials part) {
  constexpr int kCols = D / 32;
  const index_t w = index_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  index_t b, trow, t;
  int h;
  if (!locate_merge_row(p, part, w, b, trow, t, h)) return;
  float acc[kCols] = {};
  for_each_partial(p, part, w, b, trow, t, h, [&](index_t idx) {
    float v[kCols];
    load_lane_cols<D>(static_cast<const __nv_bfloat16*>(part.o) + idx * D, lane, v);
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[c] += v[c];
  });
  store_lane_cols<D>(p.dq.template ptr<T>(b, trow, h), lane, acc);
}

}  // namespace nsa::cuda
