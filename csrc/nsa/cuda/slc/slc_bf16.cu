// Kernels of the slc branch for bf16 (one file per branch and dtype keeps builds parallel).
#include "../attn/launch.cuh"

namespace nsa::cuda {
NSA_INSTANTIATE_ATTN(__nv_bfloat16, Branch::kSlc)
NSA_INSTANTIATE_SLC_BLOCKS(__nv_bfloat16)
}  // namespace nsa::cuda
