// The gated sum of the three branch outputs on CUDA (GateParams in params.h): a group of lanes per
// (b, t, h) row, fp32 sums in branch order cmp, slc, swa; the backward's dg is a reduction over
// the group in a fixed order (deterministic). Rows move in 16-byte vectors when Dv and the
// addresses allow.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "../common/cuda_check.h"
#include "../common/mma.cuh"
#include "../kernels.h"

namespace nsa::cuda {
namespace {

constexpr const char* kOp = "nsa.gated_sum";
constexpr int kMaxThreads = 256;
constexpr int kVec = 8;  // elements per 16-byte vector

// A row (b, t, h) is handled by L consecutive lanes (a power of two, 32 at most): with 16-byte
// vectors, Dv / 8 of them rounded up (Dv = 128: 16 lanes, two rows per warp, instead of a warp
// per row with half its lanes idle); else 32 lanes, one element each. Grid (T, head groups, B):
// no 64-bit divisions to find the row (ncu at 64k on a version with them: SM throughput 69%,
// DRAM 69%; the two versions were not timed against each other).
template <int L>
struct Row {
  index_t b, t;
  int h;
  bool valid;  // false past the last head (the lanes still join the shuffles)

  __device__ explicit Row(const GateParams& p)
      : b(blockIdx.z), t(blockIdx.x), h(int((blockIdx.y * blockDim.x + threadIdx.x) / L)), valid(h < p.num_heads) {}
};

// Calls f(d) for this lane's pieces of a row of Dv elements: kVec elements at d when kVec16, else
// one.
template <int L, bool kVec16, typename F>
__device__ __forceinline__ void for_lane_pieces(int dv, F&& f) {
  const int lane = threadIdx.x % L;
  constexpr int kStep = kVec16 ? kVec : 1;
  for (int d = lane * kStep; d < dv; d += L * kStep) f(d);
}

template <typename T, bool kVec16>
struct Piece {  // kVec elements of a row (kVec16) or one, as floats
  static constexpr int kN = kVec16 ? kVec : 1;
  float v[kN];
  __device__ void load(const T* src) {
    if constexpr (kVec16) {
      const uint4 raw = *reinterpret_cast<const uint4*>(src);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kN; ++i) v[i] = to_float(e[i]);
    } else {
      v[0] = to_float(src[0]);
    }
  }
  __device__ void store(T* dst) const {
    if constexpr (kVec16) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kN; ++i) e[i] = from_float<T>(v[i]);
      *reinterpret_cast<uint4*>(dst) = raw;
    } else {
      dst[0] = from_float<T>(v[0]);
    }
  }
};

template <typename T, int L, bool kVec16>
__global__ void __launch_bounds__(kMaxThreads) gate_fwd_kernel(const GateParams p) {
  const Row<L> row(p);
  if (!row.valid) return;
  float g[3];
  const T* x[3];
  T* o = p.o.ptr<T>(row.b, row.t, row.h);
  for (int i = 0; i < 3; ++i) {
    g[i] = to_float(*p.gate[i].ptr<const T>(row.b, row.t, row.h));
    x[i] = p.branch_o[i].ptr<const T>(row.b, row.t, row.h);
  }
  for_lane_pieces<L, kVec16>(p.head_dim_v, [&](int d) {
    Piece<T, kVec16> a, b, c;
    a.load(x[0] + d);
    b.load(x[1] + d);
    c.load(x[2] + d);
#pragma unroll
    for (int i = 0; i < a.kN; ++i) a.v[i] = g[0] * a.v[i] + g[1] * b.v[i] + g[2] * c.v[i];
    a.store(o + d);
  });
}

template <typename T, int L, bool kVec16>
__global__ void __launch_bounds__(kMaxThreads) gate_bwd_kernel(const GateParams p) {
  const Row<L> row(p);
  if (__all_sync(0xffffffffu, !row.valid)) return;
  const T* dout = p.dout.ptr<const T>(row.b, row.t, row.h);
  for (int i = 0; i < 3; ++i) {
    float dg = 0.f;
    if (row.valid) {
      const float g = to_float(*p.gate[i].ptr<const T>(row.b, row.t, row.h));
      const T* x = p.branch_o[i].ptr<const T>(row.b, row.t, row.h);
      T* dx = p.dbranch_o[i].ptr<T>(row.b, row.t, row.h);
      for_lane_pieces<L, kVec16>(p.head_dim_v, [&](int d) {
        Piece<T, kVec16> dy, xv;
        dy.load(dout + d);
        xv.load(x + d);
#pragma unroll
        for (int e = 0; e < dy.kN; ++e) {
          dg += dy.v[e] * xv.v[e];
          dy.v[e] *= g;
        }
        dy.store(dx + d);
      });
    }
    for (int off = L / 2; off > 0; off >>= 1) dg += __shfl_xor_sync(0xffffffffu, dg, off);
    if (row.valid && threadIdx.x % L == 0) *p.dgate[i].ptr<T>(row.b, row.t, row.h) = from_float<T>(dg);
  }
}

