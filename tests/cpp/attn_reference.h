// Helpers of the CPU kernel tests (test_kernel_*.cpp): strided test tensors, the tensors and
// params of an attention branch, a dense float64 reference of attention under an arbitrary
// visibility rule (forward and the analytic backward, written as plain loops), error norms and
// checks, ParallelFor variants and the hidden benchmarks' timer.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "catch.h"

#include "nsa/cpu/kernels.h"
#include "nsa/cpu/numeric.h"

namespace nsa_test {

using nsa::index_t;

// A [B, rows, heads, dim] tensor whose strides have `pad` unused elements after every head, row
// and batch row (pad > 0: non-contiguous, like a slice of a larger tensor).
template <typename T>
struct Tensor {
  int B = 0, rows = 0, heads = 0, dim = 0;
  index_t hs = 0, rs = 0, bs = 0;
  std::vector<T> data;

  Tensor(int B_, int rows_, int heads_, int dim_, int pad = 0)
      : B(B_), rows(rows_), heads(heads_), dim(dim_) {
    hs = dim + pad;
    rs = heads * hs + pad;
    bs = rows * rs + pad;
    data.resize(size_t(std::max<index_t>(1, B * bs)));
  }
  index_t off(int b, index_t r, int h, int d = 0) const { return b * bs + r * rs + h * hs + d; }
  double get(int b, index_t r, int h, int d = 0) const {
    return nsa::cpu::load<double>(data[off(b, r, h, d)]);
  }
  void set(int b, index_t r, int h, int d, double x) { nsa::cpu::store(data[off(b, r, h, d)], x); }
  nsa::View view() { return nsa::View{data.data(), bs, rs, hs}; }

  void fill_uniform(std::mt19937& rng, double lo = -1, double hi = 1) {
    std::uniform_real_distribution<double> u(lo, hi);
    for (auto& x : data) nsa::cpu::store(x, u(rng));
  }
  void fill_nan() {
    for (auto& x : data) nsa::cpu::store(x, std::numeric_limits<double>::quiet_NaN());
  }
};

// Sizes and sequences of a test problem; cu empty: fixed-length batch of B sequences of T.
struct Problem {
  int B = 1, T = 1, HQ = 1, H = 1, D = 8, Dv = 8;
  double scale = 0;  // 0: D^-0.5
  std::vector<int32_t> cu;

  Problem() = default;
  Problem(int B_, int T_, int HQ_, int H_, int D_, int Dv_, std::vector<int32_t> cu_ = {})
      : B(B_), T(T_), HQ(HQ_), H(H_), D(D_), Dv(Dv_), cu(std::move(cu_)) {}

  int G() const { return HQ / H; }
  double sc() const { return scale != 0 ? scale : 1.0 / std::sqrt(double(D)); }
  nsa::Seqs seqs() const {
    nsa::Seqs s;
    s.batch = B;
    s.seqlen = T;
    if (cu.empty()) {
      s.num_seqs = B;
    } else {
      s.num_seqs = int(cu.size()) - 1;
      s.cu_seqlens = cu.data();
    }
    return s;
  }
};

// The problem's sequences with their compressed rows (the compressed branch and the block
// selection): Nc(len) rows each for block size l and stride d, packed when varlen.
struct CmpSeqs {
  std::vector<int32_t> cu_cmp;
  nsa::Seqs seqs;
  int rows = 0;  // compressed rows per batch row of k_cmp / v_cmp

