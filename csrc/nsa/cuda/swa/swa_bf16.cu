// Kernels of the swa branch for bf16 (one file per branch and dtype keeps builds parallel).
#include "../attn/launch.cuh"

namespace nsa::cuda {
NSA_INSTANTIATE_ATTN(__nv_bfloat16, Branch::kSwa)
}  // namespace nsa::cuda
