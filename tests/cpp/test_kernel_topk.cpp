// Top-n block selection CPU kernel (select_topk) against float64 loops that follow docs/design.md section 1
// section 1 literally: block scores from the overlap of each compressed window with each block,
// forced blocks, the best others with ties to the smaller j.
#include <array>
#include <chrono>
#include <cstdio>

#include "attn_reference.h"
#include "catch.h"

using namespace nsa_test;
using nsa::index_t;
using nsa::cpu::bf16;

namespace {

struct TopkCase {
  Problem pr;
  int l = 32, d = 16, sel = 64, n = 16, initial = 1, local = 2;
  int pad = 0;
  unsigned seed = 1;
};

template <typename T>
struct TopkRun {
  using A = nsa::cpu::acc_t<T>;
  Tensor<T> q, k;
  Tensor<A> lse;
  Tensor<int32_t> idx;

  // lse: the float64 softmax normaliser of each row, or (fast) that of the cmp_fwd kernel.
  TopkRun(const TopkCase& c, const CmpSeqs& lay, bool kernel_lse = false)
      : q(c.pr.B, c.pr.T, c.pr.HQ, c.pr.D, c.pad),
        k(c.pr.B, lay.rows, c.pr.H, c.pr.D, c.pad),
        lse(c.pr.B, c.pr.T, c.pr.HQ, 1, c.pad),
        idx(c.pr.B, c.pr.T, c.pr.H, c.n, c.pad) {
    std::mt19937 rng(c.seed);
    q.fill_uniform(rng, -2, 2);
    k.fill_uniform(rng, -2, 2);
    std::fill(idx.data.begin(), idx.data.end(), int32_t(-99));  // poison
    lse.fill_nan();
    if (kernel_lse) {
      Tensor<T> v(c.pr.B, lay.rows, c.pr.H, 16), o(c.pr.B, c.pr.T, c.pr.HQ, 16);
      nsa::CmpParams p;
      p.dtype = dtype_of<T>();
      p.q = q.view(), p.k = k.view(), p.v = v.view(), p.o = o.view(), p.lse = lse.view();
      p.seqs = lay.seqs;
      p.num_heads = c.pr.HQ, p.num_heads_k = c.pr.H, p.head_dim = c.pr.D, p.head_dim_v = 16;
      p.scale = c.pr.sc(), p.block_size = c.l, p.block_stride = c.d;
      nsa::cpu::cmp_fwd(p, nsa::cpu::serial_for);
      return;
    }
    // Float64 lse in the accumulation type; -inf for rows that see nothing and, to test the
    // fallback to the smallest blocks, for one row in 9 of the others.
    for (int s = 0; s < lay.seqs.num_seqs; ++s) {
      const nsa::SeqRange seq = lay.seqs.range(s);
      for (index_t t = 0; t < seq.len; ++t)
        for (int h = 0; h < c.pr.HQ; ++h) {
          const int b = int(seq.batch), g = h / c.pr.G();
          double mx = -std::numeric_limits<double>::infinity(), sum = 0;
          std::vector<double> sc;
          for (index_t i = 0; i * c.d + c.l - 1 <= t; ++i) {
            double x = 0;
            for (int e = 0; e < c.pr.D; ++e)
              x += q.get(b, seq.start + t, h, e) * k.get(b, seq.cmp_start + i, g, e);
            sc.push_back(c.pr.sc() * x);
            mx = std::max(mx, sc.back());
          }
          for (double x : sc) sum += std::exp(x - mx);
          const bool none = sc.empty() || rng() % 9 == 0;
          lse.data[lse.off(b, seq.start + t, h)] =
              none ? -std::numeric_limits<A>::infinity() : A(mx + std::log(sum));
        }
    }
  }

