// Sliding-window branch on the CPU: query t attends keys max(0, t - w + 1) .. t of its sequence
// (docs/design.md section 1; flash-attn's window_size = (w - 1, 0)). The passes are attn_driver.h's;
// this file says which keys a tile walks and how the dk/dv items cut the keys.
#include <algorithm>
#include <vector>

#include "attn_driver.h"

namespace nsa::cpu {
namespace {

using attn::Batch;
using attn::BatchRows;
using attn::kMaxKeys;
using attn::kMaxRows;

struct WindowBranch {
  using Params = SwaParams;

  // Forward / dq tiles hold one batch of rows: more rows would only add masked keys at the
  // window edges (a tile of n tokens computes w + n - 1 keys per row).
  static index_t tile_tokens(int G) { return std::max(1, kMaxRows / G); }

  static attn::KeySpan visible(const SwaParams& p, index_t t) {
    return {t - p.window_size + 1, t + 1};
  }

  // The tile's rows are gathered once, in batches of kMaxRows; every key chunk of the tile's
  // windows is then loaded once for all the batches.
  template <typename A>
  struct TileWalk {
    std::vector<Batch> batches;
    std::vector<BatchRows<A>> br;
    attn::KeyRows<A> kv;

    explicit TileWalk(const SwaParams&) {}

    template <typename T, typename Visit>
    void run(const SwaParams& p, const attn::TileRows& tr, const attn::TileOperands<A>& rows,
             Visit&& visit) {
      batches.assign((tr.rows + kMaxRows - 1) / kMaxRows, Batch{});
      for (int r = 0; r < tr.rows; ++r) batches[r / kMaxRows].add(r);
      while (br.size() < batches.size()) br.emplace_back(p.head_dim, p.head_dim_v);
      for (size_t i = 0; i < batches.size(); ++i) {
        batches[i].pad();
        rows.gather(batches[i], br[i]);
      }
      const index_t key_end = tr.tile.t1;
      for (index_t c0 = std::max<index_t>(0, tr.tile.t0 - p.window_size + 1); c0 < key_end;
           c0 += kMaxKeys) {
        const int nk = int(std::min<index_t>(kMaxKeys, key_end - c0));
        kv.template load<T>(p, tr.seq, tr.g, c0, nk);
        for (size_t i = 0; i < batches.size(); ++i) {
          Batch& b = batches[i];
          attn::set_visible_keys<WindowBranch>(p, b, c0, nk,
                                               [&](int a) { return tr.token(b.row[a]); });
          if (b.sees_any()) visit(kv, nk, b, br[i]);
        }
      }
    }
  };

  // dk/dv items: (sequence, chunk of kItemKeys keys, kv head), numbered from base[s]. Several
  // key chunks per item share the gathered query rows.
  class KeyItems {
   public:
    static constexpr int kItemKeys = 2 * kMaxKeys;
    struct Item {
      SeqRange seq;
      int g;
      index_t k0;
      int nkeys;
    };

    KeyItems(const SwaParams& p, const ParallelFor&) : base_(p.seqs.num_seqs + 1, 0) {
      for (int s = 0; s < p.seqs.num_seqs; ++s) {
        const index_t len = p.seqs.range(s).len;
        base_[s + 1] = base_[s] + (len + kItemKeys - 1) / kItemKeys * p.num_heads_k;
      }
    }
    index_t size() const { return base_.back(); }
    int max_keys() const { return kItemKeys; }
    Item at(const SwaParams& p, index_t item) const {
      const int s = int(std::upper_bound(base_.begin(), base_.end(), item) - base_.begin()) - 1;
      const SeqRange seq = p.seqs.range(s);
      const index_t k0 = (item - base_[s]) / p.num_heads_k * kItemKeys;
      return {seq, int((item - base_[s]) % p.num_heads_k), k0,
              int(std::min<index_t>(kItemKeys, seq.len - k0))};
    }
    // The queries that see a key of [k0, k0 + nkeys): t in [k0, k0 + nkeys - 1 + w - 1].
    template <typename Fn>
    void for_each_token(const SwaParams& p, const Item& it, Fn&& fn) const {
      const index_t t_end = std::min(it.seq.len, it.k0 + it.nkeys + p.window_size - 1);
      for (index_t t = it.k0; t < t_end; ++t) fn(t);
    }

   private:
    std::vector<index_t> base_;  // first item of each sequence, then the total
  };
};

NSA_CPU_ATTN_CHUNKS(WindowBranch)

}  // namespace

void swa_fwd(const SwaParams& p, const ParallelFor& parallel_for) {
  attn::run_fwd<WindowBranch, Chunks>(p, parallel_for, "nsa.swa_fwd");
}

void swa_bwd(const SwaParams& p, const ParallelFor& parallel_for) {
  attn::run_bwd<WindowBranch, Chunks>(p, parallel_for, "nsa.swa_bwd");
}

}  // namespace nsa::cpu
