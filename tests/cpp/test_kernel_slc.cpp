// Selected-branch CPU kernels (slc_fwd, slc_bwd) and check_block_indices, against the dense
// float64 reference of attn_reference.h with the selected-branch visibility rule.
#include <chrono>
#include <cstdio>
#include <set>

#include "attn_reference.h"
#include "catch.h"

using namespace nsa_test;
using nsa::index_t;
using nsa::cpu::bf16;
using nsa::cpu::fp16;

namespace {

struct SlcCase {
  Problem pr;
  int select_size = 16;
  int num_selected = 3;
  int pad = 0;            // stride padding of every token tensor (non-contiguous when > 0)
  bool messy = false;     // unsorted slots, a duplicate, out-of-range values
  unsigned seed = 1;
};

index_t num_blocks(const SlcCase& c, index_t len) { return (len + c.select_size - 1) / c.select_size; }

// Per (token, kv head): up to n distinct blocks of the sequence, some of them ahead of the
// token (they hold no visible key), ascending, -1 padded; one row in 7 lists nothing.
Tensor<int32_t> random_indices(const SlcCase& c, std::mt19937& rng) {
  const Problem& pr = c.pr;
  Tensor<int32_t> idx(pr.B, pr.T, pr.H, c.num_selected, c.pad);
  std::fill(idx.data.begin(), idx.data.end(), -1);
  const nsa::Seqs seqs = pr.seqs();
  for (int s = 0; s < seqs.num_seqs; ++s) {
    const nsa::SeqRange seq = seqs.range(s);
    const index_t nb = num_blocks(c, seq.len);
    for (index_t t = 0; t < seq.len; ++t)
      for (int g = 0; g < pr.H; ++g) {
        int32_t* row = &idx.data[idx.off(int(seq.batch), seq.start + t, g)];
        if (rng() % 7 == 0) continue;
        const index_t reach = std::min<index_t>(nb, t / c.select_size + 2);
        std::vector<int32_t> pick;
        for (index_t j = 0; j < reach; ++j) pick.push_back(int32_t(j));
        std::shuffle(pick.begin(), pick.end(), rng);
        pick.resize(std::min<size_t>(pick.size(), 1 + rng() % c.num_selected));
        if (c.messy) {
          if (pick.size() > 1 && rng() % 2) pick.back() = pick.front();    // duplicate
          if (int(pick.size()) < c.num_selected) pick.push_back(int32_t(nb + rng() % 3));
          if (int(pick.size()) < c.num_selected) pick.push_back(-7);
        } else {
          std::sort(pick.begin(), pick.end());
        }
        std::copy(pick.begin(), pick.end(), row);
      }
  }
  return idx;
}

// Token t of sequence s sees key j for kv head g: j <= t and j's block listed (valid entries).
Visible slc_visible(const SlcCase& c, const Tensor<int32_t>& idx) {
  return [&c, &idx](int s, index_t t, index_t j, int g) {
    const nsa::SeqRange seq = c.pr.seqs().range(s);
    if (j > t) return false;
    const int32_t* row = &idx.data[idx.off(int(seq.batch), seq.start + t, g)];
    for (int i = 0; i < c.num_selected; ++i)
      if (row[i] >= 0 && row[i] < num_blocks(c, seq.len) && row[i] == j / c.select_size)
        return true;
    return false;
  };
}

template <typename T>
struct SlcTensors {
  using A = nsa::cpu::acc_t<T>;
  Tensor<T> q, k, v, dout, o, dq, dk, dv;
  Tensor<A> lse;
  Tensor<int32_t> idx;
  SlcTensors(const SlcCase& c, std::mt19937& rng)
      : q(c.pr.B, c.pr.T, c.pr.HQ, c.pr.D, c.pad), k(c.pr.B, c.pr.T, c.pr.H, c.pr.D, c.pad),
        v(c.pr.B, c.pr.T, c.pr.H, c.pr.Dv, c.pad), dout(c.pr.B, c.pr.T, c.pr.HQ, c.pr.Dv, c.pad),
        o(c.pr.B, c.pr.T, c.pr.HQ, c.pr.Dv, c.pad), dq(c.pr.B, c.pr.T, c.pr.HQ, c.pr.D, c.pad),
        dk(c.pr.B, c.pr.T, c.pr.H, c.pr.D, c.pad), dv(c.pr.B, c.pr.T, c.pr.H, c.pr.Dv, c.pad),
        lse(c.pr.B, c.pr.T, c.pr.HQ, 1), idx(random_indices(c, rng)) {
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
  nsa::SlcParams params(const SlcCase& c, const Problem& pr) {
    nsa::SlcParams p;
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
    p.seqs = pr.seqs();
    p.num_heads = pr.HQ;
    p.num_heads_k = pr.H;
    p.head_dim = pr.D;
    p.head_dim_v = pr.Dv;
    p.scale = pr.sc();
    p.block_indices = idx.view();
    p.num_selected = c.num_selected;
    p.select_size = c.select_size;
    return p;
  }
};

template <typename T>
void check_slc(const SlcCase& c) {
  std::mt19937 rng(c.seed);
  SlcTensors<T> x(c, rng);
  const nsa::SlcParams p = x.params(c, c.pr);
  nsa::cpu::slc_fwd(p, nsa::cpu::serial_for);
  nsa::cpu::slc_bwd(p, nsa::cpu::serial_for);

  const Reference ref = reference_attention(c.pr, x.q, x.k, x.v, &x.dout, slc_visible(c, x.idx));
  const double tol = tolerance<T>();
  CHECK(rel_err(c.pr, x.o, ref.o) < tol);
  CHECK(lse_err(c.pr, x.lse, ref.lse) < tol);
  CHECK(rel_err(c.pr, x.dq, ref.dq) < 2 * tol);
  CHECK(rel_err(c.pr, x.dk, ref.dk) < 2 * tol);
  CHECK(rel_err(c.pr, x.dv, ref.dv) < 2 * tol);

  // Same bits whatever the chunking and the threads.
  for (auto pf : {nsa::cpu::ParallelFor(reverse_for), nsa::cpu::ParallelFor(threaded_for)}) {
    std::mt19937 rng2(c.seed);
    SlcTensors<T> y(c, rng2);
    const nsa::SlcParams p2 = y.params(c, c.pr);
    nsa::cpu::slc_fwd(p2, pf);
    nsa::cpu::slc_bwd(p2, pf);
    CHECK(same_bits(x.o, y.o));
    CHECK(same_bits(x.lse, y.lse));
    CHECK(same_bits(x.dq, y.dq));
    CHECK(same_bits(x.dk, y.dk));
    CHECK(same_bits(x.dv, y.dv));
  }
}

SlcCase make_case(int B, int T, int HQ, int H, int D, int Dv, int select_size, int n, int pad) {
  SlcCase c;
  c.pr.B = B;
  c.pr.T = T;
  c.pr.HQ = HQ;
  c.pr.H = H;
  c.pr.D = D;
  c.pr.Dv = Dv;
  c.select_size = select_size;
  c.num_selected = n;
  c.pad = pad;
  return c;
}

SlcCase varlen_case() {
  // Lengths 5, 0, 1, 40, 70: an empty and a length-1 sequence.
  SlcCase c = make_case(1, 116, 6, 2, 20, 12, 16, 3, 1);
  c.pr.cu = {0, 5, 5, 6, 46, 116};
  return c;
}

}  // namespace

TEST_CASE("slc: G=3, D != Dv, strided, odd T", "[slc]") {
  const SlcCase c = make_case(2, 77, 6, 2, 20, 12, 16, 3, 3);
  SECTION("float64") { check_slc<double>(c); }
  SECTION("float32") { check_slc<float>(c); }
}

TEST_CASE("slc: G=1, vector-width head dims", "[slc]") {
  const SlcCase c = make_case(1, 150, 2, 2, 24, 40, 16, 4, 0);
  SECTION("float64") { check_slc<double>(c); }
  SECTION("float32") { check_slc<float>(c); }
}

TEST_CASE("slc: T = 1 and T < select_size", "[slc]") {
  SECTION("T=1 float64") { check_slc<double>(make_case(2, 1, 3, 1, 8, 5, 16, 2, 1)); }
  SECTION("T=1 float32") { check_slc<float>(make_case(2, 1, 3, 1, 8, 5, 16, 2, 1)); }
  SECTION("T=9 float64") { check_slc<double>(make_case(1, 9, 3, 1, 8, 5, 16, 2, 0)); }
  SECTION("T=9 float32") { check_slc<float>(make_case(1, 9, 3, 1, 8, 5, 16, 2, 0)); }
}

TEST_CASE("slc: varlen with an empty and a length-1 sequence", "[slc]") {
  SECTION("float64") { check_slc<double>(varlen_case()); }
  SECTION("float32") { check_slc<float>(varlen_case()); }
}

TEST_CASE("slc: blocks longer than a key chunk, many rows per block", "[slc]") {
  // select_size 128 > 64 keys per chunk; block 0 is listed by up to 300 tokens x 3 heads.
  SlcCase c = make_case(1, 300, 3, 1, 16, 16, 128, 2, 0);
  SECTION("float64") { check_slc<double>(c); }
  SECTION("float32") { check_slc<float>(c); }
}

TEST_CASE("slc: paper-like shape (G=4, D=64, l'=64)", "[slc]") {
  check_slc<float>(make_case(1, 200, 8, 2, 64, 64, 64, 3, 0));
}

TEST_CASE("slc: unsorted slots, duplicates and out-of-range entries are a set", "[slc]") {
  SlcCase c = make_case(1, 90, 6, 2, 12, 9, 16, 4, 2);
  c.messy = true;
  check_slc<double>(c);
}

TEST_CASE("slc: large groups, wide heads, explicit scale", "[slc]") {
  SECTION("G=20") { check_slc<float>(make_case(1, 40, 40, 2, 16, 8, 16, 2, 0)); }
  SECTION("G=70 > rows per batch") { check_slc<float>(make_case(1, 20, 70, 1, 8, 8, 16, 2, 0)); }
  SECTION("D=192, Dv=128") { check_slc<float>(make_case(1, 50, 4, 2, 192, 128, 16, 2, 0)); }
  SECTION("scale 0.3") {
    SlcCase c = make_case(1, 50, 4, 2, 16, 16, 16, 2, 0);
    c.pr.scale = 0.3;
    check_slc<double>(c);
  }
}

TEST_CASE("slc: bf16 and fp16", "[slc]") {
  const SlcCase c = make_case(2, 70, 6, 2, 20, 24, 16, 3, 1);
  SECTION("bf16") { check_slc<bf16>(c); }
  SECTION("fp16") { check_slc<fp16>(c); }
}

TEST_CASE("slc: backward matches finite differences of the forward (float64)", "[slc]") {
  const SlcCase c = make_case(1, 40, 3, 1, 6, 5, 8, 2, 1);
  std::mt19937 rng(11);
  SlcTensors<double> x(c, rng);
  const nsa::SlcParams p = x.params(c, c.pr);
  nsa::cpu::slc_fwd(p, nsa::cpu::serial_for);
  nsa::cpu::slc_bwd(p, nsa::cpu::serial_for);
  const auto dq = x.dq, dk = x.dk, dv = x.dv;
  auto loss = [&] {  // sum(o * dout), whose gradient the backward computes
    nsa::cpu::slc_fwd(p, nsa::cpu::serial_for);
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

TEST_CASE("check_block_indices", "[slc]") {
  SlcCase c = varlen_case();  // sequence 3 (tokens 6..45) has 3 blocks of 16
  std::mt19937 rng(3);
  SlcTensors<float> x(c, rng);
  nsa::SlcParams p = x.params(c, c.pr);
  std::fill(x.idx.data.begin(), x.idx.data.end(), -1);
  for (int t = 0; t < c.pr.T; ++t) x.idx.data[x.idx.off(0, t, 1)] = 0;
  CHECK(nsa::cpu::check_block_indices(p).kind == nsa::cpu::BlockIndexError::kNone);

  int32_t* row = &x.idx.data[x.idx.off(0, 20, 1)];
  row[1] = 3;  // sequence 3 has blocks 0..2
  nsa::cpu::BlockIndexError e = nsa::cpu::check_block_indices(p);
  CHECK(e.kind == nsa::cpu::BlockIndexError::kOutOfRange);
  CHECK((e.token == 20 && e.head == 1 && e.slot == 1 && e.value == 3 && e.num_blocks == 3));

  row[1] = 2;
  row[2] = 2;
  e = nsa::cpu::check_block_indices(p);
  CHECK(e.kind == nsa::cpu::BlockIndexError::kDuplicate);
  CHECK((e.token == 20 && e.head == 1 && e.slot == 2 && e.value == 2));

  row[2] = -2;
  e = nsa::cpu::check_block_indices(p);
  CHECK(e.kind == nsa::cpu::BlockIndexError::kOutOfRange);
  CHECK((e.slot == 2 && e.value == -2));
}

// Hidden benchmark: ./nsa_kernel_tests "[.bench]". The paper's shape at T = 32k with indices
// like top-n picks on random data (blocks 0, t/l' - 1, t/l' and 13 random others).
TEST_CASE("slc: forward and backward speed at T=32k HQ=8 H=2 D=64 float32", "[.bench]") {
  SlcCase c = make_case(1, 32768, 8, 2, 64, 64, 64, 16, 0);
  std::mt19937 rng(5);
  SlcTensors<float> x(c, rng);
  double keys = 0;  // visible (query row, key) pairs
  for (index_t t = 0; t < c.pr.T; ++t)
    for (int g = 0; g < c.pr.H; ++g) {
      const index_t b = t / 64;
      std::set<int32_t> pick{0, int32_t(b)};
      if (b > 0) pick.insert(int32_t(b - 1));
      while (index_t(pick.size()) < std::min<index_t>(16, b + 1))
        pick.insert(int32_t(rng() % (b + 1)));
      int32_t* row = &x.idx.data[x.idx.off(0, t, g)];
      std::fill(row, row + 16, -1);
      std::copy(pick.begin(), pick.end(), row);
      for (int32_t j : pick) keys += double(std::min<index_t>(64, t - j * 64 + 1)) * c.pr.G();
    }
  const nsa::SlcParams p = x.params(c, c.pr);
  auto two_threads = [](index_t n, index_t, const std::function<void(index_t, index_t)>& fn) {
    std::thread other([&] { fn(n / 2, n); });
    fn(0, n / 2);
    other.join();
  };
  for (int threads : {1, 2}) {
    const nsa::cpu::ParallelFor pf =
        threads == 1 ? nsa::cpu::ParallelFor(nsa::cpu::serial_for) : two_threads;
    auto t0 = std::chrono::steady_clock::now();
    nsa::cpu::slc_fwd(p, pf);
    auto t1 = std::chrono::steady_clock::now();
    nsa::cpu::slc_bwd(p, pf);
    auto t2 = std::chrono::steady_clock::now();
    const double fwd = std::chrono::duration<double>(t1 - t0).count();
    const double bwd = std::chrono::duration<double>(t2 - t1).count();
    const double flops = 2.0 * keys * (c.pr.D + c.pr.Dv);  // q.k and p.v per visible pair
    std::printf("slc %d thread(s): fwd %.3f s (%.1f GFLOP/s), bwd %.3f s (%.1f GFLOP/s at 2.5x)\n",
                threads, fwd, flops / fwd * 1e-9, bwd, 2.5 * flops / bwd * 1e-9);
  }
}
