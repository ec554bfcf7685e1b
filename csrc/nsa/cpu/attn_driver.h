// The forward, dq and dk/dv passes of the selected-block (slc.cpp) and sliding-window (swa.cpp)
// CPU kernels, written once over a branch trait B, as the CUDA kernels are written once over
// their Branch (cuda/attn/branch.cuh). The trait says which keys a query row sees and in which
// order the keys are walked; the driver loads the query rows, runs the tile steps of attn_tile.h
// on them and stores the results.
//
// Forward and dq: one work item per (tile of neighbouring tokens, kv head). Row r of a tile is
// token t0 + r / G, query head g * G + r % G: the G heads of a group and neighbouring tokens
// share most of their keys, so each key chunk is loaded once per tile for all of them.
// dk/dv: one work item per key range of a kv head (the trait's unit) owning those keys' dk/dv
// rows, looping over the queries that may see them in token order: the sums have a fixed order,
// deterministic, no atomics.
//
// A trait B provides:
//   using Params;                                  SlcParams or SwaParams
//   static index_t tile_tokens(int G);             tokens per forward / dq tile
//   static KeySpan visible(const Params&, index_t t);
//       the keys token t may see (sequence-relative); the walks apply any other rule (the
//       selected branch's block choice)
//   template <typename A> struct TileWalk {        forward / dq scratch, one per chunk of items
//     explicit TileWalk(const Params&);
//     template <typename T, typename Visit>
//     void run(const Params&, const TileRows&, const TileOperands<A>&, Visit&& visit);
//         calls visit(keys, nk, batch, batch_rows) for each key chunk and batch of the tile's
//         rows that sees some key of it: keys holds the chunk's nk key / value rows, the batch
//         its rows' visible keys (set_visible_keys), batch_rows their operands (gathered)
//   };
//   struct KeyItems {                              the dk/dv work items of one call
//     KeyItems(const Params&, const ParallelFor&);
//     index_t size() const;
//     int max_keys() const;                        keys of the largest item
//     Item at(const Params&, index_t item) const;  Item has seq, g, k0, nkeys: keys
//                                                  [k0, k0 + nkeys) of the sequence, kv head g
//     template <typename Fn>
//     void for_each_token(const Params&, const Item&, Fn&& fn) const;
//         fn(t) for every token that may see a key of the item, ascending
//   };
#pragma once

#include <algorithm>
#include <limits>
#include <vector>

#include "attn_tile.h"
#include "kernels.h"

namespace nsa::cpu::attn {

// Keys [lo, hi) of a sequence.
struct KeySpan {
  index_t lo, hi;
};

// Sets, for the current key chunk [c0, c0 + nk), the keys each row of b sees; row a is the
// query at token token_of(a).
template <typename B, typename TokenOf>
inline void set_visible_keys(const typename B::Params& p, Batch& b, index_t c0, int nk,
                             TokenOf&& token_of) {
  for (int a = 0; a < b.n; ++a) {
    const KeySpan keys = B::visible(p, token_of(a));
    b.set_visible(a, keys.lo - c0, keys.hi - c0, nk);
  }
  b.finish_visible(nk);
}

// Key and value rows [c0, c0 + n) of a sequence and kv head in the accumulation type: the
// inputs themselves when T == A, else converted copies (rows_as).
template <typename A>
struct KeyRows {
  const A* k = nullptr;
  const A* v = nullptr;
  index_t ldk = 0, ldv = 0;
  std::vector<A> kbuf, vbuf;

  template <typename T>
  void load(const AttnParams& p, const SeqRange& seq, int g, index_t c0, int n) {
    load<T>(p.k.ptr<T>(seq.batch, seq.start + c0, g), p.k.row_stride,
            p.v.ptr<T>(seq.batch, seq.start + c0, g), p.v.row_stride, n, p.head_dim,
            p.head_dim_v);
  }
  // n key rows of D elements at `keys` (row stride ldk_in) and their value rows of Dv elements.
  template <typename T>
  void load(const T* keys, index_t ldk_in, const T* values, index_t ldv_in, int n, int D, int Dv) {
    k = rows_as(keys, ldk_in, n, D, kbuf, ldk);
    v = rows_as(values, ldv_in, n, Dv, vbuf, ldv);
  }
};

// The query rows of a forward / dq work item (item = tile * H + kv head).
struct TileRows {
  SeqRange seq;
  TokenTile tile;
  int g, G, rows;

