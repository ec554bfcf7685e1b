// The wgmma operand tiles (csrc/nsa/cuda/common/wgmma_layout.h) against the canonical shared-memory
// layouts of the PTX ISA for the 128-byte swizzle, 16-bit elements (T = 8 elements per 16 bytes):
//   K-major:  ((8, m), (T, 2k)) : ((8T, SBO), (1, T))
//   MN-major: ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO))
// composed with Swizzle<3, 4, 3> on the byte address (bits 4-6 XOR bits 7-9). For every element
// of every k-step of the tiles the kernels use, the address the instruction reads must be where
// wgmma_tile_offset stored it.
#include <set>

#include "catch.h"
#include "nsa/cuda/common/wgmma_layout.h"

using namespace nsa::cuda;

namespace {

int swizzle128(int byte) { return byte ^ (((byte >> 7) & 7) << 4); }

// Byte address the hardware reads for element (mn, kx) (kx < 16) of the operand o, K-major.
int kmajor_address(const WgmmaOperand& o, int mn, int kx) {
  const int linear = o.start * 2 + (mn % 8) * 128 + (mn / 8) * o.sbo + kx * 2;
  return swizzle128(linear);
}

// The same, MN-major: mn along the tile's columns, kx (< 16) along its rows.
int mnmajor_address(const WgmmaOperand& o, int mn, int kx) {
  const int linear = o.start * 2 + (mn % 64) * 2 + (mn / 64) * o.lbo + (kx % 8) * 128 + (kx / 8) * o.sbo;
  return swizzle128(linear);
}

}  // namespace

TEST_CASE("wgmma K-major operands read what the tile loads stored", "[wgmma_layout]") {
  for (int rows : {64}) {
    for (int cols : {64, 128}) {
      INFO("tile " << rows << " x " << cols);
      for (int kk = 0; kk < cols / 16; ++kk) {
        const WgmmaOperand o = kmajor_operand(rows, kk);
        for (int mn = 0; mn < rows; ++mn)
          for (int kx = 0; kx < 16; ++kx)
            REQUIRE(kmajor_address(o, mn, kx) == 2 * wgmma_tile_offset(rows, mn, kk * 16 + kx));
      }
    }
  }
}

TEST_CASE("wgmma MN-major operands read what the tile loads stored", "[wgmma_layout]") {
  for (int rows : {64}) {
    for (int cols : {64, 128}) {
      INFO("tile " << rows << " x " << cols);
      for (int kk = 0; kk < rows / 16; ++kk) {
        const WgmmaOperand o = mnmajor_operand(rows, kk);
        for (int mn = 0; mn < cols; ++mn)
          for (int kx = 0; kx < 16; ++kx)
            REQUIRE(mnmajor_address(o, mn, kx) == 2 * wgmma_tile_offset(rows, kk * 16 + kx, mn));
      }
    }
  }
}

TEST_CASE("wgmma tiles are a permutation of their rows' 16-byte chunks", "[wgmma_layout]") {
  for (int rows : {32, 64, 128}) {
    for (int cols : {64, 128, 192}) {
      std::set<int> seen;
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) {
          const int off = wgmma_tile_offset(rows, r, c);
          REQUIRE(off >= 0);
          REQUIRE(off < rows * cols);
          REQUIRE(off % 8 == c % 8);  // 16-byte chunks stay whole (cp.async writes them)
          seen.insert(off);
        }
      CHECK(int(seen.size()) == rows * cols);
    }
  }
}
