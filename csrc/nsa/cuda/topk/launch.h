// Host-side pieces of the top-n selection shared by topk.cu (shape, checks) and the per-dtype
// launch files (topk_bf16.cu, topk_fp16.cu): the op's error helpers and the launch entry.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../common/cuda_check.h"
#include "topk_kernel.cuh"

namespace nsa::cuda::topk {

inline constexpr const char* kOp = "nsa.select_blocks";

[[noreturn]] inline void invalid(const std::string& what) {
  throw std::invalid_argument(std::string(kOp) + ": " + what);
}

// Launches select_topk_kernel for shape s on grid: head-dim, mode and group-sum-width dispatch
// (launch.cuh; instantiated per dtype in topk_bf16.cu and topk_fp16.cu, which build in parallel).
template <typename T>
void launch_select(const TopkParams& p, const Shape& s, int max_smem, dim3 grid, cudaStream_t stream);

}  // namespace nsa::cuda::topk
