// Entry points of the sliding-window branch.
#include "../attn/entry.cuh"
#include "../kernels.h"

namespace nsa::cuda {

void swa_fwd(const SwaParams& p, cudaStream_t stream) { attn_fwd<Branch::kSwa>(p, stream); }

size_t swa_bwd_workspace_bytes(const SwaParams& p) { return delta_bytes(p); }

void swa_bwd(const SwaParams& p, void* workspace, cudaStream_t stream) {
  attn_bwd<Branch::kSwa>(p, static_cast<float*>(workspace), ReverseIndex{}, nullptr, stream);
}

}  // namespace nsa::cuda
