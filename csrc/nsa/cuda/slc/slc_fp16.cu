// Kernels of the slc branch for fp16 (one file per branch and dtype keeps builds parallel).
#include "../attn/launch.cuh"

namespace nsa::cuda {
NSA_INSTANTIATE_ATTN(__half, Branch::kSlc)
NSA_INSTANTIATE_SLC_BLOCKS(__half)
}  // namespace nsa::cuda