  TileRows(const AttnParams& p, const std::vector<TokenTile>& tiles, index_t item)
      : seq(p.seqs.range(tiles[item / p.num_heads_k].seq)),
        tile(tiles[item / p.num_heads_k]),
        g(int(item % p.num_heads_k)),
        G(p.num_heads / p.num_heads_k),
        rows(int(tile.t1 - tile.t0) * G) {}
  index_t token(int r) const { return tile.t0 + r / G; }  // sequence-relative
  int head(int r) const { return g * G + r % G; }
  index_t row(int r) const { return seq.start + token(r); }  // on the T axis
};

// Row-major operands of a tile's rows: scaled queries and, for dq, dout, lse and delta.
template <typename A>
struct TileOperands {
  int D, Dv;
  bool backward;
  std::vector<A> q, dout, lse, delta;

  TileOperands(const AttnParams& p, index_t max_rows, bool backward_)
      : D(p.head_dim), Dv(p.head_dim_v), backward(backward_), q(size_t(max_rows) * D),
        dout(backward ? size_t(max_rows) * Dv : 0), lse(backward ? max_rows : 0),
        delta(backward ? max_rows : 0) {}

  // Loads the tile's rows; delta_all: see fill_delta (backward only).
  template <typename T>
  void load(const AttnParams& p, const TileRows& tr, const A* delta_all) {
    for (int r = 0; r < tr.rows; ++r) {
      const index_t row = tr.row(r);
      const int h = tr.head(r);
      load_scaled(p.q.ptr<T>(tr.seq.batch, row, h), A(p.scale), q.data() + index_t(r) * D, D);
      if (!backward) continue;
      load_row(p.dout.ptr<T>(tr.seq.batch, row, h), dout.data() + index_t(r) * Dv, Dv);
      lse[r] = *p.lse.ptr<A>(tr.seq.batch, row, h);
      delta[r] = delta_all[token_pos(p.seqs, tr.seq, tr.token(r)) * p.num_heads + h];
    }
  }
  void gather(const Batch& b, BatchRows<A>& br) const {
    if (backward)
      br.gather(b, q.data(), D, dout.data(), Dv, lse.data(), delta.data());
    else
      br.gather(b, q.data(), D, nullptr, Dv, nullptr, nullptr);
  }
};

// What a chunk of work items reads besides the params; A is the accumulation type.
template <typename B, typename A>
struct Inputs {
  const typename B::Params& p;
  const std::vector<TokenTile>& tiles;      // forward and dq
  const typename B::KeyItems* key_items;    // dk/dv
  const A* delta;                           // backward: see fill_delta
};

// Forward (kDq false) or dq items [begin, end): item = tile * H + kv head.
template <bool kDq, typename T, typename B>
void tile_items(const Inputs<B, acc_t<T>>& in, index_t begin, index_t end) {
  using A = acc_t<T>;
  const AttnParams& p = in.p;
  const int D = p.head_dim, Dv = p.head_dim_v;
  const index_t max_rows = B::tile_tokens(p.num_heads / p.num_heads_k) *
                           (p.num_heads / p.num_heads_k);
  TileOperands<A> rows(p, max_rows, kDq);
  // Per row: forward, the output accumulator and the running max m and sum l of the online
  // softmax; dq, the dq accumulator.
  std::vector<A> acc(size_t(max_rows) * (kDq ? D : Dv)), m(kDq ? 0 : max_rows),
      l(kDq ? 0 : max_rows);
  typename B::template TileWalk<A> walk(in.p);
  Scratch<A> ws;

  for (index_t item = begin; item < end; ++item) {
    const TileRows tr(p, in.tiles, item);
    rows.template load<T>(p, tr, in.delta);
    std::fill_n(acc.begin(), size_t(tr.rows) * (kDq ? D : Dv), A(0));
    std::fill_n(m.begin(), kDq ? 0 : tr.rows, -std::numeric_limits<A>::infinity());
    std::fill_n(l.begin(), kDq ? 0 : tr.rows, A(0));
    walk.template run<T>(
        in.p, tr, rows,
        [&](const KeyRows<A>& kv, int nk, const Batch& b, const BatchRows<A>& br) {
          if constexpr (kDq)
            attend_dq(kv.k, kv.ldk, kv.v, kv.ldv, nk, D, Dv, b, br, ws, acc.data());
          else
            attend_fwd(kv.k, kv.ldk, kv.v, kv.ldv, nk, D, Dv, b, br, ws, acc.data(), m.data(),
                       l.data());
        });
    for (int r = 0; r < tr.rows; ++r) {
      const index_t row = tr.row(r);
      const int h = tr.head(r);
      if constexpr (kDq) {
        T* out = p.dq.ptr<T>(tr.seq.batch, row, h);
        for (int d = 0; d < D; ++d) store(out[d], A(p.scale) * acc[index_t(r) * D + d]);
      } else {
        store_fwd_row(acc.data() + index_t(r) * Dv, m[r], l[r], Dv,
                      p.o.ptr<T>(tr.seq.batch, row, h), p.lse.ptr<A>(tr.seq.batch, row, h));
      }
    }
  }
}
template <typename T, typename B>
void fwd_items(const Inputs<B, acc_t<T>>& in, index_t begin, index_t end) {
  tile_items<false, T>(in, begin, end);
}
template <typename T, typename B>
void dq_items(const Inputs<B, acc_t<T>>& in, index_t begin, index_t end) {
  tile_items<true, T>(in, begin, end);
}

// dk/dv items [begin, end) of B::KeyItems.
template <typename T, typename B>
void dkdv_items(const Inputs<B, acc_t<T>>& in, index_t begin, index_t end) {
  using A = acc_t<T>;
  const AttnParams& p = in.p;
  const typename B::KeyItems& items = *in.key_items;
  const int G = p.num_heads / p.num_heads_k, D = p.head_dim, Dv = p.head_dim_v;
  std::vector<A> dk(size_t(items.max_keys()) * D), dv(size_t(items.max_keys()) * Dv);
  KeyRows<A> kv;
  GatheredRows<A> gr(D, Dv);
  BatchRows<A> br(D, Dv);
  Scratch<A> ws;

  for (index_t item = begin; item < end; ++item) {
    const auto it = items.at(in.p, item);
    const SeqRange& seq = it.seq;
    const int nkeys = it.nkeys;
    kv.template load<T>(p, seq, it.g, it.k0, nkeys);
    std::fill_n(dk.begin(), size_t(nkeys) * D, A(0));
    std::fill_n(dv.begin(), size_t(nkeys) * Dv, A(0));

    auto flush = [&]() {
      Batch& b = gr.batch;
      b.pad();
      br.gather(b, gr.q.data(), D, gr.dout.data(), Dv, gr.lse, gr.delta);
      for (int c = 0; c < nkeys; c += kMaxKeys) {
        const int nk = std::min(kMaxKeys, nkeys - c);
        const index_t c0 = it.k0 + c;
        if (c0 > gr.token[b.n - 1]) break;  // rows are in token order: nobody sees these keys
        set_visible_keys<B>(in.p, b, c0, nk, [&](int a) { return gr.token[a]; });
        if (b.sees_any())
          attend_dkdv(kv.k + c * kv.ldk, kv.ldk, kv.v + c * kv.ldv, kv.ldv, nk, D, Dv, b, br, ws,
                      gr.q.data(), gr.dout.data(), dk.data() + index_t(c) * D,
                      dv.data() + index_t(c) * Dv);
      }
      b.clear();
    };
    gr.batch.clear();
    items.for_each_token(in.p, it, [&](index_t t) {
      for (int hh = 0; hh < G; ++hh)
        if (gr.template add<T>(p, seq, t, it.g * G + hh, in.delta)) flush();
    });
    if (gr.batch.n > 0) flush();

    for (int key = 0; key < nkeys; ++key) {
      const index_t row = seq.start + it.k0 + key;
      store_row(dk.data() + index_t(key) * D, p.dk.ptr<T>(seq.batch, row, it.g), D);
      store_row(dv.data() + index_t(key) * Dv, p.dv.ptr<T>(seq.batch, row, it.g), Dv);
    }
  }
}

// The entry points of kernels.h. C::fwd, C::dq and C::dkdv(in, begin, end, T{}) run fwd_items,
// dq_items and dkdv_items<T> (see NSA_CPU_ATTN_CHUNKS).
template <typename B, typename C>
void run_fwd(const typename B::Params& p, const ParallelFor& parallel_for, const char* op) {
  const int G = p.num_heads / p.num_heads_k;
  const std::vector<TokenTile> tiles = token_tiles(p.seqs, B::tile_tokens(G));
  dispatch_dtype(p.dtype, op, [&](auto tag) {
    const Inputs<B, acc_t<decltype(tag)>> in{p, tiles, nullptr, nullptr};
    parallel_for(index_t(tiles.size()) * p.num_heads_k, 1,
                 [&](index_t b, index_t e) { C::fwd(in, b, e, tag); });
  });
}

template <typename B, typename C>
void run_bwd(const typename B::Params& p, const ParallelFor& parallel_for, const char* op) {
  const int G = p.num_heads / p.num_heads_k;
  const std::vector<TokenTile> tiles = token_tiles(p.seqs, B::tile_tokens(G));
  const typename B::KeyItems key_items(p, parallel_for);
  dispatch_dtype(p.dtype, op, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    std::vector<A> delta(size_t(num_token_pos(p.seqs)) * p.num_heads);
    parallel_for(index_t(tiles.size()), 1, [&](index_t b, index_t e) {
      for (index_t i = b; i < e; ++i) fill_delta<T>(p, tiles[i], delta.data());
    });
    const Inputs<B, A> in{p, tiles, &key_items, delta.data()};
    parallel_for(index_t(tiles.size()) * p.num_heads_k, 1,
                 [&](index_t b, index_t e) { C::dq(in, b, e, tag); });
    parallel_for(key_items.size(), 1, [&](index_t b, index_t e) { C::dkdv(in, b, e, tag); });
  });
}

}  // namespace nsa::cpu::attn

