#include "args.h"

#include <ATen/Parallel.h>

#ifdef NSA_WITH_CUDA
#include "nsa/cuda/head_dims.h"
#endif

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <iostream>  // initialises a statically linked libstdc++'s streams (see shape_str)
#include <limits>

namespace nsa_torch {

// Messages are built with std::string, not iostreams: some toolchains (the GPU image's g++
// wrapper) link libstdc++ statically into the extension, whose stream/locale state is then only
// set up if some file includes <iostream> (done above for torch's own c10::str messages).
std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

std::string dtype_str(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    default: return c10::toString(dtype);
  }
}

std::string tensor_str(const at::Tensor& t) {
  return dtype_str(t.scalar_type()) + " " + shape_str(t.sizes()) + " on " + t.device().str();
}

static std::string expected_str(std::initializer_list<const char*> names,
                                std::initializer_list<int64_t> expected) {
  std::string s = "[";
  size_t i = 0;
  for (const char* n : names) s += std::string(i++ ? ", " : "") + n;
  s += "] = [";
  i = 0;
  for (int64_t e : expected) s += (i++ ? ", " : "") + (e == kAny ? std::string("*") : std::to_string(e));
  return s + "]";
}

void Checker::tensor(const at::Tensor& t, const char* arg, at::ScalarType dtype,
                     std::initializer_list<const char*> names,
                     std::initializer_list<int64_t> expected, const at::Device& device,
                     bool contiguous_last) const {
  const std::string want = dtype_str(dtype) + " " + expected_str(names, expected);
  const std::string got = dtype_str(t.scalar_type()) + " " + shape_str(t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op_, ": ", arg, " must be ", want, ", got ", got);
  bool shape_ok = t.dim() == int64_t(expected.size());
  if (shape_ok) {
    int64_t d = 0;
    for (int64_t e : expected) shape_ok = shape_ok && (e == kAny || t.size(d) == e), ++d;
  }
  TORCH_CHECK_VALUE(shape_ok, op_, ": ", arg, " must be ", want, ", got ", got);
  TORCH_CHECK_VALUE(t.device() == device, op_, ": ", arg, " must be on ", device.str(),
                    " (the device of q), got ", t.device().str());
  // (An empty tensor is read by no kernel: an expanded empty gradient keeps its zero strides.)
  if (contiguous_last && t.numel() > 0 && t.size(-1) > 1)
    TORCH_CHECK_VALUE(t.stride(-1) == 1, op_, ": ", arg,
                      " must have a contiguous last dim (stride 1), got strides ",
                      shape_str(t.strides()), "; call .contiguous() first");
}

void Checker::value(bool cond, const char* arg, const std::string& expected,
                    const std::string& got) const {
  TORCH_CHECK_VALUE(cond, op_, ": ", arg, " must be ", expected, ", got ", got);
}

void check_float_dtype(const Checker& c, const at::Tensor& t, const char* arg) {
  const auto dt = t.scalar_type();
  const bool float_dtype =
      dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf;
  TORCH_CHECK_TYPE(float_dtype, c.op(), ": ", arg, " must be float32, float64, bfloat16 or float16, got ",
                   dtype_str(dt));
}

void check_qkv(const Checker& c, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const char* k_name, const char* v_name, bool same_len) {
  c.value(q.dim() == 4, "q", "a 4-D tensor [B, T, HQ, D]", tensor_str(q));
  check_float_dtype(c, q, "q");
  const auto dt = q.scalar_type();
  const int64_t B = q.size(0), HQ = q.size(2), D = q.size(3);
  c.value(k.dim() == 4 && v.dim() == 4, k.dim() == 4 ? v_name : k_name,
          "a 4-D tensor [B, Tk, H, dim]", tensor_str(k.dim() == 4 ? v : k));
  const int64_t Tk = same_len ? q.size(1) : k.size(1), H = k.size(2), Dv = v.size(3);
  const char* rows = same_len ? "T" : "Tk";
  c.tensor(q, "q", dt, {"B", "T", "HQ", "D"}, {B, kAny, HQ, D}, q.device());
  c.tensor(k, k_name, dt, {"B", rows, "H", "D"}, {B, Tk, H, D}, q.device());
  c.tensor(v, v_name, dt, {"B", rows, "H", "Dv"}, {B, Tk, H, Dv}, q.device());
  c.value(HQ >= 1, "the number of query heads HQ", "at least 1", "HQ = " + std::to_string(HQ));
  c.value(H >= 1 && HQ % H == 0, "the number of query heads HQ",
          "a multiple of the number of key/value heads H = " + std::to_string(H),
          "HQ = " + std::to_string(HQ));
  c.value(D >= 1 && Dv >= 1, "the head dims", "at least 1",
          "D = " + std::to_string(D) + ", Dv = " + std::to_string(Dv));
  // The params hold these sizes as int (an empty tensor may have any size).
  const int64_t largest = std::max({B, HQ, D, Dv});
  c.value(largest <= INT32_MAX, "the sizes B, HQ, D, Dv", "at most 2^31 - 1",
          std::to_string(largest));
}

