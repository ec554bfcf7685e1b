// The gated sum of the three branch outputs on CUDA (GateParams in params.h): one warp per
// (b, t, h) row, fp32 sums in branch order cmp, slc, swa; the backward's dg is a warp reduction
// in a fixed order (deterministic). Rows move in 16-byte vectors when Dv and the addresses allow.
#include <stdexcept>
#include <string>

#include "../common/mma.cuh"
#include "../kernels.h"

namespace nsa::cuda {
namespace {

constexpr const char* kOp = "nsa.gated_sum";
constexpr int kThreads = 256;  // 8 rows per thread block
constexpr int kVec = 8;        // elements per 16-byte vector

struct Row {
  index_t b, t;
  int h;
};

// Row of this warp, false past the end.
__device__ __forceinline__ bool locate_row(const GateParams& p, Row& row) {
  const index_t rows = index_t(p.batch) * p.seqlen * p.num_heads;
  const index_t r = index_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (r >= rows) return false;
  row.h = int(r % p.num_heads);
  row.t = (r / p.num_heads) % p.seqlen;
  row.b = r / (index_t(p.num_heads) * p.seqlen);
  return true;
}

__device__ __forceinline__ bool aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0;
}

// Calls f(d, n) for this lane's pieces of a row of Dv elements: n = kVec elements at d when
// `vec`, else single elements.
template <typename F>
__device__ __forceinline__ void for_lane_pieces(int dv, bool vec, F&& f) {
  const int lane = threadIdx.x & 31;
  if (vec) {
    for (int d = lane * kVec; d < dv; d += 32 * kVec) f(d, kVec);
  } else {
    for (int d = lane; d < dv; d += 32) f(d, 1);
  }
}

template <typename T>
struct Piece {  // up to kVec elements of a row, as floats
  float v[kVec];
  __device__ void load(const T* src, int n) {
    if (n == kVec) {
      const uint4 raw = *reinterpret_cast<const uint4*>(src);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[i] = to_float(e[i]);
    } else {
#pragma unroll
      for (int i = 1; i < kVec; ++i) v[i] = 0.f;
      v[0] = to_float(src[0]);
    }
  }
  __device__ void store(T* dst, int n) const {
    if (n == kVec) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kVec; ++i) e[i] = from_float<T>(v[i]);
      *reinterpret_cast<uint4*>(dst) = raw;
    } else {
      dst[0] = from_float<T>(v[0]);
    }
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) gate_fwd_kernel(const GateParams p) {
  Row row;
  if (!locate_row(p, row)) return;
  float g[3];
  const T* x[3];
  T* o = p.o.ptr<T>(row.b, row.t, row.h);
  bool vec = p.head_dim_v % kVec == 0 && aligned16(o);
  for (int i = 0; i < 3; ++i) {
    g[i] = to_float(*p.gate[i].ptr<const T>(row.b, row.t, row.h));
    x[i] = p.branch_o[i].ptr<const T>(row.b, row.t, row.h);
    vec = vec && aligned16(x[i]);
  }
  for_lane_pieces(p.head_dim_v, vec, [&](int d, int n) {
    Piece<T> a, b, c;
    a.load(x[0] + d, n);
    b.load(x[1] + d, n);
    c.load(x[2] + d, n);
#pragma unroll
    for (int i = 0; i < kVec; ++i) a.v[i] = g[0] * a.v[i] + g[1] * b.v[i] + g[2] * c.v[i];
    a.store(o + d, n);
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gate_bwd_kernel(const GateParams p) {
  Row row;
  if (!locate_row(p, row)) return;
  const T* dout = p.dout.ptr<const T>(row.b, row.t, row.h);
  for (int i = 0; i < 3; ++i) {
    const float g = to_float(*p.gate[i].ptr<const T>(row.b, row.t, row.h));
    const T* x = p.branch_o[i].ptr<const T>(row.b, row.t, row.h);
    T* dx = p.dbranch_o[i].ptr<T>(row.b, row.t, row.h);
    const bool vec = p.head_dim_v % kVec == 0 && aligned16(dout) && aligned16(x) && aligned16(dx);
    float dg = 0.f;
    for_lane_pieces(p.head_dim_v, vec, [&](int d, int n) {
      Piece<T> dy, xv;
      dy.load(dout + d, n);
      xv.load(x + d, n);
      for (int e = 0; e < n; ++e) dg += dy.v[e] * xv.v[e];
#pragma unroll
      for (int e = 0; e < kVec; ++e) dy.v[e] *= g;
      dy.store(dx + d, n);
    });
    for (int off = 16; off > 0; off >>= 1) dg += __shfl_xor_sync(0xffffffffu, dg, off);
    if ((threadIdx.x & 31) == 0) *p.dgate[i].ptr<T>(row.b, row.t, row.h) = from_float<T>(dg);
  }
}

template <typename Kernel>
void launch(Kernel kernel, const GateParams& p, cudaStream_t stream) {
  const index_t rows = index_t(p.batch) * p.seqlen * p.num_heads;
  if (rows <= 0) return;
  const index_t blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
  if (blocks > index_t(0x7fffffff))
    throw std::invalid_argument(std::string(kOp) + ": too many rows (" + std::to_string(rows) + ")");
  kernel<<<unsigned(blocks), kThreads, 0, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(kOp) + ": CUDA launch failed: " + cudaGetErrorString(err));
}

}  // namespace

void gate_fwd(const GateParams& p, cudaStream_t stream) {
  if (p.dtype == Dtype::kBFloat16) return launch(gate_fwd_kernel<__nv_bfloat16>, p, stream);
  if (p.dtype == Dtype::kFloat16) return launch(gate_fwd_kernel<__half>, p, stream);
  throw std::invalid_argument(std::string(kOp) + ": dtype must be bfloat16 or float16 on CUDA");
}

void gate_bwd(const GateParams& p, cudaStream_t stream) {
  if (p.dtype == Dtype::kBFloat16) return launch(gate_bwd_kernel<__nv_bfloat16>, p, stream);
  if (p.dtype == Dtype::kFloat16) return launch(gate_bwd_kernel<__half>, p, stream);
  throw std::invalid_argument(std::string(kOp) + ": dtype must be bfloat16 or float16 on CUDA");
}

}  // namespace nsa::cuda
