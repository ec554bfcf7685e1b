// Compressed-branch CPU kernels (cmp_fwd, cmp_bwd) against float64 loops that follow docs/design.md section 1
// section 1 literally, and the float64 backward against finite differences of the forward.
#include "attn_reference.h"
#include "catch.h"

using namespace nsa_test;
using nsa::index_t;
using nsa::cpu::bf16;

namespace {

struct CmpCase {
  Problem pr;
  int l = 32, d = 16;  // block_size, block_stride
  int pad = 0;         // stride padding of every tensor (non-contiguous when > 0)
  bool dlse = true;    // backward with a gradient of lse
  unsigned seed = 1;
};

// Dense float64 results, logical layouts: o [B, T, HQ, Dv], lse [B, T, HQ], dq [B, T, HQ, D],
// dk [B, rows, H, D], dv [B, rows, H, Dv].
struct CmpRef {
  std::vector<double> o, lse, dq, dk, dv;
};

template <typename T, typename A>
CmpRef reference(const CmpCase& c, const CmpSeqs& lay, const Tensor<T>& q, const Tensor<T>& k,
                 const Tensor<T>& v, const Tensor<T>* dout, const Tensor<A>* dlse) {
  const Problem& pr = c.pr;
  const int G = pr.G(), D = pr.D, Dv = pr.Dv;
  const double ninf = -std::numeric_limits<double>::infinity();
  CmpRef r;
  r.o.assign(size_t(pr.B) * pr.T * pr.HQ * Dv, 0.0);
  r.lse.assign(size_t(pr.B) * pr.T * pr.HQ, ninf);
  r.dq.assign(size_t(pr.B) * pr.T * pr.HQ * D, 0.0);
  r.dk.assign(size_t(pr.B) * lay.rows * pr.H * D, 0.0);
  r.dv.assign(size_t(pr.B) * lay.rows * pr.H * Dv, 0.0);
  for (int s = 0; s < lay.seqs.num_seqs; ++s) {
    const nsa::SeqRange seq = lay.seqs.range(s);
    const int b = int(seq.batch);
    for (index_t t = 0; t < seq.len; ++t)
      for (int h = 0; h < pr.HQ; ++h) {
        const int g = h / G;
        const index_t row = seq.start + t, qi = index_t(b) * pr.T + row;
        // Visible: compressed rows whose window [i d, i d + l - 1] ends at or before t.
        std::vector<double> score;
        for (index_t i = 0; i * c.d + c.l - 1 <= t; ++i) {
          double x = 0;
          for (int e = 0; e < D; ++e) x += q.get(b, row, h, e) * k.get(b, seq.cmp_start + i, g, e);
          score.push_back(pr.sc() * x);
        }
        if (score.empty()) continue;
        const double mx = *std::max_element(score.begin(), score.end());
        double sum = 0;
        for (double x : score) sum += std::exp(x - mx);
        const double lse = mx + std::log(sum);
        r.lse[qi * pr.HQ + h] = lse;
        double* o = &r.o[(qi * pr.HQ + h) * Dv];
        for (size_t i = 0; i < score.size(); ++i)
          for (int e = 0; e < Dv; ++e)
            o[e] += std::exp(score[i] - lse) * v.get(b, seq.cmp_start + index_t(i), g, e);
        if (dout == nullptr) continue;
        // o = sum_i p_i v_i and lse: dS_i = p_i (dout.v_i - dout.o + dlse).
        const double dl = dlse ? dlse->get(b, row, h) : 0.0;
        double delta = 0;
        for (int e = 0; e < Dv; ++e) delta += dout->get(b, row, h, e) * o[e];
        for (size_t i = 0; i < score.size(); ++i) {
          const index_t kr = index_t(b) * lay.rows + seq.cmp_start + index_t(i);
          const double p = std::exp(score[i] - lse);
          double dp = 0;
          for (int e = 0; e < Dv; ++e) {
            dp += dout->get(b, row, h, e) * v.get(b, seq.cmp_start + index_t(i), g, e);
            r.dv[(kr * pr.H + g) * Dv + e] += p * dout->get(b, row, h, e);
          }
          const double ds = p * (dp - delta + dl) * pr.sc();
          for (int e = 0; e < D; ++e) {
            r.dq[(qi * pr.HQ + h) * D + e] += ds * k.get(b, seq.cmp_start + index_t(i), g, e);
            r.dk[(kr * pr.H + g) * D + e] += ds * q.get(b, row, h, e);
          }
        }
      }
  }
  return r;
}

// Every tensor of one problem, the kernel's outputs poisoned with NaN.
template <typename T>
struct CmpRun : AttnTensors<T> {
  using A = nsa::cpu::acc_t<T>;
  Tensor<A> dlse;

