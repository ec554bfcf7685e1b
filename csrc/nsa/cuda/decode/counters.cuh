// The decoding step's counters (decode.h's workspace): kernel B counts its splits per query, and
// each (sequence, KV head) counts its blocks done of kernels A, W and C and its queries selected
// (B), so that under plan.dep_wait = head B waits for its head's scan rather than for all of A,
// C for its head's selection rather than for all of B, and D for its heads' blocks of A and W,
// then of B and C, rather than for all of C. Kernel Z (decode.cu) zeroes them at the start of
// every step.
//
// Why waiting on a counter cannot hang: a kernel launched with programmatic dependent launch
// starts only once every block of the kernel before it has started (each calls allow_next_grid()
// first), so every block a counter waits for is already running or done when the first waiter
// starts; launched plainly, the kernel before it has completed.
#pragma once

#include "decode.h"
#include "tile_attention.cuh"

namespace nsa::cuda::decode {

// Release and acquire at GPU scope (one thread of the block, after or before a barrier): a
// sequentially consistent __threadfence() in every thread is not needed for that, and costs more.
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;\n" ::: "memory"); }

// Counts the block's writes done: every thread's writes before the barrier, then thread 0's
// release and increment (cumulativity makes the other threads' writes visible with it). Not
// inlined: inlined at the end of kernel C with D = 256, it made the key loop spill.
inline __device__ __noinline__ void count_done(unsigned* counter) {
  __syncthreads();
  if (threadIdx.x == 0) {
    fence_acq_rel_gpu();
    atomicAdd(counter, 1u);
  }
}

// One thread: returns once *counter >= target, acquiring the writes counted.
__device__ __forceinline__ void spin_until(const unsigned* counter, unsigned target) {
  unsigned seen;
  while (true) {
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(seen) : "l"(counter) : "memory");
    if (seen >= target) return;
    __nanosleep(64);
  }
}

// Returns once *counter >= target, every thread of the block ordered after the writes counted
// (thread 0 acquires, then the barrier). The waiter reads the counted data through L2 (__ldcg).
__device__ __forceinline__ void wait_count(const unsigned* counter, unsigned target) {
  if (threadIdx.x == 0) spin_until(counter, target);
  __syncthreads();
}

// Kernels B and C: waits for their inputs, on their head's counter reaching target (dep_wait =
// head), else for the whole previous grid.
__device__ __forceinline__ void wait_inputs(const DecodePlan& plan, const unsigned* counter, unsigned target) {
  if (plan.dep_wait == DepWait::kHead) wait_count(counter, target);
  else wait_prior_grid();
}

}  // namespace nsa::cuda::decode
