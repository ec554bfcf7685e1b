// Selected-block branch on the CPU: query t, head h attends the keys s <= t whose block s / l'
// is listed in block_indices[t, h / G] (docs/design.md section 1). The passes are attn_driver.h's;
// this file says which blocks a tile walks and which queries a block's dk/dv item gathers.
//
// Forward and dq: the G heads of a group share every block and neighbouring tokens share the
// forced blocks (and often more), so each listed block is loaded once per tile and attended by
// all the tile's rows that listed it. dk/dv: a reverse index (per sequence, kv head and block:
// the tokens that listed the block, in token order), built with a counting sort; one work item
// owns each block's key rows.
#include <algorithm>
#include <vector>

#include "attn_driver.h"

namespace nsa::cpu {
namespace {

using attn::Batch;
using attn::BatchRows;
using attn::kMaxKeys;
using attn::kMaxRows;
using attn::TokenTile;

// A listed block is used when it is a block of the sequence that starts at or before t; -1,
// out-of-range values and blocks ahead of t hold no visible key.
bool usable_block(int32_t j, index_t t, index_t num_blocks, index_t select_size) {
  return j >= 0 && j < num_blocks && j * select_size <= t;
}

// True when block_indices row `idx` lists idx[slot] at an earlier slot (counted once).
bool listed_before(const int32_t* idx, int slot) {
  for (int i = 0; i < slot; ++i)
    if (idx[i] == idx[slot]) return true;
  return false;
}

// The blocks listed by a tile's tokens for one kv head, each with the tokens (tile-relative,
// ascending, each once) that listed it: a counting sort by block. Block j's tokens are
// tokens[begin[j], end[j]).
struct TileBlocks {
  std::vector<int32_t> begin, end, tokens;

  void build(const SlcParams& p, const SeqRange& seq, const TokenTile& tile, int g) {
    const index_t num_blocks = num_select_blocks(seq.len, p.select_size);
    auto for_each_use = [&](auto&& fn) {
      for (index_t t = tile.t0; t < tile.t1; ++t) {
        const int32_t* idx = p.block_indices.ptr<int32_t>(seq.batch, seq.start + t, g);
        for (int slot = 0; slot < p.num_selected; ++slot)
          if (usable_block(idx[slot], t, num_blocks, p.select_size))
            fn(idx[slot], int32_t(t - tile.t0));
      }
    };
    begin.assign(num_blocks + 1, 0);
    for_each_use([&](int32_t j, int32_t) { ++begin[j + 1]; });
    for (index_t j = 0; j < num_blocks; ++j) begin[j + 1] += begin[j];
    tokens.resize(begin[num_blocks]);
    end.assign(begin.begin(), begin.end() - 1);
    // Tokens arrive in order, so a block listed twice by one token would land twice in a row.
    for_each_use([&](int32_t j, int32_t tt) {
      if (end[j] == begin[j] || tokens[end[j] - 1] != tt) tokens[end[j]++] = tt;
    });
  }
};

struct SelectedBranch {
  using Params = SlcParams;

  // Query rows per forward / dq tile. A block is loaded once per tile for all the tile's tokens
  // that listed it: with top-n picks spread over the whole past (random inputs), large tiles cut
  // the key/value traffic from memory.
  static constexpr int kTileRows = 1024;
  static index_t tile_tokens(int G) { return std::max(1, kTileRows / G); }

  // Causal within the listed blocks (the walks and the reverse index apply the lists).
  static attn::KeySpan visible(const SlcParams&, index_t t) { return {0, t + 1}; }

  // Walks the blocks listed by the tile's tokens in block order; every chunk of <= kMaxKeys keys
  // of a block is attended by batches of the rows (token-major, G heads each) that listed it.
  template <typename A>
  struct TileWalk {
    TileBlocks blocks;
    BatchRows<A> br;
    Batch batch;
    attn::KeyRows<A> kv;

    explicit TileWalk(const SlcParams& p) : br(p.head_dim, p.head_dim_v) {}

    template <typename T, typename Visit>
    void run(const SlcParams& p, const attn::TileRows& tr, const attn::TileOperands<A>& rows,
             Visit&& visit) {
      const SeqRange& seq = tr.seq;
      const index_t t0 = tr.tile.t0, bs = p.select_size;
      const int G = tr.G;
      blocks.build(p, seq, tr.tile, tr.g);
      const index_t num_blocks = index_t(blocks.end.size());
      auto next_listed = [&](index_t j) {
        while (j < num_blocks && blocks.begin[j] == blocks.end[j]) ++j;
        return j;
      };

      for (index_t j = next_listed(0); j < num_blocks;) {
        const index_t next = next_listed(j + 1);
        if (next < num_blocks) {  // the next block loads while this one computes
          const int n = int(std::min(bs, seq.len - next * bs));
          attn::prefetch_rows(p.k.ptr<T>(seq.batch, seq.start + next * bs, tr.g), p.k.row_stride,
                              n, p.head_dim);
          attn::prefetch_rows(p.v.ptr<T>(seq.batch, seq.start + next * bs, tr.g), p.v.row_stride,
                              n, p.head_dim_v);
        }
        const int32_t* tok = blocks.tokens.data() + blocks.begin[j];
        const int ntok = blocks.end[j] - blocks.begin[j];
        const index_t block_end = std::min(j * bs + bs, seq.len);
        int first = 0;
        for (index_t c0 = j * bs; c0 < block_end; c0 += kMaxKeys) {
          while (first < ntok && t0 + tok[first] < c0) ++first;  // they see nothing of the chunk
          if (first == ntok) break;
          // Keys after the last token are visible to nobody.
          const int nk = int(std::min({c0 + kMaxKeys, block_end, t0 + tok[ntok - 1] + 1}) - c0);
          kv.template load<T>(p, seq, tr.g, c0, nk);
          batch.clear();
          for (int u = first; u < ntok; ++u)
            for (int hh = 0; hh < G; ++hh) {
              batch.add(tok[u] * G + hh);
              if (batch.n == kMaxRows || (u == ntok - 1 && hh == G - 1)) {
                batch.pad();
                attn::set_visible_keys<SelectedBranch>(
                    p, batch, c0, nk, [&](int a) { return tr.token(batch.row[a]); });
                rows.gather(batch, br);
                visit(kv, nk, batch, br);
                batch.clear();
              }
            }
        }
        j = next;
      }
    }
  };

