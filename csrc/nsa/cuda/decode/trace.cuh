// The decoding step's phase trace (DecodePlan::trace, set by nsa_torch._debug.decode_trace): where
// a step's time goes, kernel by kernel and phase by phase, as the graph-replay timeline cannot
// say. Thread 0 of each thread block stores the global timer (ns) when a phase ends, at
// trace[(kernel * trace_blocks + block) * kTraceEvents + event] (block: the grid's linear index;
// blocks past trace_blocks store nothing). A phase a block skips (an invalid sequence, a split
// without tiles) stays as the caller left it.
#pragma once

#include <cstdint>

#include "../../params.h"

namespace nsa::cuda::decode {

// In launch order but for W's, after or before A's (plan.window_order); as
// nsa_torch._debug.TRACE_KERNELS.
enum TraceKernel : int {
  kTraceWindow = 0,
  kTraceScan = 1,
  kTraceSelect = 2,
  kTraceSparse = 3,
  kTraceCombine = 4,
  kTraceKernels = 5
};
// kTraceWaited: past wait_prior_grid (W: at its end, or after its count when launched after B;
// B, C; D: past its last wait). kTraceStep1: A's first key tile landed (with the query rows), B's
// lse done, W's and C's first key tile landed, D past its wait for A and W. kTraceStep2: A's key
// tiles done (scan_order keys_first; before its count in key_done), B's candidates scored and
// ranked (before it publishes), C's union of chosen blocks built. kTraceMid: A's key loop done,
// B's list published and counted, D's splits merged. kTraceEnd: the block's last phase done (A: past its wait, after
// writing its partials).
enum TraceEvent : int {
  kTraceStart = 0,
  kTraceWaited = 1,
  kTraceStep1 = 2,
  kTraceStep2 = 3,
  kTraceMid = 4,
  kTraceEnd = 5,
  kTraceEvents = 6
};

__device__ __forceinline__ void trace_event(const DecodePlan& plan, TraceKernel kernel, TraceEvent event) {
  if (plan.trace == nullptr || threadIdx.x != 0) return;
  const long long block = blockIdx.x + (long long)gridDim.x * (blockIdx.y + (long long)gridDim.y * blockIdx.z);
  if (block >= plan.trace_blocks) return;
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  plan.trace[((long long)kernel * plan.trace_blocks + block) * kTraceEvents + event] = now;
}

}  // namespace nsa::cuda::decode
