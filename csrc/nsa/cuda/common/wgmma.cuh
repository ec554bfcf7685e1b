// Hopper warpgroup matrix products (wgmma.mma_async, sm_90a only) for the attention kernels.
//
// A warpgroup (4 consecutive warps, the first a multiple of 4) computes a 64-row product; warp w
// of it holds rows 16w .. 16w + 15 of the accumulator in the mma.sync C-fragment layout
// (mma.cuh): d[j] = columns 8j .. 8j + 7, so the softmax code of the mma.sync kernels applies
// unchanged, and c_to_a (tiles.cuh) turns C fragments into the A-register operand.
//
// Shared-memory operands are given by descriptors of Layout::kWgmma tiles: K-major (the reduction
// dimension along the tile's columns) or MN-major (along its rows, transposed by the instruction);
// the layout and the descriptor fields are in wgmma_layout.h.
// Ordering: wgmma_fence() before the first product that reads registers (accumulators, A) written
// by ordinary code; commit, then wait before reading the results; shared memory written by
// ordinary stores or cp.async needs fence_proxy_async() in each writing thread before the barrier
// that publishes it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "mma.cuh"
#include "wgmma_layout.h"

namespace nsa::cuda {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NSA_WGMMA 1
#else
#define NSA_WGMMA 0  // host pass or a target without wgmma: the device functions trap
#endif

// Descriptor of a 128-byte-swizzled shared-memory operand starting at p (see above).
__device__ __forceinline__ uint64_t wgmma_desc(const void* p, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  const uint32_t a = smem_addr(p);
  return uint64_t((a & 0x3FFFF) >> 4) | (uint64_t((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo_bytes >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ void wgmma_fence() {
#if NSA_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if NSA_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if NSA_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Descriptors of k-step kk of a Layout::kWgmma tile of ROWS rows (wgmma_layout.h): K-major (rows =
// the output dimension, e.g. Q or K for S = Q K^T) and MN-major (rows = the reduction dimension,
// e.g. V [keys][Dv] for O += P V).
template <int ROWS, typename T>
__device__ __forceinline__ uint64_t kmajor_desc(const T* tile, int kk) {
  const WgmmaOperand o = kmajor_operand(ROWS, kk);
  return wgmma_desc(tile + o.start, o.lbo, o.sbo);
}
// kmajor_desc<ROWS>(tile, kk) as kmajor_desc<ROWS>(tile, 0) + kmajor_step<ROWS, T>(kk): the steps
// differ only in their start address (in 16-byte units, far below the field's 2^14), so a loop
// over kk adds constants instead of rebuilding each descriptor.
template <int ROWS, typename T>
__device__ __forceinline__ uint64_t kmajor_step(int kk) {
  return uint64_t(kmajor_operand(ROWS, kk).start * int(sizeof(T)) / 16);
}
template <int ROWS, typename T>
__device__ __forceinline__ uint64_t mnmajor_desc(const T* tile, int kk) {
  const WgmmaOperand o = mnmajor_operand(ROWS, kk);
  return wgmma_desc(tile + o.start, o.lbo, o.sbo);
}
// mnmajor_desc<ROWS>(tile, kk) as mnmajor_desc<ROWS>(tile, 0) + mnmajor_step<ROWS, T>(kk) (the
// same reasoning as kmajor_step).
template <int ROWS, typename T>
__device__ __forceinline__ uint64_t mnmajor_step(int kk) {
  return uint64_t(mnmajor_operand(ROWS, kk).start * int(sizeof(T)) / 16);
}

// Traps unless the dynamic shared memory at smem starts on a 1024-byte boundary: the descriptors
// (base offset 0) assume the tiles' swizzle atoms do.
__device__ __forceinline__ void wgmma_check_alignment(const void* smem) {
  if ((smem_addr(smem) & 1023u) != 0u) __trap();
}

// Keeps the compiler from moving accumulator registers across the asynchronous products (call on
// every accumulator after wgmma_fence's issue point and after the wait).
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}

// Issues the products of issue() (which write the accumulators accs) between the fences and
// waits for them: the one pattern of every wgmma step of the kernels.
template <typename Issue, typename... Acc>
__device__ __forceinline__ void wgmma_run(Issue&& issue, Acc&... accs) {
  (wgmma_fence_operands(accs), ...);
  wgmma_fence();
  issue();
  wgmma_commit();
  wgmma_wait<0>();
  (wgmma_fence_operands(accs), ...);
}

// Makes this thread's generic-proxy writes to shared memory (stores, cp.async after its wait)
// visible to the async proxy (wgmma operand reads); then a barrier.
__device__ __forceinline__ void fence_proxy_async() {
#if NSA_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// The products used: N = 64 (S = Q K^T over 64 keys; O += P V for Dv = 64) and N = 128 (O += P V
// for Dv = 128; the block selection's S^T = K Q^T over 128 query rows).
template <int N, typename T>
__device__ void wgmma_ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b, bool accumulate);
template <int N, typename T>
__device__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate);

// The asm of each shape is written once and stamped out per element type (TN: its PTX name).
// wgmma_ss<N>: d (64 x N, this warp's rows) {=, +=} A B, A [64][16] and B [N][16] K-major in shared
// memory (N = 64, 128). wgmma_rs<N>: the same with A this warp's 16 x 16 A fragment in registers and B [16][N]
// MN-major in shared memory (transposed by the instruction). Targets without wgmma trap.
#if NSA_WGMMA
// The accumulator operands (64 x N, this warp's d[N / 8][4]) of the asm below.
#define NSA_WGMMA_D64                                                                                   \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),             \
      "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),         \
      "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),         \
      "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),         \
      "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),         \
      "+f"(d[7][2]), "+f"(d[7][3])
#define NSA_WGMMA_D128                                                                                  \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),             \
      "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),         \
      "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),         \
      "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),         \
      "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),         \
      "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),         \
      "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]),       \
      "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]),                   \
      "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),                   \
      "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]),                   \
      "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]),                   \
      "+f"(d[15][2]), "+f"(d[15][3])
