// The cluster step of the decoding step (plan.step = cluster; decode.h): for few sequences, the
// scan, the selection and the selected branch of a (sequence, KV head) in one cluster of C =
// cmp_splits thread blocks, so that the selection's hand-offs go through cluster barriers and
// distributed shared memory rather than through L2 counters and a second and third kernel.
//
// Block c of the cluster scans split c of the compressed tokens with its keys first (scan_split,
// a ring of cluster_ring slots). Once its keys are out (its tile maxima, slots and (m, l) written)
// it meets the others at a cluster barrier; then, as kernel B's split c would, it merges the C
// splits' (m, l) into the rows' lse, scores its share of the candidate blocks and keeps their n
// best (QueryScores); the blocks publish their lists in shared memory, meet again, and each merges
// all C lists into the query's n blocks, while its first value tiles are on their way. Block 0
// writes block_indices and the sequence's validity and counts the query in sel_done. After its
// value tiles (the split's partial O written and counted in scan_done) each block attends split c
// of the chosen blocks' tiles (sparse_branch's selected path) and counts itself in slc_done. The
// window kernel W (launched after the kernel, or before it: plan.window_order) and the merge D
// run as in the chain, D reading the same workspace.
//
// S = 1 and G <= 16 (one row block of one m-tile; the plan refuses other shapes), C <= 16.
#pragma once

#include "cmp_scan.cuh"
#include "select.cuh"
#include "sparse.cuh"

namespace nsa::cuda::decode {

// Cluster barrier, arrive and wait halves (every thread of every block of the cluster), with
// release and acquire at cluster scope: shared and global writes before the arrival are seen by
// the cluster's threads past their wait.
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}

// The shared::cluster address of `local` (this block's shared memory) in the block of rank `rank`.
__device__ __forceinline__ uint32_t cluster_address(const void* local, unsigned rank) {
  uint32_t remote = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n"
               : "=r"(remote)
               : "r"(uint32_t(__cvta_generic_to_shared(local))), "r"(rank));
#endif
  return remote;
}
__device__ __forceinline__ uint64_t load_cluster_u64(uint32_t address) {
  uint64_t x = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("ld.shared::cluster.u64 %0, [%1];\n" : "=l"(x) : "r"(address) : "memory");
#endif
  return x;
}

constexpr int kClusterWarps = kThreads / 32;

// The selection's shared memory that the scan leaves alone (static in the kernel): the ranked
// keys (keep_best's), the block's published list, the query's merged blocks and the bad-page flag.
struct ClusterSelect {
  uint64_t* keys;  // [kMaxSelected + kSelectRound]
  uint64_t* best;  // [kMaxSelected]
  uint64_t* pub;   // [kMaxSelected] this block's n best, 0-padded: what the others read
  int* chosen;     // [kMaxSelected] the query's blocks, ascending, -1 padded
  uint64_t* bad;   // 1 where this block's share of the pages has one outside the pool
  float* dyn;      // dynamic: lse [G], factors [round tiles][G], sums [round tiles][NS]
};

