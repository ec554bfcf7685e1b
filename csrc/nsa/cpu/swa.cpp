// Sliding-window branch on the CPU: query t attends keys max(0, t - w + 1) .. t of its sequence
// (DESIGN.md section 1; flash-attn's window_size = (w - 1, 0)).
//
// Forward and dq: one work item per (tile of neighbouring tokens, kv head); the tile's rows
// (tokens x G heads) share all but a few keys of their windows, so each key chunk is loaded once
// per tile for all of them. dk/dv: one work item per (chunk of keys, kv head) looping over the
// queries that see the chunk in token order: deterministic, no atomics.
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

// Forward / dq tiles hold one batch of rows: more rows would only add masked keys at the window
// edges (a tile of n tokens computes w + n - 1 keys per row).
index_t tile_tokens(int group) { return std::max(1, kMaxRows / group); }

// Keys per dk/dv item: several chunks share the gathered query rows.
constexpr int kItemKeys = 2 * kMaxKeys;

// Splits a tile's rows into batches of kMaxRows (row r = token r / G, head r % G of the group)
// and makes room for each batch's operands, reusing the caller's vectors.
template <typename A>
void tile_batches(int rows, int D, int Dv, std::vector<Batch>& batches,
                  std::vector<BatchRows<A>>& br) {
  batches.assign((rows + kMaxRows - 1) / kMaxRows, Batch{});
  for (int r = 0; r < rows; ++r) batches[r / kMaxRows].add(r);
  for (Batch& b : batches) b.pad();
  while (br.size() < batches.size()) br.emplace_back(D, Dv);
}

// Sets the keys of chunk [c0, c0 + nk) each row of b sees; row r belongs to token t0 + r / G.
void window_visible(Batch& b, index_t t0, int G, index_t w, index_t c0, int nk) {
  for (int a = 0; a < b.n; ++a) {
    const index_t t = t0 + b.row[a] / G;
    b.set_visible(a, t - w + 1 - c0, t + 1 - c0, nk);
  }
  b.finish_visible(nk);
}

// What a chunk of work items reads besides the params; A is the accumulation type.
template <typename A>
struct Inputs {
  const SwaParams& p;
  const std::vector<TokenTile>& tiles;  // forward and dq
  const std::vector<index_t>* item_base;  // dk/dv
  const A* delta;                        // backward: see attn::fill_delta
};

// Forward items [begin, end): item = tile * H + kv head.
template <typename T>
void fwd_items(const Inputs<acc_t<T>>& in, index_t begin, index_t end) {
  const SwaParams& p = in.p;
  const std::vector<TokenTile>& tiles = in.tiles;
  using A = acc_t<T>;
  const int H = p.num_heads_k, G = p.num_heads / H, D = p.head_dim, Dv = p.head_dim_v;
  const index_t w = p.window_size;
  const size_t max_rows = size_t(tile_tokens(G)) * G;
  std::vector<A> q(max_rows * D), o(max_rows * Dv), m(max_rows), l(max_rows), kbuf, vbuf;
  std::vector<Batch> batches;
  std::vector<BatchRows<A>> br;
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
    tile_batches(rows, D, Dv, batches, br);
    for (size_t i = 0; i < batches.size(); ++i)
      br[i].gather(batches[i], q.data(), D, nullptr, Dv, nullptr, nullptr);

    const index_t key_end = tile.t1;
    for (index_t c0 = std::max<index_t>(0, tile.t0 - w + 1); c0 < key_end; c0 += kMaxKeys) {
      const int nk = int(std::min<index_t>(kMaxKeys, key_end - c0));
      index_t ldk, ldv;
      const A* k = attn::rows_as(p.k.ptr<T>(seq.batch, seq.start + c0, g), p.k.row_stride, nk, D,
                                 kbuf, ldk);
      const A* v = attn::rows_as(p.v.ptr<T>(seq.batch, seq.start + c0, g), p.v.row_stride, nk,
                                 Dv, vbuf, ldv);
      for (size_t i = 0; i < batches.size(); ++i) {
        window_visible(batches[i], tile.t0, G, w, c0, nk);
        if (batches[i].sees_any())
          attn::attend_fwd(k, ldk, v, ldv, nk, D, Dv, batches[i], br[i], ws, o.data(), m.data(),
                           l.data());
      }
    }

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
  const SwaParams& p = in.p;
  const std::vector<TokenTile>& tiles = in.tiles;
  const acc_t<T>* delta = in.delta;
  using A = acc_t<T>;
  const int H = p.num_heads_k, G = p.num_heads / H, D = p.head_dim, Dv = p.head_dim_v;
  const index_t w = p.window_size;
  const size_t max_rows = size_t(tile_tokens(G)) * G;
  std::vector<A> q(max_rows * D), dout(max_rows * Dv), dq(max_rows * D), lse(max_rows),
      dlt(max_rows), kbuf, vbuf;
  std::vector<Batch> batches;
  std::vector<BatchRows<A>> br;
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
    tile_batches(rows, D, Dv, batches, br);
    for (size_t i = 0; i < batches.size(); ++i)
      br[i].gather(batches[i], q.data(), D, dout.data(), Dv, lse.data(), dlt.data());

    const index_t key_end = tile.t1;
    for (index_t c0 = std::max<index_t>(0, tile.t0 - w + 1); c0 < key_end; c0 += kMaxKeys) {
      const int nk = int(std::min<index_t>(kMaxKeys, key_end - c0));
      index_t ldk, ldv;
      const A* k = attn::rows_as(p.k.ptr<T>(seq.batch, seq.start + c0, g), p.k.row_stride, nk, D,
                                 kbuf, ldk);
      const A* v = attn::rows_as(p.v.ptr<T>(seq.batch, seq.start + c0, g), p.v.row_stride, nk,
                                 Dv, vbuf, ldv);
      for (size_t i = 0; i < batches.size(); ++i) {
        window_visible(batches[i], tile.t0, G, w, c0, nk);
        if (batches[i].sees_any())
          attn::attend_dq(k, ldk, v, ldv, nk, D, Dv, batches[i], br[i], ws, dq.data());
      }
    }

    for (int r = 0; r < rows; ++r) {
      T* out = p.dq.ptr<T>(seq.batch, seq.start + tile.t0 + r / G, g * G + r % G);
      for (int d = 0; d < D; ++d) store(out[d], A(p.scale) * dq[index_t(r) * D + d]);
    }
  }
}

