// Kernels W and C of the decoding step (decode.h): the window and selected branches over the raw
// cache, one body (sparse_branch) for both.
//
// A thread block owns the rows of one (sequence, KV head, row block) and a share of its branch's
// key tiles. Tiles never cross a selection-block edge, so each lies within one page
// (page_size % select_size == 0): a tile is (first key, keys, page, row in the page), looked up
// into shared memory a few tiles before its copies start. The window's keys depend on the length
// alone, so kernel W runs beside the compressed scan (launched just before or after it); C waits
// for kernel B's choice (its head's queries, or all of B: plan.dep_wait), then runs over the union
// of the row block's chosen blocks, each block carrying the mask of the queries that chose it (a
// row sees its own query's blocks, keys up to its position).
#pragma once

#include <climits>

#include "counters.cuh"
#include "decode.h"
#include "tile_attention.cuh"

namespace nsa::cuda::decode {

// Shared-memory allowance for the kernel's own arrays in the choice of pipeline stages (the
// arrays themselves are sized at launch: sparse_arrays).
constexpr size_t kSparseExtra = 4096;

template <typename T, int D, int DV, int MT>
using SparseSmem = TileSmem<T, D, DV, MT, kSparseExtra>;

// The kernel's own arrays after SparseSmem's (byte offsets): the entries of the key tiles in
// flight (first key, keys, page, row in the page: 4 ints, a ring of kStages + 1 <= 4), then the
// union's query masks (uint64) and blocks, and the row block's lists of chosen blocks. Host and
// device: the launch sizes them.
struct SparseArrays {
  int off_tiles, off_masks, off_blocks, off_lists, bytes;
};

NSA_HOST_DEVICE SparseArrays sparse_arrays(const DecodeParams& p) {
  const int entries = block_queries(p) * p.num_selected;
  SparseArrays a;
  a.off_tiles = 0;
  a.off_masks = 4 * 16;
  a.off_blocks = a.off_masks + entries * 8;
  a.off_lists = a.off_blocks + entries * 4;
  a.bytes = a.off_lists + entries * 4;
  return a;
}

// Does the ascending list of chosen blocks (n entries, -1 padding at the end) hold j?
__device__ __forceinline__ bool list_has(const int* list, int n, int j) {
  int lo = 0, hi = n;  // the first entry >= j, -1 counting as past every block
  while (lo < hi) {
    const int mid = (lo + hi) >> 1, x = list[mid];
    if (x >= 0 && x < j) lo = mid + 1; else hi = mid;
  }
  return lo < n && list[lo] == j;
}

// Tile k's entry: keys [t0, t0 + keys) of sequence b (keys <= 0: none), their page and row of
// the first in it; none when the page lies outside the pool (kernel B flags the sequence).
__device__ __forceinline__ void set_tile(const DecodeParams& p, int b, int* tile, int t0, int keys) {
  int page = 0, row = 0;
  if (keys > 0) {
    // p.page_of and p.row_of in 32 bits (check() bounds capacity, hence page_size and t0, below
    // 2^31): a 64-bit division is a call of some 70 instructions, here on the tile loop's path.
    const unsigned ps = unsigned(p.page_size), t = unsigned(t0);
    const index_t pg = p.block_table ? index_t(p.block_table[b * p.block_table_stride + t / ps]) : index_t(b);
    if (p.block_table != nullptr && (pg < 0 || pg >= p.num_pages)) keys = 0;
    page = int(pg);
    row = int(t % ps);
  }
  tile[0] = t0;
  tile[1] = keys;
  tile[2] = page;
  tile[3] = row;
}

// One branch of one split: kWindow, the window (kernel W, partials at branch 1); else the selected
// branch (kernel C, branch 0), after waiting for kernel B's choice. Both wait for the kernel before
// them at their end.
template <typename T, int D, int DV, int MT, bool kWindow>
__device__ __forceinline__ void sparse_branch(const DecodeParams& p, const Workspace& ws) {
  using W = Warps<MT>;
  using Smem = SparseSmem<T, D, DV, MT>;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int warp_reps[4];
  const Smem sm(smem);
  const SparseArrays arr = sparse_arrays(p);
  uint64_t* masks = reinterpret_cast<uint64_t*>(sm.extra() + arr.off_masks);  // union: query masks
  int* blocks = reinterpret_cast<int*>(sm.extra() + arr.off_blocks);           // union: blocks
  int* lists = reinterpret_cast<int*>(sm.extra() + arr.off_lists);             // [queries][n]
  int* tiles = reinterpret_cast<int*>(sm.extra() + arr.off_tiles);             // [tiles][4]
  constexpr TraceKernel kTrace = kWindow ? kTraceWindow : kTraceSparse;
  constexpr int kBranch = kWindow ? 1 : 0;
  trace_event(p.plan, kTrace, kTraceStart);
  if (ws.after_reset) wait_prior_grid();  // W launched right after Z (decode.h)
  allow_next_grid();

  const int split = blockIdx.x, b = blockIdx.z;
  const int h = blockIdx.y / ws.row_blocks, rb = blockIdx.y % ws.row_blocks;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = p.num_heads / p.num_heads_k, S = p.num_queries, R = ws.rows;
  const int r0 = rb * kBlockRows, nrows = min(kBlockRows, R - r0);
  const int q_first = r0 / G, q_last = (r0 + nrows - 1) / G;
  const int splits = p.plan.slc_splits;
  const index_t bh = index_t(b) * p.num_heads_k + h;
  // The split's first row of branch br's partials (0 selected, 1 window).
  auto part = [&](int br) { return ((bh * splits + split) * 2 + br) * R + r0; };
  const int L = p.seqlens[b];
  auto count_block = [&] { count_done((kWindow ? ws.win_done : ws.slc_done) + bh); };  // (counters.cuh)
  if (!(L >= S && L <= p.capacity)) {  // kernel B flags the sequence; nothing is read
    write_empty<DV>(ws.sp_o + part(kBranch) * DV, ws.sp_ml + part(kBranch) * 2, nrows);
    wait_prior_grid();
    count_block();
    return;
  }

  WarpSoftmax<T, D, DV, MT> acc;
  // This thread's rows: position (-1 for padding rows: they see nothing) and query within the
  // block's queries.
  int pos[2], qbit[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = acc.row(i);
    pos[i] = r < nrows ? L - S + (r0 + r) / G : -1;
    qbit[i] = r < nrows ? (r0 + r) / G - q_first : 0;
  }
  const int pos_first = L - S + q_first, pos_last = L - S + q_last;
  const int l_sel = p.select_size, per_block = tiles_per_block(l_sel), w = p.window_size;
  const float scale_log2 = float(p.scale * M_LOG2E);
  load_query_rows<T, D, MT>(sm.q(), p, b, h, G, r0, nrows);

  // Runs this split's share [first, first + count) of the branch's `total` key tiles: tile i spans
  // keys span(i, t0, t1); row `row` (0, 1: this thread's) takes part in tile i iff on(row, i), and
  // then sees key t iff sees(row, t). Tile k's entry lives in slot k % kRing of `tiles`: the
  // first kStages are looked up before the loop, tile k + kStages's by one thread during tile k
  // (its page load overlaps the products; its copies start at the next step, after a barrier).
  constexpr int kRing = Smem::kStages + 1;
  static_assert(kRing <= 4, "sparse_arrays keeps 4 tile entries");
  auto branch = [&](int total, const View& kv, const View& vv, auto&& span, auto&& on, auto&& sees) {
    const int per = (total + splits - 1) / splits, first = split * per;
    const int count = max(0, min(per, total - first));
    auto lookup = [&](int k, int* entry) {
      int t0, t1;
      span(first + k, t0, t1);
      set_tile(p, b, entry, t0, t1 - t0);
    };
    for (int k = tid; k < min(count, Smem::kStages); k += kThreads) lookup(k, tiles + 4 * k);
    __syncthreads();
    acc.reset();
    run_tiles<Smem::kStages>(
        count,
        [&](int k, int stage) {
          const int* tl = tiles + 4 * (k % kRing);
          copy_tile<D>(sm.k(stage), kv.ptr<const T>(tl[2], tl[3], h), kv.row_stride, tl[1]);
          copy_tile<DV>(sm.v(stage), vv.ptr<const T>(tl[2], tl[3], h), vv.row_stride, tl[1]);
        },
        [&](int k, int stage) {
          if (k == 0) trace_event(p.plan, kTrace, kTraceStep1);
          const int* tl = tiles + 4 * (k % kRing);
          const int t0 = tl[0], keys = tl[1], ahead = k + Smem::kStages;
          int next[4];
          if (tid == 0 && ahead < count) lookup(ahead, next);
          const bool on0 = on(0, first + k), on1 = on(1, first + k);
          float pr[W::kKeys / 8][4];
          acc.tile(sm.q(), sm.k(stage), sm.v(stage), sm.red(), scale_log2, false,
                   [&](int row, int key) { return key < keys && (row ? on1 : on0) && sees(row, t0 + key); }, pr);
          if (tid == 0 && ahead < count) {
            int* slot = tiles + 4 * (ahead % kRing);
#pragma unroll
            for (int i = 0; i < 4; ++i) slot[i] = next[i];
          }
        });
    acc.finish(sm.red(), sm.reduce(), ws.sp_o + part(kBranch) * DV, ws.sp_ml + part(kBranch) * 2, nrows);
  };

  if constexpr (kWindow) {
    // Keys [pos_first - w + 1, pos_last], cut at selection-block edges and every 64 keys.
    const int lo = max(0, pos_first - w + 1), blk0 = lo / l_sel;
    branch((pos_last / l_sel - blk0 + 1) * per_block, p.k_swa, p.v_swa,
           [&](int i, int& t0, int& t1) {
             const int start = (blk0 + i / per_block) * l_sel, piece = i % per_block;
             t0 = max(lo, start + piece * kTileKeys);
             t1 = min(pos_last + 1, start + min(l_sel, (piece + 1) * kTileKeys));
           },
           [](int, int) { return true; }, [&](int row, int t) { return t <= pos[row] && t > pos[row] - w; });
    // Launched after B, W counts at once (Z completed before B's blocks let it start, decode.h):
    // D's merge of the window need not wait for the selection. Else it waits first, for the
    // scan when launched after it, and for Z before the count.
    const bool count_first = p.plan.window_order == WindowOrder::kAfterSelect;
    if (count_first) {
      trace_event(p.plan, kTrace, kTraceEnd);
      count_block();
    }
    wait_prior_grid();
    trace_event(p.plan, kTrace, kTraceWaited);
    if (!count_first) {
      trace_event(p.plan, kTrace, kTraceEnd);
      count_block();
    }
    return;
  }

  // Kernel B's block_indices
  wait_inputs(p.plan, ws.sel_done + bh, unsigned(S));
  trace_event(p.plan, kTrace, kTraceWaited);
  // The union of the chosen blocks of queries q_first .. q_last, in the order of their first
  // appearance (query-major), with the mask of the queries that chose each.
  const int nq = q_last - q_first + 1, n = p.num_selected, entries = nq * n;
  for (int e = tid; e < entries; e += kThreads)
    lists[e] = __ldcg(p.block_indices.ptr<const int32_t>(b, q_first + e / n, h) + e % n);
  __syncthreads();
  int nu = 0;
  for (int e0 = 0; e0 < entries; e0 += kThreads) {
    const int e = e0 + tid;
    int j = -1;
    uint64_t mask = 0;
    if (e < entries && lists[e] >= 0) {
      j = lists[e];
      const int q = e / n;
      bool first = true;
      for (int q2 = 0; q2 < q && first; ++q2) first = !list_has(lists + q2 * n, n, j);
      if (first) {
        mask = 1ull << q;
        for (int q2 = q + 1; q2 < nq; ++q2)
          if (list_has(lists + q2 * n, n, j)) mask |= 1ull << q2;
      }
    }
    const unsigned reps = __ballot_sync(0xffffffffu, mask != 0);
    if (lane == 0) warp_reps[warp] = __popc(reps);
    __syncthreads();
    int at = nu;
    for (int w2 = 0; w2 < kThreads / 32; ++w2) {
      if (w2 < warp) at += warp_reps[w2];
      nu += warp_reps[w2];
    }
    if (mask != 0) {
      const int u = at + __popc(reps & ((1u << lane) - 1));
      blocks[u] = j;
      masks[u] = mask;
    }
    __syncthreads();  // warp_reps is rewritten next round
  }

  trace_event(p.plan, kTrace, kTraceStep2);
  // Selected: every tile of the union's blocks; a row sees keys up to its position of the blocks
  // its query chose.
  branch(nu * per_block, p.k, p.v,
         [&](int i, int& t0, int& t1) {
           const int start = blocks[i / per_block] * l_sel, piece = i % per_block;
           t0 = start + piece * kTileKeys;
           t1 = min(pos_last + 1, start + min(l_sel, (piece + 1) * kTileKeys));
         },
         [&](int row, int i) { return ((masks[i / per_block] >> qbit[row]) & 1ull) != 0; },
         [&](int row, int t) { return t <= pos[row]; });
  trace_event(p.plan, kTrace, kTraceEnd);
  count_block();  // (after Z's zeroing: the wait above acquired B's count, or all of B)
  wait_prior_grid();
}

template <typename T, int D, int DV, int MT>
__global__ void __launch_bounds__(kThreads, 2) decode_window_kernel(const DecodeParams p, const Workspace ws) {
  sparse_branch<T, D, DV, MT, true>(p, ws);
}

template <typename T, int D, int DV, int MT>
__global__ void __launch_bounds__(kThreads, 2) decode_sparse_kernel(const DecodeParams p, const Workspace ws) {
  sparse_branch<T, D, DV, MT, false>(p, ws);
}

}  // namespace nsa::cuda::decode
