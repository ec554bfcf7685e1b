#include "cuda_launch.h"

#ifdef NSA_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
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

std::vector<cudaStream_t> side_streams(const at::Tensor& q, int n) {
  const c10::DeviceIndex device = q.device().index();
  std::vector<cudaStream_t> taken = {c10::cuda::getCurrentCUDAStream(device).stream()};
  // The pool hands its streams out in turn: a few draws pass any it shares with the caller.
  for (int draws = 0; int(taken.size()) <= n && draws < 64 + n; ++draws) {
    const cudaStream_t s = c10::cuda::getStreamFromPool(false, device).stream();
    if (std::find(taken.begin(), taken.end(), s) == taken.end()) taken.push_back(s);
  }
  TORCH_CHECK(int(taken.size()) == n + 1, "could not take ", n, " distinct streams from torch's pool");
  return std::vector<cudaStream_t>(taken.begin() + 1, taken.end());
}

at::Tensor cuda_workspace(const at::Tensor& q, size_t bytes) {
  return at::empty({int64_t(bytes > 0 ? bytes : 1)}, q.options().dtype(at::kByte));
}

}  // namespace nsa_torch
#endif