#define NSA_WGMMA_SS64(T, TN)                                                                       \
  template <>                                                                                       \
  __device__ __forceinline__ void wgmma_ss<64, T>(float (&d)[8][4], uint64_t desc_a,                \
                                                 uint64_t desc_b, bool accumulate) {                \
    asm volatile(                                                                                   \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TN "." TN                                     \
        " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                   \
        " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31},"         \
        " %32, %33, p, 1, 1, 0, 0;\n}\n"                                                            \
        : NSA_WGMMA_D64                                                                             \
        : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)));                                          \
  }
#define NSA_WGMMA_RS64(T, TN)                                                                       \
  template <>                                                                                       \
  __device__ __forceinline__ void wgmma_rs<64, T>(float (&d)[8][4], const uint32_t (&a)[4],         \
                                                 uint64_t desc_b, bool accumulate) {                \
    asm volatile(                                                                                   \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TN "." TN                                     \
        " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                   \
        " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31},"         \
        " {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                              \
        : NSA_WGMMA_D64                                                                             \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)));           \
  }
#define NSA_WGMMA_RS128(T, TN)                                                                            \
  template <>                                                                                             \
  __device__ __forceinline__ void wgmma_rs<128, T>(float (&d)[16][4], const uint32_t (&a)[4],             \
                                                 uint64_t desc_b, bool accumulate) {                      \
    asm volatile(                                                                                         \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                      \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TN "." TN                                          \
        " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                         \
        " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"                \
        " %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"                \
        " %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63},"               \
        " {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                                    \
        : NSA_WGMMA_D128                                                                                  \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)));                 \
  }
#define NSA_WGMMA_SS128(T, TN)                                                                            \
  template <>                                                                                             \
  __device__ __forceinline__ void wgmma_ss<128, T>(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b,   \
                                                  bool accumulate) {                                      \
    asm volatile(                                                                                         \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                      \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TN "." TN                                          \
        " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                         \
        " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"                \
        " %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"                \
        " %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63},"               \
        " %64, %65, p, 1, 1, 0, 0;\n}\n"                                                                  \
        : NSA_WGMMA_D128                                                                                  \
        : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)));                                                \
  }
#else
#define NSA_WGMMA_SS64(T, TN)                                                                     \
  template <>                                                                                     \
  __device__ __forceinline__ void wgmma_ss<64, T>(float (&)[8][4], uint64_t, uint64_t, bool) {      \
    __trap();                                                                                     \
  }
#define NSA_WGMMA_RS64(T, TN)                                                                     \
  template <>                                                                                     \
  __device__ __forceinline__ void wgmma_rs<64, T>(float (&)[8][4], const uint32_t (&)[4], uint64_t, \
                                                  bool) {                                         \
    __trap();                                                                                     \
  }
#define NSA_WGMMA_RS128(T, TN)                                                                    \
  template <>                                                                                     \
  __device__ __forceinline__ void wgmma_rs<128, T>(float (&)[16][4], const uint32_t (&)[4],         \
                                                   uint64_t, bool) {                              \
    __trap();                                                                                     \
  }
#define NSA_WGMMA_SS128(T, TN)                                                                    \
  template <>                                                                                     \
  __device__ __forceinline__ void wgmma_ss<128, T>(float (&)[16][4], uint64_t, uint64_t, bool) {  \
    __trap();                                                                                     \
  }
#endif

NSA_WGMMA_SS64(__nv_bfloat16, "bf16")
NSA_WGMMA_SS64(__half, "f16")
NSA_WGMMA_RS64(__nv_bfloat16, "bf16")
NSA_WGMMA_RS64(__half, "f16")
NSA_WGMMA_RS128(__nv_bfloat16, "bf16")
NSA_WGMMA_RS128(__half, "f16")
NSA_WGMMA_SS128(__nv_bfloat16, "bf16")
NSA_WGMMA_SS128(__half, "f16")
#undef NSA_WGMMA_SS64
#undef NSA_WGMMA_RS64
#undef NSA_WGMMA_RS128
#undef NSA_WGMMA_SS128
#undef NSA_WGMMA_D64
#undef NSA_WGMMA_D128

}  // namespace nsa::cuda
