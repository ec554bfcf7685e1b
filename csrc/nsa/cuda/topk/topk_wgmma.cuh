// The top-n block selection on Hopper's warpgroup products (wgmma, sm_90a): select_topk_kernel's
// pass over the compressed keys, its scoring and its merges, with the scores' product done by the
// tensor cores from shared memory once per 128 query rows instead of by mma.sync per warp (where
// each warp re-read its K fragments and the exps, group sums and scoring waited on them; the
// mma.sync kernel was 20% of its FLOP floor at 64k, benchmarks/NOTES.md).
//
// Thread block: one warpgroup (4 warps) and P = 128 / G whole tokens of one sequence and KV head g,
// G = 16 or 32 (where it is the default on sm_90, nsa/plan.cpp; below G = 16 it lost to the
// mma.sync kernel), their (token, head) query rows token-major in one 128-row tile (Layout::kWgmma). Per key tile of 64 compressed rows
// (double-buffered cp.async):
//   1. S^T = K Q^T (wgmma m64n128k16, both operands K-major in shared memory): warp w holds key
//      rows 16w .. 16w + 15 against all 128 query columns in the C-fragment layout of mma.sync,
//      so masked_probs and group_sum_pow2 of the mma.sync kernel apply as they are; every warp
//      writes its 16 rows of each token's w_s.
//   2. After a barrier, warp w scores, carries and merges its own tokens w, w + 4, ... (no more
//      barriers: a warp's tokens are its alone until the next tile's group sums, which the
//      barrier at the top of the tile orders after them).
// The tail (cut block, zero-score and forced blocks) and the output are the mma.sync kernel's.
// The heads of a token are summed in the same order as there (fixed by G alone); S itself comes
// from other instructions, so a score can differ in its last bits and a near-tie can go the
// other way.
#pragma once

#include "../common/wgmma.cuh"
#include "topk_kernel.cuh"

