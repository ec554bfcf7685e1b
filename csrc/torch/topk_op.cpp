// nsa.select_blocks: the top-n block selection op (not differentiable).
#include "args.h"
#include "cuda_launch.h"
#include "kernel_plan.h"
#include "nsa/cpu/kernels.h"
#ifdef NSA_WITH_CUDA
#include "nsa/cuda/kernels.h"
#endif
#include "ops.h"

namespace nsa_torch {

// Unaligned CUDA inputs are replaced by aligned copies first (see aligned()); they live through
// the call.
at::Tensor select_blocks(const at::Tensor& q_in, const at::Tensor& k_cmp_in, const at::Tensor& lse,
                         const OptTensor& cu_seqlens, int64_t block_size, int64_t block_stride,
                         int64_t select_size, int64_t num_selected, int64_t num_initial,
                         int64_t num_local, double scale) {
  const at::Tensor q = aligned(q_in), k_cmp = aligned(k_cmp_in);
  const Checker c("nsa.select_blocks");
  check_qkv(c, q, k_cmp, k_cmp, "k_cmp", "k_cmp", /*same_len=*/false);  // no values here: k_cmp stands in for them
  const int64_t B = q.size(0), T = q.size(1), HQ = q.size(2), H = k_cmp.size(2);
  c.tensor(lse, "lse", lse_dtype(q.scalar_type()), {"B", "T", "HQ"}, {B, T, HQ}, q.device());
  check_compression(c, block_size, block_stride);
  check_selection(c, block_stride, select_size, num_selected, num_initial, num_local);
  check_scale(c, scale);
  const SeqsArg seqs = make_seqs(c, q, cu_seqlens, k_cmp.size(1), block_size, block_stride);
  check_device(c, q, q.size(3), -1);

  at::Tensor indices = new_output({B, T, H, num_selected}, q.options().dtype(at::kInt));
  nsa::TopkParams p;
  p.dtype = dtype_of(q.scalar_type());
  p.q = view_of(q);
  p.k = view_of(k_cmp);
  p.lse = view_of(lse);
  p.indices = view_of(indices);
  p.seqs = seqs.seqs;
  p.num_heads = int(HQ);
  p.num_heads_k = int(H);
  p.head_dim = int(q.size(3));
  p.scale = scale;
  p.block_size = int(block_size);
  p.block_stride = int(block_stride);
  p.select_size = int(select_size);
  p.num_selected = int(num_selected);
  p.num_initial = int(num_initial);
  p.num_local = int(num_local);
  if (q.is_cuda()) {
#ifdef NSA_WITH_CUDA
    plan_cuda(p, q);
    run_cuda(q, [&](cudaStream_t s) { nsa::cuda::select_topk(p, s); });
#endif
  } else {
    nsa::cpu::select_topk(p, torch_parallel_for);
  }
  return indices;
}

}  // namespace nsa_torch
