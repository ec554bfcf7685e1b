// nsa.sliding_window_attention: forward and backward ops.
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

constexpr const char* kOp = "nsa.sliding_window_attention";

SeqsArg check_swa(const Checker& c, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const OptTensor& cu_seqlens, int64_t window_size, double scale) {
  check_qkv(c, q, k, v, "k", "v", /*same_len=*/true);
  c.value(window_size >= 1, "window_size", "at least 1", std::to_string(window_size));
  check_scale(c, scale);
  return make_seqs(c, q, cu_seqlens);
}

nsa::SwaParams swa_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& o, const at::Tensor& lse, const SeqsArg& seqs,
                          int64_t window_size, double scale) {
  nsa::SwaParams p;
  fill_attn(p, q, k, v, o, lse, seqs.seqs, scale);
  p.window_size = int(std::min<int64_t>(window_size, int64_t(1) << 30));  // the whole past beyond
  return p;
}

}  // namespace

// Unaligned CUDA inputs are replaced by aligned copies first (see aligned()); they live through
// the call.
std::tuple<at::Tensor, at::Tensor> sliding_window_attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const OptTensor& cu_seqlens, int64_t window_size, double scale) {
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  const Checker c(kOp);
  const SeqsArg seqs = check_swa(c, q, k, v, cu_seqlens, window_size, scale);
  check_device(c, q, q.size(3), v.size(3));
  auto [o, lse] = new_attn_outputs(q, v);
  nsa::SwaParams p = swa_params(q, k, v, o, lse, seqs, window_size, scale);
  if (q.is_cuda()) {
#ifdef NSA_WITH_CUDA
    plan_cuda(p, nsa::Pass::kFwd, q);
    run_cuda(q, [&](cudaStream_t s) { nsa::cuda::swa_fwd(p, s); });
#endif
  } else {
    nsa::cpu::swa_fwd(p, torch_parallel_for);
  }
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sliding_window_attention_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& o_in, const at::Tensor& lse,
    const OptTensor& cu_seqlens, int64_t window_size, double scale) {
  const at::Tensor dout = aligned(dout_in), q = aligned(q_in), k = aligned(k_in), v = aligned(v_in),
                   o = aligned(o_in);
  const Checker c(kOp);
  const SeqsArg seqs = check_swa(c, q, k, v, cu_seqlens, window_size, scale);
  check_bwd_inputs(c, q, v, dout, o, lse);
  check_device(c, q, q.size(3), v.size(3));
  nsa::SwaParams p = swa_params(q, k, v, o, lse, seqs, window_size, scale);
  auto [dq, dk, dv] = new_attn_grads(p, dout, q, k, v);
  if (q.is_cuda()) {
#ifdef NSA_WITH_CUDA
    plan_cuda(p, nsa::Pass::kBwd, q);
    const at::Tensor ws = cuda_workspace(q, nsa::cuda::swa_bwd_workspace_bytes(p));
    run_cuda(q, [&](cudaStream_t s) { nsa::cuda::swa_bwd(p, ws.data_ptr(), s); });
#endif
  } else {
    nsa::cpu::swa_bwd(p, torch_parallel_for);
  }
  return {dq, dk, dv};
}

}  // namespace nsa_torch
