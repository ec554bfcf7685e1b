// The binding's side of the kernel plan (nsa/plan.h): the overrides of nsa_torch._debug.force,
// the log of nsa_torch._debug.plans(), and planning a CUDA op call from its device's cached
// properties. Process-wide state, guarded by a mutex: ops may run on several threads (autograd
// runs backward ops on its own).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "nsa/plan.h"

namespace nsa_torch {

// The overrides in force (a copy) and their replacement.
nsa::PlanOverrides plan_overrides();
void set_plan_overrides(const nsa::PlanOverrides& o);
// The device buffer of decode_attention's trace (nsa::DecodePlan::trace), nullptr or blocks 0:
// none. Independent of the overrides.
void set_decode_trace(uint64_t* buffer, int blocks);

// One CUDA op call's plan as nsa_torch._debug.plans() reports it.
struct PlanRecord {
  std::string op;  // e.g. "nsa.compressed_attention_fwd"
  std::vector<nsa::PlanItem> items;
};

// While at least one recording is open, every CUDA op call appends its plan to the log.
// plan_log_open returns the index its records start at; plan_log_read the records from `from`
// on; the log is cleared when the last recording closes.
size_t plan_log_open();
std::vector<PlanRecord> plan_log_read(size_t from);
void plan_log_close();

#ifdef NSA_WITH_CUDA
// Fills p.plan for a call on q's device with the overrides in force, and logs it. An override
// that cannot run raises ValueError naming the key, the value and why.
void plan_cuda(nsa::CmpParams& p, nsa::Pass pass, const at::Tensor& q);
void plan_cuda(nsa::SlcParams& p, nsa::Pass pass, const at::Tensor& q);
void plan_cuda(nsa::SwaParams& p, nsa::Pass pass, const at::Tensor& q);
void plan_cuda(nsa::TopkParams& p, const at::Tensor& q);
void plan_cuda(nsa::DecodeParams& p, const at::Tensor& q);
#endif

}  // namespace nsa_torch