at::ScalarType lse_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

SeqsArg make_seqs(const Checker& c, const at::Tensor& q,
                  const std::optional<at::Tensor>& cu_seqlens, int64_t cmp_rows,
                  int64_t block_size, int64_t block_stride) {
  SeqsArg out;
  nsa::Seqs& s = out.seqs;
  s.batch = int(q.size(0));
  s.seqlen = q.size(1);
  s.cmp_seqlen = cmp_rows >= 0 ? cmp_rows : 0;
  if (!cu_seqlens.has_value()) {
    s.num_seqs = s.batch;
    if (cmp_rows >= 0) {
      const int64_t nc = nsa::num_cmp_tokens(s.seqlen, block_size, block_stride);
      c.value(cmp_rows == nc, "k_cmp",
              "[B, Nc, H, D] with Nc = (T - block_size) // block_stride + 1 = " +
                  std::to_string(nc) + " compressed tokens for T = " + std::to_string(s.seqlen) +
                  " (0 when T < block_size)",
              std::to_string(cmp_rows) + " rows");
    }
    return out;
  }
  const at::Tensor& cu = *cu_seqlens;
  c.tensor(cu, "cu_seqlens", at::kInt, {"N + 1"}, {kAny}, q.device());
  c.value(cu.dim() == 1 && cu.size(0) >= 1 && cu.size(0) <= INT32_MAX, "cu_seqlens",
          "int32 [N + 1] with N >= 0", tensor_str(cu));
  c.value(q.size(0) == 1, "q", "packed with B == 1 when cu_seqlens is given",
          "B = " + std::to_string(q.size(0)));
  TORCH_CHECK_VALUE(s.seqlen < (int64_t(1) << 31), c.op(),
                    ": packed sequences must hold fewer than 2^31 tokens (int32 cu_seqlens), got ",
                    s.seqlen);
  out.cu_seqlens = cu.contiguous();
  const at::Tensor& cu_c = out.cu_seqlens;
  s.num_seqs = int(cu.size(0) - 1);
  s.cu_seqlens = cu_c.data_ptr<int32_t>();
  if (!cu_c.is_cpu()) {
    // On the device the values are checked there, without a host sync: a bad cu_seqlens raises
    // at the next synchronisation (a device-side assert, as torch's own index checks). The layer
    // (nsa_torch/modules.py) checks them on the host, where it reads the lengths anyway.
    const at::Tensor ok = at::logical_and(
        at::logical_and(cu_c.select(0, 0).eq(0), cu_c.select(0, s.num_seqs).eq(s.seqlen)),
        (cu_c.slice(0, 1) >= cu_c.slice(0, 0, -1)).all());
    at::_assert_async(ok, std::string(c.op()) + ": cu_seqlens must start at 0, be non-decreasing "
                          "and end at the number of packed tokens T = " + std::to_string(s.seqlen));
  } else {
    const int32_t* p = cu_c.data_ptr<int32_t>();
    c.value(p[0] == 0, "cu_seqlens", "a tensor starting at 0", "cu_seqlens[0] = " + std::to_string(p[0]));
    for (int64_t i = 0; i < s.num_seqs; ++i)
      c.value(p[i + 1] >= p[i], "cu_seqlens", "non-decreasing",
              "cu_seqlens[" + std::to_string(i + 1) + "] = " + std::to_string(p[i + 1]) +
                  " < cu_seqlens[" + std::to_string(i) + "] = " + std::to_string(p[i]));
    c.value(p[s.num_seqs] == s.seqlen, "cu_seqlens",
            "a tensor ending at the number of packed tokens T = " + std::to_string(s.seqlen),
            "cu_seqlens[-1] = " + std::to_string(p[s.num_seqs]));
  }
  if (cmp_rows >= 0) {
    // Exclusive prefix sum of Nc(T_s), computed with tensor ops so a CUDA cu_seqlens never syncs.
    const at::Tensor lens = (cu_c.slice(0, 1) - cu_c.slice(0, 0, -1)).to(at::kLong);
    const at::Tensor nc = at::clamp_min(at::floor_divide(lens - block_size, block_stride) + 1, 0);
    out.cu_seqlens_cmp =
        at::cat({at::zeros({1}, nc.options()), at::cumsum(nc, 0)}).to(at::kInt);
    s.cu_seqlens_cmp = out.cu_seqlens_cmp.data_ptr<int32_t>();
    if (cu_c.is_cpu()) {
      const int64_t total = s.cu_seqlens_cmp[s.num_seqs];
      c.value(cmp_rows == total, "k_cmp",
              "[1, Nc, H, D] with Nc = sum over sequences of (T_s - block_size) // block_stride + 1 "
              "= " + std::to_string(total) + " packed compressed tokens",
              std::to_string(cmp_rows) + " rows");
    }
  }
  return out;
}

