// Forward kernel shared by the three attention branches (flash-attention style: online softmax
// over key tiles, S = Q K^T and O += P V on the tensor cores, fp32 accumulation).
//
// Thread block: 4 warps, kRows query rows (16 per warp, see branch.cuh), key tiles of kKeys
// double-buffered with cp.async. Shared memory: Q [kRows][D], K [2][kKeys][D], V [2][kKeys][DV]
// (swizzled), then the selected branch's block union.
#pragma once

#include <cmath>
#include <type_traits>

#include "../common/warp_gemm.cuh"
#include "../common/wgmma.cuh"
#include "branch.cuh"

namespace nsa::cuda {

template <int D, int DV>
constexpr size_t fwd_smem_tiles_bytes() {
  return size_t(2) * (kRows * D + 2 * kKeys * (D + DV));
}

// Key tile i of the block: keys [ks, ke) (ks >= ke: nothing to do) and, for the selected
// branch, the mask of the tokens that chose the tile's block.
template <Branch B, typename P>
struct KeyTiles {
  index_t lo = 0, hi = 0;  // contiguous branches
  int per_block = 1;       // selected: tiles per block
  index_t t_last = 0;

  __device__ int count(const BlockUnion& u) const {
    if constexpr (B == Branch::kSlc) return u.count * per_block;
    return int((hi - lo + kKeys - 1) / kKeys);
  }
  __device__ void tile(const P& p, const BlockUnion& u, int i, index_t& ks, index_t& ke,
                       unsigned long long& tokens) const {
    if constexpr (B == Branch::kSlc) {
      const index_t j = u.blocks[i / per_block];
      const index_t start = j * p.select_size;
      ks = start + index_t(i % per_block) * kKeys;
      ke = min(min(start + p.select_size, ks + kKeys), t_last + 1);
      tokens = u.tokens[i / per_block];
    } else {
      ks = lo + index_t(i) * kKeys;
      ke = min(ks + kKeys, hi);
      tokens = ~0ull;
    }
  }
};

// Copies the block's query-side rows of `src` (q or dout, [B, T, HQ, COLS]) into a tile of R rows
// (NT threads copying, layout L); rows past rows.count are zeros.
template <int COLS, int R = kRows, int NT = kThreads, Layout L = Layout::kRowSwizzled, typename T>
__device__ __forceinline__ void load_query_rows(T* tile, const View& src, const QueryRows& rows) {
  load_pairs_async<R, COLS, NT, L>(tile, src.ptr<const T>(rows.seq.batch, rows.seq.start + rows.t_first, rows.g * rows.G),
                                src.row_stride, src.head_stride, rows.h_first, rows.G, rows.count,
                                [](int i) { return index_t(i); });
}

// The key side shared by the forward and dq kernels: the key tiles of the block's rows (for the
// selected branch, the union of their blocks, built here by all threads), double-buffered in
// sK [2][kKeys][D], sV [2][kKeys][DV] in layout L (the per-warp twin is WarpBlockTiles,
// slc_warp.cuh).
template <typename T, int D, int DV, Branch B, Layout L = Layout::kRowSwizzled>
struct QueryKeys {
  using P = typename BranchParams<B>::type;
  // Step i's tile: keys [ks, ke) (ks >= ke: nothing to do), for the selected branch the mask of
  // the tokens that chose its block, and its stage in shared memory.
  struct Tile {
    index_t ks, ke;
    unsigned long long tokens;
    const T* k;
    const T* v;
  };

  const P& p;
  const QueryRows& rows;
  T* sK;
  T* sV;
  KeyTiles<B, P> tiles;
  BlockUnion u{};
  int count = 0;  // key tiles

  // union_smem: the selected branch's share of the dynamic shared memory. Starts loading tile 0,
  // in the cp.async group of whatever the caller issued before (the query rows).
  __device__ QueryKeys(const P& p_, const QueryRows& rows_, unsigned char* union_smem, T* sK_, T* sV_)
      : p(p_), rows(rows_), sK(sK_), sV(sV_) {
    tiles.t_last = rows.t_last;
    if constexpr (B == Branch::kSlc) {
      u = carve_block_union(union_smem, p.num_selected);
      build_block_union(p, rows, u);
      tiles.per_block = tiles_per_block(p.select_size);
    } else {
      (void)union_smem;
      key_range<B>(p, rows.seq, rows.t_first, rows.t_last, tiles.lo, tiles.hi);
    }
    count = tiles.count(u);
    if (count > 0) load(0);
    cp_async_commit();
  }

