// Kernels W, A, C and D of the decoding step for fp16 (one file per dtype keeps builds parallel).
#include "launch.cuh"

namespace nsa::cuda::decode {
template void launch_window<__half>(const DecodeParams&, const Workspace&, cudaStream_t);
template void launch_cmp<__half>(const DecodeParams&, const Workspace&, cudaStream_t);
template void launch_sparse<__half>(const DecodeParams&, const Workspace&, cudaStream_t);
template void launch_combine<__half>(const DecodeParams&, const Workspace&, cudaStream_t);
}  // namespace nsa::cuda::decode
