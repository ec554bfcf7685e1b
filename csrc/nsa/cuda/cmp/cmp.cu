// Entry points of the compressed branch.
#include "../attn/entry.cuh"
#include "../kernels.h"

namespace nsa::cuda {

void cmp_fwd(const CmpParams& p, cudaStream_t stream) { attn_fwd<Branch::kCmp>(p, stream); }

// Workspace: delta, then the split dK/dV partials.
size_t cmp_bwd_workspace_bytes(const CmpParams& p) {
  return delta_bytes(p) + split_bytes(plan_dkdv_split<Branch::kCmp>(p, 0), p);
}

void cmp_bwd(const CmpParams& p, void* workspace, cudaStream_t stream) {
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  attn_bwd<Branch::kCmp>(p, reinterpret_cast<float*>(ws), ReverseIndex{},
                         reinterpret_cast<float*>(ws + delta_bytes(p)), stream);
}

}  // namespace nsa::cuda
