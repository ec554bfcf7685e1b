// Entry points of the selected branch.
#include <algorithm>
#include <stdexcept>

#include "../attn/entry.cuh"
#include "../common/cuda_check.h"
#include "../kernels.h"
#include "reverse_index.cuh"

namespace nsa::cuda {
namespace {

constexpr const char* kOp = "nsa.selected_attention";

// Bits of the sort keys [0, num_keys] (num_keys is the padding sentinel).
int key_bits(index_t num_keys) {
  int bits = 1;
  while ((index_t(1) << bits) <= num_keys) ++bits;
  return bits;
}

void check_sizes(const SlcParams& p, index_t num_keys) {
  const index_t entries = reverse_index_entries(p);
  const index_t rows = index_t(p.seqs.batch) * p.seqs.seqlen;
  if (entries > INT32_MAX || num_keys + 1 > INT32_MAX || rows > INT32_MAX)
    throw std::invalid_argument(std::string(kOp) + ": B * T * H * n = " + std::to_string(entries) +
                                " exceeds the CUDA kernels' int32 reverse index");
}

size_t sort_temp_bytes(const SlcParams& p, index_t num_keys) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), int(reverse_index_entries(p)), 0,
                                  key_bits(num_keys));
  return bytes;
}

// Workspace of the reverse index: keys and rows, unsorted and sorted, and the sort's scratch.
size_t index_bytes(const SlcParams& p, index_t num_keys) {
  return 4 * align256(size_t(reverse_index_entries(p)) * sizeof(int32_t)) + align256(sort_temp_bytes(p, num_keys));
}

// Builds the reverse index (reverse_index.cuh) in `ws` (index_bytes(p, num_keys) bytes): rows
// in chunks of chunk_rows (0: one chunk), num_keys = chunks * H * vblocks.
ReverseIndex build_reverse_index(const SlcParams& p, index_t chunk_rows, index_t num_keys, unsigned char* ws,
                                 cudaStream_t stream) {
  const index_t n = reverse_index_entries(p);
  const size_t entry_bytes = align256(size_t(n) * sizeof(int32_t));
  int32_t* keys_in = reinterpret_cast<int32_t*>(ws);
  int32_t* keys_out = reinterpret_cast<int32_t*>(ws + entry_bytes);
  int32_t* rows_in = reinterpret_cast<int32_t*>(ws + 2 * entry_bytes);
  int32_t* rows_out = reinterpret_cast<int32_t*>(ws + 3 * entry_bytes);
  ReverseIndex rix;
  rix.vblocks = reverse_index_vblocks(p);
  rix.entries = n;
  rix.keys = keys_out;
  rix.rows = rows_out;
  if (n > 0) {
    slc_reverse_index_entries_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(
        p, rix.vblocks, chunk_rows, int32_t(num_keys), keys_in, rows_in);
    check_launch(kOp);
    size_t temp_bytes = sort_temp_bytes(p, num_keys);
    const cudaError_t err = cub::DeviceRadixSort::SortPairs(ws + 4 * entry_bytes, temp_bytes, keys_in, keys_out,
                                                            rows_in, rows_out, int(n), 0, key_bits(num_keys), stream);
    check_cuda(kOp, err, "reverse index sort failed");
  }
  return rix;
}

// By blocks (p.plan.slc_fwd or slc_dq == kBlocks): the rows in chunks of p.plan.slc_chunk_rows,
// which keeps a chunk's partials under nsa::kSlcPartialBytes (nsa/plan.cpp).
struct BlocksPlan {
  index_t chunk_rows = 0, chunks = 0, num_keys = 0;
  int slots = 0;
  size_t o_bytes = 0, lse_bytes = 0, starts_bytes = 0;  // (rounded to 256)

  // Workspace: the chunked reverse index, its segment starts, the partials of one chunk.
  size_t bytes(const SlcParams& p) const { return index_bytes(p, num_keys) + starts_bytes + o_bytes + lse_bytes; }
};

// dq = false: the forward's partials (o in the output dtype, lse fp32); true: the dQ's (bf16).
BlocksPlan plan_blocks(const SlcParams& p, bool dq) {
  BlocksPlan f;
  const index_t rows = index_t(p.seqs.batch) * p.seqs.seqlen;
  f.slots = p.num_selected * tiles_per_block(p.select_size);
  f.chunk_rows = std::max<index_t>(1, p.plan.slc_chunk_rows);
  f.chunks = rows > 0 ? (rows + f.chunk_rows - 1) / f.chunk_rows : 0;
  f.num_keys = f.chunks * p.num_heads_k * reverse_index_vblocks(p);
  const size_t per_chunk = size_t(f.chunk_rows) * p.num_heads * f.slots;
  f.o_bytes = align256(per_chunk * (dq ? p.head_dim : p.head_dim_v) * 2);
  f.lse_bytes = dq ? 0 : align256(per_chunk * sizeof(float));
  f.starts_bytes = align256(size_t(f.num_keys + 1) * sizeof(int32_t));
  return f;
}

