// The no-sync mapping of CUDA thread blocks to tiles of packed sequences (csrc/nsa/cuda/common/
// seq_tiles.cuh, plain C++ here): every tile of every sequence is reached by exactly one virtual
// tile, and no virtual tile claims a tile that does not exist.
#include <cstdint>
#include <map>
#include <random>
#include <utility>
#include <vector>

#include "catch.h"
#include "nsa/cuda/common/seq_tiles.cuh"

using namespace nsa;
using namespace nsa::cuda;

namespace {

// Checks the mapping for sequences of the given lengths (packed), items = len * mult, tiles of
// `tile` items: returns the number of (sequence, tile) pairs reached, each must be reached once.
void check_packed(const std::vector<int32_t>& lengths, index_t mult, index_t tile) {
  std::vector<int32_t> cu{0};
  for (int32_t n : lengths) cu.push_back(cu.back() + n);
  Seqs seqs;
  seqs.batch = 1;
  seqs.seqlen = cu.back();
  seqs.num_seqs = int(lengths.size());
  seqs.cu_seqlens = cu.data();
  const index_t grid = num_virtual_tiles(seqs, seqs.seqlen, mult, tile);
  std::map<std::pair<index_t, index_t>, int> hits;  // (sequence start, tile) -> count
  for (index_t x = 0; x < grid; ++x) {
    SeqTile st;
    if (!locate_tile(seqs, x, 0, mult, tile, false, st)) continue;
    REQUIRE(st.index >= 0);
    REQUIRE(st.index < seqs.num_seqs);
    CHECK(st.seq.start == cu[st.index]);
    CHECK(st.seq.len == lengths[st.index]);
    CHECK(st.tile * tile < st.seq.len * mult);
    ++hits[{st.index, st.tile}];
  }
  for (size_t s = 0; s < lengths.size(); ++s) {
    const index_t tiles = (index_t(lengths[s]) * mult + tile - 1) / tile;
    for (index_t t = 0; t < tiles; ++t) {
      INFO("sequence " << s << " (length " << lengths[s] << "), tile " << t);
      CHECK(hits[{index_t(s), t}] == 1);
    }
  }
}

}  // namespace

TEST_CASE("locate_tile: fixed-length batch", "[seq_tiles]") {
  Seqs seqs;
  seqs.batch = 3;
  seqs.seqlen = 100;
  seqs.num_seqs = 3;
  CHECK(num_virtual_tiles(seqs, 100, 16, 64) == 25);
  SeqTile st;
  REQUIRE(locate_tile(seqs, 24, 2, 16, 64, false, st));
  CHECK(st.seq.batch == 2);
  CHECK(st.tile == 24);
  CHECK(st.index == 0);
  CHECK_FALSE(locate_tile(seqs, 25, 2, 16, 64, false, st));
}

TEST_CASE("locate_tile: packed sequences, empty and length-1 ones included", "[seq_tiles]") {
  check_packed({0, 1, 37, 0, 700, 5, 1300, 64, 65, 0}, 1, 64);
  check_packed({0, 1, 37, 0, 700, 5, 1300, 64, 65, 0}, 16, 64);
  check_packed({0, 1, 37, 0, 700, 5, 1300, 64, 65, 0}, 3, 64);
  check_packed({1, 1, 1, 1}, 1, 64);
  check_packed({0, 0, 0}, 4, 64);
  check_packed({4096}, 64, 64);
}

TEST_CASE("locate_tile: random packed batches", "[seq_tiles]") {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<int32_t> lengths(1 + rng() % 12);
    for (auto& n : lengths) n = rng() % 4 == 0 ? int32_t(rng() % 3) : int32_t(rng() % 3000);
    const index_t mult = 1 + rng() % 70, tile = (rng() % 2) ? 64 : 16 * (1 + rng() % 8);
    check_packed(lengths, mult, tile);
  }
}