  // dk/dv items: item = base[s] + g * num_blocks + j owns block j's key rows, gathering the
  // tokens that listed it from a reverse index: for each (sequence, kv head, block) the tokens
  // that listed the block, ascending.
  class KeyItems {
   public:
    struct Item {
      SeqRange seq;
      int g;
      index_t k0;
      int nkeys;
      const index_t* off;  // the block's tokens are tokens_[off[0], off[1])
    };

    KeyItems(const SlcParams& p, const ParallelFor& parallel_for) : select_size_(p.select_size) {
      const int H = p.num_heads_k, N = p.seqs.num_seqs;
      base_.assign(N + 1, 0);
      offset_base_.assign(size_t(N) * H, 0);
      std::vector<index_t> token_base(size_t(N) * H, 0);
      index_t num_offsets = 0, num_tokens = 0;
      for (int s = 0; s < N; ++s) {
        const SeqRange seq = p.seqs.range(s);
        const index_t num_blocks = num_select_blocks(seq.len, p.select_size);
        base_[s + 1] = base_[s] + num_blocks * H;
        for (int g = 0; g < H; ++g) {
          offset_base_[size_t(s) * H + g] = num_offsets;
          token_base[size_t(s) * H + g] = num_tokens;
          num_offsets += num_blocks + 1;
          num_tokens += seq.len * p.num_selected;  // upper bound: every slot used
        }
      }
      offsets_.assign(num_offsets, 0);
      tokens_.resize(num_tokens);
      parallel_for(index_t(N) * H, 1, [&](index_t b, index_t e) {
        std::vector<index_t> cursor;
        for (index_t i = b; i < e; ++i) fill(p, int(i / H), int(i % H), token_base[i], cursor);
      });
    }
    index_t size() const { return base_.back(); }
    int max_keys() const { return select_size_; }
    Item at(const SlcParams& p, index_t item) const {
      const int s = int(std::upper_bound(base_.begin(), base_.end(), item) - base_.begin()) - 1;
      const SeqRange seq = p.seqs.range(s);
      const index_t num_blocks = num_select_blocks(seq.len, p.select_size);
      const int g = int((item - base_[s]) / num_blocks);
      const index_t j = (item - base_[s]) % num_blocks, k0 = j * p.select_size;
      return {seq, g, k0, int(std::min(k0 + p.select_size, seq.len) - k0),
              offsets_.data() + offset_base_[size_t(s) * p.num_heads_k + g] + j};
    }
    template <typename Fn>
    void for_each_token(const SlcParams&, const Item& it, Fn&& fn) const {
      for (index_t u = it.off[0]; u < it.off[1]; ++u) fn(index_t(tokens_[u]));
    }

   private:
    // Counting sort of the block_indices of (sequence s, kv head g) into the reverse index.
    void fill(const SlcParams& p, int s, int g, index_t token_base, std::vector<index_t>& cursor) {
      const SeqRange seq = p.seqs.range(s);
      const index_t num_blocks = num_select_blocks(seq.len, p.select_size);
      index_t* off = offsets_.data() + offset_base_[size_t(s) * p.num_heads_k + g];
      auto for_each_use = [&](auto&& fn) {
        for (index_t t = 0; t < seq.len; ++t) {
          const int32_t* idx = p.block_indices.ptr<int32_t>(seq.batch, seq.start + t, g);
          for (int slot = 0; slot < p.num_selected; ++slot)
            if (usable_block(idx[slot], t, num_blocks, p.select_size) && !listed_before(idx, slot))
              fn(idx[slot], t);
        }
      };
      for_each_use([&](int32_t j, index_t) { ++off[j + 1]; });
      off[0] = token_base;
      for (index_t j = 0; j < num_blocks; ++j) off[j + 1] += off[j];
      cursor.assign(off, off + num_blocks);
      for_each_use([&](int32_t j, index_t t) { tokens_[cursor[j]++] = int32_t(t); });
    }

    int select_size_;
    std::vector<index_t> base_;         // [num_seqs + 1]: first item of each sequence
    std::vector<index_t> offset_base_;  // [num_seqs * H]: where (s, g) starts in offsets_
    std::vector<index_t> offsets_;      // per (s, g): num_blocks + 1 positions in tokens_
    std::vector<int32_t> tokens_;       // sequence-relative tokens grouped by (s, g, block)
  };
};

NSA_CPU_ATTN_CHUNKS(SelectedBranch)

}  // namespace

void slc_fwd(const SlcParams& p, const ParallelFor& parallel_for) {
  attn::run_fwd<SelectedBranch, Chunks>(p, parallel_for, "nsa.slc_fwd");
}

void slc_bwd(const SlcParams& p, const ParallelFor& parallel_for) {
  attn::run_bwd<SelectedBranch, Chunks>(p, parallel_for, "nsa.slc_bwd");
}

}  // namespace nsa::cpu
