// nsa.selected_attention: forward and backward ops.
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

constexpr const char* kOp = "nsa.selected_attention";

SeqsArg check_slc(const Checker& c, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& block_indices, const OptTensor& cu_seqlens,
                  int64_t select_size, double scale) {
  check_qkv(c, q, k, v, "k", "v", /*same_len=*/true);
  const int64_t B = q.size(0), T = q.size(1), H = k.size(2);
  c.value(block_indices.dim() == 4, "block_indices", "int32 [B, T, H, n]",
          tensor_str(block_indices));
  c.tensor(block_indices, "block_indices", at::kInt, {"B", "T", "H", "n"},
           {B, T, H, block_indices.size(3)}, q.device());
  check_size(c, "select_size", select_size);
  c.value(block_indices.size(3) <= kMaxSelected, "block_indices",
          "[B, T, H, n] with n <= " + std::to_string(kMaxSelected), tensor_str(block_indices));
  check_scale(c, scale);
  return make_seqs(c, q, cu_seqlens);
}

nsa::SlcParams slc_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& block_indices, const at::Tensor& o,
                          const at::Tensor& lse, const SeqsArg& seqs, int64_t select_size,
                          double scale) {
  nsa::SlcParams p;
  fill_attn(p, q, k, v, o, lse, seqs.seqs, scale);
  p.block_indices = view_of(block_indices);
  p.num_selected = int(block_indices.size(3));
  p.select_size = int(select_size);
  return p;
}

// Entries must be -1 or a block of the query's own sequence, listed once per row. Checked on the
// CPU only: a CUDA check would need a host sync. The CUDA kernels never read past the sequence:
// they skip entries out of range and count a repeated entry once.
void check_block_index_values(const Checker& c, const nsa::SlcParams& p) {
  const nsa::cpu::BlockIndexError e = nsa::cpu::check_block_indices(p);
  if (e.kind == nsa::cpu::BlockIndexError::kNone) return;
  const std::string where = "block_indices[" + std::to_string(e.batch) + ", " +
                            std::to_string(e.token) + ", " + std::to_string(e.head) + ", " +
                            std::to_string(e.slot) + "] = " + std::to_string(e.value);
  if (e.kind == nsa::cpu::BlockIndexError::kOutOfRange)
    c.value(false, "block_indices",
            "-1 or a block index in [0, " + std::to_string(e.num_blocks) +
                ") of the query's sequence (select_size = " + std::to_string(p.select_size) + ")",
            where);
  c.value(false, "block_indices", "free of duplicates within a row", where + " listed twice");
}

}  // namespace

// Unaligned CUDA inputs are replaced by aligned copies first (see aligned()); they live through
// the call.
std::tuple<at::Tensor, at::Tensor> selected_attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& block_indices, const OptTensor& cu_seqlens, int64_t select_size,
    double scale) {
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  const Checker c(kOp);
  const SeqsArg seqs = check_slc(c, q, k, v, block_indices, cu_seqlens, select_size, scale);
  check_device(c, q, q.size(3), v.size(3));
  auto [o, lse] = new_attn_outputs(q, v);
  nsa::SlcParams p = slc_params(q, k, v, block_indices, o, lse, seqs, select_size, scale);
  if (q.is_cuda()) {
#ifdef NSA_WITH_CUDA
    plan_cuda(p, nsa::Pass::kFwd, q);
    const size_t bytes = nsa::cuda::slc_fwd_workspace_bytes(p);
    const at::Tensor ws = bytes ? cuda_workspace(q, bytes) : at::Tensor();
    run_cuda(q, [&](cudaStream_t s) { nsa::cuda::slc_fwd(p, bytes ? ws.data_ptr() : nullptr, s); });
#endif
  } else {
    check_block_index_values(c, p);
    nsa::cpu::slc_fwd(p, torch_parallel_for);
  }
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selected_attention_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& block_indices, const at::Tensor& o_in,
    const at::Tensor& lse, const OptTensor& cu_seqlens, int64_t select_size, double scale) {
  const at::Tensor dout = aligned(dout_in), q = aligned(q_in), k = aligned(k_in), v = aligned(v_in),
                   o = aligned(o_in);
  const Checker c(kOp);
  const SeqsArg seqs = check_slc(c, q, k, v, block_indices, cu_seqlens, select_size, scale);
  check_bwd_inputs(c, q, v, dout, o, lse);
  check_device(c, q, q.size(3), v.size(3));
  nsa::SlcParams p = slc_params(q, k, v, block_indices, o, lse, seqs, select_size, scale);
  auto [dq, dk, dv] = new_attn_grads(p, dout, q, k, v);
  if (q.is_cuda()) {
#ifdef NSA_WITH_CUDA
    plan_cuda(p, nsa::Pass::kBwd, q);
    const at::Tensor ws = cuda_workspace(q, nsa::cuda::slc_bwd_workspace_bytes(p));
    run_cuda(q, [&](cudaStream_t s) { nsa::cuda::slc_bwd(p, ws.data_ptr(), s); });
#endif
  } else {
    check_block_index_values(c, p);
    nsa::cpu::slc_bwd(p, torch_parallel_for);
  }
  return {dq, dk, dv};
}

}  // namespace nsa_torch