  void run(const TopkCase& c, const CmpSeqs& lay, const nsa::cpu::ParallelFor& pf) {
    nsa::TopkParams p;
    p.dtype = dtype_of<T>();
    p.q = q.view();
    p.k = k.view();
    p.lse = lse.view();
    p.indices = idx.view();
    p.seqs = lay.seqs;
    p.num_heads = c.pr.HQ;
    p.num_heads_k = c.pr.H;
    p.head_dim = c.pr.D;
    p.scale = c.pr.sc();
    p.block_size = c.l;
    p.block_stride = c.d;
    p.select_size = c.sel;
    p.num_selected = c.n;
    p.num_initial = c.initial;
    p.num_local = c.local;
    nsa::cpu::select_topk(p, pf);
  }
};

// S[t, g, j] for j = 0 .. t / l', straight from the definition (overlap of W_i and block j).
template <typename T>
std::vector<double> block_scores(const TopkCase& c, const TopkRun<T>& run,
                                 const nsa::SeqRange& seq, index_t t, int g) {
  const int b = int(seq.batch), G = c.pr.G();
  std::vector<double> score(size_t(t / c.sel + 1), 0.0);
  for (int h = g * G; h < (g + 1) * G; ++h) {
    const double lse = run.lse.get(b, seq.start + t, h);
    if (std::isinf(lse)) continue;  // sees nothing: p = 0
    for (index_t i = 0; i * c.d + c.l - 1 <= t; ++i) {
      double x = 0;
      for (int e = 0; e < c.pr.D; ++e)
        x += run.q.get(b, seq.start + t, h, e) * run.k.get(b, seq.cmp_start + i, g, e);
      const double p = std::exp(c.pr.sc() * x - lse);
      const index_t w0 = i * c.d, w1 = i * c.d + c.l - 1;
      for (index_t j = 0; j < index_t(score.size()); ++j) {
        const index_t lo = std::max(w0, j * c.sel), hi = std::min(w1, (j + 1) * c.sel - 1);
        if (hi >= lo) score[j] += p * double(hi - lo + 1) / c.d;
      }
    }
  }
  return score;
}

bool is_forced(const TopkCase& c, index_t t, index_t j) {
  const index_t b = t / c.sel;
  return j < c.initial || (j > b - c.local && j <= b);
}

// The reference selection: forced blocks plus the best others (ties to the smaller j),
// ascending, -1 padded.
std::vector<int32_t> reference_selection(const TopkCase& c, index_t t,
                                         const std::vector<double>& score) {
  std::vector<int32_t> forced, others;
  for (int32_t j = 0; j < int32_t(score.size()); ++j)
    (is_forced(c, t, j) ? forced : others).push_back(j);
  std::stable_sort(others.begin(), others.end(),
                   [&](int32_t x, int32_t y) { return score[x] > score[y]; });
  std::vector<int32_t> out = forced;
  for (int32_t j : others)
    if (int(out.size()) < c.n) out.push_back(j);
  std::sort(out.begin(), out.end());
  out.resize(c.n, -1);
  return out;
}

// exact: indices equal to the reference's. Otherwise (rounding may swap near-ties) compare by
// score: same count, forced blocks in, no chosen free block scoring below an unchosen one
// by more than tol.
template <typename T>
void check_case(const TopkCase& c, bool exact, double tol) {
  const CmpSeqs lay(c.pr, c.l, c.d);
  TopkRun<T> run(c, lay);
  run.run(c, lay, nsa::cpu::serial_for);
  int rows = 0;
  for (int s = 0; s < lay.seqs.num_seqs; ++s) {
    const nsa::SeqRange seq = lay.seqs.range(s);
    for (index_t t = 0; t < seq.len; ++t)
      for (int g = 0; g < c.pr.H; ++g) {
        INFO("seq " << s << " t " << t << " g " << g);
        const int32_t* got = &run.idx.data[run.idx.off(int(seq.batch), seq.start + t, g)];
        const std::vector<int32_t> gv(got, got + c.n);
        const std::vector<double> score = block_scores(c, run, seq, t, g);
        const std::vector<int32_t> want = reference_selection(c, t, score);
        ++rows;
        const double top = *std::max_element(score.begin(), score.end());
        if (exact || top == 0) {  // all-zero scores are exact ties in any precision
          REQUIRE(gv == want);
          continue;
        }
        const int count = int(std::min<size_t>(score.size(), size_t(c.n)));
        for (int x = 0; x < c.n; ++x) {
          if (x >= count) {
            REQUIRE(gv[x] == -1);
            continue;
          }
          REQUIRE(gv[x] >= 0);
          REQUIRE(gv[x] < int32_t(score.size()));
          if (x > 0) REQUIRE(gv[x] > gv[x - 1]);
        }
        double worst_chosen = std::numeric_limits<double>::infinity(), best_left = -1;
        for (int32_t j = 0; j < int32_t(score.size()); ++j) {
          const bool chosen = std::find(gv.begin(), gv.end(), j) != gv.end();
          if (is_forced(c, t, j)) REQUIRE(chosen);
          else if (chosen) worst_chosen = std::min(worst_chosen, score[j]);
          else best_left = std::max(best_left, score[j]);
        }
        REQUIRE(worst_chosen >= best_left - tol * top);
      }
  }
  CHECK(rows == c.pr.B * c.pr.T * c.pr.H);
}

std::vector<TopkCase> cases() {
  std::vector<TopkCase> cs;
  auto add = [&](int B, int T, int HQ, int H, int D, std::array<int, 6> hp, int pad,
                 std::vector<int32_t> cu = {}) {
    TopkCase c;
    c.pr = Problem(B, T, HQ, H, D, D, cu);
    c.l = hp[0], c.d = hp[1], c.sel = hp[2], c.n = hp[3], c.initial = hp[4], c.local = hp[5];
    c.pad = pad, c.seed = unsigned(cs.size() + 5);
    cs.push_back(c);
  };
  add(2, 1, 2, 2, 16, {32, 16, 64, 16, 1, 2}, 0);      // T = 1
  add(1, 20, 3, 1, 8, {32, 16, 64, 16, 1, 2}, 0);      // T < l: scores all 0
  add(1, 2500, 2, 1, 32, {32, 16, 64, 16, 1, 2}, 0);   // paper sizes, up to 40 candidates
  add(1, 333, 3, 1, 24, {16, 8, 32, 5, 1, 2}, 3);      // G = 3, strided
  add(2, 200, 2, 2, 16, {32, 8, 16, 4, 0, 0}, 1);      // l' < l, nothing forced, G = 1
  add(1, 500, 4, 2, 20, {16, 16, 48, 3, 2, 1}, 0);     // l = d, l' = 3 d
  add(1, 300, 2, 1, 16, {32, 16, 64, 16, 1, 2}, 0);    // n above every candidate count
  add(1, 400, 16, 1, 16, {16, 8, 32, 6, 1, 2}, 1);     // G = 16
  add(1, 698, 2, 2, 16, {16, 8, 32, 4, 1, 2}, 2, {0, 0, 1, 41, 41, 381, 698});  // varlen
  return cs;
}

}  // namespace

