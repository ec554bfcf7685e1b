// Kernels W, A, C and D of the decoding step for bf16 (one file per dtype keeps builds parallel).
#include "launch.cuh"

namespace nsa::cuda::decode {
template void launch_window<__nv_bfloat16>(const DecodeParams&, const Workspace&, cudaStream_t);
template void launch_cmp<__nv_bfloat16>(const DecodeParams&, const Workspace&, cudaStream_t);
template void launch_sparse<__nv_bfloat16>(const DecodeParams&, const Workspace&, cudaStream_t);
template void launch_combine<__nv_bfloat16>(const DecodeParams&, const Workspace&, cudaStream_t);
}  // namespace nsa::cuda::decode