// Does the forward (dq = false) or dQ run by blocks? The plan checked the shape (sm_90, D, Dv in
// {64, 128}, select_size within [32, 256]); an empty problem has nothing to compute.
bool by_blocks(const SlcParams& p, bool dq) {
  const bool empty = p.seqs.batch <= 0 || p.seqs.seqlen <= 0 || p.num_heads <= 0;
  return !empty && (dq ? p.plan.slc_dq : p.plan.slc_fwd) == SlcKernel::kBlocks;
}

// Runs the kernels by blocks (slc_blocks.cuh) chunk by chunk in `ws` (f.bytes(p) bytes): the
// forward's o and lse, or (dq) dq from delta.
void run_by_blocks(const SlcParams& p, const BlocksPlan& f, bool dq, const float* delta, unsigned char* ws,
                   cudaStream_t stream) {
  check_sizes(p, f.num_keys);
  const ReverseIndex rix = build_reverse_index(p, f.chunk_rows, f.num_keys, ws, stream);
  ws += index_bytes(p, f.num_keys);
  int32_t* starts = reinterpret_cast<int32_t*>(ws);
  slc_segment_starts_kernel<<<unsigned(rix.entries / 256 + 1), 256, 0, stream>>>(rix.keys, rix.entries,
                                                                               int32_t(f.num_keys), starts);
  check_launch(kOp);
  SlcPartials part;
  part.starts = starts;
  part.slots = f.slots;
  part.o = ws + f.starts_bytes;
  part.lse = dq ? nullptr : reinterpret_cast<float*>(ws + f.starts_bytes + f.o_bytes);
  // Up to as many thread blocks per key tile as a tile chosen by every token of the chunk
  // needs at kSplitRows rows each (16 at most); each tile takes what its token count needs.
  part.splits = int(std::min<index_t>(16, std::max<index_t>(1, f.chunk_rows * (p.num_heads / p.num_heads_k) / kSplitRows)));
  const index_t rows = index_t(p.seqs.batch) * p.seqs.seqlen;
  for (index_t c = 0; c < f.chunks; ++c) {
    part.row0 = c * f.chunk_rows;
    part.rows = std::min(f.chunk_rows, rows - part.row0);
    part.key0 = int32_t(c * p.num_heads_k * rix.vblocks);
    dispatch_dtype(kOp, p.dtype, [&](auto t) {
      if (dq)
        run_slc_blocks<decltype(t), true>(p, rix, part, delta, stream);
      else
        run_slc_blocks<decltype(t), false>(p, rix, part, nullptr, stream);
    });
  }
}

}  // namespace

size_t slc_fwd_workspace_bytes(const SlcParams& p) {
  if (!by_blocks(p, false)) return 0;
  const BlocksPlan f = plan_blocks(p, false);
  check_sizes(p, f.num_keys);
  return f.bytes(p);
}

void slc_fwd(const SlcParams& p, void* workspace, cudaStream_t stream) {
  if (p.plan.slc_fwd != SlcKernel::kBlocks) return attn_fwd<Branch::kSlc>(p, stream);
  if (!by_blocks(p, false)) return;
  if (workspace == nullptr) throw std::invalid_argument(std::string(kOp) + ": the forward by blocks needs a workspace");
  run_by_blocks(p, plan_blocks(p, false), false, nullptr, static_cast<unsigned char*>(workspace), stream);
}

// Workspace: delta, the reverse index of the dK/dV kernel, the dK/dV split partials, then (dQ by
// blocks) run_by_blocks' share.
size_t slc_bwd_workspace_bytes(const SlcParams& p) {
  const index_t num_keys = index_t(p.num_heads_k) * reverse_index_vblocks(p);
  check_sizes(p, num_keys);
  size_t bytes = delta_bytes(p) + index_bytes(p, num_keys) +
                 split_bytes(plan_dkdv_split<Branch::kSlc>(p, reverse_index_vblocks(p)), p);
  if (by_blocks(p, true)) {
    const BlocksPlan f = plan_blocks(p, true);
    check_sizes(p, f.num_keys);
    bytes += f.bytes(p);
  }
  return bytes;
}

void slc_bwd(const SlcParams& p, void* workspace, cudaStream_t stream) {
  const index_t num_keys = index_t(p.num_heads_k) * reverse_index_vblocks(p);
  check_sizes(p, num_keys);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  float* delta = reinterpret_cast<float*>(ws);
  const ReverseIndex rix = build_reverse_index(p, 0, num_keys, ws + delta_bytes(p), stream);
  const size_t split = split_bytes(plan_dkdv_split<Branch::kSlc>(p, reverse_index_vblocks(p)), p);
  float* partial = reinterpret_cast<float*>(ws + delta_bytes(p) + index_bytes(p, num_keys));
  attn_bwd<Branch::kSlc>(p, delta, rix, partial, stream);  // delta, dK/dV (and dQ by tokens)
  if (by_blocks(p, true))
    run_by_blocks(p, plan_blocks(p, true), true, delta, ws + delta_bytes(p) + index_bytes(p, num_keys) + split,
                  stream);
}

}  // namespace nsa::cuda
