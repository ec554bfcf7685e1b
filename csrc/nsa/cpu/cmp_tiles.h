// Tile helpers shared by the compressed-branch kernels (cmp.cpp) and the top-n selection
// (topk.cpp): both score a tile of query rows against blocks of compressed keys.
//
// Layout: a tile is row-major, query rows (token-major, the G heads of a group inner) times
// keys; tiles are padded to whole register blocks (rows to kTileM, columns to kTileN) with
// zeros, so the products below have no edge cases. The register blocks use the vector types
// of simd.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "numeric.h"
#include "simd.h"

namespace nsa::cpu::cmp_tiles {

using namespace simd;  // the vector types, their loads and stores, vexp

// Register block of tile_gemm: 4 x 16 floats is 8 accumulators, which leaves room for the
// loaded B row and the broadcast A element among the 16 AVX registers.
constexpr int kTileM = 4;
constexpr int kTileN = 16;

inline index_t round_up(index_t x, index_t m) { return (x + m - 1) / m * m; }

// Compressed rows per key block (a multiple of kTileN). 64 keeps a tile's working set (scaled
// queries, transposed keys, values, scores, output: 64 x 64 each at D = 64) in L2.
constexpr index_t kKeyBlock = 64;

// Query tiles: `tokens` consecutive tokens times the G heads of a group (rows token-major),
// about 64 rows, so that each key block loaded is reused by 64 query rows.
struct QueryTile {
  index_t tokens, rows;  // rows: tokens * G padded to kTileM
  explicit QueryTile(int G)
      : tokens(std::max<index_t>(1, 64 / G)), rows(round_up(tokens * G, kTileM)) {}
};

// C[M, N] (+)= A[M, K] B[K, N], row-major with leading dimensions lda, ldb, ldc.
// M % kTileM == 0, N % kTileN == 0. Each C element sums over k in order: deterministic.
template <bool kAccumulate, typename A>
inline void tile_gemm(index_t M, index_t N, index_t K, const A* __restrict a, index_t lda,
                      const A* __restrict b, index_t ldb, A* __restrict c, index_t ldc) {
  constexpr int L = kVecLen<A>;
  constexpr int NV = kTileN / L;
  for (index_t j = 0; j < N; j += kTileN)
    for (index_t i = 0; i < M; i += kTileM) {
      vec<A> acc[kTileM][NV];
#pragma GCC unroll 4
      for (int r = 0; r < kTileM; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          if (kAccumulate)
            vload(acc[r][v], c + (i + r) * ldc + j + v * L);
          else
            acc[r][v] = vec<A>{};
        }
      for (index_t k = 0; k < K; ++k) {
        vec<A> bk[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) vload(bk[v], b + k * ldb + j + v * L);
#pragma GCC unroll 4
        for (int r = 0; r < kTileM; ++r) {
          const A ar = a[(i + r) * lda + k];
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[r][v] += ar * bk[v];
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < kTileM; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) vstore(c + (i + r) * ldc + j + v * L, acc[r][v]);
    }
}

// Largest of x[0 .. valid), valid >= 1.
template <typename A>
inline A row_max(const A* x, index_t valid) {
  constexpr int L = kVecLen<A>;
  A m = x[0];
  index_t j = 0;
  if (valid >= L) {
    vec<A> vm;
    vload(vm, x);
    for (j = L; j + L <= valid; j += L) {
      vec<A> v;
      vload(v, x + j);
      vm = v > vm ? v : vm;
    }
    for (int i = 0; i < L; ++i) m = std::max(m, vm[i]);
  }
  for (; j < valid; ++j) m = std::max(m, x[j]);
  return m;
}

// x[j] = exp(x[j] - shift) for j < valid, 0 for valid <= j < n (n % kVecLen == 0); returns the
// sum of the new x. shift = -inf (a row that sees nothing) gives zeros, never NaN.
template <typename A>
inline A exp_row(A* x, index_t n, index_t valid, A shift) {
  constexpr int L = kVecLen<A>;
  if (shift == -std::numeric_limits<A>::infinity()) valid = 0;
  using lane_t = typename Simd<A>::lane_t;
  typename Simd<A>::mask lane;
  for (int i = 0; i < L; ++i) lane[i] = i;
  const vec<A> ninf = vec<A>{} - std::numeric_limits<A>::infinity();
  vec<A> sum{};
  for (index_t j = 0; j < n; j += L) {
    vec<A> v;
    vload(v, x + j);
    v -= shift;
    v = lane + lane_t(j) < lane_t(valid) ? v : ninf;
    vexp(v);
    vstore(x + j, v);
    sum += v;
  }
  A s = 0;
  for (int i = 0; i < L; ++i) s += sum[i];
  return s;
}

// dst[r * ld + c] = mult * src row r, column c, for r < n, c < dim; zero for the padding
// columns [dim, ld) and the padding rows [n, n_pad). src rows are at stride src_ld.
template <typename T, typename A>
inline void load_rows(const T* src, index_t src_ld, index_t n, index_t n_pad, int dim, A mult,
                      A* dst, index_t ld) {
  for (index_t r = 0; r < n; ++r) {
    const T* s = src + r * src_ld;
    A* d = dst + r * ld;
    for (int c = 0; c < dim; ++c) d[c] = mult * load<A>(s[c]);
    std::fill(d + dim, d + ld, A(0));
  }
  std::fill(dst + n * ld, dst + n_pad * ld, A(0));
}

// dst[c * ld + r] = src row r, column c (the transpose), for r < n, c < dim; zero for the
// padding columns [n, ld).
template <typename T, typename A>
inline void load_rows_transposed(const T* src, index_t src_ld, index_t n, int dim, A* dst,
                                 index_t ld) {
  for (index_t r = 0; r < n; ++r) {
    const T* s = src + r * src_ld;
    for (int c = 0; c < dim; ++c) dst[c * ld + r] = load<A>(s[c]);
  }
  for (int c = 0; c < dim; ++c) std::fill(dst + c * ld + n, dst + (c + 1) * ld, A(0));
}

// Query rows of a tile: tokens [row0, row0 + ntok) of batch row b, heads [h0, h0 + G), in
// row r = token * G + head, scaled by `mult`, zero-padded to `rows` rows and `ld` columns.
template <typename T, typename A>
inline void load_query_tile(const View& x, index_t b, index_t row0, index_t ntok, int h0, int G,
                            int dim, A mult, A* dst, index_t rows, index_t ld) {
  for (index_t tt = 0; tt < ntok; ++tt)
    for (int hh = 0; hh < G; ++hh)
      load_rows(x.ptr<T>(b, row0 + tt, h0 + hh), 0, 1, 1, dim, mult,
                dst + (tt * G + hh) * ld, ld);
  std::fill(dst + ntok * G * ld, dst + rows * ld, A(0));
}

// Compressed keys or values of every sequence and kv head in the accumulation type, cut into
// blocks of kKeyBlock rows, zero-padded, each in the layout a tile product reads: transposed
// [dim, kKeyBlock] (the B operand of scores) or rows [kKeyBlock, ld] with ld = dim padded to
// kTileN (the B operand of outputs). Packed once per call: every query tile then reads its
// blocks without converting or transposing them again.
template <typename A>
class PackedBlocks {
 public:
  PackedBlocks(const Seqs& seqs, int heads, int dim, bool transposed)
      : heads_(heads), dim_(dim), transposed_(transposed),
        ld_(transposed ? kKeyBlock : round_up(dim, kTileN)) {
    begin_.push_back(0);
    for (int s = 0; s < seqs.num_seqs; ++s)
      begin_.push_back(begin_.back() + (seqs.range(s).cmp_len + kKeyBlock - 1) / kKeyBlock);
    data_.resize(size_t(begin_.back() * heads * block_elems()));
  }
  // Blocks to pack: the items of pack().
  index_t size() const { return begin_.back() * heads_; }
  // Block j (rows j * kKeyBlock ...) of sequence s, kv head g.
  const A* block(int s, int g, index_t j) const {
    return data_.data() + offset(s, g, j);
  }

  // Packs blocks [begin, end) of x ([B, Nc, H, dim], element type T).
  template <typename T>
  void pack(const View& x, const Seqs& seqs, index_t begin, index_t end) {
    for (index_t item = begin; item < end; ++item) {
      const index_t blk = item / heads_;
      const int g = int(item % heads_);
      const int s = int(std::upper_bound(begin_.begin(), begin_.end(), blk) - begin_.begin()) - 1;
      const SeqRange seq = seqs.range(s);
      const index_t j = blk - begin_[s], i0 = j * kKeyBlock;
      const index_t n = std::min(kKeyBlock, seq.cmp_len - i0);
      const T* src = x.ptr<T>(seq.batch, seq.cmp_start + i0, g);
      A* dst = data_.data() + offset(s, g, j);
      if (transposed_)
        load_rows_transposed(src, x.row_stride, n, dim_, dst, ld_);
      else
        load_rows(src, x.row_stride, n, kKeyBlock, dim_, A(1), dst, ld_);
    }
  }

 private:
  index_t block_elems() const { return transposed_ ? dim_ * kKeyBlock : kKeyBlock * ld_; }
  index_t offset(int s, int g, index_t j) const {
    return ((begin_[s] + j) * heads_ + g) * block_elems();
  }

  int heads_, dim_;
  bool transposed_;
  index_t ld_;
  std::vector<index_t> begin_;  // first block of each sequence, then the total
  std::vector<A> data_;
};

// Work items of a kernel, in the order ParallelFor chunks see them: per sequence, per kv head,
// its tiles. The cost of a tile grows (or shrinks) with its position in the sequence and
// ParallelFor hands out contiguous ranges, so the tiles of a (sequence, head) are visited in
// the order 0, n-1, 1, n-2, ...: any contiguous range then gets a balanced mix.
class WorkList {
 public:
  struct Item {
    int seq;
    int head;
    index_t tile;
  };

  // tiles_of(SeqRange) -> number of tiles of that sequence.
  template <typename F>
  WorkList(const Seqs& seqs, int heads, F&& tiles_of) {
    begin_.push_back(0);
    for (int s = 0; s < seqs.num_seqs; ++s) {
      tiles_.push_back(tiles_of(seqs.range(s)));
      begin_.push_back(begin_.back() + heads * tiles_.back());
    }
  }
  index_t size() const { return begin_.back(); }
  Item at(index_t item) const {
    const int s = int(std::upper_bound(begin_.begin(), begin_.end(), item) - begin_.begin()) - 1;
    const index_t local = item - begin_[s], n = tiles_[s];
    const index_t z = local % n;
    return Item{s, int(local / n), z % 2 == 0 ? z / 2 : n - 1 - z / 2};
  }

 private:
  std::vector<index_t> begin_;  // first item of each sequence, then the total
  std::vector<index_t> tiles_;  // tiles per (sequence, head)
};

}  // namespace nsa::cpu::cmp_tiles
