// Parameters of every NSA kernel, CPU and CUDA: one struct per op family.
//
// This header, and everything under csrc/nsa, is torch-free: kernels see raw pointers, int64
// element strides and sizes, never a torch type. The binding layer (csrc/torch) validates the
// tensors, allocates the outputs and fills these structs.
//
// Conventions
// - Token tensors use flash-attn's layout [B, T, heads, dim]; the last dim is contiguous, every
//   other stride is an element stride. Strides and offsets are int64: at T = 128k, HQ = 128,
//   D = 256 an offset passes 2^31.
// - Sequences are either a fixed-length batch (cu_seqlens == nullptr: B sequences of T tokens,
//   sequence b in batch row b) or packed varlen (B == 1: sequence s owns tokens
//   [cu_seqlens[s], cu_seqlens[s+1]) of the T axis and compressed rows
//   [cu_seqlens_cmp[s], cu_seqlens_cmp[s+1]) of the Nc axis). Positions are per sequence.
// - Query head h (of HQ) reads key/value head h / G, where G = HQ / H is the group size.
// - Accumulation type: float, or double when dtype == kFloat64. lse and dlse use it too.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NSA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NSA_HOST_DEVICE inline
#endif

namespace nsa {

using index_t = int64_t;

// Element type of q, k, v, o and of their gradients.
enum class Dtype : int32_t { kFloat32, kFloat64, kBFloat16, kFloat16 };

// Number of compressed tokens of a sequence of `len` tokens: window i covers keys
// [i*stride, i*stride + block - 1].
NSA_HOST_DEVICE index_t num_cmp_tokens(index_t len, index_t block_size, index_t block_stride) {
  return len >= block_size ? (len - block_size) / block_stride + 1 : 0;
}

// Number of selection blocks of a sequence of `len` tokens (the last one may be partial).
NSA_HOST_DEVICE index_t num_select_blocks(index_t len, index_t select_size) {
  return (len + select_size - 1) / select_size;
}

// A strided view of a [B, rows, heads, dim] tensor with contiguous dim, or of a [B, rows, heads]
// tensor (then dim is absent and head_stride is 1). Strides are in elements.
struct View {
  void* data = nullptr;
  index_t batch_stride = 0;
  index_t row_stride = 0;
  index_t head_stride = 0;

  NSA_HOST_DEVICE index_t offset(index_t b, index_t row, index_t head) const {
    return b * batch_stride + row * row_stride + head * head_stride;
  }
  template <typename T>
  NSA_HOST_DEVICE T* ptr(index_t b, index_t row, index_t head) const {
    return static_cast<T*>(data) + offset(b, row, head);
  }
};

// Where one sequence lives.
struct SeqRange {
  index_t batch;      // row of the B axis
  index_t start;      // first token on the T axis
  index_t len;        // tokens
  index_t cmp_start;  // first compressed row on the Nc axis
  index_t cmp_len;    // compressed rows (Nc(len) for the compressed branch, else 0)
};

// The batch: fixed-length or packed varlen (see the conventions above).
struct Seqs {
  int batch = 0;                            // B (1 when packed)
  index_t seqlen = 0;                       // T: tokens per batch row
  index_t cmp_seqlen = 0;                   // Nc: compressed rows per batch row (0 when unused)
  int num_seqs = 0;                         // B, or N when packed
  const int32_t* cu_seqlens = nullptr;      // [N + 1] token offsets; nullptr for a fixed-length batch
  const int32_t* cu_seqlens_cmp = nullptr;  // [N + 1] compressed-row offsets (exclusive prefix sum
                                            // of Nc(len_s)); nullptr for a fixed-length batch

