// CPU kernels of the compressed branch: query t attends the compressed rows i whose window ends
// at or before t (i * d + l - 1 <= t), a prefix of its sequence's compressed rows.
//
// Forward and dq: one work item per query tile (consecutive tokens x the G heads of a group)
// streaming blocks of compressed keys; the visible prefix grows with t, so a block can skip the
// tile's first rows. dk/dv: one work item per block of compressed rows (and kv head) streaming,
// in token order, the query tiles that see it. No atomics, and no sum depends on how
// ParallelFor splits the items.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cmp_tiles.h"
#include "kernels.h"
#include "numeric.h"

namespace nsa::cpu {
namespace {

using cmp_tiles::kTileM;
using cmp_tiles::kTileN;
using cmp_tiles::WorkList;
constexpr index_t KB = cmp_tiles::kKeyBlock;

struct Geometry {
  int G, D, Dv;
  index_t Dp, Dvp;  // D, Dv padded to whole register blocks
  cmp_tiles::QueryTile tile;
  index_t l, d;

  explicit Geometry(const CmpParams& p)
      : G(p.num_heads / p.num_heads_k),
        D(p.head_dim),
        Dv(p.head_dim_v),
        Dp(cmp_tiles::round_up(p.head_dim, kTileN)),
        Dvp(cmp_tiles::round_up(p.head_dim_v, kTileN)),
        tile(G),
        l(p.block_size),
        d(p.block_stride) {}

  // Compressed rows token t sees. The cap only guards memory: the binding checks Nc.
  index_t visible(const SeqRange& seq, index_t t) const {
    return std::min(num_cmp_tokens(t + 1, l, d), seq.cmp_len);
  }
  // First token of a query tile that sees row j0 (tokens see a prefix that grows with t).
  index_t first_seeing(const SeqRange& seq, index_t t0, index_t j0) const {
    index_t tt = 0;
    while (visible(seq, t0 + tt) <= j0) ++tt;
    return tt;
  }
};

// What a chunk of work items reads besides the params: the work list and the compressed
// keys/values packed in blocks (cmp_tiles::PackedBlocks).
template <typename A>
struct Inputs {
  const CmpParams& p;
  const WorkList& work;
  const cmp_tiles::PackedBlocks<A>& kt;  // keys transposed [D, KB]
  const cmp_tiles::PackedBlocks<A>& kr;  // keys as rows [KB, Dp] (read by dq only)
  const cmp_tiles::PackedBlocks<A>& v;   // values: rows [KB, Dvp] (forward), transposed [Dv, KB]
                                         // (backward)
};

// valid[r] = keys of the block [j0, j0 + nk) that row r (token t0 + r / G) sees, r in [r0, R).
void visible_in_block(const Geometry& geo, const SeqRange& seq, index_t t0, index_t ntok,
                      index_t j0, index_t nk, index_t r0, index_t R, index_t* valid) {
  for (index_t r = r0; r < R; ++r) {
    const index_t tt = r / geo.G;
    valid[r] = tt < ntok ? std::clamp<index_t>(geo.visible(seq, t0 + tt) - j0, 0, nk) : 0;
  }
}

// ---- forward ------------------------------------------------------------------------------

template <typename T>
void fwd_items(const Inputs<acc_t<T>>& in, index_t begin, index_t end) {
  using A = acc_t<T>;
  const CmpParams& p = in.p;
  const Geometry geo(p);
  const int G = geo.G, D = geo.D, Dv = geo.Dv;
  const index_t R = geo.tile.rows, Dvp = geo.Dvp;
  const A ninf = -std::numeric_limits<A>::infinity();
  std::vector<A> q(R * D), s(R * KB), o(R * Dvp), m(R), l(R);
  std::vector<index_t> valid(R);

  for (index_t item = begin; item < end; ++item) {
    const WorkList::Item w = in.work.at(item);
    const SeqRange seq = p.seqs.range(w.seq);
    const index_t t0 = w.tile * geo.tile.tokens;
    const index_t ntok = std::min(geo.tile.tokens, seq.len - t0);
    cmp_tiles::load_query_tile<T>(p.q, seq.batch, seq.start + t0, ntok, w.head * G, G, D,
                                  A(p.scale), q.data(), R, D);
    std::fill(o.begin(), o.end(), A(0));
    std::fill(m.begin(), m.end(), ninf);
    std::fill(l.begin(), l.end(), A(0));

    const index_t nvis = geo.visible(seq, t0 + ntok - 1);
    for (index_t j0 = 0; j0 < nvis; j0 += KB) {
      const index_t nk = std::min(KB, nvis - j0);
      const A* kt = in.kt.block(w.seq, w.head, j0 / KB);
      const A* v = in.v.block(w.seq, w.head, j0 / KB);
      const index_t r0 = geo.first_seeing(seq, t0, j0) * G / kTileM * kTileM;
      visible_in_block(geo, seq, t0, ntok, j0, nk, r0, R, valid.data());
      cmp_tiles::tile_gemm<false>(R - r0, KB, D, q.data() + r0 * D, D, kt, KB, s.data() + r0 * KB,
                                  KB);
      // Online softmax: m = running max, l = running sum of exp(s - m); o is rescaled when the
      // max moves.
      for (index_t r = r0; r < R; ++r) {
        A* sr = s.data() + r * KB;
        if (valid[r] == 0) {
          std::fill(sr, sr + KB, A(0));
          continue;
        }
        const A m_new = std::max(m[r], cmp_tiles::row_max(sr, valid[r]));
        const A alpha = std::exp(m[r] - m_new);  // 0 while the row had seen nothing
        const A sum = cmp_tiles::exp_row(sr, KB, valid[r], m_new);
        if (alpha != A(1))
          for (index_t c = 0; c < Dvp; ++c) o[r * Dvp + c] *= alpha;
        l[r] = l[r] * alpha + sum;
        m[r] = m_new;
      }
      cmp_tiles::tile_gemm<true>(R - r0, Dvp, KB, s.data() + r0 * KB, KB, v, Dvp,
                                 o.data() + r0 * Dvp, Dvp);
    }

    for (index_t tt = 0; tt < ntok; ++tt)
      for (int hh = 0; hh < G; ++hh) {
        const index_t r = tt * G + hh;
        const int h = w.head * G + hh;
        T* out = p.o.ptr<T>(seq.batch, seq.start + t0 + tt, h);
        A* lse = p.lse.ptr<A>(seq.batch, seq.start + t0 + tt, h);
        // l is NaN when a score was not finite, also when every score the row sees is -inf:
        // then m_new = -inf above and alpha = exp(-inf + inf) = NaN.
        store_fwd_row(o.data() + r * Dvp, m[r], l[r], Dv, out, lse);
      }
  }
}

NSA_CPU_CHUNKS(fwd_chunk, fwd_items, Inputs)

// ---- backward -----------------------------------------------------------------------------

// Scaled queries, dout, lse and delta of a query tile (row r = token * G + head, padded rows:
// zeros, lse = -inf so that P = 0). delta = dout . o - dlse: with dP_i = dout . v_i,
// dS_i = P_i (dP_i - delta) is the gradient of the scores through both o and lse
// (d lse / d s_i = P_i). Both passes compute it alike, so they agree bit for bit.
template <typename T, typename A>
struct BwdTile {
  std::vector<A> q, dout, lse, delta;
  index_t ldq, ldo;

