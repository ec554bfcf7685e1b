// nsa.gated_sum: o = g_cmp o_cmp + g_slc o_slc + g_swa o_swa (nsa_attention's last step) and its
// backward, one pass over the rows instead of torch's five element-wise ops and their temporaries.
#include <array>

#include "args.h"
#include "cuda_launch.h"
#include "nsa/cpu/kernels.h"
#ifdef NSA_WITH_CUDA
#include "nsa/cuda/kernels.h"
#endif
#include "ops.h"

namespace nsa_torch {
namespace {

constexpr const char* kOp = "nsa.gated_sum";
constexpr const char* kBranch[3] = {"o_cmp", "o_slc", "o_swa"};
constexpr const char* kGate[3] = {"g_cmp", "g_slc", "g_swa"};

// o_x [B, T, HQ, Dv] and g_x [B, T, HQ], all in o_cmp's float dtype and on its device; the gates
// may have any strides. Then the device: every float dtype on the CPU, bfloat16/float16 on CUDA.
void check_gate_inputs(const Checker& c, const std::array<at::Tensor, 3>& o,
                       const std::array<at::Tensor, 3>& g) {
  const at::Tensor& x = o[0];
  c.value(x.dim() == 4, "o_cmp", "a 4-D tensor [B, T, HQ, Dv]", tensor_str(x));
  check_float_dtype(c, x, "o_cmp");
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), T = x.size(1), HQ = x.size(2), Dv = x.size(3);
  for (int i = 0; i < 3; ++i) {
    c.tensor(o[i], kBranch[i], dt, {"B", "T", "HQ", "Dv"}, {B, T, HQ, Dv}, x.device());
    c.tensor(g[i], kGate[i], dt, {"B", "T", "HQ"}, {B, T, HQ}, x.device(), /*contiguous_last=*/false);
  }
  check_device_dtype(c, x, "o_cmp");
}

nsa::GateParams gate_params(const std::array<at::Tensor, 3>& o, const std::array<at::Tensor, 3>& g) {
  nsa::GateParams p;
  p.dtype = dtype_of(o[0].scalar_type());
  for (int i = 0; i < 3; ++i) {
    p.branch_o[i] = view_of(o[i]);
    p.gate[i] = view_of(g[i]);
  }
  p.batch = int(o[0].size(0));
  p.seqlen = o[0].size(1);
  p.num_heads = int(o[0].size(2));
  p.head_dim_v = int(o[0].size(3));
  return p;
}

}  // namespace

at::Tensor gated_sum(const at::Tensor& o_cmp, const at::Tensor& o_slc, const at::Tensor& o_swa,
                     const at::Tensor& g_cmp, const at::Tensor& g_slc, const at::Tensor& g_swa) {
  const Checker c(kOp);
  const std::array<at::Tensor, 3> o{o_cmp, o_slc, o_swa}, g{g_cmp, g_slc, g_swa};
  check_gate_inputs(c, o, g);
  at::Tensor out = new_output(o_cmp.sizes(), o_cmp.options());
  nsa::GateParams p = gate_params(o, g);
  p.o = view_of(out);
  if (o_cmp.is_cuda()) {
#ifdef NSA_WITH_CUDA
    run_cuda(o_cmp, [&](cudaStream_t s) { nsa::cuda::gate_fwd(p, s); });
#endif
  } else {
    nsa::cpu::gate_fwd(p, torch_parallel_for);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_sum_bwd(
    const at::Tensor& dout, const at::Tensor& o_cmp, const at::Tensor& o_slc, const at::Tensor& o_swa,
    const at::Tensor& g_cmp, const at::Tensor& g_slc, const at::Tensor& g_swa) {
  const Checker c(kOp);
  const std::array<at::Tensor, 3> o{o_cmp, o_slc, o_swa}, g{g_cmp, g_slc, g_swa};
  check_gate_inputs(c, o, g);
  c.tensor(dout, "dout", o_cmp.scalar_type(), {"B", "T", "HQ", "Dv"},
           {o_cmp.size(0), o_cmp.size(1), o_cmp.size(2), o_cmp.size(3)}, o_cmp.device());
  nsa::GateParams p = gate_params(o, g);
  p.dout = view_of(dout);
  std::array<at::Tensor, 3> d_o, d_g;
  for (int i = 0; i < 3; ++i) {
    d_o[i] = new_output(o_cmp.sizes(), o_cmp.options());
    d_g[i] = new_output(g_cmp.sizes(), o_cmp.options());
    p.dbranch_o[i] = view_of(d_o[i]);
    p.dgate[i] = view_of(d_g[i]);
  }
  if (o_cmp.is_cuda()) {
#ifdef NSA_WITH_CUDA
    run_cuda(o_cmp, [&](cudaStream_t s) { nsa::cuda::gate_bwd(p, s); });
#endif
  } else {
    nsa::cpu::gate_bwd(p, torch_parallel_for);
  }
  return {d_o[0], d_o[1], d_o[2], d_g[0], d_g[1], d_g[2]};
}

}  // namespace nsa_torch