  // cp.async of key tile i into stage i % 2; keys past the tile are zeros.
  __device__ void load(int i) const {
    index_t row;
    const int valid = span(i, row);
    copy_k(i, row, valid);
    copy_v(i, row, valid);
  }
  // Key tile i's first key row and its number of keys.
  __device__ int span(int i, index_t& row) const {
    index_t ks, ke;
    unsigned long long tok;
    tiles.tile(p, u, i, ks, ke, tok);
    row = key_row<B>(rows.seq, ks);
    return int(max(index_t(0), ke - ks));
  }
  __device__ void copy_k(int i, index_t row, int valid) const {
    load_strided_async<kKeys, D, kThreads, L>(sK + (i & 1) * kKeys * D,
                                              p.k.template ptr<const T>(rows.seq.batch, row, rows.g), p.k.row_stride, valid);
  }
  __device__ void copy_v(int i, index_t row, int valid) const {
    load_strided_async<kKeys, DV, kThreads, L>(sV + (i & 1) * kKeys * DV,
                                               p.v.template ptr<const T>(rows.seq.batch, row, rows.g), p.v.row_stride, valid);
  }

  // Step i: prefetches tile i + 1 (its stage was last read in step i - 1, before the caller's
  // closing barrier), waits for tile i.
  __device__ Tile step(int i) const {
    if (i + 1 < count) load(i + 1);
    cp_async_commit();
    cp_async_wait<1>();
    if constexpr (L == Layout::kWgmma) fence_proxy_async();  // the tensor cores read it next
    __syncthreads();
    Tile t;
    tiles.tile(p, u, i, t.ks, t.ke, t.tokens);
    t.k = sK + (i & 1) * kKeys * D;
    t.v = sV + (i & 1) * kKeys * DV;
    return t;
  }
};

// This thread's two rows (C-fragment rows lane/4 and lane/4 + 8 of its warp's 16) and the tokens
// of its warp's rows (bits relative to t_first), to skip tiles none of them chose.
struct ThreadRows {
  int row[2];
  index_t tok[2];
  bool valid[2];
  unsigned long long warp_tokens = 0;

  __device__ ThreadRows(const QueryRows& rows, int warp, int lane) {
    for (int i = 0; i < 2; ++i) {
      row[i] = warp * 16 + lane / 4 + 8 * i;
      valid[i] = row[i] < rows.count;
      tok[i] = valid[i] ? rows.token(row[i]) : -1;
    }
    if (warp * 16 < rows.count) {
      const int a = int(rows.token(warp * 16) - rows.t_first);
      const int b = int(rows.token(min(warp * 16 + 15, rows.count - 1)) - rows.t_first);
      warp_tokens = (b - a + 1 >= 64 ? ~0ull : ((1ull << (b - a + 1)) - 1)) << a;
    }
  }
  // Does row i take part in a tile whose block the tokens `tile_tokens` chose?
  __device__ bool on(int i, unsigned long long tile_tokens, index_t t_first) const {
    return valid[i] && ((tile_tokens >> (tok[i] - t_first)) & 1ull);
  }
};

// Visibility of element e of this thread's C-fragment column block j in key tile [ks, ke) (for
// the selected branch, the tile of a block the tokens `tile_tokens` chose).
template <Branch B, typename P>
struct TileMask {
  const P& p;
  index_t ks, ke;
  bool row_on[2];
  index_t tok[2];
  __device__ TileMask(const P& p_, const ThreadRows& tr, const QueryRows& rows, index_t ks_, index_t ke_,
                      unsigned long long tile_tokens)
      : p(p_), ks(ks_), ke(ke_) {
    for (int r = 0; r < 2; ++r) {
      row_on[r] = tr.on(r, tile_tokens, rows.t_first);
      tok[r] = tr.tok[r];
    }
  }
  __device__ bool operator()(int j, int e) const {
    const index_t key = ks + j * 8 + (threadIdx.x & 3) * 2 + (e & 1);
    return row_on[e >> 1] && key < ke && key_visible<B>(p, tok[e >> 1], key);
  }
};

// Calls f(std::true_type) when no element needs a mask, else f(std::false_type), so that the
// unmasked loop is compiled without the per-element tests.
template <typename F>
__device__ __forceinline__ void with_all_visible(bool all, F&& f) {
  if (all) f(std::true_type{}); else f(std::false_type{});
}

// Scales a key tile's scores to log2 units, -inf where visible(j, e) is false (not tested when
// `all`: every element is visible), and takes this thread's two row maxima into mx.
template <int N, typename Mask>
__device__ __forceinline__ void mask_scale_max(float (&s)[N / 8][4], bool all, const Mask& visible,
                                               float scale_log2, float (&mx)[2]) {
  with_all_visible(all, [&](auto all_visible) {
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = decltype(all_visible)::value || visible(j, e) ? s[j][e] * scale_log2 : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
      }
    }
  });
}

