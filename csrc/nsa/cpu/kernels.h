// CPU kernels of every NSA op (torch-free). Each entry point takes its op family's params and a
// ParallelFor supplied by the caller (the torch binding passes at::parallel_for; tests pass a
// serial loop), so the kernels never own a thread pool. Kernels may use std::vector scratch.
// Outputs named in params.h are fully written, including rows that see no key (o = 0,
// lse = -inf, gradients 0). Results do not depend on the number of threads.
#pragma once

#include <functional>

#include "../params.h"

namespace nsa::cpu {

// Runs fn(begin, end) over disjoint chunks covering [0, n), each about `grain` items or more,
// possibly concurrently. Returns when every chunk is done.
using ParallelFor =
    std::function<void(index_t n, index_t grain, const std::function<void(index_t, index_t)>& fn)>;

// A ParallelFor that runs everything on the calling thread.
inline void serial_for(index_t n, index_t, const std::function<void(index_t, index_t)>& fn) {
  if (n > 0) fn(0, n);
}

// Compressed branch. fwd writes o, lse. bwd reads q, k, v, o, lse, dout, dlse (optional) and
// writes dq, dk, dv; dk/dv are owned per compressed row (no atomics, deterministic).
void cmp_fwd(const CmpParams& p, const ParallelFor& parallel_for);
void cmp_bwd(const CmpParams& p, const ParallelFor& parallel_for);

// Top-n block selection: writes indices.
void select_topk(const TopkParams& p, const ParallelFor& parallel_for);

// Selected branch. bwd builds the reverse index (for each key block, the queries that chose it,
// in token order) and lets one work item own each block's dk/dv: deterministic.
void slc_fwd(const SlcParams& p, const ParallelFor& parallel_for);
void slc_bwd(const SlcParams& p, const ParallelFor& parallel_for);

// Sliding-window branch.
void swa_fwd(const SwaParams& p, const ParallelFor& parallel_for);
void swa_bwd(const SwaParams& p, const ParallelFor& parallel_for);

// The gated sum of the branch outputs: fwd writes o; bwd writes dbranch_o and dgate.
void gate_fwd(const GateParams& p, const ParallelFor& parallel_for);
void gate_bwd(const GateParams& p, const ParallelFor& parallel_for);

// One decoding step (decode.cpp). Throws std::invalid_argument naming the sequence when a length
// is outside [S, capacity] or a page of block_table outside the pool.
void decode_attention(const DecodeParams& p, const ParallelFor& parallel_for);

// Validation of caller-given block indices (p.block_indices, p.seqs, p.num_heads_k,
// p.num_selected, p.select_size). An entry is valid when it is -1 or a block of its own
// sequence (0 <= j < ceil(len / select_size)) not already listed in the same row.
struct BlockIndexError {
  enum Kind { kNone, kOutOfRange, kDuplicate } kind = kNone;
  index_t batch = 0, token = 0;  // token: row on the T axis
  int head = 0, slot = 0;
  int32_t value = 0;
  index_t num_blocks = 0;        // valid range is [-1, num_blocks)
};
BlockIndexError check_block_indices(const SlcParams& p);

}  // namespace nsa::cpu