// dk/dv items: (sequence, chunk of kItemKeys keys, kv head), numbered from item_base[s].
std::vector<index_t> dkdv_item_base(const SwaParams& p) {
  std::vector<index_t> base(p.seqs.num_seqs + 1, 0);
  for (int s = 0; s < p.seqs.num_seqs; ++s) {
    const index_t len = p.seqs.range(s).len;
    base[s + 1] = base[s] + (len + kItemKeys - 1) / kItemKeys * p.num_heads_k;
  }
  return base;
}

template <typename T>
void dkdv_items(const Inputs<acc_t<T>>& in, index_t begin, index_t end) {
  const SwaParams& p = in.p;
  const std::vector<index_t>& item_base = *in.item_base;
  const acc_t<T>* delta = in.delta;
  using A = acc_t<T>;
  const int H = p.num_heads_k, G = p.num_heads / H, D = p.head_dim, Dv = p.head_dim_v;
  const index_t w = p.window_size;
  std::vector<A> dk(size_t(kItemKeys) * D), dv(size_t(kItemKeys) * Dv), kbuf, vbuf;
  attn::GatheredRows<A> gr(D, Dv);
  BatchRows<A> br(D, Dv);
  Scratch<A> ws;

  for (index_t item = begin; item < end; ++item) {
    const int s = int(std::upper_bound(item_base.begin(), item_base.end(), item) -
                      item_base.begin()) - 1;
    const SeqRange seq = p.seqs.range(s);
    const int g = int((item - item_base[s]) % H);
    const index_t k0 = (item - item_base[s]) / H * kItemKeys;
    const int nkeys = int(std::min<index_t>(kItemKeys, seq.len - k0));

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
        const index_t c0 = k0 + c;
        for (int a = 0; a < b.n; ++a)
          b.set_visible(a, gr.token[a] - w + 1 - c0, gr.token[a] + 1 - c0, nk);
        b.finish_visible(nk);
        if (b.sees_any())
          attn::attend_dkdv(k + c * ldk, ldk, v + c * ldv, ldv, nk, D, Dv, b, br, ws,
                            gr.q.data(), gr.dout.data(), dk.data() + index_t(c) * D,
                            dv.data() + index_t(c) * Dv);
      }
      b.clear();
    };
    // Queries that see a key of [k0, k0 + nkeys): t in [k0, k0 + nkeys - 1 + w - 1].
    gr.batch.clear();
    const index_t t_end = std::min(seq.len, k0 + nkeys + w - 1);
    for (index_t t = k0; t < t_end; ++t)
      for (int hh = 0; hh < G; ++hh)
        if (gr.template add<T>(p, seq, t, g * G + hh, delta)) flush();
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

void swa_fwd(const SwaParams& p, const ParallelFor& parallel_for) {
  const int G = p.num_heads / p.num_heads_k;
  const std::vector<TokenTile> tiles = attn::token_tiles(p.seqs, tile_tokens(G));
  dispatch_dtype(p.dtype, "nsa.swa_fwd", [&](auto tag) {
    parallel_for(index_t(tiles.size()) * p.num_heads_k, 1,
                 [&](index_t b, index_t e) {
                   const Inputs<acc_t<decltype(tag)>> in{p, tiles, nullptr, nullptr};
                   fwd_chunk(in, b, e, tag);
                 });
  });
}

void swa_bwd(const SwaParams& p, const ParallelFor& parallel_for) {
  const int H = p.num_heads_k, G = p.num_heads / H;
  const std::vector<TokenTile> tiles = attn::token_tiles(p.seqs, tile_tokens(G));
  const std::vector<index_t> item_base = dkdv_item_base(p);
  dispatch_dtype(p.dtype, "nsa.swa_bwd", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    std::vector<A> delta(size_t(attn::num_token_pos(p.seqs)) * p.num_heads);
    parallel_for(index_t(tiles.size()), 1, [&](index_t b, index_t e) {
      for (index_t i = b; i < e; ++i) attn::fill_delta<T>(p, tiles[i], delta.data());
    });
    const Inputs<A> in{p, tiles, &item_base, delta.data()};
    parallel_for(index_t(tiles.size()) * H, 1,
                 [&](index_t b, index_t e) { dq_chunk(in, b, e, tag); });
    parallel_for(item_base.back(), 1,
                 [&](index_t b, index_t e) { dkdv_chunk(in, b, e, tag); });
  });
}

}  // namespace nsa::cpu