// mask_scale_max without the scaling: masked elements -inf, this thread's two row maxima of the
// raw scores in mx (the scale goes into the exps' FMA, softmax_probs_step_fma).
template <int N, typename Mask>
__device__ __forceinline__ void mask_max(float (&s)[N / 8][4], bool all, const Mask& visible, float (&mx)[2]) {
  with_all_visible(all, [&](auto all_visible) {
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (!decltype(all_visible)::value && !visible(j, e)) s[j][e] = -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
      }
    }
  });
}

// One key tile of the online softmax for this thread's two rows, without the accumulator: s
// holds the tile's scores (-inf where masked), mx their per-thread row maxima. kFma: raw scores
// (mask_max), scale_log2 > 0 the factor to log2 units applied in the exps' FMA (one FMA and an
// exp per element; scaling by a positive factor keeps the order, so max(s) * scale =
// max(s * scale)); else scores already in log2 units (mask_scale_max, scale_log2 unused).
// Moves the maxima m (log2 units), rescales l, turns s into probabilities and adds them to l;
// corr is the factor that takes an accumulator from the old maxima to the new ones.
template <int N, bool kFma>
__device__ __forceinline__ void softmax_probs(float (&s)[N / 8][4], const float (&mx)[2], float scale_log2,
                                              float (&m)[2], float (&l)[2], float (&corr)[2]) {
  float base[2];
  for (int r = 0; r < 2; ++r) {
    const float m_new = fmaxf(m[r], kFma ? quad_max(mx[r]) * scale_log2 : quad_max(mx[r]));
    base[r] = m_new == -INFINITY ? 0.f : m_new;
    corr[r] = exp2f(m[r] - base[r]);
    m[r] = m_new;
    l[r] *= corr[r];
  }
#pragma unroll
  for (int j = 0; j < N / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[j][e] = kFma ? exp2f(fmaf(s[j][e], scale_log2, -base[e >> 1])) : exp2f(s[j][e] - base[e >> 1]);
      l[e >> 1] += s[j][e];
    }
  }
}
template <int N>
__device__ __forceinline__ void softmax_probs_step(float (&s)[N / 8][4], const float (&mx)[2], float (&m)[2],
                                                   float (&l)[2], float (&corr)[2]) {
  softmax_probs<N, false>(s, mx, 0.f, m, l, corr);
}
template <int N>
__device__ __forceinline__ void softmax_probs_step_fma(float (&s)[N / 8][4], const float (&mx)[2], float scale_log2,
                                                       float (&m)[2], float (&l)[2], float (&corr)[2]) {
  softmax_probs<N, true>(s, mx, scale_log2, m, l, corr);
}

// acc (this thread's two rows) times corr.
template <int DV>
__device__ __forceinline__ void rescale_rows(float (&acc)[DV / 8][4], const float (&corr)[2]) {
#pragma unroll
  for (int j = 0; j < DV / 8; ++j) {
    acc[j][0] *= corr[0];
    acc[j][1] *= corr[0];
    acc[j][2] *= corr[1];
    acc[j][3] *= corr[1];
  }
}

