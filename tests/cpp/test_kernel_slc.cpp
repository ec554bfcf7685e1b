// Selected-branch CPU kernels (slc_fwd, slc_bwd) and check_block_indices, against the dense
// float64 reference of attn_reference.h with the selected-branch visibility rule.
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
struct SlcTensors : AttnTensors<T> {
  Tensor<int32_t> idx;
  SlcTensors(const SlcCase& c, std::mt19937& rng)
      : AttnTensors<T>(c.pr, c.pr.T, c.pad), idx(random_indices(c, rng)) {
    this->fill_inputs(rng);
  }
  nsa::SlcParams params(const SlcCase& c) {
    nsa::SlcParams p;
    this->set_params(p, c.pr, c.pr.seqs());
    p.block_indices = idx.view();
    p.num_selected = c.num_selected;
    p.select_size = c.select_size;
    return p;
  }
};

template <typename T>
void check_slc(const SlcCase& c) {
  check_attention<T>(
      c.pr,
      [&] {
        std::mt19937 rng(c.seed);
        return SlcTensors<T>(c, rng);
      },
      [&](SlcTensors<T>& x, const nsa::cpu::ParallelFor& pf) {
        const nsa::SlcParams p = x.params(c);
        nsa::cpu::slc_fwd(p, pf);
        nsa::cpu::slc_bwd(p, pf);
      },
      [&](const SlcTensors<T>& x) { return slc_visible(c, x.idx); });
}

SlcCase make_case(Problem pr, int select_size, int n, int pad) {
  SlcCase c;
  c.pr = pr;
  c.select_size = select_size;
  c.num_selected = n;
  c.pad = pad;
  return c;
}

SlcCase varlen_case() {
  // Lengths 5, 0, 1, 40, 70: an empty and a length-1 sequence.
  return make_case({1, 116, 6, 2, 20, 12, {0, 5, 5, 6, 46, 116}}, 16, 3, 1);
}

}  // namespace

TEMPLATE_TEST_CASE("slc: G=3, D != Dv, strided, odd T", "[slc]", double, float) {
  check_slc<TestType>(make_case({2, 77, 6, 2, 20, 12}, 16, 3, 3));
}

TEMPLATE_TEST_CASE("slc: G=1, vector-width head dims", "[slc]", double, float) {
  check_slc<TestType>(make_case({1, 150, 2, 2, 24, 40}, 16, 4, 0));
}

TEST_CASE("slc: T = 1 and T < select_size", "[slc]") {
  SECTION("T=1 float64") { check_slc<double>(make_case({2, 1, 3, 1, 8, 5}, 16, 2, 1)); }
  SECTION("T=1 float32") { check_slc<float>(make_case({2, 1, 3, 1, 8, 5}, 16, 2, 1)); }
  SECTION("T=9 float64") { check_slc<double>(make_case({1, 9, 3, 1, 8, 5}, 16, 2, 0)); }
  SECTION("T=9 float32") { check_slc<float>(make_case({1, 9, 3, 1, 8, 5}, 16, 2, 0)); }
}

TEMPLATE_TEST_CASE("slc: varlen with an empty and a length-1 sequence", "[slc]", double, float) {
  check_slc<TestType>(varlen_case());
}

TEMPLATE_TEST_CASE("slc: blocks longer than a key chunk, many rows per block", "[slc]", double,
                   float) {
  // select_size 128 > 64 keys per chunk; block 0 is listed by up to 300 tokens x 3 heads.
  check_slc<TestType>(make_case({1, 300, 3, 1, 16, 16}, 128, 2, 0));
}

TEST_CASE("slc: paper-like shape (G=4, D=64, l'=64)", "[slc]") {
  check_slc<float>(make_case({1, 200, 8, 2, 64, 64}, 64, 3, 0));
}

TEST_CASE("slc: unsorted slots, duplicates and out-of-range entries are a set", "[slc]") {
  SlcCase c = make_case({1, 90, 6, 2, 12, 9}, 16, 4, 2);
  c.messy = true;
  check_slc<double>(c);
}

TEST_CASE("slc: large groups, wide heads, explicit scale", "[slc]") {
  SECTION("G=20") { check_slc<float>(make_case({1, 40, 40, 2, 16, 8}, 16, 2, 0)); }
  SECTION("G=70 > rows per batch") { check_slc<float>(make_case({1, 20, 70, 1, 8, 8}, 16, 2, 0)); }
  SECTION("D=192, Dv=128") { check_slc<float>(make_case({1, 50, 4, 2, 192, 128}, 16, 2, 0)); }
  SECTION("scale 0.3") {
    SlcCase c = make_case({1, 50, 4, 2, 16, 16}, 16, 2, 0);
    c.pr.scale = 0.3;
    check_slc<double>(c);
  }
}

TEMPLATE_TEST_CASE("slc: bf16 and fp16", "[slc]", bf16, fp16) {
  check_slc<TestType>(make_case({2, 70, 6, 2, 20, 24}, 16, 3, 1));
}

TEST_CASE("slc: backward matches finite differences of the forward (float64)", "[slc]") {
  const SlcCase c = make_case({1, 40, 3, 1, 6, 5}, 8, 2, 1);
  std::mt19937 rng(11);
  SlcTensors<double> x(c, rng);
  const nsa::SlcParams p = x.params(c);
  check_finite_differences(
      x, rng, [&] { nsa::cpu::slc_fwd(p, nsa::cpu::serial_for); },
      [&] { nsa::cpu::slc_bwd(p, nsa::cpu::serial_for); });
}

TEST_CASE("check_block_indices", "[slc]") {
  SlcCase c = varlen_case();  // sequence 3 (tokens 6..45) has 3 blocks of 16
  std::mt19937 rng(3);
  SlcTensors<float> x(c, rng);
  nsa::SlcParams p = x.params(c);
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
  SlcCase c = make_case({1, 32768, 8, 2, 64, 64}, 64, 16, 0);
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
  const nsa::SlcParams p = x.params(c);
  time_fwd_bwd(
      "slc", 2.0 * keys * (c.pr.D + c.pr.Dv),  // q.k and p.v per visible pair
      [&](const nsa::cpu::ParallelFor& pf) { nsa::cpu::slc_fwd(p, pf); },
      [&](const nsa::cpu::ParallelFor& pf) { nsa::cpu::slc_bwd(p, pf); });
}