  BwdTile(index_t R, index_t ldq_, index_t ldo_)
      : q(R * ldq_), dout(R * ldo_), lse(R), delta(R), ldq(ldq_), ldo(ldo_) {}

  void fill(const CmpParams& p, const Geometry& geo, const SeqRange& seq, index_t t0,
            index_t ntok, int g) {
    const int G = geo.G;
    const index_t R = index_t(lse.size()), row0 = seq.start + t0;
    cmp_tiles::load_query_tile<T>(p.q, seq.batch, row0, ntok, g * G, G, geo.D, A(p.scale),
                                  q.data(), R, ldq);
    cmp_tiles::load_query_tile<T>(p.dout, seq.batch, row0, ntok, g * G, G, geo.Dv, A(1),
                                  dout.data(), R, ldo);
    std::fill(lse.begin(), lse.end(), -std::numeric_limits<A>::infinity());
    std::fill(delta.begin(), delta.end(), A(0));
    for (index_t tt = 0; tt < ntok; ++tt)
      for (int hh = 0; hh < G; ++hh) {
        const index_t r = tt * G + hh;
        const int h = g * G + hh;
        const T* o = p.o.ptr<T>(seq.batch, row0 + tt, h);
        const A* dor = dout.data() + r * ldo;
        A part[cmp_tiles::kVecLen<A>] = {};  // independent partial sums: vectorisable
        int c = 0;
        for (; c + cmp_tiles::kVecLen<A> <= geo.Dv; c += cmp_tiles::kVecLen<A>)
          for (int i = 0; i < cmp_tiles::kVecLen<A>; ++i) part[i] += dor[c + i] * load<A>(o[c + i]);
        A sum = 0;
        for (; c < geo.Dv; ++c) sum += dor[c] * load<A>(o[c]);
        for (A x : part) sum += x;
        if (p.dlse.data != nullptr) sum -= *p.dlse.ptr<A>(seq.batch, row0 + tt, h);
        delta[r] = sum;
        lse[r] = *p.lse.ptr<A>(seq.batch, row0 + tt, h);
      }
  }
};

// s = P = exp(s - lse) and dp = dS = P (dp - delta) for rows [r0, R) of [R, KB] tiles; row r
// sees the block's first valid[r] keys.
template <typename A>
void probs_and_dscores(A* s, A* dp, index_t r0, index_t R, const index_t* valid, const A* lse,
                       const A* delta) {
  for (index_t r = r0; r < R; ++r) {
    A* sr = s + r * KB;
    A* dr = dp + r * KB;
    cmp_tiles::exp_row(sr, KB, valid[r], lse[r]);
    const A dl = delta[r];
    for (index_t j = 0; j < KB; ++j) dr[j] = sr[j] * (dr[j] - dl);
  }
}

// dq of a query tile: dq = scale * sum_i dS_i k_i over the visible compressed rows.
template <typename T>
void dq_items(const Inputs<acc_t<T>>& in, index_t begin, index_t end) {
  using A = acc_t<T>;
  const CmpParams& p = in.p;
  const Geometry geo(p);
  const int G = geo.G, D = geo.D, Dv = geo.Dv;
  const index_t R = geo.tile.rows, Dp = geo.Dp;
  BwdTile<T, A> tile(R, D, Dv);
  std::vector<A> s(R * KB), dp(R * KB), dq(R * Dp);
  std::vector<index_t> valid(R);

  for (index_t item = begin; item < end; ++item) {
    const WorkList::Item w = in.work.at(item);
    const SeqRange seq = p.seqs.range(w.seq);
    const index_t t0 = w.tile * geo.tile.tokens;
    const index_t ntok = std::min(geo.tile.tokens, seq.len - t0);
    tile.fill(p, geo, seq, t0, ntok, w.head);
    std::fill(dq.begin(), dq.end(), A(0));

    const index_t nvis = geo.visible(seq, t0 + ntok - 1);
    for (index_t j0 = 0; j0 < nvis; j0 += KB) {
      const index_t nk = std::min(KB, nvis - j0);
      const A* kt = in.kt.block(w.seq, w.head, j0 / KB);
      const A* kr = in.kr.block(w.seq, w.head, j0 / KB);
      const A* vt = in.v.block(w.seq, w.head, j0 / KB);
      const index_t r0 = geo.first_seeing(seq, t0, j0) * G / kTileM * kTileM;
      visible_in_block(geo, seq, t0, ntok, j0, nk, r0, R, valid.data());
      cmp_tiles::tile_gemm<false>(R - r0, KB, D, tile.q.data() + r0 * D, D, kt, KB,
                                  s.data() + r0 * KB, KB);
      cmp_tiles::tile_gemm<false>(R - r0, KB, Dv, tile.dout.data() + r0 * Dv, Dv, vt, KB,
                                  dp.data() + r0 * KB, KB);
      probs_and_dscores(s.data(), dp.data(), r0, R, valid.data(), tile.lse.data(),
                        tile.delta.data());
      cmp_tiles::tile_gemm<true>(R - r0, Dp, KB, dp.data() + r0 * KB, KB, kr, Dp,
                                 dq.data() + r0 * Dp, Dp);
    }

    const A scale = A(p.scale);
    for (index_t tt = 0; tt < ntok; ++tt)
      for (int hh = 0; hh < G; ++hh) {
        T* out = p.dq.ptr<T>(seq.batch, seq.start + t0 + tt, w.head * G + hh);
        const A* acc = dq.data() + (tt * G + hh) * Dp;
        for (int c = 0; c < D; ++c) store(out[c], scale * acc[c]);
      }
  }
}

// dk/dv of a block of compressed rows: dv_i = sum P_i dout, dk_i = sum dS_i scale q over the
// queries that see row i (tokens t >= i * d + l - 1), in token order, heads inner.
template <typename T>
void dkdv_items(const Inputs<acc_t<T>>& in, index_t begin, index_t end) {
  using A = acc_t<T>;
  const CmpParams& p = in.p;
  const Geometry geo(p);
  const int D = geo.D, Dv = geo.Dv;
  const index_t R = geo.tile.rows, Dp = geo.Dp, Dvp = geo.Dvp;
  BwdTile<T, A> tile(R, Dp, Dvp);  // padded: q and dout are the B operands of dk and dv
  std::vector<A> s(R * KB), dp(R * KB), pt(KB * R), dst(KB * R), dk(KB * Dp), dv(KB * Dvp);
  std::vector<index_t> valid(R);

  for (index_t item = begin; item < end; ++item) {
    const WorkList::Item w = in.work.at(item);
    const SeqRange seq = p.seqs.range(w.seq);
    const index_t i0 = w.tile * KB;
    const index_t nk = std::min(KB, seq.cmp_len - i0);
    const A* kt = in.kt.block(w.seq, w.head, w.tile);
    const A* vt = in.v.block(w.seq, w.head, w.tile);
    std::fill(dk.begin(), dk.end(), A(0));
    std::fill(dv.begin(), dv.end(), A(0));

    for (index_t t0 = i0 * geo.d + geo.l - 1; t0 < seq.len; t0 += geo.tile.tokens) {
      const index_t ntok = std::min(geo.tile.tokens, seq.len - t0);
      tile.fill(p, geo, seq, t0, ntok, w.head);
      visible_in_block(geo, seq, t0, ntok, i0, nk, 0, R, valid.data());
      cmp_tiles::tile_gemm<false>(R, KB, D, tile.q.data(), Dp, kt, KB, s.data(), KB);
      cmp_tiles::tile_gemm<false>(R, KB, Dv, tile.dout.data(), Dvp, vt, KB, dp.data(), KB);
      probs_and_dscores(s.data(), dp.data(), 0, R, valid.data(), tile.lse.data(),
                        tile.delta.data());
      for (index_t r = 0; r < R; ++r)
        for (index_t j = 0; j < KB; ++j) {
          pt[j * R + r] = s[r * KB + j];
          dst[j * R + r] = dp[r * KB + j];
        }
      cmp_tiles::tile_gemm<true>(KB, Dvp, R, pt.data(), R, tile.dout.data(), Dvp, dv.data(), Dvp);
      cmp_tiles::tile_gemm<true>(KB, Dp, R, dst.data(), R, tile.q.data(), Dp, dk.data(), Dp);
    }

    for (index_t j = 0; j < nk; ++j) {
      T* dko = p.dk.ptr<T>(seq.batch, seq.cmp_start + i0 + j, w.head);
      T* dvo = p.dv.ptr<T>(seq.batch, seq.cmp_start + i0 + j, w.head);
      for (int c = 0; c < D; ++c) store(dko[c], dk[j * Dp + c]);
      for (int c = 0; c < Dv; ++c) store(dvo[c], dv[j * Dvp + c]);
    }
  }
}

NSA_CPU_CHUNKS(dq_chunk, dq_items, Inputs)
NSA_CPU_CHUNKS(dkdv_chunk, dkdv_items, Inputs)

index_t query_tiles(const CmpParams& p, const SeqRange& seq) {
  const index_t tokens = cmp_tiles::QueryTile(p.num_heads / p.num_heads_k).tokens;
  return (seq.len + tokens - 1) / tokens;
}

}  // namespace

void cmp_fwd(const CmpParams& p, const ParallelFor& parallel_for) {
  const WorkList work(p.seqs, p.num_heads_k,
                      [&](const SeqRange& seq) { return query_tiles(p, seq); });
  dispatch_dtype(p.dtype, "nsa.compressed_attention", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    cmp_tiles::PackedBlocks<A> kt(p.seqs, p.num_heads_k, p.head_dim, true);
    cmp_tiles::PackedBlocks<A> v(p.seqs, p.num_heads_k, p.head_dim_v, false);
    parallel_for(kt.size(), 16, [&](index_t b, index_t e) {
      kt.template pack<T>(p.k, p.seqs, b, e);
      v.template pack<T>(p.v, p.seqs, b, e);
    });
    const Inputs<A> in{p, work, kt, kt, v};
    parallel_for(work.size(), 1, [&](index_t b, index_t e) { fwd_chunk(in, b, e, tag); });
  });
}

