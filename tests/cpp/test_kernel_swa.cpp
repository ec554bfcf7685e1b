// Sliding-window CPU kernels (swa_fwd, swa_bwd) against the dense float64 reference of
// attn_reference.h with the window visibility rule.
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
struct SwaTensors : AttnTensors<T> {
  SwaTensors(const SwaCase& c, std::mt19937& rng) : AttnTensors<T>(c.pr, c.pr.T, c.pad) {
    this->fill_inputs(rng);
  }
  nsa::SwaParams params(const SwaCase& c) {
    nsa::SwaParams p;
    this->set_params(p, c.pr, c.pr.seqs());
    p.window_size = c.window;
    return p;
  }
};

template <typename T>
void check_swa(const SwaCase& c) {
  const index_t w = c.window;
  check_attention<T>(
      c.pr,
      [&] {
        std::mt19937 rng(c.seed);
        return SwaTensors<T>(c, rng);
      },
      [&](SwaTensors<T>& x, const nsa::cpu::ParallelFor& pf) {
        const nsa::SwaParams p = x.params(c);
        nsa::cpu::swa_fwd(p, pf);
        nsa::cpu::swa_bwd(p, pf);
      },
      [w](const SwaTensors<T>&) -> Visible {
        return [w](int, index_t t, index_t j, int) { return j <= t && j > t - w; };
      });
}

SwaCase make_case(Problem pr, int window, int pad) {
  SwaCase c;
  c.pr = pr;
  c.window = window;
  c.pad = pad;
  return c;
}

}  // namespace

TEMPLATE_TEST_CASE("swa: G=3, D != Dv, strided, odd T", "[swa]", double, float) {
  check_swa<TestType>(make_case({2, 77, 6, 2, 20, 12}, 16, 3));
}

TEMPLATE_TEST_CASE("swa: G=1, window across several key chunks", "[swa]", double, float) {
  // w = 100 spans two 64-key chunks; T = 300 gives several dk/dv items (128 keys each).
  check_swa<TestType>(make_case({1, 300, 2, 2, 24, 40}, 100, 0));
}

TEST_CASE("swa: window sizes 1, 7 and larger than T", "[swa]") {
  SECTION("w=1 float64") { check_swa<double>(make_case({1, 50, 3, 1, 8, 5}, 1, 1)); }
  SECTION("w=1 float32") { check_swa<float>(make_case({1, 50, 3, 1, 8, 5}, 1, 1)); }
  SECTION("w=7 float32") { check_swa<float>(make_case({2, 33, 3, 1, 8, 5}, 7, 0)); }
  SECTION("w>T float64") { check_swa<double>(make_case({1, 70, 3, 3, 9, 17}, 512, 0)); }
}

TEST_CASE("swa: T = 1 and T < window", "[swa]") {
  SECTION("T=1 float64") { check_swa<double>(make_case({2, 1, 3, 1, 8, 5}, 16, 1)); }
  SECTION("T=1 float32") { check_swa<float>(make_case({2, 1, 3, 1, 8, 5}, 16, 1)); }
  SECTION("T=9 float32") { check_swa<float>(make_case({1, 9, 6, 2, 8, 5}, 16, 0)); }
}

TEMPLATE_TEST_CASE("swa: varlen with an empty and a length-1 sequence", "[swa]", double, float) {
  // Lengths 5, 0, 1, 140, 70.
  check_swa<TestType>(make_case({1, 216, 6, 2, 20, 12, {0, 5, 5, 6, 146, 216}}, 50, 1));
}

TEST_CASE("swa: paper-like heads, large groups, wide heads, explicit scale", "[swa]") {
  SECTION("G=4") { check_swa<float>(make_case({1, 200, 8, 2, 64, 64}, 96, 0)); }
  SECTION("G=24") { check_swa<float>(make_case({1, 40, 48, 2, 16, 8}, 20, 0)); }
  SECTION("G=70 > rows per batch") { check_swa<float>(make_case({1, 20, 70, 1, 8, 8}, 5, 0)); }
  SECTION("D=192, Dv=128") { check_swa<float>(make_case({1, 50, 4, 2, 192, 128}, 20, 0)); }
  SECTION("scale 0.3") {
    SwaCase c = make_case({1, 50, 4, 2, 16, 16}, 9, 0);
    c.pr.scale = 0.3;
    check_swa<double>(c);
  }
}

TEMPLATE_TEST_CASE("swa: bf16 and fp16", "[swa]", bf16, fp16) {
  check_swa<TestType>(make_case({2, 70, 6, 2, 20, 24}, 20, 1));
}

TEST_CASE("swa: backward matches finite differences of the forward (float64)", "[swa]") {
  const SwaCase c = make_case({1, 40, 3, 1, 6, 5}, 9, 1);
  std::mt19937 rng(11);
  SwaTensors<double> x(c, rng);
  const nsa::SwaParams p = x.params(c);
  check_finite_differences(
      x, rng, [&] { nsa::cpu::swa_fwd(p, nsa::cpu::serial_for); },
      [&] { nsa::cpu::swa_bwd(p, nsa::cpu::serial_for); });
}

// Hidden benchmark: ./nsa_kernel_tests "[.bench]".
TEST_CASE("swa: forward and backward speed at T=32k HQ=8 H=2 D=64 w=512 float32", "[.bench]") {
  const SwaCase c = make_case({1, 32768, 8, 2, 64, 64}, 512, 0);
  std::mt19937 rng(5);
  SwaTensors<float> x(c, rng);
  const nsa::SwaParams p = x.params(c);
  double keys = 0;  // visible (query row, key) pairs
  for (index_t t = 0; t < c.pr.T; ++t) keys += double(std::min<index_t>(t + 1, 512)) * c.pr.HQ;
  time_fwd_bwd(
      "swa", 2.0 * keys * (c.pr.D + c.pr.Dv),  // q.k and p.v per visible pair
      [&](const nsa::cpu::ParallelFor& pf) { nsa::cpu::swa_fwd(p, pf); },
      [&](const nsa::cpu::ParallelFor& pf) { nsa::cpu::swa_bwd(p, pf); });
}
