// The launch of one kernel of the decoding step (decode.h), shared by the per-dtype launches
// (launch.cuh) and decode.cu.
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "../common/cuda_check.h"
#include "decode.h"

namespace nsa::cuda::decode {

// Sets a kernel's function attributes on the current device where not set before: the largest
// shared-memory carveout, and the dynamic shared memory it may use (raised when a launch needs
// more than any before). Once per (device, kernel) rather than per launch: they are host calls
// on an eager step's path. Throws std::invalid_argument naming the op when `smem` is refused.
inline void configure_kernel(const void* kernel, size_t smem) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, size_t> opted;  // (device, kernel) -> smem allowed
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) (void)cudaGetLastError();
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, kernel);
  auto it = opted.find(key);
  if (it == opted.end()) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared) !=
        cudaSuccess)
      (void)cudaGetLastError();  // a preference: the launches go ahead without it
    it = opted.emplace(key, size_t(48 * 1024)).first;
  }
  if (smem > it->second) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) != cudaSuccess) {
      (void)cudaGetLastError();
      throw std::invalid_argument(std::string(kOp) + ": a kernel needs " + std::to_string(smem) +
                                  " bytes of shared memory per thread block, more than the device allows");
    }
    it->second = smem;
  }
}

// Launches kernel on grid with `smem` bytes of dynamic shared memory; `dependent`: may start
// while the previous kernel of the stream ends (programmatic dependent launch, sm_90), the kernel
// waiting for it with wait_prior_grid(). Errors name the op. Every kernel of the step asks for
// the largest shared-memory carveout (configure_kernel): an SM changes its carveout only once
// drained, so kernels that asked for different ones could not share an SM (the window kernel
// could not start beside the scan, nor a kernel beside the end of the one before it).
template <typename... Params, typename... Args>
void launch_kernel(const DecodeParams& p, void (*kernel)(Params...), dim3 grid, int threads, size_t smem,
                   bool dependent, cudaStream_t stream, Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  if (p.plan.device.smem_per_block > 0 && smem > size_t(p.plan.device.smem_per_block))
    throw std::invalid_argument(std::string(kOp) + ": a kernel needs " + std::to_string(smem) +
                                " bytes of shared memory per thread block, the device allows " +
                                std::to_string(p.plan.device.smem_per_block));
  configure_kernel(reinterpret_cast<const void*>(kernel), smem);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(unsigned(threads));
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = dependent && p.plan.device.arch >= 90 ? 1 : 0;
  check_cuda(kOp, cudaLaunchKernelEx(&config, kernel, args...), "CUDA launch failed");
}

}  // namespace nsa::cuda::decode