TEST_CASE("select_topk matches the float64 selection (float64: same indices)", "[topk]") {
  for (const TopkCase& c : cases()) check_case<double>(c, true, 0);
}

TEST_CASE("select_topk matches the float64 selection (float32: by score)", "[topk]") {
  for (const TopkCase& c : cases()) check_case<float>(c, false, 1e-5);
}

TEST_CASE("select_topk matches the float64 selection (bfloat16: by score)", "[topk]") {
  const std::vector<TopkCase> cs = cases();
  check_case<bf16>(cs[3], false, 1e-5);
  check_case<bf16>(cs.back(), false, 1e-5);
}

TEST_CASE("select_topk is deterministic under any chunking", "[topk]") {
  const TopkCase c = cases()[2];
  const CmpSeqs lay(c.pr, c.l, c.d);
  TopkRun<float> a(c, lay), b(c, lay), t(c, lay);
  a.run(c, lay, nsa::cpu::serial_for);
  b.run(c, lay, reverse_for);
  t.run(c, lay, threaded_for);
  CHECK(same_bits(a.idx, b.idx));
  CHECK(same_bits(a.idx, t.idx));
}

// Timing at the benchmark shape (hidden: run with [.bench] or the test name).
TEST_CASE("select_topk speed at T = 32k", "[.bench]") {
  TopkCase c;
  c.pr = Problem(1, 32768, 8, 2, 64, 64);
  const CmpSeqs lay(c.pr, c.l, c.d);
  TopkRun<float> run(c, lay, true);
  double pairs = 0;  // visible (query head, compressed row) pairs: 2 D FLOP each
  for (index_t t = 0; t < c.pr.T; ++t) pairs += double(nsa::num_cmp_tokens(t + 1, c.l, c.d));
  const double flop = pairs * c.pr.HQ * 2 * c.pr.D;
  using Runner = std::pair<const char*, nsa::cpu::ParallelFor>;
  for (const auto& [name, pf] :
       {Runner{"1 thread", nsa::cpu::serial_for}, Runner{"2 threads", two_threads_for}}) {
    const auto t0 = std::chrono::steady_clock::now();
    run.run(c, lay, pf);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("select_topk %s: %.3f s (%.1f GFLOP/s)\n", name, s, flop / s * 1e-9);
  }
}
