// Register-tiled attention steps shared by the selected-block (slc.cpp) and sliding-window
// (swa.cpp) CPU kernels: a batch of up to kMaxRows query rows against a chunk of up to kMaxKeys
// keys, forward (online softmax) and backward (dq, or dk/dv), in the accumulation type A.
//
// Layout: a batch keeps its queries transposed, qt[d, row], so query rows fill the vector lanes.
// Scores are then s[key, row]: every softmax step is element-wise across lanes (no horizontal
// sums), and key/value rows are read straight from the input tensors when T == A (no transposed
// copy of the keys). Query rows are scaled by `scale` when loaded, so s = q'.k directly.
//
// The register tiles use the vector types of simd.h. Everything is inline so that
// NSA_CPU_MULTIVERSION clones compile it with AVX2 + FMA.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "numeric.h"
#include "simd.h"

namespace nsa::cpu::attn {

constexpr int kMaxRows = 64;  // query rows per batch (lanes of a score tile)
constexpr int kMaxKeys = 64;  // keys per chunk
constexpr int kRowAlign = 8;  // batches are padded to whole vectors (8 floats, 2 x 4 doubles)

using simd::kVecLen;
using simd::Simd;
using simd::vec;
using simd::vexp;
using simd::vload;
using simd::vstore;
using cpu::store_fwd_row;  // numeric.h: the finished row, non-finite rows included

// out[b, a] = sum_{d < nd} x[b, d] * yt[d, a]  for b < nb, a < na; row strides ldx, na, na.
// na is a multiple of kRowAlign. K keys (rows of x) share every loaded vector of yt.
template <typename A, int K>
inline void xyt_keys(const A* __restrict x, index_t ldx, const A* __restrict yt, int na, int nd,
                     A* __restrict out) {
  constexpr int L = kVecLen<A>;
  int a = 0;
  for (; a + 2 * L <= na; a += 2 * L) {
    vec<A> c[K][2] = {};
    for (int d = 0; d < nd; ++d) {
      vec<A> y0, y1;
      vload(y0, yt + index_t(d) * na + a);
      vload(y1, yt + index_t(d) * na + a + L);
      for (int k = 0; k < K; ++k) {
        const A xk = x[k * ldx + d];
        c[k][0] += xk * y0;
        c[k][1] += xk * y1;
      }
    }
    for (int k = 0; k < K; ++k) {
      vstore(out + index_t(k) * na + a, c[k][0]);
      vstore(out + index_t(k) * na + a + L, c[k][1]);
    }
  }
  for (; a < na; a += L) {
    vec<A> c[K] = {};
    for (int d = 0; d < nd; ++d) {
      vec<A> y0;
      vload(y0, yt + index_t(d) * na + a);
      for (int k = 0; k < K; ++k) c[k] += x[k * ldx + d] * y0;
    }
    for (int k = 0; k < K; ++k) vstore(out + index_t(k) * na + a, c[k]);
  }
}
template <typename A>
inline void xyt(const A* x, index_t ldx, int nb, const A* yt, int na, int nd, A* out) {
  int b = 0;
  for (; b + 4 <= nb; b += 4) xyt_keys<A, 4>(x + b * ldx, ldx, yt, na, nd, out + index_t(b) * na);
  for (; b < nb; ++b) xyt_keys<A, 1>(x + b * ldx, ldx, yt, na, nd, out + index_t(b) * na);
}

// out[a][c] += sum_{b < nb} coef[a * sa + b * sb] * x[b * ldx + c]  for a < R, c < nc.
// R output rows share every loaded vector of x; the b order is fixed (deterministic sums).
template <typename A, int R>
inline void acc_rows_block(A* const* out, const A* __restrict coef, index_t sa, index_t sb, int nb,
                           const A* __restrict x, index_t ldx, int nc) {
  constexpr int L = kVecLen<A>;
  int c = 0;
  for (; c + 2 * L <= nc; c += 2 * L) {
    vec<A> acc[R][2];
    for (int r = 0; r < R; ++r) {
      vload(acc[r][0], out[r] + c);
      vload(acc[r][1], out[r] + c + L);
    }
    for (int b = 0; b < nb; ++b) {
      vec<A> x0, x1;
      vload(x0, x + b * ldx + c);
      vload(x1, x + b * ldx + c + L);
      for (int r = 0; r < R; ++r) {
        const A w = coef[r * sa + b * sb];
        acc[r][0] += w * x0;
        acc[r][1] += w * x1;
      }
    }
    for (int r = 0; r < R; ++r) {
      vstore(out[r] + c, acc[r][0]);
      vstore(out[r] + c + L, acc[r][1]);
    }
  }
  for (; c + L <= nc; c += L) {
    vec<A> acc[R];
    for (int r = 0; r < R; ++r) vload(acc[r], out[r] + c);
    for (int b = 0; b < nb; ++b) {
      vec<A> x0;
      vload(x0, x + b * ldx + c);
      for (int r = 0; r < R; ++r) acc[r] += coef[r * sa + b * sb] * x0;
    }
    for (int r = 0; r < R; ++r) vstore(out[r] + c, acc[r]);
  }
  for (; c < nc; ++c)
    for (int r = 0; r < R; ++r) {
      A sum = out[r][c];
      for (int b = 0; b < nb; ++b) sum += coef[r * sa + b * sb] * x[b * ldx + c];
      out[r][c] = sum;
    }
}
template <typename A>
inline void acc_rows(A* const* out, int na, const A* coef, index_t sa, index_t sb, int nb,
                     const A* x, index_t ldx, int nc) {
  int a = 0;
  for (; a + 4 <= na; a += 4) acc_rows_block<A, 4>(out + a, coef + a * sa, sa, sb, nb, x, ldx, nc);
  for (; a < na; ++a) acc_rows_block<A, 1>(out + a, coef + a * sa, sa, sb, nb, x, ldx, nc);
}

// dst[d, a] = rows[a][d] for a < n; zero for n <= a < np (padding lanes stay finite).
template <typename A>
inline void transpose_rows(const A* const* rows, int n, int np, int dim, A* __restrict dst) {
  for (int a = 0; a < n; ++a) {
    const A* src = rows[a];
    for (int d = 0; d < dim; ++d) dst[index_t(d) * np + a] = src[d];
  }
  for (int d = 0; d < dim; ++d)
    for (int a = n; a < np; ++a) dst[index_t(d) * np + a] = A(0);
}

// A batch of query rows and, for the current key chunk, the keys [lo, hi) each row sees
// (relative to the chunk start). `row` indexes the caller's row arrays.
struct Batch {
  int n = 0, np = 0;
  bool full = true;  // every row sees the whole chunk: no mask needed
  int row[kMaxRows];
  int32_t lo[kMaxRows], hi[kMaxRows];

