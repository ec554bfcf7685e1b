// The gated-sum CPU kernels (gate_fwd, gate_bwd) against the expression in double, on padded
// (non-contiguous) tensors of every element type.
#include <type_traits>

#include "attn_reference.h"
#include "catch.h"

using namespace nsa_test;
using nsa::cpu::bf16;
using nsa::cpu::fp16;

namespace {

// Absolute tolerance for values of magnitude <= 3 rounded to T.
template <typename T>
double abs_tol() {
  if (std::is_same_v<T, double>) return 1e-12;
  if (std::is_same_v<T, float>) return 1e-5;
  if (std::is_same_v<T, bf16>) return 3e-2;
  return 4e-3;  // fp16
}

template <typename T>
void check_gate(int B, int T_, int HQ, int Dv, int pad) {
  std::mt19937 rng(unsigned(B * 1000 + T_ * 100 + HQ * 10 + Dv));
  std::vector<Tensor<T>> o, g, d_o, d_g;
  for (int i = 0; i < 3; ++i) {
    o.emplace_back(B, T_, HQ, Dv, pad);
    g.emplace_back(B, T_, HQ, 1, pad);
    d_o.emplace_back(B, T_, HQ, Dv, pad);
    d_g.emplace_back(B, T_, HQ, 1, pad);
    o[i].fill_uniform(rng);
    g[i].fill_uniform(rng, 0, 1);
    d_o[i].fill_nan();
    d_g[i].fill_nan();
  }
  Tensor<T> out(B, T_, HQ, Dv, pad), dout(B, T_, HQ, Dv, pad);
  out.fill_nan();
  dout.fill_uniform(rng);

  nsa::GateParams p;
  p.dtype = dtype_of<T>();
  for (int i = 0; i < 3; ++i) {
    p.branch_o[i] = o[i].view();
    p.gate[i] = g[i].view();
    p.dbranch_o[i] = d_o[i].view();
    p.dgate[i] = d_g[i].view();
  }
  p.o = out.view();
  p.dout = dout.view();
  p.batch = B;
  p.seqlen = T_;
  p.num_heads = HQ;
  p.head_dim_v = Dv;
  nsa::cpu::gate_fwd(p, nsa::cpu::serial_for);
  nsa::cpu::gate_bwd(p, nsa::cpu::serial_for);

  const double tol = abs_tol<T>();
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T_; ++t)
      for (int h = 0; h < HQ; ++h) {
        double dg[3] = {0, 0, 0};
        for (int d = 0; d < Dv; ++d) {
          double ref = 0;
          for (int i = 0; i < 3; ++i) {
            ref += g[i].get(b, t, h) * o[i].get(b, t, h, d);
            dg[i] += dout.get(b, t, h, d) * o[i].get(b, t, h, d);
            REQUIRE(std::abs(d_o[i].get(b, t, h, d) - g[i].get(b, t, h) * dout.get(b, t, h, d)) <= tol);
          }
          REQUIRE(std::abs(out.get(b, t, h, d) - ref) <= tol);
        }
        for (int i = 0; i < 3; ++i) REQUIRE(std::abs(d_g[i].get(b, t, h) - dg[i]) <= tol * Dv);
      }
}

}  // namespace

TEST_CASE("gate_fwd / gate_bwd match the gated sum in double", "[gate]") {
  check_gate<double>(2, 5, 3, 7, 1);
  check_gate<float>(1, 9, 2, 16, 0);
  check_gate<bf16>(2, 4, 3, 5, 2);
  check_gate<fp16>(1, 6, 4, 8, 1);
}
