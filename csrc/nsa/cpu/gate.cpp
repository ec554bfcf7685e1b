// The gated sum of the three branch outputs on the CPU (GateParams in params.h), one work item
// per (b, t, h) row; sums in the accumulation type, in branch order cmp, slc, swa.
#include "kernels.h"
#include "numeric.h"

namespace nsa::cpu {
namespace {

constexpr index_t kGrain = 256;  // rows per chunk: a row is only Dv multiply-adds per branch

// Calls f(b, t, h) for rows [begin, end) of the [B, T, HQ] grid.
template <typename F>
void for_rows(const GateParams& p, index_t begin, index_t end, F&& f) {
  for (index_t r = begin; r < end; ++r) {
    const int h = int(r % p.num_heads);
    const index_t t = (r / p.num_heads) % p.seqlen;
    const index_t b = r / (index_t(p.num_heads) * p.seqlen);
    f(b, t, h);
  }
}

template <typename T>
void fwd_rows(const GateParams& p, index_t begin, index_t end) {
  using A = acc_t<T>;
  for_rows(p, begin, end, [&](index_t b, index_t t, int h) {
    A g[3];
    const T* x[3];
    for (int i = 0; i < 3; ++i) {
      g[i] = load<A>(*p.gate[i].ptr<const T>(b, t, h));
      x[i] = p.branch_o[i].ptr<const T>(b, t, h);
    }
    T* o = p.o.ptr<T>(b, t, h);
    for (int d = 0; d < p.head_dim_v; ++d)
      store(o[d], g[0] * load<A>(x[0][d]) + g[1] * load<A>(x[1][d]) + g[2] * load<A>(x[2][d]));
  });
}

template <typename T>
void bwd_rows(const GateParams& p, index_t begin, index_t end) {
  using A = acc_t<T>;
  for_rows(p, begin, end, [&](index_t b, index_t t, int h) {
    const T* dout = p.dout.ptr<const T>(b, t, h);
    for (int i = 0; i < 3; ++i) {
      const A g = load<A>(*p.gate[i].ptr<const T>(b, t, h));
      const T* x = p.branch_o[i].ptr<const T>(b, t, h);
      T* dx = p.dbranch_o[i].ptr<T>(b, t, h);
      A dg = 0;
      for (int d = 0; d < p.head_dim_v; ++d) {
        const A dy = load<A>(dout[d]);
        store(dx[d], g * dy);
        dg += dy * load<A>(x[d]);
      }
      store(*p.dgate[i].ptr<T>(b, t, h), dg);
    }
  });
}

index_t num_rows(const GateParams& p) { return index_t(p.batch) * p.seqlen * p.num_heads; }

}  // namespace

void gate_fwd(const GateParams& p, const ParallelFor& parallel_for) {
  dispatch_dtype(p.dtype, "nsa.gated_sum", [&](auto t) {
    using T = decltype(t);
    parallel_for(num_rows(p), kGrain, [&](index_t begin, index_t end) { fwd_rows<T>(p, begin, end); });
  });
}

void gate_bwd(const GateParams& p, const ParallelFor& parallel_for) {
  dispatch_dtype(p.dtype, "nsa.gated_sum", [&](auto t) {
    using T = decltype(t);
    parallel_for(num_rows(p), kGrain, [&](index_t begin, index_t end) { bwd_rows<T>(p, begin, end); });
  });
}

}  // namespace nsa::cpu