  void clear() { n = 0; }
  void add(int r) { row[n++] = r; }
  void pad() { np = (n + kRowAlign - 1) / kRowAlign * kRowAlign; }
  // Clamps the rows' visible key ranges to the chunk [0, nk).
  void set_visible(int r, index_t lo_rel, index_t hi_rel, int nk) {
    lo[r] = int32_t(std::clamp<index_t>(lo_rel, 0, nk));
    hi[r] = int32_t(std::clamp<index_t>(hi_rel, 0, nk));
  }
  void finish_visible(int nk) {
    full = true;
    for (int a = 0; a < n; ++a) full = full && lo[a] == 0 && hi[a] == nk;
  }
  bool sees_any() const {
    for (int a = 0; a < n; ++a)
      if (hi[a] > lo[a]) return true;
    return false;
  }
};

// Scores of keys a row does not see become -inf (padding lanes are never read back).
template <typename A>
inline void mask_scores(A* s, int nk, const Batch& b) {
  if (b.full) return;
  const A ninf = -std::numeric_limits<A>::infinity();
  for (int a = 0; a < b.n; ++a) {
    for (int k = 0; k < std::min<int>(b.lo[a], nk); ++k) s[index_t(k) * b.np + a] = ninf;
    for (int k = std::max<int>(b.hi[a], 0); k < nk; ++k) s[index_t(k) * b.np + a] = ninf;
  }
}

// Per-batch operands of the attention steps: transposed scaled queries [D, np] and, for the
// backward, transposed dout [Dv, np] and each lane's lse and delta (padding lanes: lse -inf,
// delta 0, zero queries).
template <typename A>
struct BatchRows {
  std::vector<A> qt, dot;
  A lse[kMaxRows], delta[kMaxRows];
  BatchRows(int D, int Dv) : qt(size_t(D) * kMaxRows), dot(size_t(Dv) * kMaxRows) {}