  NSA_HOST_DEVICE SeqRange range(int s) const {
    if (cu_seqlens == nullptr) return SeqRange{s, 0, seqlen, 0, cmp_seqlen};
    index_t cmp0 = cu_seqlens_cmp ? cu_seqlens_cmp[s] : 0;
    index_t cmp1 = cu_seqlens_cmp ? cu_seqlens_cmp[s + 1] : 0;
    return SeqRange{0, cu_seqlens[s], cu_seqlens[s + 1] - cu_seqlens[s], cmp0, cmp1 - cmp0};
  }
};

// Which CUDA kernel an op runs, where there is a choice: chosen on the host by nsa/plan.h from
// the shape, the device facts and the overrides of nsa_torch._debug, and carried in the params so
// that the workspace sizes and the launches read one decision. The CPU kernels ignore it.

// What the plan knows of the GPU (the binding fills it from cached device properties).
struct DeviceFacts {
  int arch = 0;            // compute capability as 10 * major + minor (90: sm_90)
  int num_sms = 0;         // streaming multiprocessors
  int smem_per_block = 0;  // bytes of shared memory a thread block may opt in to
  int smem_per_sm = 0;     // bytes of shared memory per SM
};

// Forward of the compressed and window branches: warpgroup products (fwd_wgmma.cuh), mma.sync
// with 32 rows per warp (fwd_wide.cuh) or 16 (fwd.cuh, the one for D or Dv > 128).
enum class FwdKernel : int32_t { kWgmma, kWide, kMma };
// dQ and dK/dV kernels (bwd.cuh): on warpgroup products or on mma.sync.
enum class BwdKernel : int32_t { kWgmma, kMma };
// The selected branch's forward or dQ: one warp per 16 rows walking its own tokens' blocks
// (slc_warp.cuh), the shared kernels over the union of a 64-row tile's blocks (fwd.cuh, bwd.cuh),
// or by key blocks (slc_blocks.cuh).
enum class SlcKernel : int32_t { kWarp, kUnion, kBlocks };
// Block selection: select_topk_wgmma_kernel or select_topk_kernel (mma.sync).
enum class SelectKernel : int32_t { kWgmma, kMma };
// Where decode_attention launches its window kernel W: after the compressed scan A (W fills the
// SMs A leaves), before it, or after the selection B (B right behind A, W then C as A leaves).
enum class WindowOrder : int32_t { kAfterScan, kBeforeScan, kAfterSelect };
// How decode_attention's compressed scan A streams a split: each key tile with its value tile, or
// every key tile of the split first (its probabilities kept in shared memory), then the value
// tiles, so that the selection's inputs are out after the keys alone.
enum class ScanOrder : int32_t { kTogether, kKeysFirst };
// What decode_attention's selection (B), selected branch (C) and merge (D) wait for before
// reading their inputs: the whole previous kernel (griddepcontrol.wait), or their own (sequence,
// KV head)'s producers, counted in the workspace (counters.cuh).
enum class DepWait : int32_t { kGrid, kHead };

// The plan of one attention op call (forward or backward of one branch).
struct AttnPlan {
  DeviceFacts device;
  FwdKernel fwd = FwdKernel::kMma;        // forward of the compressed and window branches
  SlcKernel slc_fwd = SlcKernel::kUnion;  // forward of the selected branch
  BwdKernel bwd = BwdKernel::kMma;        // dK/dV, and dQ where it runs on the shared kernels
  SlcKernel slc_dq = SlcKernel::kUnion;   // dQ of the selected branch
  index_t split_tokens = 0;               // tokens per dK/dV split range (0: no split)
  int split = 1;                          // dK/dV split ranges of the long key tiles (1: none)
  index_t slc_chunk_rows = 0;             // rows (b, t) per chunk of the selected branch by
                                          // blocks (0 when it does not run by blocks)
};

// The plan of one select_blocks call.
struct TopkPlan {
  DeviceFacts device;
  SelectKernel select = SelectKernel::kMma;
};

// Fields shared by the three attention branches (compressed, selected, sliding window).
// In the forward, o and lse are outputs; in the backward they are inputs and dq, dk, dv outputs.
struct AttnParams {
  Dtype dtype = Dtype::kFloat32;
  View q;     // [B, T, HQ, D]
  View k;     // [B, Tk, H, D]   Tk = T, or Nc for the compressed branch
  View v;     // [B, Tk, H, Dv]
  View o;     // [B, T, HQ, Dv]
  View lse;   // [B, T, HQ]      accumulation type; log sum exp(scale * q.k) over the visible
              //                 keys, -inf when none is visible (then o = 0)
  // Backward only (data == nullptr in the forward).
  View dout;  // [B, T, HQ, Dv]  gradient of o
  View dq;    // [B, T, HQ, D]
  View dk;    // [B, Tk, H, D]
  View dv;    // [B, Tk, H, Dv]

