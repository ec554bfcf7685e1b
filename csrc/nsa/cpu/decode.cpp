// One decoding step on the CPU (DecodeParams in params.h): query s of sequence b sits at position
// t = seqlens[b] - S + s and follows docs/design.md section 1 for that position.
//
// One work item per (sequence, new token, kv head): the G query heads of the group are the rows
// of one batch (attn_tile.h; several batches past kMaxRows heads), so every key chunk is loaded
// once for the whole group. Per item: the compressed branch over the compressed tokens the
// position sees (online softmax, giving lse), a second pass over the same keys for the group's
// probabilities exp(q.k - lse) summed over the G heads, the block scores and top-n (selector.h),
// the selected branch over the chosen blocks, the window branch, and the gated sum. Raw-cache
// keys are read through page_of / row_of in chunks that never cross a page.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "attn_driver.h"
#include "kernels.h"
#include "numeric.h"
#include "selector.h"

namespace nsa::cpu {
namespace {

using attn::Batch;
using attn::BatchRows;
using attn::kMaxKeys;
using attn::kMaxRows;

constexpr const char* kOp = "nsa.decode_attention";

// Every length in [S, capacity] and, paged, every page a sequence uses inside the pool: the
// kernel below then reads nothing outside the caches.
void check_cache(const DecodeParams& p) {
  const auto str = [](index_t x) { return std::to_string(x); };
  for (index_t b = 0; b < p.batch; ++b) {
    const index_t len = p.seqlens[b];
    if (len < p.num_queries || len > p.capacity)
      throw std::invalid_argument(std::string(kOp) + ": cache_seqlens[" + str(b) +
                                  "] must be in [S, capacity] = [" + str(p.num_queries) + ", " +
                                  str(p.capacity) + "], got " + str(len));
    if (p.block_table == nullptr) continue;
    const index_t pages = (len + p.page_size - 1) / p.page_size;
    for (index_t i = 0; i < pages; ++i) {
      const index_t page = p.block_table[b * p.block_table_stride + i];
      if (page < 0 || page >= p.num_pages)
        throw std::invalid_argument(
            std::string(kOp) + ": block_table[" + str(b) + ", " + str(i) +
            "] must be a page of the pool, in [0, " + str(p.num_pages) + "), for sequence " +
            str(b) + " (cache_seqlens[" + str(b) + "] = " + str(len) + " uses its pages 0 .. " +
            str(pages - 1) + "), got " + str(page));
    }
  }
}

// The online-softmax state of the G rows of one branch.
template <typename A>
struct BranchRows {
  std::vector<A> o, m, l;  // [G, Dv], [G], [G]
  BranchRows(int G, int Dv) : o(size_t(G) * Dv), m(G), l(G) {}
  void reset() {
    std::fill(o.begin(), o.end(), A(0));
    std::fill(m.begin(), m.end(), -std::numeric_limits<A>::infinity());
    std::fill(l.begin(), l.end(), A(0));
  }
};

// A work item's computation and the scratch it reuses from one item to the next.
template <typename T>
class Step {
  using A = acc_t<T>;

 public:
  explicit Step(const DecodeParams& p)
      : p_(p), G_(p.num_heads / p.num_heads_k), D_(p.head_dim), Dv_(p.head_dim_v),
        q_(size_t(G_) * D_), lse_(G_), selector_(p) {
    for (int r0 = 0; r0 < G_; r0 += kMaxRows) {
      Batch b;
      for (int r = r0; r < std::min(G_, r0 + kMaxRows); ++r) b.add(r);
      b.pad();
      batches_.push_back(b);
      rows_.emplace_back(D_, Dv_);
    }
    for (int x = 0; x < 3; ++x) branch_.emplace_back(G_, Dv_);
  }

  // Item = (b * S + s) * H + g.
  void run(index_t item) {
    const index_t H = p_.num_heads_k, S = p_.num_queries;
    const int g = int(item % H);
    const index_t s = item / H % S, b = item / H / S;
    const index_t t = p_.seqlens[b] - S + s;
    for (int r = 0; r < G_; ++r)
      attn::load_scaled(p_.q.ptr<T>(b, s, g * G_ + r), A(p_.scale), q_.data() + index_t(r) * D_,
                        D_);
    for (size_t i = 0; i < batches_.size(); ++i)
      rows_[i].gather(batches_[i], q_.data(), D_, nullptr, Dv_, nullptr, nullptr);
    for (BranchRows<A>& x : branch_) x.reset();

    // Compressed branch, then the blocks.
    const index_t nc = num_cmp_tokens(t + 1, p_.block_size, p_.block_stride);
    for (index_t c0 = 0; c0 < nc; c0 += kMaxKeys)
      attend(p_.k_cmp.ptr<T>(b, c0, g), p_.k_cmp.row_stride, p_.v_cmp.ptr<T>(b, c0, g),
             p_.v_cmp.row_stride, int(std::min<index_t>(kMaxKeys, nc - c0)), branch_[0]);
    finish(branch_[0], lse_.data());
    group_probs(b, g, nc);
    int32_t* blocks = p_.block_indices.ptr<int32_t>(b, s, g);
    selector_.select(t, nc, w_.data(), blocks);

    // Selected branch: the chosen blocks (ascending, then -1), causal at the query's own block.
    for (int i = 0; i < p_.num_selected && blocks[i] >= 0; ++i) {
      const index_t k0 = index_t(blocks[i]) * p_.select_size;
      const index_t k1 = std::min<index_t>(k0 + p_.select_size, t + 1);
      for (index_t c0 = k0; c0 < k1; c0 += kMaxKeys)
        attend_raw(p_.k, p_.v, b, g, c0, int(std::min<index_t>(kMaxKeys, k1 - c0)), branch_[1]);
    }
    finish(branch_[1], nullptr);

    // Window branch: keys max(0, t - w + 1) .. t, in chunks that end at page ends.
    for (index_t c0 = std::max<index_t>(0, t - p_.window_size + 1); c0 <= t;) {
      const index_t nk = std::min({index_t(kMaxKeys), t + 1 - c0, p_.page_size - p_.row_of(c0)});
      attend_raw(p_.k_swa, p_.v_swa, b, g, c0, int(nk), branch_[2]);
      c0 += nk;
    }
    finish(branch_[2], nullptr);

    // Gated sum, in branch order (as gate.cpp).
    for (int r = 0; r < G_; ++r) {
      const int h = g * G_ + r;
      A gate[3];
      for (int x = 0; x < 3; ++x) gate[x] = load<A>(*p_.gate[x].ptr<const T>(b, s, h));
      const A* oc = branch_[0].o.data() + index_t(r) * Dv_;
      const A* os = branch_[1].o.data() + index_t(r) * Dv_;
      const A* ow = branch_[2].o.data() + index_t(r) * Dv_;
      T* o = p_.o.ptr<T>(b, s, h);
      for (int c = 0; c < Dv_; ++c)
        store(o[c], gate[0] * oc[c] + gate[1] * os[c] + gate[2] * ow[c]);
    }
  }

