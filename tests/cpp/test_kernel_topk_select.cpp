// The scalar pieces the CUDA top-n kernel shares with the host (csrc/nsa/cuda/topk/select.h):
// the candidate order, the overlap-weighted block scores and the candidates left after the
// streamed key tiles, each against a direct reading of docs/design.md section 1.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <set>
#include <vector>

#include "catch.h"
#include "nsa/cuda/topk/select.h"

using namespace nsa;
using namespace nsa::cuda::topk;

TEST_CASE("block_key orders forced, then score, then the smaller block", "[topk_select]") {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(block_key(-inf, 5, true) > block_key(inf, 0, false));
  CHECK(block_key(0.f, 9, true) > block_key(0.f, 10, true));  // forced: smaller j first
  CHECK(block_key(2.f, 9, false) > block_key(1.f, 0, false));
  CHECK(block_key(-1.f, 0, false) > block_key(-2.f, 0, false));
  CHECK(block_key(0.f, 0, false) > block_key(-0.5f, 0, false));
  CHECK(block_key(1e-30f, 7, false) > block_key(0.f, 0, false));
  CHECK(block_key(1.f, 3, false) > block_key(1.f, 4, false));  // ties: smaller j wins
  CHECK(block_key(nan, 3, false) == block_key(-inf, 3, false));  // NaN ranks as -inf
  CHECK(block_key(-inf, 0, false) > 0);
  for (int j : {0, 1, 77, 1 << 20}) {
    CHECK(key_block(block_key(0.25f, j, false)) == j);
    CHECK(key_block(block_key(0.f, j, true)) == j);
  }
  std::mt19937 rng(3);
  std::normal_distribution<float> dist;
  for (int i = 0; i < 10000; ++i) {
    const float a = dist(rng), b = dist(rng);
    const int ja = int(rng() % 100), jb = int(rng() % 100);
    const bool better = a > b || (a == b && ja < jb);
    if (a != b || ja != jb) CHECK((block_key(a, ja, false) > block_key(b, jb, false)) == better);
  }
}

TEST_CASE("cells_score gives the overlap-weighted block scores", "[topk_select]") {
  struct Hyper { int l, d, ls; };
  for (const Hyper h : {Hyper{32, 16, 64}, Hyper{64, 64, 64}, Hyper{32, 16, 32}, Hyper{48, 16, 16},
                        Hyper{16, 16, 128}, Hyper{128, 32, 64}}) {
    const int cpr = h.l / h.d, cpb = h.ls / h.d, rows = 40;
    std::mt19937 rng(h.l * 1000 + h.ls);
    std::uniform_real_distribution<float> dist(0.f, 1.f);
    // w[r + cpr] = probability mass of compressed row r (rows < 0 and >= rows do not exist: 0).
    std::vector<float> w(rows + 2 * cpr, 0.f);
    for (int r = 0; r < rows; ++r) w[r + cpr] = dist(rng);
    const int blocks = (rows - 1 + cpr) / cpb + 1;
    for (int j = 0; j < blocks; ++j) {
      double want = 0;  // sum_i p_i |W_i ∩ block j| / d
      for (int i = 0; i < rows; ++i) {
        const long lo = std::max<long>(long(i) * h.d, long(j) * h.ls);
        const long hi = std::min<long>(long(i) * h.d + h.l - 1, long(j + 1) * h.ls - 1);
        if (hi >= lo) want += double(w[i + cpr]) * double(hi - lo + 1) / h.d;
      }
      const int ka = j * cpb, kb = std::min((j + 1) * cpb, rows + cpr - 1);
      INFO("l = " << h.l << ", d = " << h.d << ", l' = " << h.ls << ", block " << j);
      CHECK(cells_score(w.data(), -cpr, ka, kb, cpr) == Approx(want).epsilon(1e-5));
      // Split at any cell: the two parts add up (the kernel carries a block across key tiles).
      for (int cut = ka; cut <= kb; ++cut)
        CHECK(cells_score(w.data(), -cpr, ka, cut, cpr) + cells_score(w.data(), -cpr, cut, kb, cpr) ==
              Approx(want).epsilon(1e-5));
    }
  }
}

TEST_CASE("tail_of lists every block the tile loop left that can still be chosen", "[topk_select]") {
  for (int cpb : {1, 2, 4}) {
    for (int n : {1, 3, 16}) {
      for (int num_local : {0, 1, 2}) {
        for (int b = 0; b < 40; ++b) {
          for (int cells = 0; cells <= (b + 1) * cpb; ++cells) {
            const Tail t = tail_of(b, cells, cpb, n, num_local);
            std::vector<int> got;
            for (int i = 0; i < t.count(); ++i) {
              bool open = false;
              got.push_back(t.block(i, open));
              CHECK(open == (i == 0 && t.open_j >= 0));
            }
            // Expected: the block cut by the edge (partial score), then the first n blocks of
            // score 0 (ties go to the smaller j), then the forced local blocks past them.
            std::vector<int> want;
            const int jo = cells / cpb;
            const bool cut = cells % cpb != 0;
            if (cut && jo <= b) want.push_back(jo);
            int zeros = 0;
            for (int j = jo + cut; j <= b; ++j) {
              const bool forced_local = j > b - num_local;
              if (zeros < n) {
                want.push_back(j);
                ++zeros;
              } else if (forced_local) {
                want.push_back(j);
              }
            }
            INFO("cpb " << cpb << ", n " << n << ", num_local " << num_local << ", b " << b
                        << ", cells " << cells);
            CHECK(got == want);
          }
        }
      }
    }
  }
}