// In a branch's .cpp, in an unnamed namespace: the multiversioned (AVX2 + baseline) functions
// of the three passes of branch trait B, one per element type (NSA_CPU_CHUNKS), and `Chunks`,
// through which run_fwd and run_bwd call them.
#define NSA_CPU_ATTN_CHUNKS(B)                                                  \
  template <typename A>                                                         \
  using Inputs = ::nsa::cpu::attn::Inputs<B, A>;                                \
  NSA_CPU_CHUNKS(fwd_chunk, ::nsa::cpu::attn::fwd_items, Inputs)                \
  NSA_CPU_CHUNKS(dq_chunk, ::nsa::cpu::attn::dq_items, Inputs)                  \
  NSA_CPU_CHUNKS(dkdv_chunk, ::nsa::cpu::attn::dkdv_items, Inputs)              \
  struct Chunks {                                                               \
    template <typename In, typename T>                                          \
    static void fwd(const In& in, index_t begin, index_t end, T tag) {          \
      fwd_chunk(in, begin, end, tag);                                           \
    }                                                                           \
    template <typename In, typename T>                                          \
    static void dq(const In& in, index_t begin, index_t end, T tag) {           \
      dq_chunk(in, begin, end, tag);                                            \
    }                                                                           \
    template <typename In, typename T>                                          \
    static void dkdv(const In& in, index_t begin, index_t end, T tag) {         \
      dkdv_chunk(in, begin, end, tag);                                          \
    }                                                                           \
  };
