// nsa.decode_attention: one decoding step over a contiguous or paged KV cache (inference only,
// no autograd). Never syncs with the host: on CUDA the lengths stay on the device (a step can be
// captured in a CUDA graph) and a bad length or page gives that sequence NaN rows; on the CPU the
// kernel reads them and raises.
#include <algorithm>
#include <stdexcept>
#include <utility>

#include "args.h"
#include "cuda_launch.h"
#include "kernel_plan.h"
#include "nsa/cpu/kernels.h"
#ifdef NSA_WITH_CUDA
#include "nsa/cuda/kernels.h"
#endif
#include "ops.h"

namespace nsa_torch {
namespace {

constexpr const char* kOp = "nsa.decode_attention";
constexpr const char* kGate[3] = {"g_cmp", "g_slc", "g_swa"};

std::string str(int64_t x) { return std::to_string(x); }

// The raw cache's geometry, from k_cache (and block_table when paged).
struct CacheShape {
  bool paged;
  int64_t rows;      // dim 0: B (contiguous) or num_pages (paged)
  int64_t per_row;   // dim 1: capacity (contiguous) or page_size (paged)
  int64_t capacity;  // tokens a sequence can hold
};

// A cache of the raw layout: [B, capacity, H, dim] or [num_pages, page_size, H, dim].
void check_raw(const Checker& c, const at::Tensor& t, const char* arg, const CacheShape& cs,
               int64_t H, const char* dim_name, int64_t dim, const at::Tensor& q) {
  if (cs.paged)
    c.tensor(t, arg, q.scalar_type(), {"num_pages", "page_size", "H", dim_name},
             {cs.rows, cs.per_row, H, dim}, q.device());
  else
    c.tensor(t, arg, q.scalar_type(), {"B", "capacity", "H", dim_name},
             {cs.rows, cs.per_row, H, dim}, q.device());
}

// The CUDA kernels read rows with 16-byte loads. The other ops copy unaligned inputs (aligned());
// a cache is too large to copy at every step, so it must be aligned as it is.
void check_aligned(const Checker& c, const at::Tensor& t, const char* arg) {
  c.value(is_aligned(t), arg,
          "16-byte aligned on CUDA (data pointer and the strides of its first three dims "
          "multiples of 16 bytes)",
          "strides " + shape_str(t.strides()));
}

struct DecodeArgs {
  CacheShape cache;
  at::Tensor seqlens;  // contiguous int32 [B]
};

DecodeArgs check_decode(const Checker& c, const at::Tensor& q, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const OptTensor& k_swa_cache,
                        const OptTensor& v_swa_cache, const at::Tensor& k_cmp_cache,
                        const at::Tensor& v_cmp_cache, const at::Tensor* gates[3],
                        const at::Tensor& cache_seqlens, const OptTensor& block_table,
                        int64_t block_size, int64_t block_stride, int64_t select_size,
                        int64_t num_selected, int64_t num_initial, int64_t num_local,
                        int64_t window_size, double scale) {
  c.value(q.dim() == 4, "q", "a 4-D tensor [B, S, HQ, D]", tensor_str(q));
  check_float_dtype(c, q, "q");
  const int64_t B = q.size(0), S = q.size(1), HQ = q.size(2), D = q.size(3);
  c.tensor(q, "q", q.scalar_type(), {"B", "S", "HQ", "D"}, {B, S, HQ, D}, q.device());
  const bool paged = block_table.has_value();
  const std::string layout = paged ? "a 4-D tensor [num_pages, page_size, H, "
                                   : "a 4-D tensor [B, capacity, H, ";
  c.value(k_cache.dim() == 4, "k_cache", layout + "D]", tensor_str(k_cache));
  c.value(v_cache.dim() == 4, "v_cache", layout + "Dv]", tensor_str(v_cache));
  CacheShape cs{paged, paged ? k_cache.size(0) : B, k_cache.size(1), k_cache.size(1)};
  std::string capacity = str(cs.capacity);
  if (paged) {
    const at::Tensor& bt = *block_table;
    c.value(bt.dim() == 2, "block_table", "int32 [B, max_pages]", tensor_str(bt));
    c.tensor(bt, "block_table", at::kInt, {"B", "max_pages"}, {B, kAny}, q.device());
    const int64_t max_pages = bt.size(1), page_size = cs.per_row;
    // (each bounded first, so that the product cannot overflow)
    cs.capacity = max_pages <= INT32_MAX && page_size <= INT32_MAX ? max_pages * page_size
                                                                   : INT64_MAX;
    capacity = "max_pages * page_size = " + str(max_pages) + " * " + str(page_size);
  }
  c.value(cs.capacity <= INT32_MAX, "the cache capacity",
          "at most 2^31 - 1 tokens (int32 cache_seqlens)", capacity);
  const int64_t H = k_cache.size(2), Dv = v_cache.size(3);
  check_raw(c, k_cache, "k_cache", cs, H, "D", D, q);
  check_raw(c, v_cache, "v_cache", cs, H, "Dv", kAny, q);
  c.value(k_swa_cache.has_value() == v_swa_cache.has_value(),
          k_swa_cache.has_value() ? "v_swa_cache" : "k_swa_cache",
          "given with " + std::string(k_swa_cache.has_value() ? "k_swa_cache" : "v_swa_cache") +
              " (the window branch's own keys and values, or neither)",
          "None");
  if (k_swa_cache.has_value()) {
    check_raw(c, *k_swa_cache, "k_swa_cache", cs, H, "D", D, q);
    check_raw(c, *v_swa_cache, "v_swa_cache", cs, H, "Dv", Dv, q);
  }
  c.value(HQ >= 1, "the number of query heads HQ", "at least 1", "HQ = " + str(HQ));
  c.value(H >= 1 && HQ % H == 0, "the number of query heads HQ",
          "a multiple of the number of key/value heads H = " + str(H), "HQ = " + str(HQ));
  c.value(D >= 1 && Dv >= 1, "the head dims", "at least 1",
          "D = " + str(D) + ", Dv = " + str(Dv));
  const int64_t largest = std::max({B, S, HQ, D, Dv});
  c.value(largest <= INT32_MAX, "the sizes B, S, HQ, D, Dv", "at most 2^31 - 1", str(largest));

  c.value(k_cmp_cache.dim() == 4, "k_cmp_cache", "a 4-D tensor [B, cmp_capacity, H, D]",
          tensor_str(k_cmp_cache));
  c.tensor(k_cmp_cache, "k_cmp_cache", q.scalar_type(), {"B", "cmp_capacity", "H", "D"},
           {B, kAny, H, D}, q.device());
  c.tensor(v_cmp_cache, "v_cmp_cache", q.scalar_type(), {"B", "cmp_capacity", "H", "Dv"},
           {B, k_cmp_cache.size(1), H, Dv}, q.device());
  for (int i = 0; i < 3; ++i)
    c.tensor(*gates[i], kGate[i], q.scalar_type(), {"B", "S", "HQ"}, {B, S, HQ}, q.device(),
             /*contiguous_last=*/false);
  c.tensor(cache_seqlens, "cache_seqlens", at::kInt, {"B"}, {B}, q.device(),
           /*contiguous_last=*/false);

  check_compression(c, block_size, block_stride);
  check_selection(c, block_stride, select_size, num_selected, num_initial, num_local);
  c.value(window_size >= 1, "window_size", "at least 1", str(window_size));
  check_scale(c, scale);
  if (paged)
    c.value(cs.per_row % select_size == 0, "k_cache",
            "a pool of pages of a multiple of select_size = " + str(select_size) +
                " tokens (a selection block never straddles two pages)",
            "page_size = " + str(cs.per_row));
  c.value(S <= cs.capacity, "q",
          "[B, S, HQ, D] with at most capacity = " + str(cs.capacity) + " new tokens",
          "S = " + str(S));
  const int64_t nc = nsa::num_cmp_tokens(cs.capacity, block_size, block_stride);
  c.value(k_cmp_cache.size(1) >= nc, "k_cmp_cache",
          "[B, cmp_capacity, H, D] with cmp_capacity >= Nc(capacity) = " + str(nc) +
              " compressed tokens for capacity = " + str(cs.capacity),
          str(k_cmp_cache.size(1)) + " rows");
  check_device(c, q, D, Dv);
  if (q.is_cuda()) {
    const std::pair<const at::Tensor*, const char*> caches[] = {
        {&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&k_cmp_cache, "k_cmp_cache"},
        {&v_cmp_cache, "v_cmp_cache"}, {k_swa_cache ? &*k_swa_cache : nullptr, "k_swa_cache"},
        {v_swa_cache ? &*v_swa_cache : nullptr, "v_swa_cache"}};
    for (const auto& [t, arg] : caches)
      if (t != nullptr) check_aligned(c, *t, arg);
  }
  return DecodeArgs{cs, cache_seqlens.contiguous()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_attention(
    const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const OptTensor& k_swa_cache, const OptTensor& v_swa_cache, const at::Tensor& k_cmp_cache,
    const at::Tensor& v_cmp_cache, const at::Tensor& g_cmp, const at::Tensor& g_slc,
    const at::Tensor& g_swa, const at::Tensor& cache_seqlens, const OptTensor& block_table,
    int64_t block_size, int64_t block_stride, int64_t select_size, int64_t num_selected,
    int64_t num_initial, int64_t num_local, int64_t window_size, double scale) {
  const at::Tensor q = aligned(q_in);
  const Checker c(kOp);
  const at::Tensor* gates[3] = {&g_cmp, &g_slc, &g_swa};
  const DecodeArgs args = check_decode(
      c, q, k_cache, v_cache, k_swa_cache, v_swa_cache, k_cmp_cache, v_cmp_cache, gates,
      cache_seqlens, block_table, block_size, block_stride, select_size, num_selected,
      num_initial, num_local, window_size, scale);
  const int64_t B = q.size(0), S = q.size(1), HQ = q.size(2), H = k_cache.size(2);
  at::Tensor o = new_output({B, S, HQ, v_cache.size(3)}, q.options());
  at::Tensor block_indices = new_output({B, S, H, num_selected}, q.options().dtype(at::kInt));

  nsa::DecodeParams p;
  p.dtype = dtype_of(q.scalar_type());
  p.q = view_of(q);
  p.k = view_of(k_cache);
  p.v = view_of(v_cache);
  p.k_swa = view_of(k_swa_cache ? *k_swa_cache : k_cache);
  p.v_swa = view_of(v_swa_cache ? *v_swa_cache : v_cache);
  p.k_cmp = view_of(k_cmp_cache);
  p.v_cmp = view_of(v_cmp_cache);
  for (int i = 0; i < 3; ++i) p.gate[i] = view_of(*gates[i]);
  p.o = view_of(o);
  p.block_indices = view_of(block_indices);
  p.seqlens = args.seqlens.data_ptr<int32_t>();
  if (block_table) {
    p.block_table = block_table->data_ptr<int32_t>();
    p.block_table_stride = block_table->stride(0);
  }
  p.batch = int(B);
  p.num_queries = int(S);
  p.num_heads = int(HQ);
  p.num_heads_k = int(H);
  p.head_dim = int(q.size(3));
  p.head_dim_v = int(v_cache.size(3));
  p.capacity = args.cache.capacity;
  p.page_size = args.cache.per_row;
  p.num_pages = args.cache.rows;
  p.cmp_capacity = nsa::num_cmp_tokens(p.capacity, block_size, block_stride);
  p.scale = scale;
  p.block_size = int(block_size);
  p.block_stride = int(block_stride);
  p.select_size = int(select_size);
  p.num_selected = int(num_selected);
  p.num_initial = int(num_initial);
  p.num_local = int(num_local);
  p.window_size = int(std::min<int64_t>(window_size, int64_t(1) << 30));  // the whole past beyond
  if (q.is_cuda()) {
#ifdef NSA_WITH_CUDA
    plan_cuda(p, q);
    const size_t bytes = nsa::cuda::decode_workspace_bytes(p);
    const at::Tensor ws = bytes ? cuda_workspace(q, bytes) : at::Tensor();
    run_cuda(q, [&](cudaStream_t s) {
      nsa::cuda::decode_attention(p, bytes ? ws.data_ptr() : nullptr, s);
    });
#endif
  } else {
    try {
      nsa::cpu::decode_attention(p, torch_parallel_for);
    } catch (const std::invalid_argument& e) {  // a length or page outside the cache
      TORCH_CHECK_VALUE(false, e.what());
    }
  }
  return {o, block_indices};
}

}  // namespace nsa_torch