  CmpSeqs(const Problem& pr, int l, int d) : seqs(pr.seqs()) {
    if (pr.cu.empty()) {
      rows = int(nsa::num_cmp_tokens(pr.T, l, d));
      seqs.cmp_seqlen = rows;
    } else {
      cu_cmp.push_back(0);
      for (size_t s = 0; s + 1 < pr.cu.size(); ++s)
        cu_cmp.push_back(cu_cmp.back() +
                         int32_t(nsa::num_cmp_tokens(pr.cu[s + 1] - pr.cu[s], l, d)));
      rows = cu_cmp.back();
      seqs.cu_seqlens_cmp = cu_cmp.data();
    }
  }
  CmpSeqs(const CmpSeqs&) = delete;  // seqs points into cu_cmp
};

// visible(seq, t, s, g): does token t of sequence seq see key s of the same sequence for kv
// head g (positions sequence-relative)?
using Visible = std::function<bool(int, index_t, index_t, int)>;

// Dense reference in float64, logical layouts: o, dout [B, T, HQ, Dv], lse [B, T, HQ],
// dq [B, T, HQ, D], dk [B, T, H, D], dv [B, T, H, Dv].
struct Reference {
  std::vector<double> o, lse, dq, dk, dv;
};

template <typename T>
Reference reference_attention(const Problem& pr, const Tensor<T>& q, const Tensor<T>& k,
                              const Tensor<T>& v, const Tensor<T>* dout, const Visible& visible) {
  const int G = pr.G(), D = pr.D, Dv = pr.Dv;
  const index_t rows = index_t(pr.B) * pr.T;
  Reference r;
  r.o.assign(rows * pr.HQ * Dv, 0.0);
  r.lse.assign(rows * pr.HQ, -std::numeric_limits<double>::infinity());
  r.dq.assign(rows * pr.HQ * D, 0.0);
  r.dk.assign(rows * pr.H * D, 0.0);
  r.dv.assign(rows * pr.H * Dv, 0.0);
  const nsa::Seqs seqs = pr.seqs();
  std::vector<double> score;
  for (int s = 0; s < seqs.num_seqs; ++s) {
    const nsa::SeqRange seq = seqs.range(s);
    const int b = int(seq.batch);
    for (index_t t = 0; t < seq.len; ++t)
      for (int h = 0; h < pr.HQ; ++h) {
        const int g = h / G;
        const index_t qrow = b * index_t(pr.T) + seq.start + t;
        score.assign(seq.len, -std::numeric_limits<double>::infinity());
        double mx = -std::numeric_limits<double>::infinity();
        for (index_t j = 0; j < seq.len; ++j) {
          if (!visible(s, t, j, g)) continue;
          double dotp = 0;
          for (int d = 0; d < D; ++d) dotp += q.get(b, seq.start + t, h, d) * k.get(b, seq.start + j, g, d);
          score[j] = pr.sc() * dotp;
          mx = std::max(mx, score[j]);
        }
        if (mx == -std::numeric_limits<double>::infinity()) continue;  // sees nothing
        double sum = 0;
        for (index_t j = 0; j < seq.len; ++j) sum += std::exp(score[j] - mx);
        const double lse = mx + std::log(sum);
        r.lse[qrow * pr.HQ + h] = lse;
        double* o = &r.o[(qrow * pr.HQ + h) * Dv];
        for (index_t j = 0; j < seq.len; ++j) {
          const double p = std::exp(score[j] - lse);
          if (p == 0) continue;
          for (int c = 0; c < Dv; ++c) o[c] += p * v.get(b, seq.start + j, g, c);
        }
        if (dout == nullptr) continue;
        // Backward of o = sum_j p_j v_j, p = softmax(score): dS_j = p_j (dout.v_j - dout.o).
        double delta = 0;
        for (int c = 0; c < Dv; ++c) delta += dout->get(b, seq.start + t, h, c) * o[c];
        for (index_t j = 0; j < seq.len; ++j) {
          const double p = std::exp(score[j] - lse);
          if (p == 0) continue;
          const index_t krow = b * index_t(pr.T) + seq.start + j;
          double dp = 0;
          for (int c = 0; c < Dv; ++c) {
            dp += dout->get(b, seq.start + t, h, c) * v.get(b, seq.start + j, g, c);
            r.dv[(krow * pr.H + g) * Dv + c] += p * dout->get(b, seq.start + t, h, c);
          }
          const double ds = p * (dp - delta) * pr.sc();
          for (int d = 0; d < D; ++d) {
            r.dq[(qrow * pr.HQ + h) * D + d] += ds * k.get(b, seq.start + j, g, d);
            r.dk[(krow * pr.H + g) * D + d] += ds * q.get(b, seq.start + t, h, d);
          }
        }
      }
  }
  return r;
}

// ||x - ref|| / ||ref|| over the elements added; inf once an x is NaN (e.g. unwritten) or an
// infinite x or reference differs from the other.
class RelErr {
 public:
  void add(double x, double ref) {
    if (std::isnan(x) || ((std::isinf(x) || std::isinf(ref)) && x != ref)) failed_ = true;
    if (std::isinf(ref)) return;  // equal infinities
    num_ += (x - ref) * (x - ref);
    den_ += ref * ref;
  }
  double value() const {
    if (failed_) return std::numeric_limits<double>::infinity();
    return den_ > 0 ? std::sqrt(num_ / den_) : std::sqrt(num_);
  }