  CmpRun(const CmpCase& c, const CmpSeqs& lay)
      : AttnTensors<T>(c.pr, lay.rows, c.pad), dlse(c.pr.B, c.pr.T, c.pr.HQ, 1, c.pad) {
    std::mt19937 rng(c.seed);
    this->fill_inputs(rng, 2);  // scores of a few units: softmax neither uniform nor one-hot
    dlse.fill_uniform(rng);
  }

  nsa::CmpParams params(const CmpCase& c, const CmpSeqs& lay, bool backward) {
    nsa::CmpParams p;
    this->set_params(p, c.pr, lay.seqs, backward);
    if (backward && c.dlse) p.dlse = dlse.view();
    p.block_size = c.l;
    p.block_stride = c.d;
    return p;
  }

  void run(const CmpCase& c, const CmpSeqs& lay, const nsa::cpu::ParallelFor& pf) {
    nsa::cpu::cmp_fwd(params(c, lay, false), pf);
    nsa::cpu::cmp_bwd(params(c, lay, true), pf);
  }
};

template <typename T>
void check_case(const CmpCase& c) {
  const CmpSeqs lay(c.pr, c.l, c.d);
  CmpRun<T> run(c, lay);
  run.run(c, lay, nsa::cpu::serial_for);
  const CmpRef ref =
      reference(c, lay, run.q, run.k, run.v, &run.dout, c.dlse ? &run.dlse : nullptr);
  const double tol = tolerance<T>();
  CHECK(rel_err(c.pr, run.o, ref.o) < tol);
  CHECK(rel_err(c.pr, run.lse, ref.lse) < tol);
  CHECK(rel_err(c.pr, run.dq, ref.dq) < 2 * tol);
  CHECK(err_all(run.dk, ref.dk) < 2 * tol);
  CHECK(err_all(run.dv, ref.dv) < 2 * tol);
  // Rows that see nothing: exactly o = 0, dq = 0 (lse = -inf is checked by rel_err).
  for (size_t i = 0; i < ref.lse.size(); ++i) {
    if (!std::isinf(ref.lse[i])) continue;
    const int b = int(i / (size_t(c.pr.T) * c.pr.HQ));
    const index_t row = index_t(i / c.pr.HQ) % c.pr.T;
    const int h = int(i % c.pr.HQ);
    for (int e = 0; e < c.pr.Dv; ++e) REQUIRE(run.o.get(b, row, h, e) == 0.0);
    for (int e = 0; e < c.pr.D; ++e) REQUIRE(run.dq.get(b, row, h, e) == 0.0);
  }
}

std::vector<CmpCase> cases() {
  std::vector<CmpCase> cs;
  auto add = [&](int B, int T, int HQ, int H, int D, int Dv, int l, int d, int pad,
                 std::vector<int32_t> cu = {}) {
    CmpCase c;
    c.pr = Problem(B, T, HQ, H, D, Dv, cu);
    c.l = l, c.d = d, c.pad = pad, c.seed = unsigned(cs.size() + 11);
    c.dlse = cs.size() % 2 == 0;
    cs.push_back(c);
  };
  add(2, 1, 2, 2, 16, 16, 32, 16, 0);        // T = 1: nothing visible anywhere
  add(1, 20, 3, 1, 8, 12, 32, 16, 0);        // T < l, G = 3, D != Dv
  add(1, 20, 3, 1, 8, 12, 8, 4, 1);          // a few visible rows, strided
  add(2, 77, 3, 3, 24, 40, 16, 8, 3);        // G = 1, T not a multiple of anything, strided
  add(1, 301, 6, 2, 64, 32, 32, 16, 0);      // paper l, d; G = 3
  add(1, 700, 1, 1, 20, 20, 8, 8, 0);        // l = d, 88 rows: two key blocks
  add(1, 1100, 2, 1, 40, 24, 16, 4, 2);      // 272 rows: five key blocks, G = 2
  add(1, 150, 16, 1, 16, 16, 16, 8, 0);      // G = 16: 4 tokens per query tile
  add(1, 90, 5, 1, 12, 20, 8, 4, 1);         // G = 5, strided
  add(1, 193, 4, 2, 16, 8, 16, 8, 1, {0, 0, 1, 38, 38, 188, 193});  // varlen: empty, length 1
  return cs;
}

}  // namespace

