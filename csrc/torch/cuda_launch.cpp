#include "cuda_launch.h"

#ifdef NSA_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <stdexcept>

namespace nsa_torch {

void run_cuda(const at::Tensor& q, const std::function<void(cudaStream_t)>& fn) {
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  try {
    fn(stream);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

at::Tensor cuda_workspace(const at::Tensor& q, size_t bytes) {
  return at::empty({int64_t(bytes > 0 ? bytes : 1)}, q.options().dtype(at::kByte));
}

}  // namespace nsa_torch
#endif
