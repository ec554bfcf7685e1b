// Sliding-window CPU kernels (swa_fwd, swa_bwd) against the dense float64 reference of
// attn_reference.h with the window visibility rule.
#include <chrono>
#include <cstdio>

#include "attn_reference.h"
#include "catch.h"

using namespace nsa_test;
using nsa::index_t;
using nsa::cpu::bf16;
using nsa::cpu::fp16;

namespace {

struct SwaCase {
  Problem pr;
  int window = 16;
  int pad = 0;  // stride padding of every token tensor (non-contiguous when > 0)
  unsigned seed = 1;
};

template <typename T>
struct SwaTensors {
  using A = nsa::cpu::acc_t<T>;
  Tensor<T> q, k, v, dout, o, dq, dk, dv;
  Tensor<A> lse;
  SwaTensors(const SwaCase& c, std::mt19937& rng)
      : q(c.pr.B, c.pr.T, c.pr.HQ, c.pr.D, c.pad), k(c.pr.B, c.pr.T, c.pr.H, c.pr.D, c.pad),
        v(c.pr.B, c.pr.T, c.pr.H, c.pr.Dv, c.pad), dout(c.pr.B, c.pr.T, c.pr.HQ, c.pr.Dv, c.pad),
        o(c.pr.B, c.pr.T, c.pr.HQ, c.pr.Dv, c.pad), dq(c.pr.B, c.pr.T, c.pr.HQ, c.pr.D, c.pad),
        dk(c.pr.B, c.pr.T, c.pr.H, c.pr.D, c.pad), dv(c.pr.B, c.pr.T, c.pr.H, c.pr.Dv, c.pad),
        lse(c.pr.B, c.pr.T, c.pr.HQ, 1) {
    q.fill_uniform(rng);
    k.fill_uniform(rng);
    v.fill_uniform(rng);
    dout.fill_uniform(rng);
    o.fill_nan();
    dq.fill_nan();
    dk.fill_nan();
    dv.fill_nan();
    lse.fill_nan();
  }
  nsa::SwaParams params(const SwaCase& c) {
    nsa::SwaParams p;
    p.dtype = dtype_of<T>();
    p.q = q.view();
    p.k = k.view();
    p.v = v.view();
    p.o = o.view();
    p.lse = lse.view();
    p.dout = dout.view();
    p.dq = dq.view();
    p.dk = dk.view();
    p.dv = dv.view();
    p.seqs = c.pr.seqs();
    p.num_heads = c.pr.HQ;
    p.num_heads_k = c.pr.H;
    p.head_dim = c.pr.D;
    p.head_dim_v = c.pr.Dv;
    p.scale = c.pr.sc();
    p.window_size = c.window;
    return p;
  }
};

template <typename T>
void check_swa(const SwaCase& c) {
  std::mt19937 rng(c.seed);
  SwaTensors<T> x(c, rng);
  const nsa::SwaParams p = x.params(c);
  nsa::cpu::swa_fwd(p, nsa::cpu::serial_for);
  nsa::cpu::swa_bwd(p, nsa::cpu::serial_for);

  const index_t w = c.window;
  const Reference ref = reference_attention(
      c.pr, x.q, x.k, x.v, &x.dout, [w](int, index_t t, index_t j, int) { return j <= t && j > t - w; });
  const double tol = tolerance<T>();
  CHECK(rel_err(c.pr, x.o, ref.o) < tol);
  CHECK(lse_err(c.pr, x.lse, ref.lse) < tol);
  CHECK(rel_err(c.pr, x.dq, ref.dq) < 2 * tol);
  CHECK(rel_err(c.pr, x.dk, ref.dk) < 2 * tol);
  CHECK(rel_err(c.pr, x.dv, ref.dv) < 2 * tol);

  // Same bits whatever the chunking and the threads.
  for (auto pf : {nsa::cpu::ParallelFor(reverse_for), nsa::cpu::ParallelFor(threaded_for)}) {
    std::mt19937 rng2(c.seed);
    SwaTensors<T> y(c, rng2);
    const nsa::SwaParams p2 = y.params(c);
    nsa::cpu::swa_fwd(p2, pf);
    nsa::cpu::swa_bwd(p2, pf);
    CHECK(same_bits(x.o, y.o));
    CHECK(same_bits(x.lse, y.lse));
    CHECK(same_bits(x.dq, y.dq));
    CHECK(same_bits(x.dk, y.dk));
    CHECK(same_bits(x.dv, y.dv));
  }
}

SwaCase make_case(int B, int T, int HQ, int H, int D, int Dv, int window, int pad) {
  SwaCase c;
  c.pr.B = B;
  c.pr.T = T;
  c.pr.HQ = HQ;
  c.pr.H = H;
  c.pr.D = D;
  c.pr.Dv = Dv;
  c.window = window;
  c.pad = pad;
  return c;
}

}  // namespace

