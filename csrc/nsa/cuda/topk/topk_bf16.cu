// The top-n selection kernels for bf16 (one file per dtype keeps builds parallel).
#include "launch.cuh"

namespace nsa::cuda::topk {
template void launch_select<__nv_bfloat16>(const TopkParams&, const Shape&, int, dim3, cudaStream_t);
}  // namespace nsa::cuda::topk
