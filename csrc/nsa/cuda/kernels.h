// CUDA kernels of every NSA op (torch-free). Each entry point takes its op family's params and
// the stream to launch on; it launches asynchronously and never synchronises with the host.
// Supported: dtype bf16 or fp16; (D, Dv) one of kHeadDims (head_dims.h). Unsupported values throw
// std::invalid_argument (the binding checks first and raises a Python error naming the op).
// Launch failures throw std::runtime_error with the CUDA error string.
//
// Workspaces: the backward entry points need device scratch memory, allocated by the caller
// (the binding uses torch's caching allocator) with at least *_bwd_workspace_bytes(p) bytes,
// 256-byte aligned. Its content on entry does not matter.
//
// Determinism: every output is written by exactly one thread, with sums in a fixed order; there
// are no float atomics, so two runs on the same inputs give identical bits.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "../params.h"
#include "head_dims.h"

namespace nsa::cuda {

void cmp_fwd(const CmpParams& p, cudaStream_t stream);
size_t cmp_bwd_workspace_bytes(const CmpParams& p);
void cmp_bwd(const CmpParams& p, void* workspace, cudaStream_t stream);

// One fused pass: block scores from the compressed keys and the final lse, overlap weighting,
// group sum, forced blocks and top-n, without materialising the [T, T / select_size] scores.
void select_topk(const TopkParams& p, cudaStream_t stream);

// The forward by blocks (sm_90) needs a workspace (the reverse index and the partials of a chunk
// of rows, at most about 2 GiB); slc_fwd_workspace_bytes is 0 when the kernels run by tokens.
size_t slc_fwd_workspace_bytes(const SlcParams& p);
void slc_fwd(const SlcParams& p, void* workspace, cudaStream_t stream);
size_t slc_bwd_workspace_bytes(const SlcParams& p);
void slc_bwd(const SlcParams& p, void* workspace, cudaStream_t stream);

void swa_fwd(const SwaParams& p, cudaStream_t stream);
size_t swa_bwd_workspace_bytes(const SwaParams& p);
void swa_bwd(const SwaParams& p, void* workspace, cudaStream_t stream);

// The gated sum of the branch outputs (any Dv): one warp per (b, t, h) row.
void gate_fwd(const GateParams& p, cudaStream_t stream);
void gate_bwd(const GateParams& p, cudaStream_t stream);

// One decoding step (nsa/cuda/decode); the workspace holds the split partials and scores.
size_t decode_workspace_bytes(const DecodeParams& p);
void decode_attention(const DecodeParams& p, void* workspace, cudaStream_t stream);

}  // namespace nsa::cuda