namespace nsa::cuda::topk {

template <typename T, int D, int kGroup>
__global__ void __launch_bounds__(kWgThreads) select_topk_wgmma_kernel(const TopkParams p, const Shape s) {
  static_assert(D == 64 || D == 128, "D: 64 or 128");
  static_assert(kGroup == 16 || kGroup == 32, "G: 16 or 32");
  constexpr int kWarps = kWgThreads / 32;
  constexpr int P = kWgRows / kGroup;  // tokens per thread block (= s.tokens)
  extern __shared__ __align__(1024) unsigned char smem_tw[];  // (its own name: the other kernel declares 128)
  wgmma_check_alignment(smem_tw);
  T* q_s = reinterpret_cast<T*>(smem_tw);                                // [D / 64][128][64] (Layout::kWgmma)
  T* k_s = reinterpret_cast<T*>(smem_tw + s.off_k);                      // [2] x [D / 64][64][64] (1024-aligned)
  float* lse_s = reinterpret_cast<float*>(smem_tw + s.off_lse);          // [128] lse * log2e
  int* nv_s = reinterpret_cast<int*>(smem_tw + s.off_nv);                // [128] rows visible
  const TokenState ts = token_state(smem_tw, s);
  float* w_s = ts.w;

  SeqTile st;
  // Heavy (late) tiles first: the light ones fill the tail of the grid.
  if (!locate_tile(p.seqs, index_t(gridDim.x) - 1 - blockIdx.x, blockIdx.z, 1, P, false, st)) return;
  const SeqRange seq = st.seq;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = blockIdx.y, n = p.num_selected;
  const int cpr = s.cpr, cpb = s.cpb, ws = s.ws, cap = s.cap;
  const int t0 = int(st.tile) * P;
  const int ntok = min(P, int(seq.len) - t0);
  const int nvis_max = visible_rows(t0 + ntok - 1, p.block_size, p.block_stride, seq.cmp_len);
  // Tiles until every nonzero cell (k < nvis + cpr - 1) is complete.
  const int ntiles = nvis_max > 0 ? (nvis_max + cpr - 1 + kTileRows - 1) / kTileRows : 0;

  // Q: the tokens' rows; rows past the last token are zeros.
  if (ntiles > 0)
    load_pairs_async<kWgRows, D, kWgThreads, Layout::kWgmma>(
        q_s, p.q.ptr<const T>(seq.batch, seq.start + t0, g * kGroup), p.q.row_stride, p.q.head_stride, 0, kGroup,
        ntok * kGroup, [](int i) { return index_t(i); });
  const StridedTileStream<T, kTileRows, D, kWgThreads, Layout::kWgmma> k_stream(
      p.k.ptr<const T>(seq.batch, seq.cmp_start, g), p.k.row_stride);
  auto load_keys = [&](int kt) {
    const int i0 = kt * kTileRows;
    k_stream.copy(k_s + (kt & 1) * kTileRows * D, i0, nvis_max - i0);
  };
  if (ntiles > 0) load_keys(0);
  cp_async_commit();

  {  // one query row per thread
    const int tok = tid / kGroup, h = tid % kGroup;
    load_row_stats(p, seq, t0 + tok, g * kGroup + h, tok < ntok, lse_s[tid], nv_s[tid]);
  }
  init_tokens<kWgThreads>(ts, P, s);
  __syncthreads();
  // The fewest key rows any real column sees: key rows below it need no visibility test (padding
  // columns feed no score, so they do not count).
  int nv_min = INT_MAX;
#pragma unroll
  for (int k = 0; k < kWgRows / 32; ++k) {
    const int e = k * 32 + lane;
    if (e < ntok * kGroup) nv_min = min(nv_min, nv_s[e]);
  }
  nv_min = __reduce_min_sync(0xffffffffu, nv_min);

  // f(tok, i) for this warp's tokens and i < per.
  auto for_own_items = [&](int per, auto&& f) {
    for (int tok = warp; tok < ntok; tok += kWarps)
      for (int i = lane; i < per; i += 32) f(tok, i);
  };
  // The paper's shape (cpr = 2, cpb = 4; chosen once per block): each tile completes 16 whole
  // blocks per token, scored with compile-time weights by two tokens per 32 lanes (the generic
  // loop leaves 16 lanes idle), lane's token in round q: warp + kWarps (2 q + lane / 16) (past the
  // last token: none; G = 32 has one per warp). Its own block, a division, once per block.
  const bool fast = cpr == 2 && cpb == 4;
  constexpr int kRounds = (P / kWarps + 1) / 2;
  int own_b[kRounds];
#pragma unroll
  for (int q = 0; q < kRounds; ++q) own_b[q] = (t0 + warp + kWarps * (2 * q + (lane >> 4))) / p.select_size;

  for (int kt = 0; kt < ntiles; ++kt) {
    const int i0 = kt * kTileRows;
    // Tile kt landed, and every warp is done with tile kt - 1 (its buffer, which tile kt + 1
    // reuses, and its tokens' w_s rows, which the group sums below rewrite).
    cp_async_wait<0>();
    fence_proxy_async();  // the tensor cores read Q and tile kt next
    __syncthreads();
    if ((kt + 1) * kTileRows < nvis_max) load_keys(kt + 1);
    cp_async_commit();

    // 1. Group-summed probabilities of the tile's rows, 16 per warp.
    if (i0 < nvis_max) {
      const T* kt_s = k_s + (kt & 1) * kTileRows * D;
      float acc[kWgRows / 8][4];
#pragma unroll
      for (int nt = 0; nt < kWgRows / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
      const uint64_t k_desc = kmajor_desc<kTileRows>(kt_s, 0), q_desc = kmajor_desc<kWgRows>(q_s, 0);
      wgmma_run([&] {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
          wgmma_ss<kWgRows, T>(acc, k_desc + kmajor_step<kTileRows, T>(kk), q_desc + kmajor_step<kWgRows, T>(kk),
                               kk > 0);
      }, acc);
      const int col0 = (lane & 3) * 2;  // fragment columns: query rows 8 nt + col0, + 1
      tile_probs<kWgRows / 8>(acc, lse_s, nv_s, col0, i0 + warp * 16, nv_min, s.scale_log2);
      group_sum_pow2<kWgRows / 8, kGroup>(acc, w_s, ws, cpr - 1 + warp * 16, false);
    } else {  // past every visible row: the tile only completes cells from the carried rows
      for (int i = tid; i < P * kTileRows; i += kWgThreads) w_s[(i / kTileRows) * ws + cpr - 1 + i % kTileRows] = 0.f;
    }
    __syncthreads();  // every warp's rows of every token's w_s

    // 2. Blocks touching cells [i0, i0 + 64): score, keep the cut one's part, filter by theta.
    if (fast) {
#pragma unroll
      for (int q = 0; q < kRounds; ++q) {
        const int tok = warp + kWarps * (2 * q + (lane >> 4));
        if (tok < ntok) score_block<2, 4>(p, s, ts, P, kt, tok, lane & 15, own_b[q]);
      }
    } else {
      for_own_items(blocks_of_tile(kt, cpb),
                    [&](int tok, int jj) { score_block(p, s, ts, P, kt, tok, jj, (t0 + tok) / p.select_size); });
    }
    __syncwarp();

    // 3. Carry the last cpr - 1 rows (in rounds of 64 when they overlap), then merge the tokens
    // whose slots could not take another tile's candidates.
    if (fast) {  // one row: a lane per token
      const int tok = warp + kWarps * lane;
      if (tok < ntok) w_s[tok * ws] = w_s[tok * ws + kTileRows];
    } else {
      carry_rows(ts, s, for_own_items, [] { __syncwarp(); });
    }
    const int last = kt + 1 == ntiles;
    for (int tok = warp; tok < ntok; tok += kWarps) merge_if_due(ts, n, cap, last ? 0 : s.merge_at, tok);
  }
  __syncthreads();

  finish_tokens<kWgThreads>(p, s, ts, P, ntiles, t0, ntok, p.indices.ptr<int32_t>(seq.batch, seq.start + t0, g),
                            p.indices.row_stride);
}

}  // namespace nsa::cuda::topk
