// A CUDA runtime call's (or launch's) error as the op's exception: std::runtime_error "<op>: <what>: <error>",
// the error cleared first so that later calls do not see it.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace nsa::cuda {

inline void check_cuda(const char* op, cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();
  throw std::runtime_error(std::string(op) + ": " + what + ": " + cudaGetErrorString(err));
}

// Throws std::runtime_error naming `op` if the last launch failed.
inline void check_launch(const char* op) { check_cuda(op, cudaGetLastError(), "CUDA launch failed"); }

}  // namespace nsa::cuda
