// Selected-block branch on the CPU: query t, head h attends the keys s <= t whose block s / l'
// is listed in block_indices[t, h / G] (DESIGN.md section 1).
//
// Forward and dq: one work item per (tile of neighbouring tokens, kv head). The G heads of a
// group share every block and neighbouring tokens share the forced blocks (and often more), so
// each listed block is loaded once per tile and attended by all the tile's rows that listed it.
// dk/dv: a reverse index (per sequence, kv head and block: the tokens that listed the block, in
// token order), built with a counting sort; one work item owns each block's key rows, so the
// sums have a fixed order: deterministic, no atomics.
#include <algorithm>
#include <vector>

#include "attn_tile.h"
#include "kernels.h"

namespace nsa::cpu {
namespace {

using attn::Batch;
using attn::BatchRows;
using attn::kMaxKeys;
using attn::kMaxRows;
using attn::Scratch;
using attn::TokenTile;

// Query rows per forward / dq tile. A block is loaded once per tile for all the tile's tokens
// that listed it: with top-n picks spread over the whole past (random inputs), large tiles cut
// the key/value traffic from memory. 1024 rows measured ~1.5x faster than 256 at T = 32k.
constexpr int kTileRows = 1024;

index_t tile_tokens(int group) { return std::max(1, kTileRows / group); }

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

// Walks the blocks listed by a tile's tokens for kv head g, in block order. For every chunk of
// <= kMaxKeys keys of a block it calls visit(k, ldk, v, ldv, nk, batch) for batches of the rows
// (token-major, G heads each) that listed the block, with each row's visible keys set.
// `blocks` and the key/value buffers are caller scratch.
template <typename T, typename A, typename Visit>
void for_each_block_batch(const SlcParams& p, const SeqRange& seq, const TokenTile& tile, int g,
                          TileBlocks& blocks, std::vector<A>& kbuf, std::vector<A>& vbuf,
                          Visit&& visit) {
  const int G = p.num_heads / p.num_heads_k;
  const index_t bs = p.select_size;
  blocks.build(p, seq, tile, g);
  const index_t num_blocks = index_t(blocks.end.size());
  auto next_listed = [&](index_t j) {
    while (j < num_blocks && blocks.begin[j] == blocks.end[j]) ++j;
    return j;
  };

  Batch batch;
  for (index_t j = next_listed(0); j < num_blocks;) {
    const index_t next = next_listed(j + 1);
    if (next < num_blocks) {  // the next block loads while this one computes
      const int rows = int(std::min(bs, seq.len - next * bs));
      attn::prefetch_rows(p.k.ptr<T>(seq.batch, seq.start + next * bs, g), p.k.row_stride, rows,
                          p.head_dim);
      attn::prefetch_rows(p.v.ptr<T>(seq.batch, seq.start + next * bs, g), p.v.row_stride, rows,
                          p.head_dim_v);
    }
    const int32_t* tok = blocks.tokens.data() + blocks.begin[j];
    const int ntok = blocks.end[j] - blocks.begin[j];
    const index_t block_end = std::min(j * bs + bs, seq.len);
    int first = 0;
    for (index_t c0 = j * bs; c0 < block_end; c0 += kMaxKeys) {
      while (first < ntok && tile.t0 + tok[first] < c0) ++first;  // they see nothing of the chunk
      if (first == ntok) break;
      // Keys after the last token are visible to nobody.
      const int nk = int(std::min({c0 + kMaxKeys, block_end, tile.t0 + tok[ntok - 1] + 1}) - c0);
      index_t ldk, ldv;
      const A* k = attn::rows_as(p.k.ptr<T>(seq.batch, seq.start + c0, g), p.k.row_stride, nk,
                                 p.head_dim, kbuf, ldk);
      const A* v = attn::rows_as(p.v.ptr<T>(seq.batch, seq.start + c0, g), p.v.row_stride, nk,
                                 p.head_dim_v, vbuf, ldv);
      batch.clear();
      for (int u = first; u < ntok; ++u)
        for (int hh = 0; hh < G; ++hh) {
          batch.set_visible(batch.n, 0, tile.t0 + tok[u] - c0 + 1, nk);
          batch.add(tok[u] * G + hh);
          if (batch.n == kMaxRows || (u == ntok - 1 && hh == G - 1)) {
            batch.pad();
            batch.finish_visible(nk);
            visit(k, ldk, v, ldv, nk, batch);
            batch.clear();
          }
        }
    }
    j = next;
  }
}

struct ReverseIndex;  // below, with the backward

// What a chunk of work items reads besides the params; A is the accumulation type.
template <typename A>
struct Inputs {
  const SlcParams& p;
  const std::vector<TokenTile>& tiles;  // forward and dq
  const ReverseIndex* ri;  // dk/dv
  const A* delta;                        // backward: see attn::fill_delta
};

// Forward items [begin, end): item = tile * H + kv head.
template <typename T>
void fwd_items(const Inputs<acc_t<T>>& in, index_t begin, index_t end) {
  const SlcParams& p = in.p;
  const std::vector<TokenTile>& tiles = in.tiles;
  using A = acc_t<T>;
  const int H = p.num_heads_k, G = p.num_heads / H, D = p.head_dim, Dv = p.head_dim_v;
  const size_t max_rows = size_t(tile_tokens(G)) * G;
  std::vector<A> q(max_rows * D), o(max_rows * Dv), m(max_rows), l(max_rows), kbuf, vbuf;
  TileBlocks blocks;
  BatchRows<A> br(D, Dv);
  Scratch<A> ws;

  for (index_t item = begin; item < end; ++item) {
    const TokenTile& tile = tiles[item / H];
    const int g = int(item % H);
    const SeqRange seq = p.seqs.range(tile.seq);
    const int rows = int(tile.t1 - tile.t0) * G;
    for (int r = 0; r < rows; ++r)
      attn::load_scaled(p.q.ptr<T>(seq.batch, seq.start + tile.t0 + r / G, g * G + r % G),
                        A(p.scale), q.data() + index_t(r) * D, D);
    std::fill_n(o.begin(), size_t(rows) * Dv, A(0));
    std::fill_n(m.begin(), rows, -std::numeric_limits<A>::infinity());
    std::fill_n(l.begin(), rows, A(0));

    for_each_block_batch<T, A>(
        p, seq, tile, g, blocks, kbuf, vbuf,
        [&](const A* k, index_t ldk, const A* v, index_t ldv, int nk, const Batch& b) {
          br.gather(b, q.data(), D, nullptr, Dv, nullptr, nullptr);
          attn::attend_fwd(k, ldk, v, ldv, nk, D, Dv, b, br, ws, o.data(), m.data(), l.data());
        });

    for (int r = 0; r < rows; ++r) {
      const index_t row = seq.start + tile.t0 + r / G;
      const int h = g * G + r % G;
      attn::store_fwd_row(o.data() + index_t(r) * Dv, m[r], l[r], Dv,
                          p.o.ptr<T>(seq.batch, row, h), p.lse.ptr<A>(seq.batch, row, h));
    }
  }
}

// dq items [begin, end): item = tile * H + kv head. delta: see attn::fill_delta.
template <typename T>
void dq_items(const Inputs<acc_t<T>>& in, index_t begin, index_t end) {
  const SlcParams& p = in.p;
  const std::vector<TokenTile>& tiles = in.tiles;
  const acc_t<T>* delta = in.delta;
  using A = acc_t<T>;
  const int H = p.num_heads_k, G = p.num_heads / H, D = p.head_dim, Dv = p.head_dim_v;
  const size_t max_rows = size_t(tile_tokens(G)) * G;
  std::vector<A> q(max_rows * D), dout(max_rows * Dv), dq(max_rows * D), lse(max_rows),
      dlt(max_rows), kbuf, vbuf;
  TileBlocks blocks;
  BatchRows<A> br(D, Dv);
  Scratch<A> ws;

  for (index_t item = begin; item < end; ++item) {
    const TokenTile& tile = tiles[item / H];
    const int g = int(item % H);
    const SeqRange seq = p.seqs.range(tile.seq);
    const int rows = int(tile.t1 - tile.t0) * G;
    for (int r = 0; r < rows; ++r) {
      const index_t t = tile.t0 + r / G;
      const int h = g * G + r % G;
      attn::load_scaled(p.q.ptr<T>(seq.batch, seq.start + t, h), A(p.scale),
                        q.data() + index_t(r) * D, D);
      load_row(p.dout.ptr<T>(seq.batch, seq.start + t, h), dout.data() + index_t(r) * Dv, Dv);
      lse[r] = *p.lse.ptr<A>(seq.batch, seq.start + t, h);
      dlt[r] = delta[attn::token_pos(p.seqs, seq, t) * p.num_heads + h];
    }
    std::fill_n(dq.begin(), size_t(rows) * D, A(0));

    for_each_block_batch<T, A>(
        p, seq, tile, g, blocks, kbuf, vbuf,
        [&](const A* k, index_t ldk, const A* v, index_t ldv, int nk, const Batch& b) {
          br.gather(b, q.data(), D, dout.data(), Dv, lse.data(), dlt.data());
          attn::attend_dq(k, ldk, v, ldv, nk, D, Dv, b, br, ws, dq.data());
        });

    for (int r = 0; r < rows; ++r) {
      T* out = p.dq.ptr<T>(seq.batch, seq.start + tile.t0 + r / G, g * G + r % G);
      for (int d = 0; d < D; ++d) store(out[d], A(p.scale) * dq[index_t(r) * D + d]);
    }
  }
}

// For each (sequence, kv head, block): the tokens that listed the block, ascending.
struct ReverseIndex {
  std::vector<index_t> item_base;    // [num_seqs + 1]: first dk/dv item of each sequence
  std::vector<index_t> offset_base;  // [num_seqs * H]: where (s, g) starts in `offsets`
  std::vector<index_t> offsets;      // per (s, g): num_blocks + 1 positions in `tokens`
  std::vector<int32_t> tokens;       // sequence-relative tokens grouped by (s, g, block)
};

ReverseIndex plan_reverse_index(const SlcParams& p, std::vector<index_t>& token_base) {
  const int H = p.num_heads_k, N = p.seqs.num_seqs;
  ReverseIndex ri;
  ri.item_base.assign(N + 1, 0);
  ri.offset_base.assign(size_t(N) * H, 0);
  token_base.assign(size_t(N) * H, 0);
  index_t num_offsets = 0, num_tokens = 0;
  for (int s = 0; s < N; ++s) {
    const SeqRange seq = p.seqs.range(s);
    const index_t num_blocks = num_select_blocks(seq.len, p.select_size);
    ri.item_base[s + 1] = ri.item_base[s] + num_blocks * H;
    for (int g = 0; g < H; ++g) {
      ri.offset_base[size_t(s) * H + g] = num_offsets;
      token_base[size_t(s) * H + g] = num_tokens;
      num_offsets += num_blocks + 1;
      num_tokens += seq.len * p.num_selected;  // upper bound: every slot used
    }
  }
  ri.offsets.assign(num_offsets, 0);
  ri.tokens.resize(num_tokens);
  return ri;
}

// Counting sort of the block_indices of (sequence s, kv head g) into the reverse index.
void fill_reverse_index(const SlcParams& p, int s, int g, index_t token_base,
                        std::vector<index_t>& cursor, ReverseIndex& ri) {
  const SeqRange seq = p.seqs.range(s);
  const index_t num_blocks = num_select_blocks(seq.len, p.select_size);
  index_t* off = ri.offsets.data() + ri.offset_base[size_t(s) * p.num_heads_k + g];
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
  for_each_use([&](int32_t j, index_t t) { ri.tokens[cursor[j]++] = int32_t(t); });
}

// dk/dv items [begin, end): item = item_base[s] + g * num_blocks + j owns block j's key rows.
template <typename T>
void dkdv_items(const Inputs<acc_t<T>>& in, index_t begin, index_t end) {
  const SlcParams& p = in.p;
  const ReverseIndex& ri = *in.ri;
  const acc_t<T>* delta = in.delta;
  using A = acc_t<T>;
  const int H = p.num_heads_k, G = p.num_heads / H, D = p.head_dim, Dv = p.head_dim_v;
  const index_t bs = p.select_size;
  std::vector<A> dk(size_t(bs) * D), dv(size_t(bs) * Dv), kbuf, vbuf;
  attn::GatheredRows<A> gr(D, Dv);
  BatchRows<A> br(D, Dv);
  Scratch<A> ws;

  for (index_t item = begin; item < end; ++item) {
    const int s = int(std::upper_bound(ri.item_base.begin(), ri.item_base.end(), item) -
                      ri.item_base.begin()) - 1;
    const SeqRange seq = p.seqs.range(s);
    const index_t num_blocks = num_select_blocks(seq.len, bs);
    const int g = int((item - ri.item_base[s]) / num_blocks);
    const index_t j = (item - ri.item_base[s]) % num_blocks;
    const index_t k0 = j * bs;
    const int nkeys = int(std::min(k0 + bs, seq.len) - k0);
    const index_t* off = ri.offsets.data() + ri.offset_base[size_t(s) * H + g] + j;

    index_t ldk, ldv;
    const A* k = attn::rows_as(p.k.ptr<T>(seq.batch, seq.start + k0, g), p.k.row_stride, nkeys,
                               D, kbuf, ldk);
    const A* v = attn::rows_as(p.v.ptr<T>(seq.batch, seq.start + k0, g), p.v.row_stride, nkeys,
                               Dv, vbuf, ldv);
    std::fill_n(dk.begin(), size_t(nkeys) * D, A(0));
    std::fill_n(dv.begin(), size_t(nkeys) * Dv, A(0));

    auto flush = [&]() {
      Batch& b = gr.batch;
      b.pad();
      br.gather(b, gr.q.data(), D, gr.dout.data(), Dv, gr.lse, gr.delta);
      for (int c = 0; c < nkeys; c += kMaxKeys) {
        const int nk = std::min(kMaxKeys, nkeys - c);
        for (int a = 0; a < b.n; ++a) b.set_visible(a, 0, gr.token[a] - (k0 + c) + 1, nk);
        b.finish_visible(nk);
        if (!b.sees_any()) break;  // rows are in token order: later chunks are out of reach too
        attn::attend_dkdv(k + c * ldk, ldk, v + c * ldv, ldv, nk, D, Dv, b, br, ws, gr.q.data(),
                          gr.dout.data(), dk.data() + index_t(c) * D, dv.data() + index_t(c) * Dv);
      }
      b.clear();
    };
    gr.batch.clear();
    for (index_t u = off[0]; u < off[1]; ++u)
      for (int hh = 0; hh < G; ++hh)
        if (gr.template add<T>(p, seq, ri.tokens[u], g * G + hh, delta)) flush();
    if (gr.batch.n > 0) flush();

    for (int key = 0; key < nkeys; ++key) {
      store_row(dk.data() + index_t(key) * D, p.dk.ptr<T>(seq.batch, seq.start + k0 + key, g), D);
      store_row(dv.data() + index_t(key) * Dv, p.dv.ptr<T>(seq.batch, seq.start + k0 + key, g),
                Dv);
    }
  }
}

// The multiversioned (AVX2 + baseline) entry of each pass, one per element type.
NSA_CPU_CHUNKS(fwd_chunk, fwd_items, Inputs)
NSA_CPU_CHUNKS(dq_chunk, dq_items, Inputs)
NSA_CPU_CHUNKS(dkdv_chunk, dkdv_items, Inputs)

}  // namespace

void slc_fwd(const SlcParams& p, const ParallelFor& parallel_for) {
  const int G = p.num_heads / p.num_heads_k;
  const std::vector<TokenTile> tiles = attn::token_tiles(p.seqs, tile_tokens(G));
  dispatch_dtype(p.dtype, "nsa.slc_fwd", [&](auto tag) {
    parallel_for(index_t(tiles.size()) * p.num_heads_k, 1,
                 [&](index_t b, index_t e) {
                   const Inputs<acc_t<decltype(tag)>> in{p, tiles, nullptr, nullptr};
                   fwd_chunk(in, b, e, tag);
                 });
  });
}

void slc_bwd(const SlcParams& p, const ParallelFor& parallel_for) {
  const int H = p.num_heads_k, G = p.num_heads / H;
  const std::vector<TokenTile> tiles = attn::token_tiles(p.seqs, tile_tokens(G));
  std::vector<index_t> token_base;
  ReverseIndex ri = plan_reverse_index(p, token_base);
  parallel_for(index_t(p.seqs.num_seqs) * H, 1, [&](index_t b, index_t e) {
    std::vector<index_t> cursor;
    for (index_t i = b; i < e; ++i)
      fill_reverse_index(p, int(i / H), int(i % H), token_base[i], cursor, ri);
  });

  dispatch_dtype(p.dtype, "nsa.slc_bwd", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    std::vector<A> delta(size_t(attn::num_token_pos(p.seqs)) * p.num_heads);
    parallel_for(index_t(tiles.size()), 1, [&](index_t b, index_t e) {
      for (index_t i = b; i < e; ++i) attn::fill_delta<T>(p, tiles[i], delta.data());
    });
    const Inputs<A> in{p, tiles, &ri, delta.data()};
    parallel_for(index_t(tiles.size()) * H, 1,
                 [&](index_t b, index_t e) { dq_chunk(in, b, e, tag); });
    parallel_for(ri.item_base.back(), 1,
                 [&](index_t b, index_t e) { dkdv_chunk(in, b, e, tag); });
  });
}

}  // namespace nsa::cpu
