#include "kernel_plan.h"

#include <map>
#include <mutex>
#include <stdexcept>

#ifdef NSA_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace nsa_torch {
namespace {

struct PlanState {
  std::mutex mutex;
  nsa::PlanOverrides overrides;
  uint64_t* decode_trace = nullptr;  // set_decode_trace's buffer, kept across force()'s replacements
  int decode_trace_blocks = 0;
  int recordings = 0;  // open nsa_torch._debug.plans() contexts
  std::vector<PlanRecord> log;
};

PlanState& state() {
  static PlanState s;
  return s;
}

}  // namespace

nsa::PlanOverrides plan_overrides() {
  std::lock_guard<std::mutex> lock(state().mutex);
  nsa::PlanOverrides o = state().overrides;
  o.decode_trace = state().decode_trace;
  o.decode_trace_blocks = state().decode_trace_blocks;
  return o;
}

void set_decode_trace(uint64_t* buffer, int blocks) {
  std::lock_guard<std::mutex> lock(state().mutex);
  state().decode_trace = blocks > 0 ? buffer : nullptr;
  state().decode_trace_blocks = blocks > 0 && buffer ? blocks : 0;
}

void set_plan_overrides(const nsa::PlanOverrides& o) {
  std::lock_guard<std::mutex> lock(state().mutex);
  state().overrides = o;
}

size_t plan_log_open() {
  std::lock_guard<std::mutex> lock(state().mutex);
  ++state().recordings;
  return state().log.size();
}

std::vector<PlanRecord> plan_log_read(size_t from) {
  std::lock_guard<std::mutex> lock(state().mutex);
  const std::vector<PlanRecord>& log = state().log;
  return std::vector<PlanRecord>(log.begin() + std::min(from, log.size()), log.end());
}

void plan_log_close() {
  std::lock_guard<std::mutex> lock(state().mutex);
  if (state().recordings > 0 && --state().recordings == 0) state().log.clear();
}

#ifdef NSA_WITH_CUDA
namespace {

// The device facts of q's GPU, from its properties queried once per device index and cached.
nsa::DeviceFacts device_facts(const at::Tensor& q) {
  static std::mutex mutex;
  static std::map<int, nsa::DeviceFacts> cache;
  const int index = q.device().index();
  std::lock_guard<std::mutex> lock(mutex);
  const auto it = cache.find(index);
  if (it != cache.end()) return it->second;
  cudaDeviceProp prop;
  const cudaError_t err = cudaGetDeviceProperties(&prop, index);
  TORCH_CHECK(err == cudaSuccess, "nsa_torch: cudaGetDeviceProperties(", index, ") failed: ", cudaGetErrorString(err));
  nsa::DeviceFacts dev;
  dev.arch = prop.major * 10 + prop.minor;
  dev.num_sms = prop.multiProcessorCount;
  dev.smem_per_block = int(prop.sharedMemPerBlockOptin);
  dev.smem_per_sm = int(prop.sharedMemPerMultiprocessor);
  return cache[index] = dev;
}

// Plans with plan_fn(device facts, overrides), logs the plan under op (with suffix) while a
// recording is open, and returns it; std::invalid_argument becomes ValueError.
template <typename Plan, typename F, typename D>
Plan plan_and_log(const at::Tensor& q, const std::string& op, F&& plan_fn, D&& describe_fn) {
  Plan plan;
  try {
    plan = plan_fn(device_facts(q), plan_overrides());
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  std::lock_guard<std::mutex> lock(state().mutex);
  if (state().recordings > 0) state().log.push_back(PlanRecord{op, describe_fn(plan)});
  return plan;
}

template <typename P>
void plan_attn(P& p, nsa::Pass pass, const at::Tensor& q, const char* op, nsa::AttnBranch branch,
               nsa::AttnPlan (*plan_fn)(const P&, nsa::Pass, const nsa::DeviceFacts&, const nsa::PlanOverrides&)) {
  p.plan = plan_and_log<nsa::AttnPlan>(
      q, std::string(op) + (pass == nsa::Pass::kFwd ? "_fwd" : "_bwd"),
      [&](const nsa::DeviceFacts& dev, const nsa::PlanOverrides& o) { return plan_fn(p, pass, dev, o); },
      [&](const nsa::AttnPlan& plan) { return nsa::describe(plan, branch, pass); });
}

}  // namespace

void plan_cuda(nsa::CmpParams& p, nsa::Pass pass, const at::Tensor& q) {
  plan_attn(p, pass, q, "nsa.compressed_attention", nsa::AttnBranch::kCmp, &nsa::plan_cmp);
}

void plan_cuda(nsa::SlcParams& p, nsa::Pass pass, const at::Tensor& q) {
  plan_attn(p, pass, q, "nsa.selected_attention", nsa::AttnBranch::kSlc, &nsa::plan_slc);
}

void plan_cuda(nsa::SwaParams& p, nsa::Pass pass, const at::Tensor& q) {
  plan_attn(p, pass, q, "nsa.sliding_window_attention", nsa::AttnBranch::kSwa, &nsa::plan_swa);
}

void plan_cuda(nsa::TopkParams& p, const at::Tensor& q) {
  p.plan = plan_and_log<nsa::TopkPlan>(
      q, "nsa.select_blocks",
      [&](const nsa::DeviceFacts& dev, const nsa::PlanOverrides& o) { return nsa::plan_select(p, dev, o); },
      [](const nsa::TopkPlan& plan) { return nsa::describe(plan); });
}

void plan_cuda(nsa::DecodeParams& p, const at::Tensor& q) {
  p.plan = plan_and_log<nsa::DecodePlan>(
      q, "nsa.decode_attention",
      [&](const nsa::DeviceFacts& dev, const nsa::PlanOverrides& o) { return nsa::plan_decode(p, dev, o); },
      [](const nsa::DecodePlan& plan) { return nsa::describe(plan); });
}
#endif

}  // namespace nsa_torch