// The selection of the cluster's query, by every thread of every block of the cluster, once the
// block's keys are out (or at once for a split without tiles). Leaves the query's blocks in
// sel.chosen; block 0 writes them to block_indices with the sequence's validity and counts them
// in sel_done. Ends with the arrival of a cluster barrier whose wait comes at the kernel's end
// (no block leaves while another may still read its list).
__device__ __forceinline__ void cluster_select(const DecodeParams& p, const Workspace& ws, const ClusterSelect& sel) {
  const int c = blockIdx.x, C = p.plan.cmp_splits, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int G = p.num_heads / p.num_heads_k, R = ws.rows, n = p.num_selected;
  const index_t bh = index_t(b) * p.num_heads_k + h;
  trace_event(p.plan, kTraceSelect, kTraceStart);
  // The sequence, and this block's share of its pages (inputs only, before the meeting).
  const int L = p.seqlens[b];
  const bool ok = L >= 1 && L <= p.capacity;
  const bool bad_pages = ok && bad_pages_in_share<kThreads>(p, b, L, c, C);
  cluster_sync();  // every split's tile maxima, slots and (m, l) written
  trace_event(p.plan, kTraceSelect, kTraceWaited);

  int kept = 0;
  if (ok) {
    const int pos = L - 1, bpos = pos / p.select_size, cand = bpos + 1;
    const int nts = int((num_cmp_tokens(pos + 1, p.block_size, p.block_stride) + kTileKeys - 1) / kTileKeys);
    const int per = (cand + C - 1) / C, j0 = min(cand, c * per), j1 = min(cand, j0 + per);
    float* lse_s = sel.dyn;
    const QueryScores<kThreads> qs{ws.tile_m + bh * ws.tiles * R, ws.tile_u + bh * ws.tiles * ws.slots * R, lse_s,
                                   lse_s + G, lse_s + G + ws.sel_tiles * G, R, G, ws.cpr, ws.cpb, ws.slots, nts,
                                   bpos, ws.sel_round, j0, j1};
    float mt_ahead[QueryScores<kThreads>::kMtAhead];
    qs.load_ahead(mt_ahead);
    query_lse<kClusterWarps>(ws.cmp_ml + bh * C * R * 2, C, R, G, lse_s);
    __syncthreads();
    trace_event(p.plan, kTraceSelect, kTraceStep1);
    kept = qs.rank(sel.keys, sel.best, n, p.num_initial, p.num_local, mt_ahead);
  }
  // Publish: the n best (0 after them), and the pages' flag.
  if (tid < n) sel.pub[tid] = tid < kept ? sel.keys[tid] : 0;
  if (tid == 0) *sel.bad = bad_pages ? 1 : 0;
  trace_event(p.plan, kTraceSelect, kTraceStep2);
  cluster_sync();  // every list published
  trace_event(p.plan, kTraceSelect, kTraceMid);

  // Every block merges the C lists (C n keys, in rounds of kSelectRound beside the best so far).
  bool bad = false;
  for (int r = tid; r < C; r += kThreads) bad = bad || load_cluster_u64(cluster_address(sel.bad, r)) != 0;
  bad = __syncthreads_or(bad) || !ok;
  kept = 0;
  if (!bad) {
    const int all = C * n;
    for (int r0 = 0; r0 < all; r0 += kSelectRound) {
      const int m = min(kSelectRound, all - r0);
      __syncthreads();  // the previous round's keys are read before they are overwritten
      for (int i = tid; i < m; i += kThreads) {
        const int e = r0 + i;
        sel.keys[kept + i] = load_cluster_u64(cluster_address(sel.pub + e % n, unsigned(e / n)));
      }
      __syncthreads();
      kept = keep_best<kThreads>(sel.keys, sel.best, kept, m, n);
    }
  }
  cluster_arrive();  // this block has read every list (the wait: at the kernel's end)
  if (bad) {
    if (tid < n) sel.chosen[tid] = -1;
  } else if (tid < 32) {
    topk::write_token(sel.keys, kept, n, sel.chosen);
  }
  __syncthreads();
  if (c == 0) {
    int32_t* out = p.block_indices.ptr<int32_t>(b, 0, h);
    if (tid < n) out[tid] = sel.chosen[tid];
    if (tid == 0) ws.bad[bh] = bad ? 1 : 0;  // (S = 1: query (b, 0, h))
    wait_prior_grid();  // Z before the count (a no-op past the scan's wait where Z came just before)
    count_done(ws.sel_done + bh);
  }
  trace_event(p.plan, kTraceSelect, kTraceEnd);
}

// Dynamic shared memory of the cluster step: the scan's (its keys first, cluster_ring slots) then
// the selection's arrays, or the selected branch's layout (which overlays both once they are done),
// whichever is larger.
template <typename T, int D, int DV>
size_t cluster_smem(const DecodeParams& p, const Workspace& ws) {
  const size_t scan = cluster_scan_bytes(D, DV, ws.split_tiles);
  const size_t select = select_smem_bytes(group_size(p), ws.sel_tiles, ws.slots);
  const size_t sparse = SparseSmem<T, D, DV, 1>::kOffExtra + size_t(sparse_arrays(p).bytes);
  return scan + select > sparse ? scan + select : sparse;
}

template <typename T, int D, int DV>
__global__ void __launch_bounds__(kThreads, 1) decode_cluster_kernel(const DecodeParams p, const Workspace ws) {
  extern __shared__ __align__(128) unsigned char smem[];
  // (whole chunks of 32 keys, 16-byte aligned: keep_best reads them so)
  __shared__ __align__(16) uint64_t keys[kMaxSelected + kSelectRound];
  __shared__ __align__(16) uint64_t best[kMaxSelected];
  __shared__ __align__(16) uint64_t pub[kMaxSelected];
  __shared__ int chosen[kMaxSelected];
  __shared__ uint64_t bad;
  constexpr int kRing = cluster_ring(D, DV);
  const ClusterSelect sel{keys, best, pub, chosen, &bad,
                          reinterpret_cast<float*>(smem + cluster_scan_bytes(D, DV, ws.split_tiles))};
  trace_event(p.plan, kTraceScan, kTraceStart);
  // Right after Z (W after it), scan_split waits for Z and lets W start once its first tiles are
  // issued; after W (launched first), the next kernel (D) may start at once, and each count below
  // comes after a wait for W, hence for Z.
  if (!ws.after_reset) allow_next_grid();
  const index_t bh = index_t(blockIdx.z) * p.num_heads_k + blockIdx.y;
  // The scan; the selection once its keys are out, while its first value tiles land.
  const bool had_tiles = scan_split<T, D, DV, 1, true, kRing>(p, ws, smem, [&] {
    trace_event(p.plan, kTraceScan, kTraceStep2);
    cluster_select(p, ws, sel);
  });
  if (!had_tiles) {  // a split without key tiles: scan_split's waits, then its share of the selection
    if (ws.after_reset) {
      wait_prior_grid();
      allow_next_grid();
    }
    cluster_select(p, ws, sel);
  }
  wait_prior_grid();
  trace_event(p.plan, kTraceScan, kTraceEnd);
  count_done(ws.scan_done + bh);
  // The selected branch over split c of the chosen blocks' tiles (its layout over the scan's).
  sparse_branch<T, D, DV, 1, false, true>(p, ws, chosen);
  cluster_wait();
}

}  // namespace nsa::cuda::decode
