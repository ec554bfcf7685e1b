// The (D, Dv) head-dim pairs the CUDA kernels are compiled for: the one list that the attention
// and top-k dispatch, the binding's checks (csrc/torch/args.cpp) and Python (nsa_torch._C's
// CUDA_HEAD_DIMS, read by nsa_torch/_checks.py) all derive from. Plain C++ (no CUDA, no torch), so
// that the binding and the Catch2 tests include it without nvcc.
//
// Adding a pair compiles every mma.sync kernel for it (the files per branch and dtype); check the
// ptxas report (registers, spills) and the shared-memory sizes of the new instantiations. The
// warpgroup (wgmma) kernels take only wgmma_head_dims below.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace nsa::cuda {

struct HeadDims {
  int d, dv;
};

inline constexpr HeadDims kHeadDims[] = {{64, 64},   {64, 128},  {96, 96},  {128, 64},
                                         {128, 128}, {192, 128}, {256, 256}};
inline constexpr int kNumHeadDims = int(sizeof(kHeadDims) / sizeof(kHeadDims[0]));

constexpr bool supported_head_dims(int d, int dv) {
  for (const HeadDims& hd : kHeadDims)
    if (hd.d == d && hd.dv == dv) return true;
  return false;
}

// Is D the query/key dim of a listed pair? (select_blocks reads no values.)
constexpr bool supported_head_dim(int d) {
  for (const HeadDims& hd : kHeadDims)
    if (hd.d == d) return true;
  return false;
}

// Do the warpgroup kernels (wgmma: the attention forward and backward, the selected branch by
// blocks, the block selection) take (D, Dv)? Their tiles are 64-column slabs of 128-byte swizzle
// atoms and their accumulators fit the registers up to 128 columns: D, Dv in {64, 128}.
constexpr bool wgmma_head_dim(int d) { return d == 64 || d == 128; }
constexpr bool wgmma_head_dims(int d, int dv) { return wgmma_head_dim(d) && wgmma_head_dim(dv); }

// "(64, 64), (64, 128), ..." (with_dv) or "64, 96, ..." (the distinct D), for error messages.
inline std::string head_dims_list(bool with_dv) {
  std::string s;
  for (int i = 0; i < kNumHeadDims; ++i) {
    bool repeat = false;
    for (int j = 0; j < i; ++j) repeat = repeat || kHeadDims[j].d == kHeadDims[i].d;
    if (!with_dv && repeat) continue;
    s += s.empty() ? "" : ", ";
    s += with_dv ? "(" + std::to_string(kHeadDims[i].d) + ", " + std::to_string(kHeadDims[i].dv) + ")"
                 : std::to_string(kHeadDims[i].d);
  }
  return s;
}

// Calls f(integral_constant<int, D>, integral_constant<int, Dv>) for the listed pair (d, dv), else
// throws std::invalid_argument naming `op` and the supported pairs.
template <int I = 0, typename F>
void dispatch_head_dims(const char* op, int d, int dv, F&& f) {
  if constexpr (I < kNumHeadDims) {
    constexpr int D = kHeadDims[I].d, DV = kHeadDims[I].dv;
    if (d == D && dv == DV) return f(std::integral_constant<int, D>{}, std::integral_constant<int, DV>{});
    return dispatch_head_dims<I + 1>(op, d, dv, std::forward<F>(f));
  } else {
    throw std::invalid_argument(std::string(op) + ": head dims (D, Dv) must be one of " + head_dims_list(true) +
                                " on CUDA, got (" + std::to_string(d) + ", " + std::to_string(dv) + ")");
  }
}

// Is entry I the first with its D? (dispatch_head_dim instantiates each D once.)
template <int I>
constexpr bool first_with_d() {
  for (int j = 0; j < I; ++j)
    if (kHeadDims[j].d == kHeadDims[I].d) return false;
  return true;
}

// Calls f(integral_constant<int, D>) for a listed D (the ops that read no values), else throws
// std::invalid_argument naming `op` and the supported D.
template <int I = 0, typename F>
void dispatch_head_dim(const char* op, int d, F&& f) {
  if constexpr (I < kNumHeadDims) {
    constexpr int D = kHeadDims[I].d;
    if constexpr (first_with_d<I>()) {
      if (d == D) return f(std::integral_constant<int, D>{});
    }
    return dispatch_head_dim<I + 1>(op, d, std::forward<F>(f));
  } else {
    throw std::invalid_argument(std::string(op) + ": head dim D must be one of " + head_dims_list(false) +
                                " on CUDA, got " + std::to_string(d));
  }
}

}  // namespace nsa::cuda