TEST_CASE("swa: G=3, D != Dv, strided, odd T", "[swa]") {
  const SwaCase c = make_case(2, 77, 6, 2, 20, 12, 16, 3);
  SECTION("float64") { check_swa<double>(c); }
  SECTION("float32") { check_swa<float>(c); }
}

TEST_CASE("swa: G=1, window across several key chunks", "[swa]") {
  // w = 100 spans two 64-key chunks; T = 300 gives several dk/dv items (128 keys each).
  const SwaCase c = make_case(1, 300, 2, 2, 24, 40, 100, 0);
  SECTION("float64") { check_swa<double>(c); }
  SECTION("float32") { check_swa<float>(c); }
}

TEST_CASE("swa: window sizes 1, 7 and larger than T", "[swa]") {
  SECTION("w=1 float64") { check_swa<double>(make_case(1, 50, 3, 1, 8, 5, 1, 1)); }
  SECTION("w=1 float32") { check_swa<float>(make_case(1, 50, 3, 1, 8, 5, 1, 1)); }
  SECTION("w=7 float32") { check_swa<float>(make_case(2, 33, 3, 1, 8, 5, 7, 0)); }
  SECTION("w>T float64") { check_swa<double>(make_case(1, 70, 3, 3, 9, 17, 512, 0)); }
}

TEST_CASE("swa: T = 1 and T < window", "[swa]") {
  SECTION("T=1 float64") { check_swa<double>(make_case(2, 1, 3, 1, 8, 5, 16, 1)); }
  SECTION("T=1 float32") { check_swa<float>(make_case(2, 1, 3, 1, 8, 5, 16, 1)); }
  SECTION("T=9 float32") { check_swa<float>(make_case(1, 9, 6, 2, 8, 5, 16, 0)); }
}

TEST_CASE("swa: varlen with an empty and a length-1 sequence", "[swa]") {
  SwaCase c = make_case(1, 216, 6, 2, 20, 12, 50, 1);
  c.pr.cu = {0, 5, 5, 6, 146, 216};  // lengths 5, 0, 1, 140, 70
  SECTION("float64") { check_swa<double>(c); }
  SECTION("float32") { check_swa<float>(c); }
}

TEST_CASE("swa: paper-like heads, large groups, wide heads, explicit scale", "[swa]") {
  SECTION("G=4") { check_swa<float>(make_case(1, 200, 8, 2, 64, 64, 96, 0)); }
  SECTION("G=24") { check_swa<float>(make_case(1, 40, 48, 2, 16, 8, 20, 0)); }
  SECTION("G=70 > rows per batch") { check_swa<float>(make_case(1, 20, 70, 1, 8, 8, 5, 0)); }
  SECTION("D=192, Dv=128") { check_swa<float>(make_case(1, 50, 4, 2, 192, 128, 20, 0)); }
  SECTION("scale 0.3") {
    SwaCase c = make_case(1, 50, 4, 2, 16, 16, 9, 0);
    c.pr.scale = 0.3;
    check_swa<double>(c);
  }
}

