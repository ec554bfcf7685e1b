// Scalar pieces of the CUDA top-n selection (topk_kernel.cuh) that do not touch the tensor-core
// tiles: block scores from the group-summed probabilities, the ordering keys, and the candidates
// left after the streamed key tiles. Host + device, so that a CPU emulation can check the
// streaming logic against the CPU kernel.
//
// Cells. Cut a sequence into runs of d tokens: compressed row i covers cells i .. i + cpr - 1
// (cpr = l / d) and block j covers cells j cpb .. (j + 1) cpb - 1 (cpb = l' / d), so
// |W_i ∩ block j| / d is the number of cells of row i inside block j. A key tile of rows
// [i0, i0 + 64) completes cells [i0, i0 + 64) (cell k needs rows k - cpr + 1 .. k), and a block is
// scored once its last cell is complete, its earlier cells' part carried from the previous tile.
#pragma once

#include <cstdint>
#include <cstring>

#include "../../params.h"

namespace nsa::cuda::topk {

constexpr int kTileRows = 64;  // compressed rows (and cells) per streamed key tile

// Contribution of cells [ka, kb) to a block score: sum over the rows r touching them of
// (cells of row r in [ka, kb)) * w[r - base]. Rows r >= ka - cpr + 1 must be held in w.
NSA_HOST_DEVICE float cells_score(const float* w, int base, int ka, int kb, int cpr) {
  float s = 0.f;
  for (int r = ka - cpr + 1; r < kb; ++r) {
    const int last = kb - 1 < r + cpr - 1 ? kb - 1 : r + cpr - 1;
    const int first = ka > r ? ka : r;
    s += float(last - first + 1) * w[r - base];
  }
  return s;
}

NSA_HOST_DEVICE bool is_forced(int j, int b, int num_initial, int num_local) {
  return j < num_initial || j > b - num_local;
}

NSA_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

// Total order of the candidates of one token: forced blocks first, then higher scores, NaN as
// -inf (the CPU kernel's order), ties to the smaller j. Larger key = better; keys are unique and
// never 0, so 0 ranks below every candidate.
NSA_HOST_DEVICE uint64_t block_key(float score, int j, bool forced) {
  uint32_t hi = 0xffffffffu;
  if (!forced) {
    const uint32_t u = float_bits(score != score ? -__builtin_huge_valf() : score);
    hi = (u >> 31) ? ~u : (u | 0x80000000u);  // monotone float -> unsigned map; < 0xffffffff
  }
  return (uint64_t(hi) << 32) | uint64_t(~uint32_t(j));
}

NSA_HOST_DEVICE int key_block(uint64_t key) { return int(~uint32_t(key)); }

// Candidates of one token (own block b) that the tile loop did not merge, given that it
// completed cells [0, cells) and every cell from `cells` on is zero: the block cut by that edge
// (its partial score is final), then blocks of score 0, of which only the first n can be chosen
// (equal scores go to the smaller j), then the forced local blocks past those.
struct Tail {
  int open_j;  // block with a partial score, or -1
  int z0, nz;  // zero-score blocks z0 .. z0 + nz - 1
  int f0, nf;  // forced blocks f0 .. f0 + nf - 1

  NSA_HOST_DEVICE int count() const { return (open_j >= 0) + nz + nf; }
  // Block of candidate idx < count(); open: whether it is open_j.
  NSA_HOST_DEVICE int block(int idx, bool& open) const {
    open = open_j >= 0 && idx == 0;
    if (open) return open_j;
    idx -= open_j >= 0;
    return idx < nz ? z0 + idx : f0 + idx - nz;
  }
};

NSA_HOST_DEVICE Tail tail_of(int b, int cells, int cpb, int n, int num_local) {
  Tail t;
  const int jo = cells / cpb;
  const bool cut = cells % cpb != 0;
  t.open_j = cut && jo <= b ? jo : -1;
  t.z0 = jo + cut;
  const int z1 = b < t.z0 + n - 1 ? b : t.z0 + n - 1;
  t.nz = z1 >= t.z0 ? z1 - t.z0 + 1 : 0;
  t.f0 = t.z0 + n > b - num_local + 1 ? t.z0 + n : b - num_local + 1;
  t.nf = b >= t.f0 ? b - t.f0 + 1 : 0;
  return t;
}

// Compressed rows visible to token t (sequence-relative) of a sequence with cmp_len rows.
NSA_HOST_DEVICE int visible_rows(int t, int block_size, int block_stride, index_t cmp_len) {
  const index_t v = num_cmp_tokens(index_t(t) + 1, block_size, block_stride);
  return int(v < cmp_len ? v : cmp_len);
}

}  // namespace nsa::cuda::topk