nsa::View view_of(const at::Tensor& t) {
  nsa::View v;
  v.data = t.data_ptr();
  v.batch_stride = t.stride(0);
  v.row_stride = t.stride(1);
  v.head_stride = t.stride(2);
  return v;
}

nsa::Dtype dtype_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return nsa::Dtype::kFloat32;
    case at::kDouble: return nsa::Dtype::kFloat64;
    case at::kBFloat16: return nsa::Dtype::kBFloat16;
    case at::kHalf: return nsa::Dtype::kFloat16;
    default: TORCH_CHECK_TYPE(false, "nsa: unsupported dtype ", dtype_str(dtype));
  }
}

void check_device_dtype(const Checker& c, const at::Tensor& t, const char* arg) {
  if (t.is_cpu()) return;
  TORCH_CHECK_NOT_IMPLEMENTED(t.is_cuda(), c.op(), ": nsa_torch has CPU and CUDA kernels; got ", arg,
                              " on ", t.device().str());
#ifndef NSA_WITH_CUDA
  TORCH_CHECK_NOT_IMPLEMENTED(false, c.op(), ": this build of nsa_torch has no CUDA kernels (it was "
                              "built without nvcc or a CUDA build of torch); got ", arg, " on ",
                              t.device().str());
#else
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kBFloat16 || dt == at::kHalf, c.op(), ": ", arg,
                   " must be bfloat16 or float16 on CUDA, got ", dtype_str(dt));
#endif
}

void check_device(const Checker& c, const at::Tensor& q, int64_t head_dim, int64_t head_dim_v) {
  check_device_dtype(c, q, "q");
  if (q.is_cpu()) return;
#ifdef NSA_WITH_CUDA
  // (int64 sizes compared before narrowing; the messages are built only for the error)
  const auto fits = [](int64_t x) { return x >= 0 && x <= 1 << 20; };
  if (head_dim_v < 0) {
    if (fits(head_dim) && nsa::cuda::supported_head_dim(int(head_dim))) return;
    c.value(false, "head dim D", "one of " + nsa::cuda::head_dims_list(false) + " on CUDA",
            std::to_string(head_dim));
    return;
  }
  if (fits(head_dim) && fits(head_dim_v) && nsa::cuda::supported_head_dims(int(head_dim), int(head_dim_v))) return;
  c.value(false, "head dims (D, Dv)", "one of " + nsa::cuda::head_dims_list(true) + " on CUDA",
          "(" + std::to_string(head_dim) + ", " + std::to_string(head_dim_v) + ")");
#endif
}

bool is_aligned(const at::Tensor& t) {
  if (!t.defined() || !t.is_cuda() || t.dim() != 4 || t.element_size() != 2 || t.stride(3) != 1)
    return true;
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) <= 1 || t.stride(d) % 8 == 0);
  return ok;
}

