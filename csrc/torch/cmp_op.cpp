// nsa.compressed_attention: forward and backward ops.
#include "args.h"
#include "cuda_launch.h"
#include "kernel_plan.h"
#include "nsa/cpu/kernels.h"
#ifdef NSA_WITH_CUDA
#include "nsa/cuda/kernels.h"
#endif
#include "ops.h"

namespace nsa_torch {
namespace {

constexpr const char* kOp = "nsa.compressed_attention";

SeqsArg check_cmp(const Checker& c, const at::Tensor& q, const at::Tensor& k_cmp,
                  const at::Tensor& v_cmp, const OptTensor& cu_seqlens, int64_t block_size,
                  int64_t block_stride, double scale) {
  check_qkv(c, q, k_cmp, v_cmp, "k_cmp", "v_cmp", /*same_len=*/false);
  check_compression(c, block_size, block_stride);
  check_scale(c, scale);
  return make_seqs(c, q, cu_seqlens, k_cmp.size(1), block_size, block_stride);
}

nsa::CmpParams cmp_params(const at::Tensor& q, const at::Tensor& k_cmp, const at::Tensor& v_cmp,
                          const at::Tensor& o, const at::Tensor& lse, const SeqsArg& seqs,
                          int64_t block_size, int64_t block_stride, double scale) {
  nsa::CmpParams p;
  fill_attn(p, q, k_cmp, v_cmp, o, lse, seqs.seqs, scale);
  p.block_size = int(block_size);
  p.block_stride = int(block_stride);
  return p;
}

}  // namespace

// Unaligned CUDA inputs are replaced by aligned copies first (see aligned()); they live through
// the call.
std::tuple<at::Tensor, at::Tensor> compressed_attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_cmp_in, const at::Tensor& v_cmp_in,
    const OptTensor& cu_seqlens, int64_t block_size, int64_t block_stride, double scale) {
  const at::Tensor q = aligned(q_in), k_cmp = aligned(k_cmp_in), v_cmp = aligned(v_cmp_in);
  const Checker c(kOp);
  const SeqsArg seqs = check_cmp(c, q, k_cmp, v_cmp, cu_seqlens, block_size, block_stride, scale);
  check_device(c, q, q.size(3), v_cmp.size(3));
  auto [o, lse] = new_attn_outputs(q, v_cmp);
  nsa::CmpParams p = cmp_params(q, k_cmp, v_cmp, o, lse, seqs, block_size, block_stride, scale);
  if (q.is_cuda()) {
#ifdef NSA_WITH_CUDA
    plan_cuda(p, nsa::Pass::kFwd, q);
    run_cuda(q, [&](cudaStream_t s) { nsa::cuda::cmp_fwd(p, s); });
#endif
  } else {
    nsa::cpu::cmp_fwd(p, torch_parallel_for);
  }
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compressed_attention_bwd(
    const at::Tensor& dout_in, const OptTensor& dlse, const at::Tensor& q_in,
    const at::Tensor& k_cmp_in, const at::Tensor& v_cmp_in, const at::Tensor& o_in,
    const at::Tensor& lse, const OptTensor& cu_seqlens, int64_t block_size, int64_t block_stride,
    double scale) {
  const at::Tensor dout = aligned(dout_in), q = aligned(q_in), k_cmp = aligned(k_cmp_in),
                   v_cmp = aligned(v_cmp_in), o = aligned(o_in);
  const Checker c(kOp);
  const SeqsArg seqs = check_cmp(c, q, k_cmp, v_cmp, cu_seqlens, block_size, block_stride, scale);
  check_bwd_inputs(c, q, v_cmp, dout, o, lse);
  if (dlse.has_value())
    c.tensor(*dlse, "dlse", lse.scalar_type(), {"B", "T", "HQ"}, {q.size(0), q.size(1), q.size(2)},
             q.device());
  check_device(c, q, q.size(3), v_cmp.size(3));
  nsa::CmpParams p = cmp_params(q, k_cmp, v_cmp, o, lse, seqs, block_size, block_stride, scale);
  auto [dq, dk, dv] = new_attn_grads(p, dout, q, k_cmp, v_cmp);
  if (dlse.has_value()) p.dlse = view_of(*dlse);
  if (q.is_cuda()) {
#ifdef NSA_WITH_CUDA
    plan_cuda(p, nsa::Pass::kBwd, q);
    const at::Tensor ws = cuda_workspace(q, nsa::cuda::cmp_bwd_workspace_bytes(p));
    run_cuda(q, [&](cudaStream_t s) { nsa::cuda::cmp_bwd(p, ws.data_ptr(), s); });
#endif
  } else {
    nsa::cpu::cmp_bwd(p, torch_parallel_for);
  }
  return {dq, dk, dv};
}

}  // namespace nsa_torch