  Seqs seqs;
  int num_heads = 0;    // HQ
  int num_heads_k = 0;  // H (divides HQ)
  int head_dim = 0;     // D
  int head_dim_v = 0;   // Dv
  double scale = 1.0;   // softmax scale applied to q.k
  AttnPlan plan;        // CUDA only
};

// Compressed branch: query t sees compressed token i iff i*block_stride + block_size - 1 <= t.
// k, v are the compressed keys/values [B, Nc, H, D|Dv]; seqs.cmp_seqlen / cu_seqlens_cmp are set.
struct CmpParams : AttnParams {
  View dlse;             // [B, T, HQ] accumulation type: gradient of lse (backward, optional:
                         // data == nullptr means zero)
  int block_size = 32;   // l
  int block_stride = 16; // d (divides l)
};

// Top-n block selection from the compressed attention probabilities (not differentiable).
struct TopkParams {
  Dtype dtype = Dtype::kFloat32;
  View q;        // [B, T, HQ, D]
  View k;        // [B, Nc, H, D]   compressed keys
  View lse;      // [B, T, HQ]      accumulation type: lse of the compressed branch
  View indices;  // [B, T, H, n]    int32 output: selected blocks ascending, then -1 padding

  Seqs seqs;
  int num_heads = 0;      // HQ
  int num_heads_k = 0;    // H
  int head_dim = 0;       // D
  double scale = 1.0;
  int block_size = 32;    // l
  int block_stride = 16;  // d (divides l and select_size)
  int select_size = 64;   // l'
  int num_selected = 16;  // n >= num_initial + num_local
  int num_initial = 1;    // blocks 0 .. num_initial-1 are always selected (when causal)
  int num_local = 2;      // the query's own block and the num_local-1 before it likewise
  TopkPlan plan;          // CUDA only
};

// Selected branch: query t, head h attends keys s <= t whose block s / select_size is listed in
// block_indices[t, h / G]. Blocks are sequence-relative; -1 marks an empty slot.
struct SlcParams : AttnParams {
  View block_indices;     // [B, T, H, n] int32
  int num_selected = 16;  // n
  int select_size = 64;   // l'
};

// Sliding-window branch: query t attends keys max(0, t - window_size + 1) .. t.
struct SwaParams : AttnParams {
  int window_size = 512;  // w >= 1
};

// The gated sum that ends nsa_attention, per (b, t, h) row of Dv values, in the accumulation
// type: o = g_cmp o_cmp + g_slc o_slc + g_swa o_swa. Backward: do_x = g_x dout and
// dg_x = sum over the row of dout * o_x. Every tensor in one dtype; index x: 0 cmp, 1 slc, 2 swa.
struct GateParams {
  Dtype dtype = Dtype::kFloat32;
  View branch_o[3];  // [B, T, HQ, Dv]  the branch outputs
  View gate[3];      // [B, T, HQ]      (any strides)
  View o;            // [B, T, HQ, Dv]  forward output
  // Backward only (data == nullptr in the forward).
  View dout;         // [B, T, HQ, Dv]
  View dbranch_o[3]; // [B, T, HQ, Dv]
  View dgate[3];     // [B, T, HQ]

