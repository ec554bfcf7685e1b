// The kernel plan: which CUDA kernel each op call runs, as a pure function of the op's params
// (shape), the GPU's facts (architecture, SM count, shared memory) and explicit overrides (the
// private nsa_torch._debug.force). Host-only and free of the CUDA runtime, so that the C++ tests
// say which kernel each shape gets without a GPU. The binding (csrc/torch/kernel_plan.cpp) calls
// it and stores the result in the params' `plan`; the CUDA entry points read only that.
//
// Keys and values of the overrides (and of a plan's description):
//   fwd             wgmma | wide | mma      forward of the compressed and window branches
//   bwd             wgmma | mma             dQ and dK/dV of every branch
//   slc_fwd         warp | union | blocks   forward of the selected branch; warp and union also
//                                           pick the selected dQ's kernel when it runs by tokens
//   slc_dq          tokens | blocks         dQ of the selected branch
//   select          wgmma | mma             select_blocks
//   split_tokens    int >= 0                tokens per dK/dV split range (0: no split)
//   slc_chunk_rows  int >= 1                rows per chunk of the selected branch by blocks
//   cmp_splits      int in [1, 65535]       decode_attention: thread blocks per (sequence, KV head)
//                                           over the compressed tokens
//   slc_splits      int in [1, 65535]       decode_attention: thread blocks per (sequence, KV head)
//                                           over the selected and window keys
//   sel_splits      int in [1, 64]          decode_attention: thread blocks per (query, KV head)
//                                           over the candidate blocks of the top-n selection
//   window_order    after_scan | before_scan | after_select
//                                           decode_attention: the window kernel's launch
//   scan_order      together | keys_first   decode_attention: the compressed scan's tiles
//   dep_wait        grid | head             decode_attention: what the selection, the selected
//                                           branch and the merge wait for (the previous kernel,
//                                           or their head's producers)
// An override the shape or GPU cannot take makes the plan function throw std::invalid_argument
// naming the key, the value and why; it never falls back silently.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "params.h"

namespace nsa {

// Keys per key tile of the CUDA attention kernels (kKeys in cuda/attn/branch.cuh, which asserts
// that they agree): the selected branch's partials by blocks are per tile.
inline constexpr int kPlanKeyTile = 64;
// Tokens per dK/dV split range unless overridden.
inline constexpr index_t kDefaultSplitTokens = 4096;
// The selected branch by blocks keeps one chunk's partials under this many bytes.
inline constexpr size_t kSlcPartialBytes = size_t(2) << 30;
// A decode step aims at this many thread blocks per SM in each of its long kernels (the
// compressed scan; the window and selected attention, counted together), each split taking at least
// kDecodeMinTiles key tiles.
inline constexpr int kDecodeBlocksPerSm = 2;
inline constexpr int kDecodeMinTiles = 2;
// Its top-n selection aims at kSelectBlocksPerSm thread blocks per SM over all (query, KV head)
// units, each scoring at least kSelectMinBlocks candidate blocks, in at most kMaxSelectSplits
// splits (the last thread block merges the splits' lists).
inline constexpr int kSelectBlocksPerSm = 4;
inline constexpr int kSelectMinBlocks = 128;
inline constexpr int kMaxSelectSplits = 64;
// Its scan takes each split's keys before its values only where the SMs hold at least this many
// scan blocks per (sequence, KV head, row block) unit: few units, a step of latency-bound phases.
inline constexpr int kKeysFirstBlocksPerUnit = 16;

// Explicit choices; an empty field leaves the choice to the plan.
struct PlanOverrides {
  std::optional<FwdKernel> fwd;
  std::optional<BwdKernel> bwd;
  std::optional<SlcKernel> slc_fwd;
  std::optional<bool> slc_dq_blocks;  // slc_dq: blocks (true) or tokens (false)
  std::optional<SelectKernel> select;
  std::optional<index_t> split_tokens;
  std::optional<index_t> slc_chunk_rows;
  std::optional<int> cmp_splits;
  std::optional<int> slc_splits;
  std::optional<int> sel_splits;
  std::optional<WindowOrder> window_order;
  std::optional<ScanOrder> scan_order;
  std::optional<DepWait> dep_wait;
  // Not a force key: decode_attention's phase timestamps (nsa_torch._debug.decode_trace), a device
  // buffer of DecodePlan::trace's shape, or nullptr.
  uint64_t* decode_trace = nullptr;
  int decode_trace_blocks = 0;
};

// Sets one override from its key and value (a kernel name, or an int for split_tokens,
// slc_chunk_rows and the decode splits). Throws std::invalid_argument for an unknown key, a
// value of the wrong kind or out of range, naming the key, the value and what is accepted.
void set_override(PlanOverrides& o, const std::string& key, const std::string& value);
void set_override(PlanOverrides& o, const std::string& key, int64_t value);

// The keys above, in order, and the accepted names of a kernel key (empty for the int keys).
const std::vector<std::string>& plan_keys();
const std::vector<std::string>& plan_values(const std::string& key);

enum class Pass : int32_t { kFwd, kBwd };

// The plans of the three attention branches and of the block selection. Throw
// std::invalid_argument (message starting with the op name) when an override cannot run here.
AttnPlan plan_cmp(const CmpParams& p, Pass pass, const DeviceFacts& dev, const PlanOverrides& o);
AttnPlan plan_slc(const SlcParams& p, Pass pass, const DeviceFacts& dev, const PlanOverrides& o);
AttnPlan plan_swa(const SwaParams& p, Pass pass, const DeviceFacts& dev, const PlanOverrides& o);
TopkPlan plan_select(const TopkParams& p, const DeviceFacts& dev, const PlanOverrides& o);
// The split of a decode step (DecodePlan): from the capacity, never the lengths (graph capture).
// By default each of its long kernels gets about kDecodeBlocksPerSm thread blocks per SM over all
// (sequence, KV head, row block) units, and no split fewer than kDecodeMinTiles key tiles of the
// longest step the cache allows, and its selection as kSelectBlocksPerSm and kSelectMinBlocks
// say; overrides of the splits are taken as given.
DecodePlan plan_decode(const DecodeParams& p, const DeviceFacts& dev, const PlanOverrides& o);

// What a plan chose, as (key, value) items in the vocabulary above plus split (split ranges),
// arch and num_sms: what nsa_torch._debug.plans() records. Only the keys that matter to the op
// call are listed (e.g. fwd for a forward of the compressed branch).
struct PlanItem {
  std::string key;
  std::string name;    // the kernel's name, or empty for a number
  int64_t number = 0;  // split_tokens, split, slc_chunk_rows, cmp_splits, cmp_chunk, slc_splits,
                       // sel_splits, combine_wpr, arch, num_sms
};
enum class AttnBranch : int32_t { kCmp, kSlc, kSwa };
std::vector<PlanItem> describe(const AttnPlan& plan, AttnBranch branch, Pass pass);
std::vector<PlanItem> describe(const TopkPlan& plan);
// cmp_splits, cmp_chunk, slc_splits, sel_splits, window_order, dep_wait, combine_wpr (kernel D's
// warps per row, which follow from the splits), arch, num_sms.
std::vector<PlanItem> describe(const DecodePlan& plan);

}  // namespace nsa