at::Tensor aligned(const at::Tensor& t) {
  return is_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

void check_size(const Checker& c, const char* arg, int64_t v, int64_t max) {
  c.value(v >= 1, arg, "at least 1", std::to_string(v));
  c.value(v <= max, arg, "at most " + std::to_string(max), std::to_string(v));
}

void check_compression(const Checker& c, int64_t block_size, int64_t block_stride) {
  check_size(c, "block_stride", block_stride);
  check_size(c, "block_size", block_size);
  c.value(block_size % block_stride == 0, "block_size",
          "a positive multiple of block_stride (" + std::to_string(block_stride) + ")",
          std::to_string(block_size));
}

void check_selection(const Checker& c, int64_t block_stride, int64_t select_size,
                     int64_t num_selected, int64_t num_initial, int64_t num_local) {
  check_size(c, "select_size", select_size);
  c.value(select_size % block_stride == 0, "select_size",
          "a positive multiple of block_stride (" + std::to_string(block_stride) + ")",
          std::to_string(select_size));
  check_size(c, "num_selected", num_selected, kMaxSelected);
  // Each bounded first, so that their sum cannot overflow.
  c.value(num_initial >= 0 && num_initial <= num_selected, "num_initial",
          "in [0, num_selected]", std::to_string(num_initial));
  c.value(num_local >= 0 && num_local <= num_selected, "num_local", "in [0, num_selected]",
          std::to_string(num_local));
  c.value(num_selected >= num_initial + num_local, "num_selected",
          "at least 1 and at least num_initial + num_local = " +
              std::to_string(num_initial + num_local),
          std::to_string(num_selected));
}

void check_scale(const Checker& c, double scale) {
  c.value(std::isfinite(scale), "scale", "a finite number", std::to_string(scale));
}

void check_bwd_inputs(const Checker& c, const at::Tensor& q, const at::Tensor& v,
                      const at::Tensor& dout, const at::Tensor& o, const at::Tensor& lse) {
  const int64_t B = q.size(0), T = q.size(1), HQ = q.size(2), Dv = v.size(3);
  c.tensor(dout, "dout", q.scalar_type(), {"B", "T", "HQ", "Dv"}, {B, T, HQ, Dv}, q.device());
  c.tensor(o, "o", q.scalar_type(), {"B", "T", "HQ", "Dv"}, {B, T, HQ, Dv}, q.device());
  c.tensor(lse, "lse", lse_dtype(q.scalar_type()), {"B", "T", "HQ"}, {B, T, HQ}, q.device());
}

std::tuple<at::Tensor, at::Tensor> new_attn_outputs(const at::Tensor& q, const at::Tensor& v) {
  return {new_output({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options()),
          new_output({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_dtype(q.scalar_type())))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> new_attn_grads(nsa::AttnParams& p, const at::Tensor& dout,
                                                              const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v) {
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = new_output(k.sizes(), k.options());
  at::Tensor dv = new_output(v.sizes(), v.options());
  fill_attn_bwd(p, dout, dq, dk, dv);
  return {dq, dk, dv};
}

void fill_attn(nsa::AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& o, const at::Tensor& lse, const nsa::Seqs& seqs, double scale) {
  p.dtype = dtype_of(q.scalar_type());
  p.q = view_of(q);
  p.k = view_of(k);
  p.v = view_of(v);
  p.o = view_of(o);
  p.lse = view_of(lse);
  p.seqs = seqs;
  p.num_heads = int(q.size(2));
  p.num_heads_k = int(k.size(2));
  p.head_dim = int(q.size(3));
  p.head_dim_v = int(v.size(3));
  p.scale = scale;
}

void fill_attn_bwd(nsa::AttnParams& p, const at::Tensor& dout, const at::Tensor& dq,
                   const at::Tensor& dk, const at::Tensor& dv) {
  p.dout = view_of(dout);
  p.dq = view_of(dq);
  p.dk = view_of(dk);
  p.dv = view_of(dv);
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool poison = [] {
    const char* env = std::getenv("NSA_POISON_OUTPUTS");
    return env != nullptr && std::string(env) == "1";
  }();
  at::Tensor t = at::empty(sizes, options);
  if (poison) {
    if (at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
    else t.fill_(std::numeric_limits<int32_t>::min());
  }
  return t;
}

void torch_parallel_for(nsa::index_t n, nsa::index_t grain,
                        const std::function<void(nsa::index_t, nsa::index_t)>& fn) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { fn(begin, end); });
}

}  // namespace nsa_torch
