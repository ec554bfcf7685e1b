// Kernels of the cmp branch for fp16 (one file per branch and dtype keeps builds parallel).
#include "../attn/launch.cuh"

namespace nsa::cuda {
NSA_INSTANTIATE_ATTN(__half, Branch::kCmp)
}  // namespace nsa::cuda