  int batch = 0;       // B
  index_t seqlen = 0;  // T
  int num_heads = 0;   // HQ
  int head_dim_v = 0;  // Dv
};

// The plan of one decode_attention call (CUDA): how the step's work is split over thread blocks.
// Fixed by the cache's capacity, never by the lengths in it (those live on the device), so that a
// step keeps its launch shapes from one token to the next and can be captured in a CUDA graph.
struct DecodePlan {
  DeviceFacts device;
  int cmp_splits = 1;        // thread blocks per (sequence, KV head) over the compressed tokens
  index_t cmp_chunk = 0;     // compressed tokens per split at full capacity, a multiple of the key
                             // tile (cmp_splits * cmp_chunk >= cmp_capacity); shorter sequences
                             // spread their tiles evenly over the same splits
  int slc_splits = 1;        // thread blocks per (sequence, KV head) over the selected keys, and
                             // as many over the window's
  WindowOrder window_order = WindowOrder::kAfterScan;
  ScanOrder scan_order = ScanOrder::kTogether;
  DepWait dep_wait = DepWait::kHead;
  int sel_splits = 1;        // thread blocks per (query, KV head) over the candidate blocks of the
                             // top-n selection (each keeps its own n best; the last one merges)
  // Debugging (nsa_torch._debug.decode_trace): thread 0 of each thread block stores the global
  // timer (ns) at its phases' ends, [5 kernels][trace_blocks][kTraceEvents] (cuda/decode/trace.cuh);
  // nullptr: no trace.
  uint64_t* trace = nullptr;
  int trace_blocks = 0;
};

// One decoding step (decode_attention): the S newest tokens of each sequence attend the
// sequence's KV cache, whose rows 0 .. seqlens[b]-1 hold tokens 0 .. seqlens[b]-1 (the S new ones
// included). Query s of sequence b sits at position seqlens[b] - S + s. Every branch follows
// section 1 of docs/design.md for that position: the compressed branch over the cached
// compressed tokens, the block scores and top-n selection, the selected and window branches over
// the raw cache, and the gated sum.
//
// The raw cache is contiguous (block_table == nullptr: "page" b is batch row b, page_size =
// capacity) or paged: token t of sequence b is row t % page_size of page
// block_table[b * block_table_stride + t / page_size] (page_size % select_size == 0, so a
// selection block never straddles two pages).
struct DecodeParams {
  Dtype dtype = Dtype::kFloat32;
  View q;              // [B, S, HQ, D]
  View k;              // [B, capacity, H, D] contiguous, or [num_pages, page_size, H, D] paged
  View v;              // [B, capacity, H, Dv] or [num_pages, page_size, H, Dv]
  View k_swa;          // the window branch's keys and values, as k and v (the same pointers as
  View v_swa;          //   k and v when the branches share them)
  View k_cmp;          // [B, cmp_capacity, H, D]   row i: compressed token i of sequence b
  View v_cmp;          // [B, cmp_capacity, H, Dv]  (rows >= Nc(seqlens[b]) are never read)
  View gate[3];        // [B, S, HQ]  g_cmp, g_slc, g_swa (any strides)
  View o;              // [B, S, HQ, Dv]  output
  View block_indices;  // [B, S, H, n] int32 output: the blocks each query chose, as select_blocks
  const int32_t* seqlens = nullptr;      // [B] tokens in each sequence's cache, in [S, capacity]
  const int32_t* block_table = nullptr;  // [B, max_pages] pages of each sequence (paged), else nullptr
  index_t block_table_stride = 0;        // elements between two sequences' rows of block_table

  int batch = 0;             // B
  int num_queries = 1;       // S: new tokens per sequence in this step
  int num_heads = 0;         // HQ
  int num_heads_k = 0;       // H (divides HQ)
  int head_dim = 0;          // D
  int head_dim_v = 0;        // Dv
  index_t capacity = 0;      // tokens a sequence's cache can hold (paged: max_pages * page_size)
  index_t page_size = 0;     // paged: tokens per page; contiguous: capacity
  index_t num_pages = 0;     // paged: pages in the pool (block_table entries are < num_pages)
  index_t cmp_capacity = 0;  // rows of k_cmp / v_cmp per sequence: Nc(capacity)
  double scale = 1.0;
  int block_size = 32;    // l
  int block_stride = 16;  // d
  int select_size = 64;   // l'
  int num_selected = 16;  // n
  int num_initial = 1;
  int num_local = 2;
  int window_size = 512;  // w
  DecodePlan plan;        // CUDA only

  // Page and row of token t of sequence b in k, v, k_swa, v_swa.
  NSA_HOST_DEVICE index_t page_of(index_t b, index_t t) const {
    return block_table ? block_table[b * block_table_stride + t / page_size] : b;
  }
  NSA_HOST_DEVICE index_t row_of(index_t t) const { return t % page_size; }
};

}  // namespace nsa
