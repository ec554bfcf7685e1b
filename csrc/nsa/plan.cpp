// The kernel plan (plan.h): defaults and the checks of overrides. The defaults are the kernels that
// won the measurements of benchmarks/NOTES.md on sm_90; other GPUs get the mma.sync kernels.
#include "plan.h"

#include <algorithm>
#include <climits>
#include <stdexcept>

#include "cuda/decode/choices.h"
#include "cuda/decode/shape.h"
#include "cuda/head_dims.h"

namespace nsa {
namespace {

constexpr const char* kForce = "nsa_torch._debug.force";
// The most thread blocks per (sequence, KV head) a decode override may ask for (a grid dimension).
constexpr int64_t kMaxDecodeSplits = 65535;

const std::vector<std::string> kFwdNames = {"wgmma", "wide", "mma"};     // FwdKernel order
const std::vector<std::string> kBwdNames = {"wgmma", "mma"};             // BwdKernel order
const std::vector<std::string> kSlcNames = {"warp", "union", "blocks"};  // SlcKernel order
const std::vector<std::string> kSlcDqNames = {"tokens", "blocks"};
const std::vector<std::string> kSelectNames = {"wgmma", "mma"};          // SelectKernel order
const std::vector<std::string> kWindowOrderNames = {"after_scan", "before_scan", "after_select"};  // WindowOrder
const std::vector<std::string> kScanOrderNames = {"together", "keys_first"};  // ScanOrder order
const std::vector<std::string> kDepWaitNames = {"grid", "head"};  // DepWait order
const std::vector<std::string> kNoNames;

const std::string& name_of(FwdKernel k) { return kFwdNames[size_t(k)]; }
const std::string& name_of(BwdKernel k) { return kBwdNames[size_t(k)]; }
const std::string& name_of(SlcKernel k) { return kSlcNames[size_t(k)]; }
const std::string& name_of(SelectKernel k) { return kSelectNames[size_t(k)]; }
const std::string& name_of(WindowOrder k) { return kWindowOrderNames[size_t(k)]; }
const std::string& name_of(DepWait k) { return kDepWaitNames[size_t(k)]; }
const std::string& name_of(ScanOrder k) { return kScanOrderNames[size_t(k)]; }

std::string quoted_list(const std::vector<std::string>& names) {
  std::string s;
  for (const std::string& n : names) s += (s.empty() ? "\"" : ", \"") + n + "\"";
  return s;
}

// Index of `value` in names, or throws naming the key and the accepted values.
size_t pick(const std::string& key, const std::string& value, const std::vector<std::string>& names) {
  const auto it = std::find(names.begin(), names.end(), value);
  if (it == names.end())
    throw std::invalid_argument(std::string(kForce) + ": " + key + "=\"" + value + "\" is not a kernel; expected one of " +
                                quoted_list(names));
  return size_t(it - names.begin());
}

[[noreturn]] void unknown_key(const std::string& key) {
  std::string keys;
  for (const std::string& k : plan_keys()) keys += (keys.empty() ? "" : ", ") + k;
  throw std::invalid_argument(std::string(kForce) + ": unknown key \"" + key + "\"; expected one of " + keys);
}

int group_of(int num_heads, int num_heads_k) { return num_heads_k > 0 ? num_heads / num_heads_k : 0; }

std::string arch_str(const DeviceFacts& dev) { return "sm_" + std::to_string(dev.arch); }

// Why a kernel cannot run here, or "" when it can.
std::string needs_sm90(const DeviceFacts& dev) {
  return dev.arch == 90 ? "" : "needs an sm_90 GPU, this one is " + arch_str(dev);
}
// The warpgroup kernels take D, Dv in {64, 128} (cuda/head_dims.h).
std::string needs_wgmma_dims(const AttnParams& p) {
  if (cuda::wgmma_head_dims(p.head_dim, p.head_dim_v)) return "";
  return "needs D, Dv in {64, 128}, got D = " + std::to_string(p.head_dim) + ", Dv = " + std::to_string(p.head_dim_v);
}
std::string wgmma_reason(const AttnParams& p, const DeviceFacts& dev) {
  std::string why = needs_sm90(dev);
  return why.empty() ? needs_wgmma_dims(p) : why;
}

std::string fwd_reason(FwdKernel k, const AttnParams& p, const DeviceFacts& dev) {
  if (k == FwdKernel::kWgmma) return wgmma_reason(p, dev);
  if (k == FwdKernel::kWide && (p.head_dim > 128 || p.head_dim_v > 128))
    return "needs D, Dv <= 128, got D = " + std::to_string(p.head_dim) + ", Dv = " + std::to_string(p.head_dim_v);
  return "";
}

// The selected branch by blocks: the warpgroup kernels' dims, and select_size within [32, 256],
// which bounds the partials per row.
std::string slc_blocks_reason(const SlcParams& p, const DeviceFacts& dev) {
  std::string why = wgmma_reason(p, dev);
  if (why.empty() && (p.select_size < 32 || p.select_size > 256))
    why = "needs select_size in [32, 256], got " + std::to_string(p.select_size);
  return why;
}

std::string slc_reason(SlcKernel k, const SlcParams& p, const DeviceFacts& dev) {
  if (k == SlcKernel::kBlocks) return slc_blocks_reason(p, dev);
  const int G = group_of(p.num_heads, p.num_heads_k);
  // From G = 64 on, one thread block of the union kernels is one token: the per-warp loop already.
  if (k == SlcKernel::kWarp && G >= 64) return "needs a group size G < 64, got G = " + std::to_string(G);
  return "";
}

// Throws for a forced kernel that cannot run (why non-empty).
void refuse_if(const std::string& why, const char* op, const char* key, const std::string& value) {
  if (!why.empty())
    throw std::invalid_argument(std::string(op) + ": " + kForce + "(" + key + "=\"" + value + "\") cannot run: " + why);
}

// The dK/dV split: ranges of split_tokens tokens (up to 16) for the long key tiles of the
// compressed and selected branches; the window branch's key tiles see at most window_size + 63
// queries and are never split.
void plan_split(AttnPlan& plan, AttnBranch branch, const AttnParams& p, const PlanOverrides& o) {
  plan.split_tokens = o.split_tokens.value_or(kDefaultSplitTokens);
  if (branch == AttnBranch::kSwa || plan.split_tokens <= 0) return;
  plan.split = int(std::min<index_t>(16, std::max<index_t>(1, p.seqs.seqlen / plan.split_tokens)));
}

AttnPlan plan_contiguous(AttnBranch branch, const char* op, const AttnParams& p, Pass pass,
                         const DeviceFacts& dev, const PlanOverrides& o) {
  AttnPlan plan;
  plan.device = dev;
  const bool wgmma = wgmma_reason(p, dev).empty();
  if (pass == Pass::kFwd) {
    if (o.fwd) {
      refuse_if(fwd_reason(*o.fwd, p, dev), op, "fwd", name_of(*o.fwd));
      plan.fwd = *o.fwd;
    } else {
      plan.fwd = wgmma ? FwdKernel::kWgmma : fwd_reason(FwdKernel::kWide, p, dev).empty() ? FwdKernel::kWide
                                                                                            : FwdKernel::kMma;
    }
    return plan;
  }
  if (o.bwd) {
    if (*o.bwd == BwdKernel::kWgmma) refuse_if(wgmma_reason(p, dev), op, "bwd", name_of(*o.bwd));
    plan.bwd = *o.bwd;
  } else {
    plan.bwd = wgmma ? BwdKernel::kWgmma : BwdKernel::kMma;
  }
  plan_split(plan, branch, p, o);
  return plan;
}

// Rows per chunk of the selected branch by blocks: as many as keep a chunk's partials (per row,
// HQ x slots of Dv outputs in 16 bits and an fp32 lse, or of D dQ values in bf16) under
// kSlcPartialBytes, unless overridden; within [1, rows].
index_t slc_chunk_rows(const SlcParams& p, bool dq, const PlanOverrides& o) {
  const index_t rows = index_t(p.seqs.batch) * p.seqs.seqlen;
  const size_t slots = size_t(std::max(0, p.num_selected)) * size_t((p.select_size + kPlanKeyTile - 1) / kPlanKeyTile);
  const size_t per_slot = dq ? size_t(p.head_dim) * 2 : size_t(p.head_dim_v) * 2 + sizeof(float);
  const size_t per_row = size_t(std::max(0, p.num_heads)) * slots * per_slot;
  index_t n = per_row ? index_t(kSlcPartialBytes / per_row) : rows;
  if (o.slc_chunk_rows) n = *o.slc_chunk_rows;
  return std::max<index_t>(1, std::min(rows, n));
}

// The accepted range [least, most] of an int key (most 0: unbounded), and its text for messages.
struct IntRange {
  int64_t least = 1, most = 0;
  bool holds(int64_t v) const { return v >= least && (most == 0 || v <= most); }
  std::string text() const {
    return most ? "in [" + std::to_string(least) + ", " + std::to_string(most) + "]" : ">= " + std::to_string(least);
  }
};
IntRange int_range(const std::string& key) {
  if (key == "split_tokens") return {0, 0};
  if (key == "cmp_splits" || key == "slc_splits") return {1, kMaxDecodeSplits};
  if (key == "sel_splits") return {1, kMaxSelectSplits};
  return {1, 0};
}

}  // namespace

const std::vector<std::string>& plan_keys() {
  static const std::vector<std::string> keys = {"fwd",        "bwd",          "slc_fwd",        "slc_dq",
                                                "select",     "split_tokens", "slc_chunk_rows", "cmp_splits",
                                                "slc_splits", "sel_splits",   "window_order",   "dep_wait",
                                                "scan_order"};
  return keys;
}

const std::vector<std::string>& plan_values(const std::string& key) {
  if (key == "fwd") return kFwdNames;
  if (key == "bwd") return kBwdNames;
  if (key == "slc_fwd") return kSlcNames;
  if (key == "slc_dq") return kSlcDqNames;
  if (key == "select") return kSelectNames;
  if (key == "window_order") return kWindowOrderNames;
  if (key == "dep_wait") return kDepWaitNames;
  if (key == "scan_order") return kScanOrderNames;
  if (key == "split_tokens" || key == "slc_chunk_rows" || key == "cmp_splits" || key == "slc_splits" ||
      key == "sel_splits")
    return kNoNames;
  unknown_key(key);
}

void set_override(PlanOverrides& o, const std::string& key, const std::string& value) {
  const std::vector<std::string>& names = plan_values(key);
  if (names.empty())
    throw std::invalid_argument(std::string(kForce) + ": " + key + "=\"" + value + "\": expected an int " +
                                int_range(key).text());
  const size_t i = pick(key, value, names);
  if (key == "fwd") o.fwd = FwdKernel(i);
  if (key == "bwd") o.bwd = BwdKernel(i);
  if (key == "slc_fwd") o.slc_fwd = SlcKernel(i);
  if (key == "slc_dq") o.slc_dq_blocks = names[i] == "blocks";
  if (key == "select") o.select = SelectKernel(i);
  if (key == "window_order") o.window_order = WindowOrder(i);
  if (key == "dep_wait") o.dep_wait = DepWait(i);
  if (key == "scan_order") o.scan_order = ScanOrder(i);
}

void set_override(PlanOverrides& o, const std::string& key, int64_t value) {
  if (!plan_values(key).empty())
    throw std::invalid_argument(std::string(kForce) + ": " + key + "=" + std::to_string(value) +
                                ": expected one of " + quoted_list(plan_values(key)));
  if (!int_range(key).holds(value))
    throw std::invalid_argument(std::string(kForce) + ": " + key + "=" + std::to_string(value) + ": expected an int " +
                                int_range(key).text());
  if (key == "split_tokens") o.split_tokens = value;
  if (key == "slc_chunk_rows") o.slc_chunk_rows = value;
  if (key == "cmp_splits") o.cmp_splits = int(value);
  if (key == "slc_splits") o.slc_splits = int(value);
  if (key == "sel_splits") o.sel_splits = int(value);
}

AttnPlan plan_cmp(const CmpParams& p, Pass pass, const DeviceFacts& dev, const PlanOverrides& o) {
  return plan_contiguous(AttnBranch::kCmp, "nsa.compressed_attention", p, pass, dev, o);
}

AttnPlan plan_swa(const SwaParams& p, Pass pass, const DeviceFacts& dev, const PlanOverrides& o) {
  return plan_contiguous(AttnBranch::kSwa, "nsa.sliding_window_attention", p, pass, dev, o);
}

// The selected branch: by blocks on sm_90 below G = 16, where the per-token kernels are bound by
// re-reading K and V from L2 (from G = 16 on, by blocks is slower, benchmarks/NOTES.md); else the
// per-warp kernels below G = 64 and the union kernels from there on.
AttnPlan plan_slc(const SlcParams& p, Pass pass, const DeviceFacts& dev, const PlanOverrides& o) {
  constexpr const char* op = "nsa.selected_attention";
  AttnPlan plan;
  if (pass == Pass::kBwd) plan = plan_contiguous(AttnBranch::kSlc, op, p, pass, dev, o);  // bwd, split
  plan.device = dev;
  const int G = group_of(p.num_heads, p.num_heads_k);
  const bool empty = p.seqs.batch <= 0 || p.seqs.seqlen <= 0 || p.num_heads <= 0;
  const bool by_blocks = !empty && G < 16 && slc_blocks_reason(p, dev).empty();
  // The per-token kernel: slc_fwd's when it forces warp or union (for both passes), else by G.
  auto tokens_kernel = [&] {
    if (o.slc_fwd && *o.slc_fwd != SlcKernel::kBlocks) {
      refuse_if(slc_reason(*o.slc_fwd, p, dev), op, "slc_fwd", name_of(*o.slc_fwd));
      return *o.slc_fwd;
    }
    return G < 64 ? SlcKernel::kWarp : SlcKernel::kUnion;
  };
  if (pass == Pass::kFwd) {
    if (o.slc_fwd == SlcKernel::kBlocks) {
      refuse_if(slc_blocks_reason(p, dev), op, "slc_fwd", "blocks");
      plan.slc_fwd = SlcKernel::kBlocks;
    } else {
      plan.slc_fwd = o.slc_fwd || !by_blocks ? tokens_kernel() : SlcKernel::kBlocks;
    }
    if (plan.slc_fwd == SlcKernel::kBlocks) plan.slc_chunk_rows = slc_chunk_rows(p, false, o);
    return plan;
  }
  if (o.slc_dq_blocks.value_or(by_blocks)) {
    if (o.slc_dq_blocks) refuse_if(slc_blocks_reason(p, dev), op, "slc_dq", "blocks");
    plan.slc_dq = SlcKernel::kBlocks;
    plan.slc_chunk_rows = slc_chunk_rows(p, true, o);
  } else {
    plan.slc_dq = tokens_kernel();
  }
  return plan;
}

// select_topk_wgmma_kernel on sm_90 for D in {64, 128} and G in {16, 32}: there it scores 128 query
// rows per thread block. By default only while block_size / block_stride <= 512, which keeps its
// shared memory (the per-token window of compressed scores) within two blocks per SM at any
// num_selected; topk.cu refuses a forced shape that does not fit.
TopkPlan plan_select(const TopkParams& p, const DeviceFacts& dev, const PlanOverrides& o) {
  TopkPlan plan;
  plan.device = dev;
  const int G = group_of(p.num_heads, p.num_heads_k);
  std::string why = needs_sm90(dev);
  if (why.empty() && !cuda::wgmma_head_dim(p.head_dim))
    why = "needs D in {64, 128}, got D = " + std::to_string(p.head_dim);
  if (why.empty() && G != 16 && G != 32) why = "needs a group size G in {16, 32}, got G = " + std::to_string(G);
  if (o.select) {
    if (*o.select == SelectKernel::kWgmma) refuse_if(why, "nsa.select_blocks", "select", "wgmma");
    plan.select = *o.select;
  } else {
    const bool small_window = p.block_stride >= 1 && p.block_size / p.block_stride <= 512;
    plan.select = why.empty() && small_window ? SelectKernel::kWgmma : SelectKernel::kMma;
  }
  return plan;
}

namespace {
// Splits of `tiles` key tiles over thread blocks when `units` blocks run per split: enough for
// kDecodeBlocksPerSm blocks per SM, none below kDecodeMinTiles tiles, then as few as keep the
// tiles per split (so that the last split is not nearly empty); the override as given.
int decode_splits(index_t tiles, index_t units, const DeviceFacts& dev, const std::optional<int>& forced) {
  if (forced) return *forced;
  const index_t fill = std::max<index_t>(1, index_t(kDecodeBlocksPerSm) * std::max(1, dev.num_sms) / units);
  const index_t most = std::max<index_t>(1, tiles / kDecodeMinTiles);
  const index_t splits = std::min(fill, most);
  const index_t per = std::max<index_t>(1, (tiles + splits - 1) / splits);
  return int(std::max<index_t>(1, (tiles + per - 1) / per));
}

// Shared memory the GPU keeps per resident thread block (sm_80 on), beside what the block asks.
constexpr size_t kSmemPerBlockReserved = 1024;

// Shared memory of the scan with its keys first (cuda/decode/choices.h) for the plan's splits of
// up to cmp_chunk compressed tokens.
size_t keys_first_smem(const DecodeParams& p, const DecodePlan& plan) {
  const index_t per = plan.cmp_chunk / cuda::decode::kTileKeys;
  const int rows = 16 * cuda::decode::m_tiles(cuda::decode::group_rows(p));
  return cuda::decode::keys_first_layout(std::max(0, p.head_dim), std::max(0, p.head_dim_v), rows,
                                         int(std::min<index_t>(per, INT_MAX / 8192)))
      .bytes;
}

// Shared memory of a selection block (kernel B), static and dynamic.
size_t select_smem(const DecodeParams& p) {
  if (p.block_stride < 1 || p.block_size < 1 || p.select_size < 1) return cuda::decode::kSelectStaticBytes;
  const int cpr = p.block_size / p.block_stride, cpb = std::max(1, p.select_size / p.block_stride);
  const int G = cuda::decode::group_size(p);
  const int round = cuda::decode::select_round(G, cpb, cpr);
  return cuda::decode::kSelectStaticBytes +
         cuda::decode::select_smem_bytes(G, cuda::decode::select_round_tiles(round, cpb, cpr),
                                         cuda::decode::tile_slots(cpr, cpb));
}
}  // namespace

// The compressed scan splits the cache's compressed tiles (cmp_chunk: the most compressed tokens
// one split takes, at full capacity; the kernel spreads a step's actual tiles evenly over the
// splits); the window and selected kernels (W and C) share one split count, from the most key
// tiles a row block can have in both.
DecodePlan plan_decode(const DecodeParams& p, const DeviceFacts& dev, const PlanOverrides& o) {
  DecodePlan plan;
  plan.device = dev;
  const index_t units =
      index_t(std::max(1, p.batch)) * std::max(1, p.num_heads_k) * std::max(1, cuda::decode::row_blocks(p));
  const index_t tiles = cuda::decode::cmp_tiles(std::max<index_t>(0, p.cmp_capacity));
  plan.cmp_splits = decode_splits(tiles, units, dev, o.cmp_splits);
  plan.cmp_chunk = std::max<index_t>(1, (tiles + plan.cmp_splits - 1) / plan.cmp_splits) * cuda::decode::kTileKeys;
  index_t sparse = 0;
  if (p.select_size > 0 && p.num_selected > 0 && p.window_size > 0)
    sparse = cuda::decode::selected_tiles_max(p) + cuda::decode::window_tiles_max(p);
  plan.slc_splits = decode_splits(sparse, units, dev, o.slc_splits);
  // The scan's order: keys first where the step has few units (kKeysFirstBlocksPerUnit) and two
  // scan blocks and a selection block fit an SM's shared memory, else together. With few units the
  // selection, a chain of latency-bound phases, runs beside the scan's value tiles; with many the
  // step is bound by the memory's bandwidth, and a selection beside the scan slows both.
  const size_t keys_first_bytes = keys_first_smem(p, plan);
  const bool keys_first_fits = keys_first_bytes <= size_t(std::max(0, dev.smem_per_block));
  if (o.scan_order) {
    if (*o.scan_order == ScanOrder::kKeysFirst && !keys_first_fits)
      refuse_if("needs " + std::to_string(keys_first_bytes) + " bytes of shared memory per block, the GPU " +
                    "allows " + std::to_string(dev.smem_per_block),
                "nsa.decode_attention", "scan_order", "keys_first");
    plan.scan_order = *o.scan_order;
  } else {
    const size_t beside = 2 * (keys_first_bytes + kSmemPerBlockReserved) + select_smem(p) +
                          kSmemPerBlockReserved;
    const bool few_units = units * kKeysFirstBlocksPerUnit <= index_t(kDecodeBlocksPerSm) * std::max(1, dev.num_sms);
    plan.scan_order = few_units && keys_first_fits && beside <= size_t(std::max(0, dev.smem_per_sm))
                          ? ScanOrder::kKeysFirst
                          : ScanOrder::kTogether;
  }
  const bool keys_first = plan.scan_order == ScanOrder::kKeysFirst;
  // The selection: a thread block per (query, KV head) and split of the candidate blocks; after a
  // scan with its keys first, at most one selection block per SM (all beside the scan).
  if (o.sel_splits) {
    plan.sel_splits = *o.sel_splits;
  } else {
    const index_t queries = index_t(std::max(1, p.batch)) * std::max(1, p.num_heads_k) * std::max(1, p.num_queries);
    const index_t blocks = p.select_size > 0 ? (std::max<index_t>(1, p.capacity) + p.select_size - 1) / p.select_size : 1;
    const index_t per_sm = keys_first ? 1 : kSelectBlocksPerSm;
    const index_t fill = std::max<index_t>(1, per_sm * std::max(1, dev.num_sms) / queries);
    const index_t most = std::max<index_t>(1, blocks / kSelectMinBlocks);
    plan.sel_splits = int(std::min<index_t>(kMaxSelectSplits, std::min(fill, most)));
  }
  plan.window_order =
      o.window_order.value_or(keys_first ? WindowOrder::kAfterSelect : WindowOrder::kAfterScan);
  plan.dep_wait = o.dep_wait.value_or(DepWait::kHead);
  plan.trace = o.decode_trace;
  plan.trace_blocks = o.decode_trace_blocks;
  return plan;
}

namespace {
PlanItem named(const char* key, const std::string& name) { return PlanItem{key, name, 0}; }
PlanItem number(const char* key, int64_t n) { return PlanItem{key, "", n}; }
void add_device(std::vector<PlanItem>& items, const DeviceFacts& dev) {
  items.push_back(number("arch", dev.arch));
  items.push_back(number("num_sms", dev.num_sms));
}
}  // namespace

std::vector<PlanItem> describe(const AttnPlan& plan, AttnBranch branch, Pass pass) {
  std::vector<PlanItem> items;
  if (pass == Pass::kFwd) {
    if (branch != AttnBranch::kSlc) {
      items.push_back(named("fwd", name_of(plan.fwd)));
    } else {
      items.push_back(named("slc_fwd", name_of(plan.slc_fwd)));
      if (plan.slc_fwd == SlcKernel::kBlocks) items.push_back(number("slc_chunk_rows", plan.slc_chunk_rows));
    }
  } else {
    if (branch == AttnBranch::kSlc) {
      const bool blocks = plan.slc_dq == SlcKernel::kBlocks;
      items.push_back(named("slc_dq", blocks ? "blocks" : "tokens"));
      // Which per-token kernel computes dQ (the names of slc_fwd).
      if (!blocks) items.push_back(named("slc_tokens", name_of(plan.slc_dq)));
      if (blocks) items.push_back(number("slc_chunk_rows", plan.slc_chunk_rows));
    }
    items.push_back(named("bwd", name_of(plan.bwd)));
    if (branch != AttnBranch::kSwa) {
      items.push_back(number("split_tokens", plan.split_tokens));
      items.push_back(number("split", plan.split));
    }
  }
  add_device(items, plan.device);
  return items;
}

std::vector<PlanItem> describe(const TopkPlan& plan) {
  std::vector<PlanItem> items = {named("select", name_of(plan.select))};
  add_device(items, plan.device);
  return items;
}

std::vector<PlanItem> describe(const DecodePlan& plan) {
  std::vector<PlanItem> items = {number("cmp_splits", plan.cmp_splits), number("cmp_chunk", plan.cmp_chunk),
                                 number("slc_splits", plan.slc_splits), number("sel_splits", plan.sel_splits),
                                 named("window_order", name_of(plan.window_order)),
                                 named("dep_wait", name_of(plan.dep_wait)),
                                 named("scan_order", name_of(plan.scan_order)),
                                 number("combine_wpr", cuda::decode::combine_warps_per_row(plan))};
  add_device(items, plan.device);
  return items;
}

}  // namespace nsa