  // Fills the operands from row-major arrays indexed by the batch's rows.
  void gather(const Batch& b, const A* q, int D, const A* dout, int Dv, const A* lse_rows,
              const A* delta_rows) {
    const A* rows[kMaxRows];
    for (int a = 0; a < b.n; ++a) rows[a] = q + index_t(b.row[a]) * D;
    transpose_rows(rows, b.n, b.np, D, qt.data());
    if (dout == nullptr) return;
    for (int a = 0; a < b.n; ++a) rows[a] = dout + index_t(b.row[a]) * Dv;
    transpose_rows(rows, b.n, b.np, Dv, dot.data());
    for (int a = 0; a < b.np; ++a) {
      lse[a] = a < b.n ? lse_rows[b.row[a]] : -std::numeric_limits<A>::infinity();
      delta[a] = a < b.n ? delta_rows[b.row[a]] : A(0);
    }
  }
};

// Score tiles of one ParallelFor chunk, reused by all its work items.
template <typename A>
struct Scratch {
  std::vector<A> s, dp;  // [kMaxKeys, kMaxRows] scores (then P), dP (then dS)
  A m[kMaxRows], l[kMaxRows];
  Scratch() : s(kMaxKeys * kMaxRows), dp(kMaxKeys * kMaxRows) {}
};

// Forward: the batch's rows attend keys [0, nk) of a chunk (key/value rows at strides ldk/ldv),
// folding them into the rows' output accumulators o[row * Dv] and running max m / sum l
// (online softmax; m is -inf and l 0 until a row sees a key).
template <typename A>
inline void attend_fwd(const A* k, index_t ldk, const A* v, index_t ldv, int nk, int D, int Dv,
                       const Batch& b, const BatchRows<A>& br, Scratch<A>& ws, A* o, A* m,
                       A* l) {
  constexpr int L = kVecLen<A>;
  const int np = b.np;
  A* s = ws.s.data();
  xyt(k, ldk, nk, br.qt.data(), np, D, s);
  mask_scores(s, nk, b);

  const A ninf = -std::numeric_limits<A>::infinity();
  A* mb = ws.m;
  A* lb = ws.l;  // then the rescale factor of each row's old accumulator
  for (int a = 0; a < np; ++a) {
    mb[a] = a < b.n ? m[b.row[a]] : ninf;
    lb[a] = a < b.n ? l[b.row[a]] : A(0);
  }
  for (int a = 0; a < np; a += L) {
    vec<A> old_max, mx, sum = {};
    vload(old_max, mb + a);
    mx = old_max;
    for (int key = 0; key < nk; ++key) {
      vec<A> x;
      vload(x, s + index_t(key) * np + a);
      mx = mx > x ? mx : x;
    }
    // A row that has seen nothing yet keeps max -inf: subtract 0 instead so exp gives 0, not NaN.
    const vec<A> ref = mx == vec<A>{} + ninf ? vec<A>{} : mx;
    for (int key = 0; key < nk; ++key) {
      vec<A> x;
      vload(x, s + index_t(key) * np + a);
      x -= ref;
      vexp(x);
      vstore(s + index_t(key) * np + a, x);
      sum += x;
    }
    vec<A> alpha = old_max - ref, lsum;
    vexp(alpha);
    vload(lsum, lb + a);
    lsum = lsum * alpha + sum;
    vstore(lb + a, alpha);
    for (int i = 0; i < L && a + i < b.n; ++i) {
      // Max -inf although the row sees a key of this chunk: every score it sees is -inf (an
      // overflow or an -inf input), not "no visible key". The NaN sum makes the row non-finite
      // (see store_fwd_row); a check here per row and chunk keeps the key loops as they are.
      const bool sees = b.full ? nk > 0 : b.hi[a + i] > b.lo[a + i];
      m[b.row[a + i]] = mx[i];
      l[b.row[a + i]] = mx[i] == ninf && sees ? std::numeric_limits<A>::quiet_NaN() : lsum[i];
    }
  }
  A* rows[kMaxRows];
  for (int a = 0; a < b.n; ++a) {
    rows[a] = o + index_t(b.row[a]) * Dv;
    if (lb[a] != A(1))
      for (int c = 0; c < Dv; ++c) rows[a][c] *= lb[a];
  }
  acc_rows(rows, b.n, s, 1, np, nk, v, ldv, Dv);
}

// Backward, shared part: ws.s = P = exp(q'.k - lse) and ws.dp = dS = P * (dout.v - delta),
// both [nk, np].
template <typename A>
inline void probs_and_dscores(const A* k, index_t ldk, const A* v, index_t ldv, int nk, int D,
                              int Dv, const Batch& b, const BatchRows<A>& br, Scratch<A>& ws) {
  constexpr int L = kVecLen<A>;
  const int np = b.np;
  A* s = ws.s.data();
  A* dp = ws.dp.data();
  xyt(k, ldk, nk, br.qt.data(), np, D, s);
  mask_scores(s, nk, b);
  xyt(v, ldv, nk, br.dot.data(), np, Dv, dp);
  const A inf = std::numeric_limits<A>::infinity();
  for (int a = 0; a < np; a += L) {
    vec<A> lse, delta;
    vload(lse, br.lse + a);
    vload(delta, br.delta + a);
    // lse = -inf: the row sees no key. Using +inf makes every P exactly 0 (never -inf - -inf).
    lse = lse == vec<A>{} - inf ? vec<A>{} + inf : lse;
    for (int key = 0; key < nk; ++key) {
      vec<A> x, d;
      vload(x, s + index_t(key) * np + a);
      vload(d, dp + index_t(key) * np + a);
      x -= lse;
      vexp(x);
      vstore(s + index_t(key) * np + a, x);
      vstore(dp + index_t(key) * np + a, x * (d - delta));
    }
  }
}

// Backward dq: dq[row * D] += dS k (unscaled; the caller multiplies by `scale` at the end).
template <typename A>
inline void attend_dq(const A* k, index_t ldk, const A* v, index_t ldv, int nk, int D, int Dv,
                      const Batch& b, const BatchRows<A>& br, Scratch<A>& ws, A* dq) {
  probs_and_dscores(k, ldk, v, ldv, nk, D, Dv, b, br, ws);
  A* rows[kMaxRows];
  for (int a = 0; a < b.n; ++a) rows[a] = dq + index_t(b.row[a]) * D;
  acc_rows(rows, b.n, ws.dp.data(), 1, b.np, nk, k, ldk, D);
}

// Backward dk/dv of a chunk: dv[key] += P^T dout, dk[key] += dS^T q' over the batch's rows,
// whose scaled queries / dout are the row-major q[a * D] / dout[a * Dv], a < b.n.
template <typename A>
inline void attend_dkdv(const A* k, index_t ldk, const A* v, index_t ldv, int nk, int D, int Dv,
                        const Batch& b, const BatchRows<A>& br, Scratch<A>& ws, const A* q,
                        const A* dout, A* dk, A* dv) {
  probs_and_dscores(k, ldk, v, ldv, nk, D, Dv, b, br, ws);
  A* rows[kMaxKeys];
  for (int key = 0; key < nk; ++key) rows[key] = dv + index_t(key) * Dv;
  acc_rows(rows, nk, ws.s.data(), b.np, 1, b.n, dout, Dv, Dv);
  for (int key = 0; key < nk; ++key) rows[key] = dk + index_t(key) * D;
  acc_rows(rows, nk, ws.dp.data(), b.np, 1, b.n, q, D, D);
}

// ---- Loading and storing rows -------------------------------------------------------------

// Rows [0, n) of an input at `src` (row stride ld) in the accumulation type: the input itself
// when T == A, else a converted copy in `buf` (then the stride is dim).
template <typename T, typename A>
inline const A* rows_as(const T* src, index_t ld, int n, int dim, std::vector<A>& buf,
                        index_t& ld_out) {
  if constexpr (std::is_same_v<T, A>) {
    ld_out = ld;
    return src;
  } else {
    if (buf.size() < size_t(n) * dim) buf.resize(size_t(n) * dim);
    for (int i = 0; i < n; ++i) load_row(src + i * ld, buf.data() + index_t(i) * dim, dim);
    ld_out = dim;
    return buf.data();
  }
}

// Asks the cache for rows [0, n) of dim elements at src (row stride ld). Selected blocks are
// scattered over the sequence: the hardware prefetchers cannot guess the next one.
template <typename T>
inline void prefetch_rows(const T* src, index_t ld, int n, int dim) {
  const index_t bytes = index_t(dim) * sizeof(T);
  for (int i = 0; i < n; ++i)
    for (index_t b = 0; b < bytes; b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(src + i * ld) + b);
}

template <typename T, typename A>
inline void load_scaled(const T* src, A scale, A* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = scale * load<A>(src[i]);
}

// Position of token t (sequence-relative) on the flattened [B, T] axes: rows of per-token
// scratch such as delta.
inline index_t token_pos(const Seqs& seqs, const SeqRange& seq, index_t t) {
  return seq.batch * seqs.seqlen + seq.start + t;
}
inline index_t num_token_pos(const Seqs& seqs) {
  index_t n = 0;
  for (int s = 0; s < seqs.num_seqs; ++s) {
    const SeqRange r = seqs.range(s);
    if (r.len > 0) n = std::max(n, token_pos(seqs, r, r.len));
  }
  return n;
}

// Query rows of a dk/dv work item, gathered from the inputs: scaled q, dout, lse, delta and
// the token of each row (rows are added in token order, so sums over them are deterministic).
template <typename A>
struct GatheredRows {
  std::vector<A> q, dout;  // [kMaxRows, D], [kMaxRows, Dv]
  A lse[kMaxRows], delta[kMaxRows];
  index_t token[kMaxRows];  // sequence-relative
  Batch batch;
  GatheredRows(int D, int Dv) : q(size_t(D) * kMaxRows), dout(size_t(Dv) * kMaxRows) {}