TEST_CASE("swa: bf16 and fp16", "[swa]") {
  const SwaCase c = make_case(2, 70, 6, 2, 20, 24, 20, 1);
  SECTION("bf16") { check_swa<bf16>(c); }
  SECTION("fp16") { check_swa<fp16>(c); }
}

TEST_CASE("swa: backward matches finite differences of the forward (float64)", "[swa]") {
  const SwaCase c = make_case(1, 40, 3, 1, 6, 5, 9, 1);
  std::mt19937 rng(11);
  SwaTensors<double> x(c, rng);
  const nsa::SwaParams p = x.params(c);
  nsa::cpu::swa_fwd(p, nsa::cpu::serial_for);
  nsa::cpu::swa_bwd(p, nsa::cpu::serial_for);
  const auto dq = x.dq, dk = x.dk, dv = x.dv;
  auto loss = [&] {  // sum(o * dout), whose gradient the backward computes
    nsa::cpu::swa_fwd(p, nsa::cpu::serial_for);
    double sum = 0;
    for (int t = 0; t < c.pr.T; ++t)
      for (int h = 0; h < c.pr.HQ; ++h)
        for (int d = 0; d < c.pr.Dv; ++d) sum += x.o.get(0, t, h, d) * x.dout.get(0, t, h, d);
    return sum;
  };
  auto check = [&](Tensor<double>& in, const Tensor<double>& grad) {
    for (int i = 0; i < 12; ++i) {
      const index_t off = in.off(0, rng() % in.rows, int(rng() % in.heads), int(rng() % in.dim));
      const double x0 = in.data[off], eps = 1e-6;
      in.data[off] = x0 + eps;
      const double up = loss();
      in.data[off] = x0 - eps;
      const double down = loss();
      in.data[off] = x0;
      CHECK(std::abs((up - down) / (2 * eps) - grad.data[off]) < 1e-7);
    }
  };
  check(x.q, dq);
  check(x.k, dk);
  check(x.v, dv);
}

// Hidden benchmark: ./nsa_kernel_tests "[.bench]".
TEST_CASE("swa: forward and backward speed at T=32k HQ=8 H=2 D=64 w=512 float32", "[.bench]") {
  const SwaCase c = make_case(1, 32768, 8, 2, 64, 64, 512, 0);
  std::mt19937 rng(5);
  SwaTensors<float> x(c, rng);
  const nsa::SwaParams p = x.params(c);
  double keys = 0;  // visible (query row, key) pairs
  for (index_t t = 0; t < c.pr.T; ++t) keys += double(std::min<index_t>(t + 1, 512)) * c.pr.HQ;
  auto two_threads = [](index_t n, index_t, const std::function<void(index_t, index_t)>& fn) {
    std::thread other([&] { fn(n / 2, n); });
    fn(0, n / 2);
    other.join();
  };
  for (int threads : {1, 2}) {
    const nsa::cpu::ParallelFor pf =
        threads == 1 ? nsa::cpu::ParallelFor(nsa::cpu::serial_for) : two_threads;
    auto t0 = std::chrono::steady_clock::now();
    nsa::cpu::swa_fwd(p, pf);
    auto t1 = std::chrono::steady_clock::now();
    nsa::cpu::swa_bwd(p, pf);
    auto t2 = std::chrono::steady_clock::now();
    const double fwd = std::chrono::duration<double>(t1 - t0).count();
    const double bwd = std::chrono::duration<double>(t2 - t1).count();
    const double flops = 2.0 * keys * (c.pr.D + c.pr.Dv);  // q.k and p.v per visible pair
    std::printf("swa %d thread(s): fwd %.3f s (%.1f GFLOP/s), bwd %.3f s (%.1f GFLOP/s at 2.5x)\n",
                threads, fwd, flops / fwd * 1e-9, bwd, 2.5 * flops / bwd * 1e-9);
  }
}