 private:
  double num_ = 0, den_ = 0;
  bool failed_ = false;
};

// RelErr of x against ref (in the logical layout of x's shape) over the rows of x whose row(b, r)
// is true, every head and element.
template <typename T, typename Row>
double rel_err_rows(const Tensor<T>& x, const std::vector<double>& ref, Row&& row) {
  RelErr err;
  for (int b = 0; b < x.B; ++b)
    for (index_t r = 0; r < x.rows; ++r) {
      if (!row(b, r)) continue;
      for (int h = 0; h < x.heads; ++h)
        for (int d = 0; d < x.dim; ++d)
          err.add(x.get(b, r, h, d), ref[((index_t(b) * x.rows + r) * x.heads + h) * x.dim + d]);
    }
  return err.value();
}

// Over the tokens of the problem's sequences. lse (dim 1) is -inf exactly where the reference is.
template <typename T>
double rel_err(const Problem& pr, const Tensor<T>& x, const std::vector<double>& ref) {
  const nsa::Seqs seqs = pr.seqs();
  return rel_err_rows(x, ref, [&](int b, index_t r) {
    for (int s = 0; s < seqs.num_seqs; ++s) {
      const nsa::SeqRange seq = seqs.range(s);
      if (seq.batch == b && r >= seq.start && r < seq.start + seq.len) return true;
    }
    return false;
  });
}
// Over every element (e.g. the compressed rows of k_cmp).
template <typename T>
double err_all(const Tensor<T>& x, const std::vector<double>& ref) {
  return rel_err_rows(x, ref, [](int, index_t) { return true; });
}

// Tolerances of docs/design.md section 5 (forward; gradients get twice as much).
template <typename T>
double tolerance() {
  if (std::is_same_v<T, double>) return 1e-9;
  if (std::is_same_v<T, float>) return 1e-5;
  if (std::is_same_v<T, nsa::cpu::fp16>) return 5e-3;
  return 1e-2;
}
template <typename T>
nsa::Dtype dtype_of() {
  if (std::is_same_v<T, double>) return nsa::Dtype::kFloat64;
  if (std::is_same_v<T, float>) return nsa::Dtype::kFloat32;
  if (std::is_same_v<T, nsa::cpu::fp16>) return nsa::Dtype::kFloat16;
  return nsa::Dtype::kBFloat16;
}

// ParallelFor variants: chunks of 3 items in reverse order; chunks of 5 items taken by 3 threads;
// like at::parallel_for on two threads, two contiguous halves run concurrently.
inline void reverse_for(index_t n, index_t, const std::function<void(index_t, index_t)>& fn) {
  for (index_t e = n; e > 0; e -= 3) fn(std::max<index_t>(0, e - 3), e);
}
inline void threaded_for(index_t n, index_t, const std::function<void(index_t, index_t)>& fn) {
  std::vector<std::thread> pool;
  for (int w = 0; w < 3; ++w)
    pool.emplace_back([&, w] {
      for (index_t b = index_t(w) * 5; b < n; b += 15) fn(b, std::min(n, b + 5));
    });
  for (auto& t : pool) t.join();
}
inline void two_threads_for(index_t n, index_t, const std::function<void(index_t, index_t)>& fn) {
  std::thread other([&] { fn(0, n / 2); });
  fn(n / 2, n);
  other.join();
}

template <typename T>
bool same_bits(const Tensor<T>& a, const Tensor<T>& b) {
  return a.data.size() == b.data.size() &&
         std::memcmp(a.data.data(), b.data.data(), a.data.size() * sizeof(T)) == 0;
}

// The tensors of an attention branch (nsa::AttnParams) for a problem whose keys have key_rows
// rows per batch row (T, or Nc for the compressed branch); the outputs are poisoned with NaN.
template <typename T>
struct AttnTensors {
  using A = nsa::cpu::acc_t<T>;
  Tensor<T> q, k, v, dout, o, dq, dk, dv;
  Tensor<A> lse;