  // Adds token t's query head h; returns true when the batch is full.
  template <typename T>
  bool add(const AttnParams& p, const SeqRange& seq, index_t t, int h, const A* delta_all) {
    const int a = batch.n;
    const index_t row = seq.start + t;
    load_scaled(p.q.ptr<T>(seq.batch, row, h), A(p.scale), q.data() + index_t(a) * p.head_dim,
                p.head_dim);
    load_row(p.dout.ptr<T>(seq.batch, row, h), dout.data() + index_t(a) * p.head_dim_v,
             p.head_dim_v);
    lse[a] = *p.lse.ptr<A>(seq.batch, row, h);
    delta[a] = delta_all[token_pos(p.seqs, seq, t) * p.num_heads + h];
    token[a] = t;
    batch.add(a);
    return batch.n == kMaxRows;
  }
};

// Tokens [t0, t1) of sequence `seq`: the unit of the forward and dq work items.
struct TokenTile {
  int seq;
  index_t t0, t1;
};
inline std::vector<TokenTile> token_tiles(const Seqs& seqs, index_t tokens_per_tile) {
  std::vector<TokenTile> tiles;
  for (int s = 0; s < seqs.num_seqs; ++s) {
    const index_t len = seqs.range(s).len;
    for (index_t t0 = 0; t0 < len; t0 += tokens_per_tile)
      tiles.push_back({s, t0, std::min(len, t0 + tokens_per_tile)});
  }
  return tiles;
}

// delta[token_pos * HQ + h] = sum_c dout[c] * o[c] for the tile's tokens: the softmax-backward
// correction in dS = P (dP - delta).
template <typename T, typename A>
inline void fill_delta(const AttnParams& p, const TokenTile& tile, A* delta) {
  const SeqRange seq = p.seqs.range(tile.seq);
  const int Dv = p.head_dim_v;
  constexpr int kLanes = 16;
  for (index_t t = tile.t0; t < tile.t1; ++t)
    for (int h = 0; h < p.num_heads; ++h) {
      const T* o = p.o.ptr<T>(seq.batch, seq.start + t, h);
      const T* dout = p.dout.ptr<T>(seq.batch, seq.start + t, h);
      A part[kLanes] = {};  // independent partial sums: vectorisable under strict IEEE
      int c = 0;
      for (; c + kLanes <= Dv; c += kLanes)
        for (int i = 0; i < kLanes; ++i) part[i] += load<A>(o[c + i]) * load<A>(dout[c + i]);
      A sum = 0;
      for (; c < Dv; ++c) sum += load<A>(o[c]) * load<A>(dout[c]);
      for (int i = 0; i < kLanes; ++i) sum += part[i];
      delta[token_pos(p.seqs, seq, t) * p.num_heads + h] = sum;
    }
}

}  // namespace nsa::cpu::attn
