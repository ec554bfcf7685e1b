// The ops called through the C++ dispatcher (as a C++ user of LibTorch would), checked against
// dense ATen math, and their argument errors.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "catch.h"

namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor> swa_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const OptTensor& cu, int64_t w, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nsa::sliding_window_attention_fwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                         const OptTensor&, int64_t, double)>();
  return op.call(q, k, v, cu, w, scale);
}

std::tuple<Tensor, Tensor> cmp_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const OptTensor& cu, int64_t l, int64_t d, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nsa::compressed_attention_fwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                         const OptTensor&, int64_t, int64_t, double)>();
  return op.call(q, k, v, cu, l, d, scale);
}

// Dense masked attention in float64: q [B, T, HQ, D], k [B, Tk, H, D], mask [T, Tk] (true = visible).
// One thread: with several, this ATen float64 math gave one of two results about 1e-9 apart
// from run to run (torch 2.14.1 CPU, before any op of ours ran), which failed the 1e-10 checks.
std::tuple<Tensor, Tensor> dense(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& mask, double scale) {
  struct OneThread {
    int was = at::get_num_threads();
    OneThread() { at::set_num_threads(1); }
    ~OneThread() { at::set_num_threads(was); }
  } one_thread;
  const int64_t G = q.size(2) / k.size(2);
  Tensor kk = k.repeat_interleave(G, 2).transpose(1, 2);  // [B, HQ, Tk, D]
  Tensor vv = v.repeat_interleave(G, 2).transpose(1, 2);
  Tensor s = at::matmul(q.transpose(1, 2), kk.transpose(-1, -2)) * scale;  // [B, HQ, T, Tk]
  s = s.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity());
  Tensor lse = at::logsumexp(s, -1);                                       // [B, HQ, T]
  Tensor p = at::exp(s - lse.unsqueeze(-1)).nan_to_num(0.0);
  return {at::matmul(p, vv).transpose(1, 2), lse.transpose(1, 2)};
}

}  // namespace

TEST_CASE("sliding window through the dispatcher matches dense math", "[dispatcher]") {
  at::manual_seed(0);
  const int64_t B = 2, T = 37, HQ = 6, H = 2, D = 8, Dv = 5, w = 7;
  auto opt = at::TensorOptions().dtype(at::kDouble);
  Tensor q = at::randn({B, T, HQ, D}, opt), k = at::randn({B, T, H, D}, opt),
         v = at::randn({B, T, H, Dv}, opt);
  auto [o, lse] = swa_fwd(q, k, v, std::nullopt, w, 0.3);
  Tensor t = at::arange(T).unsqueeze(1), s = at::arange(T).unsqueeze(0);
  auto [o_ref, lse_ref] = dense(q, k, v, (s <= t).logical_and(s > t - w), 0.3);
  REQUIRE(lse.scalar_type() == at::kDouble);
  CHECK(at::allclose(o, o_ref, 1e-10, 1e-10));
  CHECK(at::allclose(lse, lse_ref, 1e-10, 1e-10));
}

TEST_CASE("compressed branch through the dispatcher: visibility and empty rows", "[dispatcher]") {
  at::manual_seed(1);
  const int64_t T = 45, HQ = 3, H = 1, D = 4, l = 8, d = 4, Nc = (T - l) / d + 1;
  auto opt = at::TensorOptions().dtype(at::kDouble);
  Tensor q = at::randn({1, T, HQ, D}, opt), k = at::randn({1, Nc, H, D}, opt),
         v = at::randn({1, Nc, H, D}, opt);
  auto [o, lse] = cmp_fwd(q, k, v, std::nullopt, l, d, 0.5);
  Tensor t = at::arange(T).unsqueeze(1), i = at::arange(Nc).unsqueeze(0);
  auto [o_ref, lse_ref] = dense(q, k, v, i * d + l - 1 <= t, 0.5);
  CHECK(at::allclose(o, o_ref, 1e-10, 1e-10));
  // Queries before the first full window see nothing: o = 0, lse = -inf.
  CHECK(at::all(at::isneginf(lse.slice(1, 0, l - 1))).item<bool>());
  CHECK(at::all(o.slice(1, 0, l - 1) == 0).item<bool>());
  CHECK(at::allclose(lse.slice(1, l - 1), lse_ref.slice(1, l - 1), 1e-10, 1e-10));
}

TEST_CASE("argument errors name the op, the argument, the expectation and the value",
          "[dispatcher]") {
  auto opt = at::TensorOptions().dtype(at::kFloat);
  Tensor q = at::randn({1, 16, 4, 8}, opt), k = at::randn({1, 16, 3, 8}, opt),
         v = at::randn({1, 16, 3, 8}, opt);
  try {
    swa_fwd(q, k, v, std::nullopt, 4, 1.0);
    FAIL("HQ = 4, H = 3 was accepted");
  } catch (const c10::ValueError& e) {
    const std::string msg = e.what_without_backtrace();
    CHECK(msg.find("nsa.sliding_window_attention") != std::string::npos);
    CHECK(msg.find("H = 3") != std::string::npos);
    CHECK(msg.find("HQ = 4") != std::string::npos);
  }
  Tensor k2 = at::randn({1, 16, 2, 8}, opt), v2 = at::randn({1, 16, 2, 8}, opt);
  Tensor cu = at::tensor({0, 9, 7, 16}, at::TensorOptions().dtype(at::kInt));
  try {
    swa_fwd(q, k2, v2, cu, 4, 1.0);
    FAIL("decreasing cu_seqlens was accepted");
  } catch (const c10::ValueError& e) {
    const std::string msg = e.what_without_backtrace();
    CHECK(msg.find("cu_seqlens must be non-decreasing") != std::string::npos);
    CHECK(msg.find("cu_seqlens[2] = 7") != std::string::npos);
  }
  try {
    swa_fwd(q.to(at::kInt), k2, v2, std::nullopt, 4, 1.0);
    FAIL("int32 q was accepted");
  } catch (const c10::TypeError& e) {
    CHECK(std::string(e.what_without_backtrace()).find("q must be float32") != std::string::npos);
  }
}
