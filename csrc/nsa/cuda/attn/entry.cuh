// Dtype dispatch of the attention entry points. The kernels of each (dtype, branch) pair are
// compiled once, in the instantiation files <branch>/<branch>_<dtype>.cu; everyone else sees
// these extern declarations.
#pragma once

#include <stdexcept>
#include <string>

#include "launch.cuh"

namespace nsa::cuda {

#define NSA_EXTERN_ATTN(T, B)                                                                        \
  extern template void run_fwd<T, B>(const typename BranchParams<B>::type&, cudaStream_t);          \
  extern template void run_bwd<T, B>(const typename BranchParams<B>::type&, float*,                 \
                                     const ReverseIndex&, float*, cudaStream_t);
NSA_EXTERN_ATTN(__nv_bfloat16, Branch::kCmp)
NSA_EXTERN_ATTN(__half, Branch::kCmp)
NSA_EXTERN_ATTN(__nv_bfloat16, Branch::kSlc)
NSA_EXTERN_ATTN(__half, Branch::kSlc)
NSA_EXTERN_ATTN(__nv_bfloat16, Branch::kSwa)
NSA_EXTERN_ATTN(__half, Branch::kSwa)
#undef NSA_EXTERN_ATTN
#define NSA_EXTERN_SLC_BLOCKS(T, DQ) \
  extern template void run_slc_blocks<T, DQ>(const SlcParams&, const ReverseIndex&, const SlcPartials&, const float*, \
                                             cudaStream_t);
NSA_EXTERN_SLC_BLOCKS(__nv_bfloat16, false)
NSA_EXTERN_SLC_BLOCKS(__nv_bfloat16, true)
NSA_EXTERN_SLC_BLOCKS(__half, false)
NSA_EXTERN_SLC_BLOCKS(__half, true)
#undef NSA_EXTERN_SLC_BLOCKS

// Calls f(T{}) with T the element type of `dtype`, or throws for a dtype without CUDA kernels.
template <typename F>
void dispatch_dtype(const char* op, Dtype dtype, F&& f) {
  if (dtype == Dtype::kBFloat16) return f(__nv_bfloat16{});
  if (dtype == Dtype::kFloat16) return f(__half{});
  throw std::invalid_argument(std::string(op) + ": dtype must be bfloat16 or float16 on CUDA");
}

template <Branch B>
void attn_fwd(const typename BranchParams<B>::type& p, cudaStream_t stream) {
  dispatch_dtype(op_name<B>(), p.dtype, [&](auto t) { run_fwd<decltype(t), B>(p, stream); });
}

template <Branch B>
void attn_bwd(const typename BranchParams<B>::type& p, float* delta, const ReverseIndex& rix,
              float* partial, cudaStream_t stream) {
  dispatch_dtype(op_name<B>(), p.dtype, [&](auto t) { run_bwd<decltype(t), B>(p, delta, rix, partial, stream); });
}

// Bytes of the workspace slice holding delta (B * T * HQ floats), rounded to 256.
inline size_t delta_bytes(const AttnParams& p) {
  return align256(size_t(p.seqs.batch) * size_t(p.seqs.seqlen) * size_t(p.num_heads) * sizeof(float));
}

}  // namespace nsa::cuda