 private:
  // Folds nk keys / values (rows at strides ldk, ldv) into branch x for every row of the group.
  void attend(const T* k, index_t ldk, const T* v, index_t ldv, int nk, BranchRows<A>& x) {
    kv_.template load<T>(k, ldk, v, ldv, nk, D_, Dv_);
    for (size_t i = 0; i < batches_.size(); ++i) {
      Batch& bt = batches_[i];
      for (int a = 0; a < bt.n; ++a) bt.set_visible(a, 0, nk, nk);  // the group sees them all
      bt.finish_visible(nk);
      attn::attend_fwd(kv_.k, kv_.ldk, kv_.v, kv_.ldv, nk, D_, Dv_, bt, rows_[i], ws_,
                       x.o.data(), x.m.data(), x.l.data());
    }
  }

  // Raw-cache tokens c0 .. c0 + nk - 1 of sequence b (all in one page).
  void attend_raw(const View& k, const View& v, index_t b, int g, index_t c0, int nk,
                  BranchRows<A>& x) {
    const index_t page = p_.page_of(b, c0), row = p_.row_of(c0);
    attend(k.ptr<T>(page, row, g), k.row_stride, v.ptr<T>(page, row, g), v.row_stride, nk, x);
  }

  // The branch's output rows o / l in place (0 for a row that saw nothing, NaN for non-finite
  // scores: store_fwd_row), and their lse when asked.
  void finish(BranchRows<A>& x, A* lse) {
    A unused;
    for (int r = 0; r < G_; ++r) {
      A* o = x.o.data() + index_t(r) * Dv_;
      store_fwd_row(o, x.m[r], x.l[r], Dv_, o, lse ? lse + r : &unused);
    }
  }

  // w_[i] = sum over the group's heads of exp(q.k_cmp_i - lse), i < nc: the compressed
  // probabilities the block scores weigh. (A NaN lse gives NaN scores, which rank last.)
  void group_probs(index_t b, int g, index_t nc) {
    if (index_t(w_.size()) < nc) w_.resize(nc);
    A* s = ws_.s.data();
    for (index_t c0 = 0; c0 < nc; c0 += kMaxKeys) {
      const int nk = int(std::min<index_t>(kMaxKeys, nc - c0));
      index_t ldk;
      const A* k = attn::rows_as(p_.k_cmp.ptr<T>(b, c0, g), p_.k_cmp.row_stride, nk, D_,
                                 kv_.kbuf, ldk);
      std::fill(w_.begin() + c0, w_.begin() + c0 + nk, A(0));
      for (size_t i = 0; i < batches_.size(); ++i) {
        const Batch& bt = batches_[i];
        attn::xyt(k, ldk, nk, rows_[i].qt.data(), bt.np, D_, s);
        for (int key = 0; key < nk; ++key)
          for (int a = 0; a < bt.n; ++a)
            w_[c0 + key] += std::exp(s[index_t(key) * bt.np + a] - lse_[bt.row[a]]);
      }
    }
  }

  const DecodeParams& p_;
  const int G_, D_, Dv_;
  std::vector<A> q_, lse_, w_;  // scaled queries [G, D], compressed lse [G], probabilities [nc]
  std::vector<Batch> batches_;
  std::vector<BatchRows<A>> rows_;
  std::vector<BranchRows<A>> branch_;  // cmp, slc, swa
  attn::KeyRows<A> kv_;
  attn::Scratch<A> ws_;
  Selector<A> selector_;
};

template <typename A>
struct Inputs {
  const DecodeParams& p;
};

template <typename T>
void decode_items(const Inputs<acc_t<T>>& in, index_t begin, index_t end) {
  Step<T> step(in.p);
  for (index_t item = begin; item < end; ++item) step.run(item);
}

NSA_CPU_CHUNKS(decode_chunk, decode_items, Inputs)

}  // namespace

void decode_attention(const DecodeParams& p, const ParallelFor& parallel_for) {
  check_cache(p);
  const index_t items = index_t(p.batch) * p.num_queries * p.num_heads_k;
  dispatch_dtype(p.dtype, kOp, [&](auto tag) {
    using A = acc_t<decltype(tag)>;
    const Inputs<A> in{p};
    parallel_for(items, 1, [&](index_t b, index_t e) { decode_chunk(in, b, e, tag); });
  });
}

}  // namespace nsa::cpu