// One key tile of the online softmax from raw scores S (visible(j, e) false: masked; not tested
// when `all`): the scale in the exps' FMA when it is positive (then it keeps the order of the
// scores), else applied first; acc rescaled to the new maxima unless no row of the warp moved its
// maximum (corr = 1 exactly: once the maxima settle, most tiles).
template <int N, int DV, typename Mask>
__device__ __forceinline__ void masked_softmax_step(float (&s)[N / 8][4], bool all, const Mask& visible,
                                                    float scale_log2, float (&m)[2], float (&l)[2],
                                                    float (&acc)[DV / 8][4]) {
  float mx[2] = {-INFINITY, -INFINITY}, corr[2];
  if (scale_log2 > 0.f) {
    mask_max<N>(s, all, visible, mx);
    softmax_probs_step_fma<N>(s, mx, scale_log2, m, l, corr);
  } else {
    mask_scale_max<N>(s, all, visible, scale_log2, mx);
    softmax_probs_step<N>(s, mx, m, l, corr);
  }
  if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) rescale_rows<DV>(acc, corr);
}

// One key tile of the online softmax: softmax_probs_step, then acc rescaled to the new maxima.
template <int N, int DV>
__device__ __forceinline__ void online_softmax_step(float (&s)[N / 8][4], const float (&mx)[2], float (&m)[2],
                                                    float (&l)[2], float (&acc)[DV / 8][4]) {
  float corr[2];
  softmax_probs_step<N>(s, mx, m, l, corr);
  rescale_rows<DV>(acc, corr);
}

// Issues acc (64 x N) += C B on the warpgroup as one wgmma group: C this warp's fp32 C fragments
// over kKeys columns (P or dS), rounded to T as the register A operand (before the fence, which
// must follow every write of A); B [kKeys][N] MN-major in shared memory (V or K). wgmma_run_cb
// also waits for it.
// (b_desc: mnmajor_desc<kKeys>(b, 0), the k-steps added as constants.)
template <int N, typename T>
__device__ __forceinline__ void wgmma_issue_cb(float (&acc)[N / 8][4], const float (&c)[kKeys / 8][4],
                                               uint64_t b_desc) {
  uint32_t a[kKeys / 16][4];
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk) c_to_a<T>(a[kk], c[2 * kk], c[2 * kk + 1]);
  wgmma_fence_operands(acc);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk) wgmma_rs<N, T>(acc, a[kk], b_desc + mnmajor_step<kKeys, T>(kk), true);
  wgmma_commit();
}
template <int N, typename T>
__device__ __forceinline__ void wgmma_run_cb(float (&acc)[N / 8][4], const float (&c)[kKeys / 8][4],
                                             uint64_t b_desc) {
  wgmma_issue_cb<N, T>(acc, c, b_desc);
  wgmma_wait<0>();
  wgmma_fence_operands(acc);
}
template <int N, typename T>
__device__ __forceinline__ void wgmma_run_cb(float (&acc)[N / 8][4], const float (&c)[kKeys / 8][4], const T* b) {
  wgmma_run_cb<N, T>(acc, c, mnmajor_desc<kKeys>(b, 0));
}

// The end of a row's online softmax, from its sum l (docs/design.md section 4, "Non-finite
// values"): l > 0: o = acc / l and lse = m + log l; l == 0: the row saw no key: o = 0, lse = -inf,
// no NaN, unless `sees_key` says its position sees one (then every score was -inf: an overflow,
// NaN); l NaN: a score was NaN or +inf (fmaxf drops a NaN from the running max, but exp2f carries
// it into l): o and lse are NaN, never "saw nothing". Tested once per row, not per element.
__device__ __forceinline__ float softmax_inv(float l, bool sees_key = false) {
  return l > 0.f ? 1.f / l : (sees_key ? __int_as_float(0x7fffffff) : l * 0.f);
}
__device__ __forceinline__ float softmax_lse(float l, float lse, bool sees_key = false) {
  return l > 0.f ? lse : (l == 0.f && !sees_key ? -INFINITY : __int_as_float(0x7fffffff));
}

