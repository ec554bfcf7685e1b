// Which kernel the host launches where there is a choice: the defaults and the NSA_CUDA_*_KERNEL
// environment switches that override them (for comparing kernels on a GPU; they never change
// what is computed).
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "../head_dims.h"
#include "branch.cuh"

namespace nsa::cuda {

// Does environment variable `var` equal `value`? (The NSA_CUDA_*_KERNEL switches.)
inline bool env_is(const char* var, const char* value) {
  const char* env = std::getenv(var);
  return env && std::strcmp(env, value) == 0;
}

// Is the current device an sm_90 (Hopper) GPU, the one target of the wgmma kernels?
inline bool device_is_sm90() {
  int dev = 0, major = 0, minor = 0;
  return cudaGetDevice(&dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess && major == 9 &&
         minor == 0;
}

// Which forward kernel runs a contiguous branch with D, DV <= 128: attn_fwd_wgmma_kernel
// (fwd_wgmma.cuh; one stage of V) on sm_90 for D, DV in {64, 128}, else the wide one (fwd_wide.cuh, 32 rows per warp);
// NSA_CUDA_FWD_KERNEL=wgmma_kv2 forces the warpgroup kernel with two stages of V, =wide or
// =narrow (attn_fwd_kernel, 16 rows per warp) an mma.sync kernel. The selected branch and
// D > 128 always take attn_fwd_kernel.
enum class FwdKind { kNarrow, kWide, kWgmma, kWgmmaKv2 };

template <Branch B>
inline FwdKind fwd_kind(int head_dim, int head_dim_v) {
  if (B == Branch::kSlc || head_dim > 128 || head_dim_v > 128) return FwdKind::kNarrow;
  if (env_is("NSA_CUDA_FWD_KERNEL", "narrow")) return FwdKind::kNarrow;
  if (env_is("NSA_CUDA_FWD_KERNEL", "wide") || !wgmma_head_dims(head_dim, head_dim_v) || !device_is_sm90())
    return FwdKind::kWide;
  return env_is("NSA_CUDA_FWD_KERNEL", "wgmma_kv2") ? FwdKind::kWgmmaKv2 : FwdKind::kWgmma;
}

// Do the dQ and dK/dV kernels run on warpgroup products? On sm_90 for D, DV in {64, 128}, unless
// NSA_CUDA_BWD_KERNEL=mma forces the mma.sync kernels.
inline bool bwd_wgmma(int head_dim, int head_dim_v) {
  return wgmma_head_dims(head_dim, head_dim_v) && !env_is("NSA_CUDA_BWD_KERNEL", "mma") && device_is_sm90();
}

// The selected branch's per-warp forward and dq kernels (slc_warp.cuh) are used below this
// group size; NSA_CUDA_SLC_KERNEL=union or =warp forces one
// kind (for comparing them on a GPU).
inline bool slc_per_warp(int group) {
  if (env_is("NSA_CUDA_SLC_KERNEL", "union")) return false;
  if (env_is("NSA_CUDA_SLC_KERNEL", "warp")) return true;
  return group < 64;
}

// Keys per sub-tile of the per-warp kernels (slc_warp.cuh): 16 (half the shared memory of 32,
// twice the warps per SM for a latency-bound kernel) unless NSA_CUDA_SLC_WARP_KEYS=32.
inline int slc_warp_keys() { return env_is("NSA_CUDA_SLC_WARP_KEYS", "32") ? 32 : 16; }
// Their stages of K and V with 16-key sub-tiles: 2 unless NSA_CUDA_SLC_WARP_STAGES=3 (two loads
// in flight per warp, fewer warps per SM; an experiment for the L2 latency that the per-warp
// forward waits on, slower at 64k, G = 16: forward 17.0 against 15.4 ms).
inline int slc_warp_stages() { return env_is("NSA_CUDA_SLC_WARP_STAGES", "3") ? 3 : 2; }

// Does the selected branch's forward (var = NSA_CUDA_SLC_FWD_KERNEL) or dQ (var =
// NSA_CUDA_SLC_DQ_KERNEL) run by blocks (slc_blocks.cuh: each key tile read once, partial results
// per (row, slot) merged in slot order) instead of by tokens? On sm_90 for D, DV in {64, 128} and G < 16,
// where the per-token kernels are bound by re-reading K and V from L2 (64k, G = 4: forward 70.2 ->
// 29.2 ms; forward+backward with dQ by blocks 114.6 -> 83.9; at G = 16 both are slower by blocks,
// forward 18.4 -> 32.2, forward+backward 55.3 -> 76.3); var=blocks or =tokens forces one (blocks
// still needs sm_90 and D, DV in {64, 128}; slc.cu also keeps select_size within [32, 256], which bounds
// the partials per row).
inline bool slc_by_blocks(const char* var, int group, int head_dim, int head_dim_v) {
  if (!wgmma_head_dims(head_dim, head_dim_v) || env_is(var, "tokens") || !device_is_sm90()) return false;
  return env_is(var, "blocks") || group < 16;
}
inline bool slc_fwd_by_blocks(int group, int head_dim, int head_dim_v) {
  return slc_by_blocks("NSA_CUDA_SLC_FWD_KERNEL", group, head_dim, head_dim_v);
}
inline bool slc_dq_by_blocks(int group, int head_dim, int head_dim_v) {
  return slc_by_blocks("NSA_CUDA_SLC_DQ_KERNEL", group, head_dim, head_dim_v);
}

// Does the block selection run select_topk_wgmma_kernel (topk/topk_wgmma.cuh: S^T = K Q^T on
// wgmma for 128 query rows per thread block)? On sm_90 for D in {64, 128} and G = 16 or 32 (64k:
// G = 16 13.05 -> 10.95 ms; G = 4 27.1 -> 42.7, its 8 tokens per warp score and merge on 4 warps
// where the mma.sync kernel has 8; G = 32, one token per warp, is tested but not yet timed);
// NSA_CUDA_SELECT_KERNEL=wgmma forces it for any power of two G in [4, 32], =mma forces
// select_topk_kernel (mma.sync), the kernel everywhere else.
inline bool select_wgmma(int group, int head_dim) {
  const bool shape = wgmma_head_dim(head_dim) && group >= 4 && group <= 32 && (group & (group - 1)) == 0;
  if (!shape || env_is("NSA_CUDA_SELECT_KERNEL", "mma") || !device_is_sm90()) return false;
  return group >= 16 || env_is("NSA_CUDA_SELECT_KERNEL", "wgmma");
}

}  // namespace nsa::cuda
