// Running a torch-free CUDA kernel from an op: device guard, current stream, workspace from
// torch's caching allocator, and kernel exceptions turned into Python errors naming the op.
// Only the CUDA build calls these; a CPU-only build never reaches them (check_device raises).
#pragma once

#include <ATen/ATen.h>

#include <functional>

#ifdef NSA_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace nsa_torch {

#ifdef NSA_WITH_CUDA
// Runs fn(stream) on q's device and current stream. std::invalid_argument from the kernel
// layer becomes ValueError, anything else RuntimeError.
void run_cuda(const at::Tensor& q, const std::function<void(cudaStream_t)>& fn);

// Uninitialised device scratch of `bytes` bytes (at least 1) on q's device.
at::Tensor cuda_workspace(const at::Tensor& q, size_t bytes);
#endif

}  // namespace nsa_torch