// Does the query at sequence position t see a key whatever the scores (the compressed branch once
// its first window is complete, the window branch always)? The selected branch's keys depend on
// the blocks chosen, which the epilogue does not see: false.
template <Branch B, typename P>
__device__ __forceinline__ bool row_sees_key(const P& p, const SeqRange& seq, index_t t) {
  if constexpr (B == Branch::kCmp) return seq.cmp_len > 0 && key_visible<B>(p, t, 0);
  return B == Branch::kSwa;
}

// Epilogue of the forward kernels: this thread's two rows of o = acc / l and lse = m + log l
// (m in log2 units), as softmax_inv/softmax_lse say.
template <typename T, int DV, Branch B, typename P>
__device__ __forceinline__ void store_rows_output(const P& p, const QueryRows& rows,
                                                  const ThreadRows& tr, const float (&acc)[DV / 8][4],
                                                  const float (&m)[2], const float (&l)[2]) {
  const int lane = threadIdx.x & 31;
  for (int r = 0; r < 2; ++r) {
    const float lsum = quad_sum(l[r]);
    if (!tr.valid[r]) continue;
    const bool sees_key = row_sees_key<B>(p, rows.seq, tr.tok[r]);
    const float inv = softmax_inv(lsum, sees_key);
    const index_t t = rows.seq.start + tr.tok[r];
    const int h = rows.head(tr.row[r]);
    T* o = p.o.template ptr<T>(rows.seq.batch, t, h);
#pragma unroll
    for (int j = 0; j < DV / 8; ++j) {
      const int col = j * 8 + (lane & 3) * 2;
      *reinterpret_cast<uint32_t*>(o + col) = pack2<T>(acc[j][2 * r] * inv, acc[j][2 * r + 1] * inv);
    }
    if ((lane & 3) == 0)
      *p.lse.template ptr<float>(rows.seq.batch, t, h) =
          softmax_lse(lsum, (m[r] + log2f(lsum)) * float(M_LN2), sees_key);
  }
}

template <typename T, int D, int DV, Branch B>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const typename BranchParams<B>::type p) {
  using P = typename BranchParams<B>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kRows * D;
  T* sV = sK + 2 * kKeys * D;

  QueryRows rows;
  if (!locate_query_rows(p, rows)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  load_query_rows<D>(sQ, p.q, rows);
  const QueryKeys<T, D, DV, B> keys(p, rows, smem + fwd_smem_tiles_bytes<D, DV>(), sK, sV);
  const ThreadRows tr(rows, warp, lane);

  const float scale_log2 = float(p.scale * M_LOG2E);
  float acc[DV / 8][4];
  for (int j = 0; j < DV / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  // Q's fragments stay in registers over the key loop, except where they would not fit beside O
  // (D + DV > 320: D = DV = 256): there the products read them from shared memory per tile.
  constexpr bool kQInRegs = D + DV <= 320;
  uint32_t qf[kQInRegs ? D / 16 : 1][4];

  for (int i = 0; i < keys.count; ++i) {
    const auto tile = keys.step(i);
    if constexpr (kQInRegs) {
      if (i == 0) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) load_a<D>(qf[kk], sQ, warp * 16, kk * 16);
      }
    }
    if (tile.ks < tile.ke && (tile.tokens & tr.warp_tokens)) {
      float s[kKeys / 8][4];
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      if constexpr (kQInRegs)
        warp_gemm_nt<D, kKeys, T>(s, qf, tile.k);
      else
        warp_gemm_nt<D, kKeys, T>(s, sQ, warp * 16, tile.k);
      // Mask, scale, online softmax.
      const TileMask<B, P> visible(p, tr, rows, tile.ks, tile.ke, tile.tokens);
      float mx[2] = {-INFINITY, -INFINITY};
      mask_scale_max<kKeys>(s, tile_all_visible<B>(p, tile.ks, tile.ke, rows.t_first, rows.t_last), visible,
                            scale_log2, mx);
      online_softmax_step<kKeys, DV>(s, mx, m, l, acc);
      warp_gemm_pn<kKeys, DV, T>(acc, s, tile.v);  // O += P V
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  store_rows_output<T, DV, B>(p, rows, tr, acc, m, l);
}

}  // namespace nsa::cuda
