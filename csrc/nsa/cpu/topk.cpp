// CPU kernel of the top-n block selection. For query t and kv head g, selection block j scores
//   S[t, g, j] = sum_{h in group g} sum_{i visible} p_cmp[t, h, i] * |W_i ∩ block j| / d,
// p_cmp = exp(scale q.k_cmp_i - lse). One work item per query tile (consecutive tokens x the G
// heads of a group, as in cmp.cpp): its probabilities are computed block by block of compressed
// keys and summed over the group into one row per token; each token then scores its blocks and
// picks the top n. The [T, T / l'] score tensor never exists.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cmp_tiles.h"
#include "kernels.h"
#include "numeric.h"
#include "selector.h"

namespace nsa::cpu {
namespace {

using cmp_tiles::kTileM;
using cmp_tiles::WorkList;
constexpr index_t KB = cmp_tiles::kKeyBlock;

index_t visible(const TopkParams& p, const SeqRange& seq, index_t t) {
  // The cap only guards memory: the binding checks Nc.
  return std::min(num_cmp_tokens(t + 1, p.block_size, p.block_stride), seq.cmp_len);
}

// What a chunk of work items reads besides the params.
template <typename A>
struct Inputs {
  const TopkParams& p;
  const WorkList& work;
  const cmp_tiles::PackedBlocks<A>& kt;  // compressed keys transposed [D, KB]
};

template <typename T>
void topk_items(const Inputs<acc_t<T>>& in, index_t begin, index_t end) {
  using A = acc_t<T>;
  const TopkParams& p = in.p;
  const int G = p.num_heads / p.num_heads_k, D = p.head_dim;
  const cmp_tiles::QueryTile tile(G);
  const index_t R = tile.rows;
  std::vector<A> q(R * D), s(R * KB), lse(R);
  std::vector<A> w;  // [tokens, ncols]: group-summed p_cmp of each token (ncols ~ Nc)
  std::vector<index_t> vis(tile.tokens);
  Selector<A> selector(p);

  for (index_t item = begin; item < end; ++item) {
    const WorkList::Item it = in.work.at(item);
    const SeqRange seq = p.seqs.range(it.seq);
    const index_t t0 = it.tile * tile.tokens, row0 = seq.start + t0;
    const index_t ntok = std::min(tile.tokens, seq.len - t0);
    cmp_tiles::load_query_tile<T>(p.q, seq.batch, row0, ntok, it.head * G, G, D, A(p.scale),
                                  q.data(), R, D);
    std::fill(lse.begin(), lse.end(), -std::numeric_limits<A>::infinity());
    for (index_t tt = 0; tt < ntok; ++tt) {
      vis[tt] = visible(p, seq, t0 + tt);
      for (int hh = 0; hh < G; ++hh)
        lse[tt * G + hh] = *p.lse.ptr<A>(seq.batch, row0 + tt, it.head * G + hh);
    }

    const index_t nvis = vis[ntok - 1];
    const index_t ncols = cmp_tiles::round_up(nvis, KB);
    if (index_t(w.size()) < ntok * ncols) w.resize(ntok * ncols);
    for (index_t j0 = 0; j0 < nvis; j0 += KB) {
      const index_t nk = std::min(KB, nvis - j0);
      // Tokens before tt_first see nothing of this block: skip their rows.
      index_t tt_first = 0;
      while (vis[tt_first] <= j0) ++tt_first;
      const index_t r0 = tt_first * G / kTileM * kTileM;
      cmp_tiles::tile_gemm<false>(R - r0, KB, D, q.data() + r0 * D, D,
                                  in.kt.block(it.seq, it.head, j0 / KB), KB, s.data() + r0 * KB,
                                  KB);
      for (index_t r = r0; r < R; ++r) {
        const index_t tt = r / G;
        const index_t nv = tt < ntok ? std::clamp<index_t>(vis[tt] - j0, 0, nk) : 0;
        cmp_tiles::exp_row(s.data() + r * KB, KB, nv, lse[r]);
      }
      for (index_t tt = tt_first; tt < ntok; ++tt) {
        A* wt = w.data() + tt * ncols + j0;
        const A* st = s.data() + tt * G * KB;
        std::copy(st, st + KB, wt);
        for (int hh = 1; hh < G; ++hh)
          for (index_t j = 0; j < KB; ++j) wt[j] += st[hh * KB + j];
      }
    }

    for (index_t tt = 0; tt < ntok; ++tt)
      selector.select(t0 + tt, vis[tt], w.data() + tt * ncols,
                      p.indices.ptr<int32_t>(seq.batch, row0 + tt, it.head));
  }
}

NSA_CPU_CHUNKS(topk_chunk, topk_items, Inputs)

}  // namespace

void select_topk(const TopkParams& p, const ParallelFor& parallel_for) {
  const index_t tokens = cmp_tiles::QueryTile(p.num_heads / p.num_heads_k).tokens;
  const WorkList work(p.seqs, p.num_heads_k,
                      [&](const SeqRange& seq) { return (seq.len + tokens - 1) / tokens; });
  dispatch_dtype(p.dtype, "nsa.select_blocks", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    cmp_tiles::PackedBlocks<A> kt(p.seqs, p.num_heads_k, p.head_dim, true);
    parallel_for(kt.size(), 16,
                 [&](index_t b, index_t e) { kt.template pack<T>(p.k, p.seqs, b, e); });
    const Inputs<A> in{p, work, kt};
    parallel_for(work.size(), 1, [&](index_t b, index_t e) { topk_chunk(in, b, e, tag); });
  });
}

}  // namespace nsa::cpu
