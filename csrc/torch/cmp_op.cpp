// nsa.compressed_attention: forward and backward ops.
#include "args.h"
#include "nsa/cpu/kernels.h"
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

std::tuple<at::Tensor, at::Tensor> compressed_attention_fwd(
    const at::Tensor& q, const at::Tensor& k_cmp, const at::Tensor& v_cmp,
    const OptTensor& cu_seqlens, int64_t block_size, int64_t block_stride, double scale) {
  const Checker c(kOp);
  const SeqsArg seqs = check_cmp(c, q, k_cmp, v_cmp, cu_seqlens, block_size, block_stride, scale);
  require_cpu(c, q);
  at::Tensor o = new_output({q.size(0), q.size(1), q.size(2), v_cmp.size(3)}, q.options());
  at::Tensor lse = new_output({q.size(0), q.size(1), q.size(2)},
                             q.options().dtype(lse_dtype(q.scalar_type())));
  const nsa::CmpParams p = cmp_params(q, k_cmp, v_cmp, o, lse, seqs, block_size, block_stride, scale);
  nsa::cpu::cmp_fwd(p, torch_parallel_for);
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compressed_attention_bwd(
    const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q, const at::Tensor& k_cmp,
    const at::Tensor& v_cmp, const at::Tensor& o, const at::Tensor& lse,
    const OptTensor& cu_seqlens, int64_t block_size, int64_t block_stride, double scale) {
  const Checker c(kOp);
  const SeqsArg seqs = check_cmp(c, q, k_cmp, v_cmp, cu_seqlens, block_size, block_stride, scale);
  check_bwd_inputs(c, q, v_cmp, dout, o, lse);
  if (dlse.has_value())
    c.tensor(*dlse, "dlse", lse.scalar_type(), {"B", "T", "HQ"}, {q.size(0), q.size(1), q.size(2)},
             q.device());
  require_cpu(c, q);
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = new_output(k_cmp.sizes(), k_cmp.options());
  at::Tensor dv = new_output(v_cmp.sizes(), v_cmp.options());
  nsa::CmpParams p = cmp_params(q, k_cmp, v_cmp, o, lse, seqs, block_size, block_stride, scale);
  fill_attn_bwd(p, dout, dq, dk, dv);
  if (dlse.has_value()) p.dlse = view_of(*dlse);
  nsa::cpu::cmp_bwd(p, torch_parallel_for);
  return {dq, dk, dv};
}

}  // namespace nsa_torch
