// Entry points of the selected branch.
#include <stdexcept>

#include "../attn/entry.cuh"
#include "../kernels.h"
#include "reverse_index.cuh"

namespace nsa::cuda {
namespace {

constexpr const char* kOp = "nsa.selected_attention";

int key_bits(const SlcParams& p) {
  const index_t sentinel = index_t(p.num_heads_k) * reverse_index_vblocks(p);
  int bits = 1;
  while ((index_t(1) << bits) <= sentinel) ++bits;
  return bits;
}

void check_sizes(const SlcParams& p) {
  const index_t entries = reverse_index_entries(p);
  const index_t keys = index_t(p.num_heads_k) * reverse_index_vblocks(p) + 1;
  const index_t rows = index_t(p.seqs.batch) * p.seqs.seqlen;
  if (entries > INT32_MAX || keys > INT32_MAX || rows > INT32_MAX)
    throw std::invalid_argument(std::string(kOp) + ": B * T * H * n = " + std::to_string(entries) +
                                " exceeds the CUDA backward's int32 reverse index");
}

size_t sort_temp_bytes(const SlcParams& p) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), int(reverse_index_entries(p)), 0,
                                  key_bits(p));
  return bytes;
}

}  // namespace

void slc_fwd(const SlcParams& p, cudaStream_t stream) { attn_fwd<Branch::kSlc>(p, stream); }

size_t slc_bwd_workspace_bytes(const SlcParams& p) {
  check_sizes(p);
  const size_t entries = align256(size_t(reverse_index_entries(p)) * sizeof(int32_t));
  return delta_bytes(p) + 4 * entries + align256(sort_temp_bytes(p)) +
         split_bytes(plan_dkdv_split<Branch::kSlc>(p, reverse_index_vblocks(p)), p);
}

void slc_bwd(const SlcParams& p, void* workspace, cudaStream_t stream) {
  check_sizes(p);
  const index_t n = reverse_index_entries(p);
  const size_t entry_bytes = align256(size_t(n) * sizeof(int32_t));
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  float* delta = reinterpret_cast<float*>(ws);
  int32_t* keys_in = reinterpret_cast<int32_t*>(ws + delta_bytes(p));
  int32_t* keys_out = reinterpret_cast<int32_t*>(ws + delta_bytes(p) + entry_bytes);
  int32_t* rows_in = reinterpret_cast<int32_t*>(ws + delta_bytes(p) + 2 * entry_bytes);
  int32_t* rows_out = reinterpret_cast<int32_t*>(ws + delta_bytes(p) + 3 * entry_bytes);
  void* temp = ws + delta_bytes(p) + 4 * entry_bytes;
  float* partial = reinterpret_cast<float*>(ws + delta_bytes(p) + 4 * entry_bytes +
                                            align256(sort_temp_bytes(p)));

  ReverseIndex rix;
  rix.vblocks = reverse_index_vblocks(p);
  rix.entries = n;
  rix.keys = keys_out;
  rix.rows = rows_out;
  if (n > 0) {
    slc_reverse_index_entries_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(p, rix.vblocks,
                                                                                   keys_in, rows_in);
    check_launch(kOp);
    size_t temp_bytes = sort_temp_bytes(p);
    const cudaError_t err = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, rows_in,
                                                            rows_out, int(n), 0, key_bits(p), stream);
    if (err != cudaSuccess)
      throw std::runtime_error(std::string(kOp) + ": reverse index sort failed: " + cudaGetErrorString(err));
  }
  attn_bwd<Branch::kSlc>(p, delta, rix, partial, stream);
}

}  // namespace nsa::cuda