// Can every row of v move in 16-byte vectors (start and strides multiples of 8 elements)?
bool vec16(const View& v) {
  return reinterpret_cast<uintptr_t>(v.data) % 16 == 0 && v.batch_stride % kVec == 0 && v.row_stride % kVec == 0 &&
         v.head_stride % kVec == 0;
}

template <typename Kernel>
void launch_rows(Kernel kernel, const GateParams& p, int lanes, cudaStream_t stream) {
  if (index_t(p.batch) * p.seqlen * p.num_heads <= 0) return;
  if (p.seqlen > index_t(0x7fffffff) || p.batch > 65535)
    throw std::invalid_argument(std::string(kOp) + ": at most 2^31 - 1 tokens and 65535 batch rows, got T = " +
                                std::to_string(p.seqlen) + ", B = " + std::to_string(p.batch));
  const int threads_needed = p.num_heads * lanes;
  const int threads = std::min(kMaxThreads, (threads_needed + 31) / 32 * 32);
  const dim3 grid(unsigned(p.seqlen), unsigned((threads_needed + threads - 1) / threads), unsigned(p.batch));
  kernel<<<grid, threads, 0, stream>>>(p);
  check_launch(kOp);
}

// Lanes per row with 16-byte vectors (see Row), 0 when some row cannot use them.
int vec_lanes(const GateParams& p, bool backward) {
  bool ok = p.head_dim_v % kVec == 0 && vec16(backward ? p.dout : p.o);
  for (int i = 0; i < 3; ++i) ok = ok && vec16(p.branch_o[i]) && (!backward || vec16(p.dbranch_o[i]));
  if (!ok) return 0;
  int lanes = 1;
  while (lanes < 32 && lanes * kVec < p.head_dim_v) lanes *= 2;
  return lanes;
}

// Launches KERNEL<T, lanes, kVec16> for the row layout of p.
#define NSA_GATE_DISPATCH(KERNEL, T, BACKWARD)                                         \
  switch (vec_lanes(p, BACKWARD)) {                                                \
    case 1: return launch_rows(KERNEL<T, 1, true>, p, 1, stream);                     \
    case 2: return launch_rows(KERNEL<T, 2, true>, p, 2, stream);                     \
    case 4: return launch_rows(KERNEL<T, 4, true>, p, 4, stream);                     \
    case 8: return launch_rows(KERNEL<T, 8, true>, p, 8, stream);                     \
    case 16: return launch_rows(KERNEL<T, 16, true>, p, 16, stream);                  \
    case 32: return launch_rows(KERNEL<T, 32, true>, p, 32, stream);                  \
    default: return launch_rows(KERNEL<T, 32, false>, p, 32, stream);                 \
  }

template <typename T>
void run_fwd(const GateParams& p, cudaStream_t stream) {
  NSA_GATE_DISPATCH(gate_fwd_kernel, T, false)
}
template <typename T>
void run_bwd(const GateParams& p, cudaStream_t stream) {
  NSA_GATE_DISPATCH(gate_bwd_kernel, T, true)
}
#undef NSA_GATE_DISPATCH

}  // namespace

void gate_fwd(const GateParams& p, cudaStream_t stream) {
  if (p.dtype == Dtype::kBFloat16) return run_fwd<__nv_bfloat16>(p, stream);
  if (p.dtype == Dtype::kFloat16) return run_fwd<__half>(p, stream);
  throw std::invalid_argument(std::string(kOp) + ": dtype must be bfloat16 or float16 on CUDA");
}

void gate_bwd(const GateParams& p, cudaStream_t stream) {
  if (p.dtype == Dtype::kBFloat16) return run_bwd<__nv_bfloat16>(p, stream);
  if (p.dtype == Dtype::kFloat16) return run_bwd<__half>(p, stream);
  throw std::invalid_argument(std::string(kOp) + ": dtype must be bfloat16 or float16 on CUDA");
}

}  // namespace nsa::cuda