  AttnTensors(const Problem& pr, int key_rows, int pad)
      : q(pr.B, pr.T, pr.HQ, pr.D, pad), k(pr.B, key_rows, pr.H, pr.D, pad),
        v(pr.B, key_rows, pr.H, pr.Dv, pad), dout(pr.B, pr.T, pr.HQ, pr.Dv, pad),
        o(pr.B, pr.T, pr.HQ, pr.Dv, pad), dq(pr.B, pr.T, pr.HQ, pr.D, pad),
        dk(pr.B, key_rows, pr.H, pr.D, pad), dv(pr.B, key_rows, pr.H, pr.Dv, pad),
        lse(pr.B, pr.T, pr.HQ, 1, pad) {
    for (auto* x : {&o, &dq, &dk, &dv}) x->fill_nan();
    lse.fill_nan();
  }
  // q and k uniform in [-qk, qk], v and dout in [-1, 1].
  void fill_inputs(std::mt19937& rng, double qk = 1) {
    q.fill_uniform(rng, -qk, qk);
    k.fill_uniform(rng, -qk, qk);
    v.fill_uniform(rng);
    dout.fill_uniform(rng);
  }
  // The fields of AttnParams; the backward's tensors only when `backward`.
  void set_params(nsa::AttnParams& p, const Problem& pr, const nsa::Seqs& seqs,
                  bool backward = true) {
    p.dtype = dtype_of<T>();
    p.q = q.view();
    p.k = k.view();
    p.v = v.view();
    p.o = o.view();
    p.lse = lse.view();
    if (backward) {
      p.dout = dout.view();
      p.dq = dq.view();
      p.dk = dk.view();
      p.dv = dv.view();
    }
    p.seqs = seqs;
    p.num_heads = pr.HQ;
    p.num_heads_k = pr.H;
    p.head_dim = pr.D;
    p.head_dim_v = pr.Dv;
    p.scale = pr.sc();
  }
};

// Every output of two runs has the same bits.
template <typename T>
void check_same_outputs(const AttnTensors<T>& a, const AttnTensors<T>& b) {
  CHECK(same_bits(a.o, b.o));
  CHECK(same_bits(a.lse, b.lse));
  CHECK(same_bits(a.dq, b.dq));
  CHECK(same_bits(a.dk, b.dk));
  CHECK(same_bits(a.dv, b.dv));
}

// The slc and swa kernels' check: fwd and bwd (run(x, parallel_for)) on the tensors of make()
// against reference_attention under visible(x) with the tolerances of docs/design.md section 5, then the same bits
// under other chunkings and threads.
template <typename T, typename Make, typename Run, typename Vis>
void check_attention(const Problem& pr, Make&& make, Run&& run, Vis&& visible) {
  auto x = make();
  run(x, nsa::cpu::ParallelFor(nsa::cpu::serial_for));
  const Reference ref = reference_attention(pr, x.q, x.k, x.v, &x.dout, visible(x));
  const double tol = tolerance<T>();
  CHECK(rel_err(pr, x.o, ref.o) < tol);
  CHECK(rel_err(pr, x.lse, ref.lse) < tol);
  CHECK(rel_err(pr, x.dq, ref.dq) < 2 * tol);
  CHECK(rel_err(pr, x.dk, ref.dk) < 2 * tol);
  CHECK(rel_err(pr, x.dv, ref.dv) < 2 * tol);
  for (auto pf : {nsa::cpu::ParallelFor(reverse_for), nsa::cpu::ParallelFor(threaded_for)}) {
    auto y = make();
    run(y, pf);
    check_same_outputs(x, y);
  }
}

// Runs forward() and backward(), then checks their dq, dk, dv (the gradients of the loss
// sum(o * dout)) at 12 random elements each against central differences of forward().
template <typename Fwd, typename Bwd>
void check_finite_differences(AttnTensors<double>& x, std::mt19937& rng, Fwd&& forward,
                              Bwd&& backward) {
  forward();
  backward();
  auto loss = [&] {
    forward();
    double sum = 0;
    for (int b = 0; b < x.o.B; ++b)
      for (int t = 0; t < x.o.rows; ++t)
        for (int h = 0; h < x.o.heads; ++h)
          for (int d = 0; d < x.o.dim; ++d) sum += x.o.get(b, t, h, d) * x.dout.get(b, t, h, d);
    return sum;
  };
  for (auto [in, grad] : {std::pair{&x.q, x.dq}, std::pair{&x.k, x.dk}, std::pair{&x.v, x.dv}})
    for (int i = 0; i < 12; ++i) {
      const index_t off = in->off(int(rng() % in->B), rng() % in->rows, int(rng() % in->heads),
                                  int(rng() % in->dim));
      const double x0 = in->data[off], eps = 1e-6;
      in->data[off] = x0 + eps;
      const double up = loss();
      in->data[off] = x0 - eps;
      const double down = loss();
      in->data[off] = x0;
      CHECK(std::abs((up - down) / (2 * eps) - grad.data[off]) < 1e-7);
    }
}

// The hidden benchmarks ([.bench]): times fwd(parallel_for) then bwd(parallel_for) on one and on
// two threads; flop: the forward's, the backward's counted as 2.5x that.
template <typename Fwd, typename Bwd>
void time_fwd_bwd(const char* name, double flop, Fwd&& fwd, Bwd&& bwd) {
  for (int threads : {1, 2}) {
    const nsa::cpu::ParallelFor pf =
        threads == 1 ? nsa::cpu::ParallelFor(nsa::cpu::serial_for) : two_threads_for;
    const auto t0 = std::chrono::steady_clock::now();
    fwd(pf);
    const auto t1 = std::chrono::steady_clock::now();
    bwd(pf);
    const auto t2 = std::chrono::steady_clock::now();
    const double f = std::chrono::duration<double>(t1 - t0).count();
    const double b = std::chrono::duration<double>(t2 - t1).count();
    std::printf("%s %d thread(s): fwd %.3f s (%.1f GFLOP/s), bwd %.3f s (%.1f GFLOP/s at 2.5x)\n",
                name, threads, f, flop / f * 1e-9, b, 2.5 * flop / b * 1e-9);
  }
}

}  // namespace nsa_test
