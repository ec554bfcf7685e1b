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
  p.window_size = int(std::min<int64_t>(window_size, int64_t(1) << 30));
  return p;
}

}  // namespace

static std::tuple<at::Tensor, at::Tensor> sliding_window_attention_fwd_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& cu_seqlens,
    int64_t window_size, double scale) {
  const Checker c(kOp);
  const SeqsArg seqs = check_swa(c, q, k, v, cu_seqlens, window_size, scale);
  check_device(c, q, q.size(3), v.size(3));
  at::Tensor o = new_output({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = new_output({q.size(0), q.size(1), q.size(2)},
                             q.options().dtype(lse_dtype(q.scalar_type())));
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

static std::tuple<at::Tensor, at::Tensor, at::Tensor> sliding_window_attention_bwd_impl(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& o, const at::Tensor& lse, const OptTensor& cu_seqlens, int64_t window_size,
    double scale) {
  const Checker c(kOp);
  const SeqsArg seqs = check_swa(c, q, k, v, cu_seqlens, window_size, scale);
  check_bwd_inputs(c, q, v, dout, o, lse);
  check_device(c, q, q.size(3), v.size(3));
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = new_output(k.sizes(), k.options());
  at::Tensor dv = new_output(v.sizes(), v.options());
  nsa::SwaParams p = swa_params(q, k, v, o, lse, seqs, window_size, scale);
  fill_attn_bwd(p, dout, dq, dk, dv);
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

// Unaligned CUDA inputs get aligned copies (see aligned()); the copies live through the call.
std::tuple<at::Tensor, at::Tensor> sliding_window_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& cu_seqlens,
    int64_t window_size, double scale) {
  return sliding_window_attention_fwd_impl(aligned(q), aligned(k), aligned(v), cu_seqlens,
      window_size, scale);
}

// Unaligned CUDA inputs get aligned copies (see aligned()); the copies live through the call.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sliding_window_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& o, const at::Tensor& lse, const OptTensor& cu_seqlens, int64_t window_size,
    double scale) {
  return sliding_window_attention_bwd_impl(aligned(dout), aligned(q), aligned(k), aligned(v),
      aligned(o), lse, cu_seqlens, window_size, scale);
}

}  // namespace nsa_torch
