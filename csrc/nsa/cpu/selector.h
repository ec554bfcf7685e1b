// Block scoring and top-n choice of single tokens (docs/design.md section 1, "Block scores" and
// "Top-n selection"), shared by the block selection (topk.cpp) and the decoding step (decode.cpp).
//
// Cut the tokens into cells of d: compressed row i covers cells i .. i + l/d - 1 and block j
// covers cells j l'/d .. (j + 1) l'/d - 1, so |W_i ∩ block j| / d is the number of cells of
// row i inside block j. The rows touching block j are i = j l'/d - l/d + 1 + m for
// m = 0 .. l'/d + l/d - 2, with a weight that depends on m only (1, 2, 2, 2, 1 for the paper's
// sizes): the scores are a strided convolution of the token's row probabilities.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../params.h"

namespace nsa::cpu {

// One per thread: it owns the scratch of the scores.
template <typename A>
class Selector {
 public:
  // p: any params with the hyper-parameters block_size, block_stride, select_size,
  // num_selected, num_initial and num_local (TopkParams, DecodeParams).
  template <typename P>
  explicit Selector(const P& p)
      : select_size_(p.select_size), num_selected_(p.num_selected), num_initial_(p.num_initial),
        num_local_(p.num_local), cells_per_row_(p.block_size / p.block_stride),
        cells_per_block_(p.select_size / p.block_stride) {
    for (index_t m = 0; m < cells_per_block_ + cells_per_row_ - 1; ++m) {
      const index_t first = m - cells_per_row_ + 1;  // the row's first cell, block at 0
      const index_t last = first + cells_per_row_ - 1;
      taps_.push_back(A(std::min(last, cells_per_block_ - 1) - std::max<index_t>(first, 0) + 1));
    }
  }

  // Picks the blocks of token t (sequence-relative), which sees nv compressed rows whose
  // group-summed probabilities are w[0 .. nv), and writes them to out[0 .. n): ascending, then
  // -1 padding.
  void select(index_t t, index_t nv, const A* w, int32_t* out) {
    const index_t n = num_selected_;
    const index_t b = t / select_size_;  // the token's own block; candidates are 0 .. b
    const index_t nb = b + 1;
    if (nb <= n) {
      for (index_t j = 0; j < n; ++j) out[j] = j < nb ? int32_t(j) : -1;
      return;
    }
    const index_t ntaps = index_t(taps_.size());
    score_.resize(nb);
    for (index_t j = 0; j < nb; ++j) {
      const index_t i0 = j * cells_per_block_ - cells_per_row_ + 1;
      A sum = 0;
      for (index_t m = std::max<index_t>(0, -i0); m < std::min(ntaps, nv - i0); ++m)
        sum += taps_[m] * w[i0 + m];
      score_[j] = std::isnan(sum) ? -std::numeric_limits<A>::infinity() : sum;  // NaN last
    }

    // Forced blocks, then the best-scoring others, ties to the smaller j.
    index_t nout = 0;
    others_.clear();
    for (index_t j = 0; j < nb; ++j) {
      if (j < num_initial_ || j > b - num_local_)
        out[nout++] = int32_t(j);
      else
        others_.push_back(int32_t(j));
    }
    const A* score = score_.data();
    const auto better = [score](int32_t x, int32_t y) {
      return score[x] > score[y] || (score[x] == score[y] && x < y);
    };
    // n >= num_initial + num_local and nb > n, so nout <= n <= nout + others.size().
    const index_t take = n - nout;
    std::nth_element(others_.begin(), others_.begin() + take, others_.end(), better);
    std::copy(others_.begin(), others_.begin() + take, out + nout);
    std::sort(out, out + n);
  }

 private:
  index_t select_size_, num_selected_, num_initial_, num_local_;
  index_t cells_per_row_, cells_per_block_;
  std::vector<A> taps_, score_;
  std::vector<int32_t> others_;  // candidates that are not forced
};

}  // namespace nsa::cpu