TEST_CASE("cmp kernels match float64 loops (float32)", "[cmp]") {
  for (const CmpCase& c : cases()) {
    INFO("T=" << c.pr.T << " HQ=" << c.pr.HQ << " H=" << c.pr.H << " l=" << c.l << " d=" << c.d);
    check_case<float>(c);
  }
}

TEST_CASE("cmp kernels match float64 loops (float64)", "[cmp]") {
  for (const CmpCase& c : cases()) {
    INFO("T=" << c.pr.T << " HQ=" << c.pr.HQ << " H=" << c.pr.H << " l=" << c.l << " d=" << c.d);
    check_case<double>(c);
  }
}

TEST_CASE("cmp kernels match float64 loops (bfloat16, float16)", "[cmp]") {
  const std::vector<CmpCase> cs = cases();
  check_case<bf16>(cs[4]);
  check_case<bf16>(cs.back());
  check_case<nsa::cpu::fp16>(cs[6]);
}

TEST_CASE("cmp backward matches finite differences of the forward (float64)", "[cmp]") {
  CmpCase c;
  c.pr = Problem(1, 40, 2, 1, 6, 5);
  c.l = 8, c.d = 4, c.pad = 1;
  const CmpSeqs lay(c.pr, c.l, c.d);
  CmpRun<double> run(c, lay);
  run.run(c, lay, nsa::cpu::serial_for);
  // Loss = sum(o * dout) + sum(lse * dlse) over rows that see something.
  auto loss = [&] {
    CmpRun<double> probe(c, lay);
    probe.q = run.q, probe.k = run.k, probe.v = run.v;
    nsa::cpu::cmp_fwd(probe.params(c, lay, false), nsa::cpu::serial_for);
    double sum = 0;
    for (index_t t = 0; t < c.pr.T; ++t)
      for (int h = 0; h < c.pr.HQ; ++h) {
        const double lse = probe.lse.get(0, t, h);
        if (std::isinf(lse)) continue;
        sum += lse * run.dlse.get(0, t, h);
        for (int e = 0; e < c.pr.Dv; ++e) sum += probe.o.get(0, t, h, e) * run.dout.get(0, t, h, e);
      }
    return sum;
  };
  auto check = [&](Tensor<double>& x, const Tensor<double>& grad) {
    double num = 0, den = 0;
    for (int r = 0; r < x.rows; ++r)
      for (int h = 0; h < x.heads; ++h)
        for (int e = 0; e < x.dim; ++e) {
          const double x0 = x.get(0, r, h, e), eps = 1e-6;
          x.set(0, r, h, e, x0 + eps);
          const double up = loss();
          x.set(0, r, h, e, x0 - eps);
          const double down = loss();
          x.set(0, r, h, e, x0);
          const double fd = (up - down) / (2 * eps), g = grad.get(0, r, h, e);
          num += (fd - g) * (fd - g);
          den += g * g;
        }
    CHECK(den > 0);
    CHECK(std::sqrt(num / den) < 1e-7);
  };
  check(run.q, run.dq);
  check(run.k, run.dk);
  check(run.v, run.dv);
}

TEST_CASE("cmp kernels are deterministic under any chunking", "[cmp]") {
  CmpCase c = cases()[6];
  c.pr.B = 2;
  const CmpSeqs lay(c.pr, c.l, c.d);
  CmpRun<float> a(c, lay), b(c, lay), t(c, lay);
  a.run(c, lay, nsa::cpu::serial_for);
  b.run(c, lay, reverse_for);
  t.run(c, lay, threaded_for);
  check_same_outputs(a, b);
  check_same_outputs(a, t);
}

// Timing at the benchmark shape (hidden: run with [.bench] or the test name).
TEST_CASE("cmp forward/backward speed at T = 32k", "[.bench]") {
  CmpCase c;
  c.pr = Problem(1, 32768, 8, 2, 64, 64);
  const CmpSeqs lay(c.pr, c.l, c.d);
  CmpRun<float> run(c, lay);
  // 2 * (D + Dv) FLOP per visible (query head, compressed row) pair.
  double pairs = 0;
  for (index_t t = 0; t < c.pr.T; ++t) pairs += double(nsa::num_cmp_tokens(t + 1, c.l, c.d));
  time_fwd_bwd(
      "cmp", pairs * c.pr.HQ * 2 * (c.pr.D + c.pr.Dv),
      [&](const nsa::cpu::ParallelFor& pf) { nsa::cpu::cmp_fwd(run.params(c, lay, false), pf); },
      [&](const nsa::cpu::ParallelFor& pf) { nsa::cpu::cmp_bwd(run.params(c, lay, true), pf); });
}
