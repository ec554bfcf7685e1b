// The launch of one kernel of the decoding step (decode.h), shared by the per-dtype launches
// (launch.cuh) and decode.cu.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "decode.h"

namespace nsa::cuda::decode {

// Launches kernel on grid with `smem` bytes of dynamic shared memory; `dependent`: may start
// while the previous kernel of the stream ends (programmatic dependent launch, sm_90), the kernel
// waiting for it with wait_prior_grid(). Errors name the op. Every kernel of the step asks for
// the largest shared-memory carveout: an SM changes its carveout only once drained, so kernels
// that asked for different ones could not share an SM (the window kernel could not start beside
// the scan, nor a kernel beside the end of the one before it).
template <typename... Params, typename... Args>
void launch_kernel(const DecodeParams& p, void (*kernel)(Params...), dim3 grid, int threads, size_t smem,
                   bool dependent, cudaStream_t stream, Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  if (p.plan.device.smem_per_block > 0 && smem > size_t(p.plan.device.smem_per_block))
    throw std::invalid_argument(std::string(kOp) + ": a kernel needs " + std::to_string(smem) +
                                " bytes of shared memory per thread block, the device allows " +
                                std::to_string(p.plan.device.smem_per_block));
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::invalid_argument(std::string(kOp) + ": a kernel needs " + std::to_string(smem) +
                                " bytes of shared memory per thread block, more than the device allows");
  }
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared) !=
      cudaSuccess)
    (void)cudaGetLastError();  // a preference: the launch goes ahead without it
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
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, args...);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(std::string(kOp) + ": CUDA launch failed: " + cudaGetErrorString(err));
  }
}

}  // namespace nsa::cuda::decode
