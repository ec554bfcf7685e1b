// Definitions of launch_select (launch.h), included by the per-dtype instantiation files.
#pragma once

#include "../head_dims.h"
#include "launch.h"
#include "topk_wgmma.cuh"

namespace nsa::cuda::topk {

template <typename Kernel>
void launch_kernel(Kernel kernel, int threads, const TopkParams& p, const Shape& s, int max_smem, dim3 grid,
                   cudaStream_t stream) {
  if (s.smem > max_smem)
    invalid("needs " + std::to_string(s.smem) + " bytes of shared memory per block (G = " +
            std::to_string(s.group) + ", D = " + std::to_string(p.head_dim) + ", block_size / block_stride = " +
            std::to_string(s.cpr) + ", num_selected = " + std::to_string(p.num_selected) +
            "), the device allows " + std::to_string(max_smem));
  if (s.smem > 48 * 1024)
    check_cuda(kOp, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, s.smem),
               "cudaFuncSetAttribute failed");
  kernel<<<grid, threads, s.smem, stream>>>(p, s);
  check_launch(kOp);
}

template <typename T, int D, bool kResident, int kReduce>
void launch(const TopkParams& p, const Shape& s, int max_smem, dim3 grid, cudaStream_t stream) {
  launch_kernel(select_topk_kernel<T, D, kResident, kReduce>, 32 * kernel_warps(D, kResident), p, s, max_smem, grid,
                stream);
}

// The kernel is compiled per group-sum width (s.reduce): resident 0 (generic), 1 .. 32;
// streamed 0 or 64.
template <typename T, int D>
void dispatch_mode(const TopkParams& p, const Shape& s, int max_smem, dim3 grid, cudaStream_t stream) {
  if (!s.resident) {
    if (s.reduce == 64) return launch<T, D, false, 64>(p, s, max_smem, grid, stream);
    return launch<T, D, false, 0>(p, s, max_smem, grid, stream);
  }
  switch (s.reduce) {
    case 1: return launch<T, D, true, 1>(p, s, max_smem, grid, stream);
    case 2: return launch<T, D, true, 2>(p, s, max_smem, grid, stream);
    case 4: return launch<T, D, true, 4>(p, s, max_smem, grid, stream);
    case 8: return launch<T, D, true, 8>(p, s, max_smem, grid, stream);
    case 16: return launch<T, D, true, 16>(p, s, max_smem, grid, stream);
    case 32: return launch<T, D, true, 32>(p, s, max_smem, grid, stream);
    default: return launch<T, D, true, 0>(p, s, max_smem, grid, stream);
  }
}

// select_topk_wgmma_kernel, compiled per G (its group sum's width) and D: G = 16 and 32, where it
// is the default (below G = 16 it lost to select_topk_kernel).
template <typename T, int D>
void dispatch_wgmma(const TopkParams& p, const Shape& s, int max_smem, dim3 grid, cudaStream_t stream) {
  auto go = [&](auto kernel) { launch_kernel(kernel, kWgThreads, p, s, max_smem, grid, stream); };
  switch (s.group) {
    case 16: return go(select_topk_wgmma_kernel<T, D, 16>);
    case 32: return go(select_topk_wgmma_kernel<T, D, 32>);
    default: invalid("internal: no warpgroup selection kernel for G = " + std::to_string(s.group));
  }
}

template <typename T>
void launch_select(const TopkParams& p, const Shape& s, int max_smem, dim3 grid, cudaStream_t stream) {
  dispatch_head_dim(kOp, p.head_dim, [&](auto d) {
    constexpr int D = decltype(d)::value;
    if constexpr (wgmma_head_dim(D)) {
      if (s.wgmma) return dispatch_wgmma<T, D>(p, s, max_smem, grid, stream);
    }
    if (s.wgmma) invalid("internal: no warpgroup selection kernel for D = " + std::to_string(D));
    dispatch_mode<T, D>(p, s, max_smem, grid, stream);
  });
}

}  // namespace nsa::cuda::topk
