// Helpers of the attention kernel tests (test_kernel_slc.cpp, test_kernel_swa.cpp): strided test
// tensors, a dense float64 reference of attention under an arbitrary visibility rule (forward
// and the analytic backward, written as plain loops), error norms, and ParallelFor variants.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <thread>
#include <vector>

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

// ||x - ref|| / ||ref|| over the tokens of the sequences (inf if any x is NaN or unwritten).
// ref is in the logical layout of x's shape.
template <typename T>
double rel_err(const Problem& pr, const Tensor<T>& x, const std::vector<double>& ref) {
  const nsa::Seqs seqs = pr.seqs();
  double num = 0, den = 0;
  for (int s = 0; s < seqs.num_seqs; ++s) {
    const nsa::SeqRange seq = seqs.range(s);
    for (index_t t = seq.start; t < seq.start + seq.len; ++t)
      for (int h = 0; h < x.heads; ++h)
        for (int d = 0; d < x.dim; ++d) {
          const double a = x.get(int(seq.batch), t, h, d);
          const double e = ref[((seq.batch * x.rows + t) * x.heads + h) * x.dim + d];
          if (std::isnan(a)) return std::numeric_limits<double>::infinity();
          num += (a - e) * (a - e);
          den += e * e;
        }
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// lse: -inf exactly where the reference is -inf, else the relative error of the finite entries.
template <typename A>
double lse_err(const Problem& pr, const Tensor<A>& lse, const std::vector<double>& ref) {
  const nsa::Seqs seqs = pr.seqs();
  double num = 0, den = 0;
  for (int s = 0; s < seqs.num_seqs; ++s) {
    const nsa::SeqRange seq = seqs.range(s);
    for (index_t t = seq.start; t < seq.start + seq.len; ++t)
      for (int h = 0; h < pr.HQ; ++h) {
        const double a = double(lse.data[lse.off(int(seq.batch), t, h)]);
        const double e = ref[(seq.batch * pr.T + t) * pr.HQ + h];
        if (std::isnan(a)) return std::numeric_limits<double>::infinity();
        if (std::isinf(e) || std::isinf(a)) {
          if (a != e) return std::numeric_limits<double>::infinity();
          continue;
        }
        num += (a - e) * (a - e);
        den += e * e;
      }
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Tolerances of DESIGN.md section 4 (forward; gradients get twice as much).
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

// ParallelFor variants: chunks of 3 items in reverse order; chunks of 5 items taken by 3 threads.
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

template <typename T>
bool same_bits(const Tensor<T>& a, const Tensor<T>& b) {
  return a.data.size() == b.data.size() &&
         std::memcmp(a.data.data(), b.data.data(), a.data.size() * sizeof(T)) == 0;
}

}  // namespace nsa_test