void cmp_bwd(const CmpParams& p, const ParallelFor& parallel_for) {
  const WorkList queries(p.seqs, p.num_heads_k,
                         [&](const SeqRange& seq) { return query_tiles(p, seq); });
  const WorkList keys(p.seqs, p.num_heads_k,
                      [](const SeqRange& seq) { return (seq.cmp_len + KB - 1) / KB; });
  dispatch_dtype(p.dtype, "nsa.compressed_attention_backward", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    cmp_tiles::PackedBlocks<A> kt(p.seqs, p.num_heads_k, p.head_dim, true);
    cmp_tiles::PackedBlocks<A> kr(p.seqs, p.num_heads_k, p.head_dim, false);
    cmp_tiles::PackedBlocks<A> vt(p.seqs, p.num_heads_k, p.head_dim_v, true);
    parallel_for(kt.size(), 16, [&](index_t b, index_t e) {
      kt.template pack<T>(p.k, p.seqs, b, e);
      kr.template pack<T>(p.k, p.seqs, b, e);
      vt.template pack<T>(p.v, p.seqs, b, e);
    });
    const Inputs<A> in_q{p, queries, kt, kr, vt}, in_k{p, keys, kt, kr, vt};
    parallel_for(queries.size(), 1, [&](index_t b, index_t e) { dq_chunk(in_q, b, e, tag); });
    parallel_for(keys.size(), 1, [&](index_t b, index_t e) { dkdv_chunk(in_k, b, e, tag); });
  });
}

}  // namespace nsa::cpu
