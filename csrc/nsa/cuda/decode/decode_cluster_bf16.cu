// The cluster step's kernel of the decoding step for bf16 (its own file: a large kernel per head-dim
// pair, compiled beside the others).
#include "launch.cuh"

namespace nsa::cuda::decode {
template void launch_cluster<__nv_bfloat16>(const DecodeParams&, const Workspace&, cudaStream_t);
}  // namespace nsa::cuda::decode
