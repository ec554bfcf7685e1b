// The one list of CUDA head dims (csrc/nsa/cuda/head_dims.h) and the dispatch built from it, and
// the mma.sync tiles' swizzle (csrc/nsa/cuda/common/swizzle.h) at every width the listed head dims
// give: plain C++, no GPU needed.
#include <set>
#include <stdexcept>
#include <string>
#include <utility>

#include "catch.h"
#include "nsa/cuda/common/swizzle.h"
#include "nsa/cuda/head_dims.h"

using namespace nsa::cuda;

namespace {

// The message of the std::invalid_argument that f throws ("" if none).
template <typename F>
std::string invalid_message(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

// Swizzled offsets of a [rows][COLS] tile, checked as ldmatrix reads them (16-byte rows of 8
// consecutive tile rows r0 .. r0 + 7, r0 a multiple of 8, at one logical chunk): every element
// has its own place inside its row, and the 8 rows of each read fall into 8 different 16-byte bank
// groups (no bank conflict).
template <int COLS>
void check_swizzle() {
  constexpr int kRows = 64, kChunks = COLS / 8;
  std::set<int> places;
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < COLS; ++c) {
      const int off = swz<COLS>(r, c);
      REQUIRE(off / COLS == r);
      REQUIRE(off % 8 == c % 8);  // 16-byte chunks stay whole: ldmatrix reads a row of 8 elements
      places.insert(off);
    }
  REQUIRE(int(places.size()) == kRows * COLS);
  for (int r0 = 0; r0 < kRows; r0 += 8)
    for (int c = 0; c < kChunks; ++c) {
      std::set<int> groups;
      for (int r = r0; r < r0 + 8; ++r) groups.insert(swz<COLS>(r, c * 8) * 2 / 16 % 8);
      REQUIRE(groups.size() == 8);
    }
}

}  // namespace

TEST_CASE("head dims: one list, no repeats, 96 and 256 on the mma.sync kernels only") {
  std::set<std::pair<int, int>> seen;
  for (const HeadDims& hd : kHeadDims) {
    REQUIRE(seen.insert({hd.d, hd.dv}).second);
    REQUIRE(supported_head_dims(hd.d, hd.dv));
    REQUIRE(supported_head_dim(hd.d));
    REQUIRE(hd.d % 32 == 0);  // whole 16-byte chunks, and a width swz takes
    REQUIRE(hd.dv % 32 == 0);
  }
  REQUIRE(supported_head_dims(96, 96));
  REQUIRE(supported_head_dims(256, 256));
  REQUIRE_FALSE(supported_head_dims(96, 128));
  REQUIRE_FALSE(supported_head_dims(256, 128));
  REQUIRE_FALSE(supported_head_dim(80));
  REQUIRE(wgmma_head_dims(64, 128));
  REQUIRE(wgmma_head_dims(128, 128));
  REQUIRE_FALSE(wgmma_head_dims(96, 96));
  REQUIRE_FALSE(wgmma_head_dims(192, 128));
  REQUIRE_FALSE(wgmma_head_dims(256, 256));
}

TEST_CASE("head dims: every listed pair dispatches to its own instantiation") {
  for (const HeadDims& hd : kHeadDims) {
    int got_d = 0, got_dv = 0, calls = 0;
    dispatch_head_dims("nsa.test", hd.d, hd.dv, [&](auto d, auto dv) {
      got_d = decltype(d)::value;
      got_dv = decltype(dv)::value;
      ++calls;
    });
    REQUIRE(calls == 1);
    REQUIRE(got_d == hd.d);
    REQUIRE(got_dv == hd.dv);
  }
}

TEST_CASE("head dims: an unlisted pair throws, naming the op and the supported pairs") {
  const std::string list = head_dims_list(true);
  REQUIRE(list.find("(96, 96)") != std::string::npos);
  REQUIRE(list.find("(256, 256)") != std::string::npos);
  for (const auto& [d, dv] : {std::pair{96, 128}, std::pair{80, 80}, std::pair{256, 128}, std::pair{0, 0}}) {
    bool called = false;
    const std::string msg = invalid_message([&] { dispatch_head_dims("nsa.test_op", d, dv, [&](auto, auto) { called = true; }); });
    REQUIRE_FALSE(called);
    REQUIRE(msg == "nsa.test_op: head dims (D, Dv) must be one of " + list + " on CUDA, got (" + std::to_string(d) +
                       ", " + std::to_string(dv) + ")");
  }
}

TEST_CASE("head dims: the D-only dispatch (select_blocks) takes each listed D once") {
  std::set<int> ds;
  for (const HeadDims& hd : kHeadDims) ds.insert(hd.d);
  std::string list;
  for (int d : ds) {
    list += (list.empty() ? "" : ", ") + std::to_string(d);
    int got = 0;
    dispatch_head_dim("nsa.test", d, [&](auto dd) { got = decltype(dd)::value; });
    REQUIRE(got == d);
  }
  REQUIRE(head_dims_list(false) == list);
  const std::string msg = invalid_message([] { dispatch_head_dim("nsa.select_blocks", 80, [](auto) {}); });
  REQUIRE(msg == "nsa.select_blocks: head dim D must be one of " + list + " on CUDA, got 80");
}

TEST_CASE("swizzle: ldmatrix reads are conflict-free at every tile width") {
  check_swizzle<64>();
  check_swizzle<96>();
  check_swizzle<128>();
  check_swizzle<192>();
  check_swizzle<256>();
  check_swizzle<160>();  // 64 m + 32 with m = 2
}
