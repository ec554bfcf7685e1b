// Argument checks and params filling shared by every op binding. Each message names the op, the argument, what was
// expected and what was given, e.g.
//   nsa.selected_attention: block_indices must be int32 [B, T, H, n] = [1, 4096, 4, 16],
//   got int64 [1, 4096, 4, 16]
// Shape and value errors raise ValueError in Python, dtype errors TypeError.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>

#include "nsa/params.h"

namespace nsa_torch {

std::string shape_str(at::IntArrayRef sizes);
std::string dtype_str(at::ScalarType dtype);
std::string tensor_str(const at::Tensor& t);  // "int64 [1, 4096, 4, 16] on cpu"

// kAny in an expected shape accepts any size for that dim.
constexpr int64_t kAny = -1;

class Checker {
 public:
  explicit Checker(const char* op) : op_(op) {}
  const char* op() const { return op_; }

  // `t` has dtype `dtype` and shape `expected` (dims named `names`, e.g. {"B", "T", "H", "n"}),
  // lives on `device`, and, when `contiguous_last` is set, its last dim is contiguous.
  void tensor(const at::Tensor& t, const char* arg, at::ScalarType dtype,
              std::initializer_list<const char*> names, std::initializer_list<int64_t> expected,
              const at::Device& device, bool contiguous_last = true) const;

  // A ValueError "<op>: <arg> must be <expected>, got <got>" unless cond holds.
  void value(bool cond, const char* arg, const std::string& expected, const std::string& got) const;

 private:
  const char* op_;
};

// t has one of the float dtypes the kernels take (float32, float64, bfloat16, float16).
void check_float_dtype(const Checker& c, const at::Tensor& t, const char* arg);

// The attention inputs q [B, T, HQ, D], k [B, Tk, H, D], v [B, Tk, H, Dv]: float dtypes the
// device supports, one dtype, one device, contiguous last dims, H >= 1 dividing HQ.
// `k_name`/`v_name` name the keys in messages ("k" or "k_cmp"). With `same_len` (keys are the
// tokens themselves) Tk must be T: checking k against q first blames k, not v, when k is short.
void check_qkv(const Checker& c, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const char* k_name, const char* v_name, bool same_len);

// Where q's sequences lie. Checks cu_seqlens (int32 [N + 1] on q's device, B == 1; on the CPU also
// its values: starts at 0, non-decreasing, ends at T). With `cmp_rows` >= 0 (the compressed
// branch), also the compressed-row count: Nc(T) per batch row, or sum_s Nc(T_s) when packed;
// cu_seqlens_cmp is then computed on the device (no host sync).
// The returned tensors own the memory that seqs points to: keep them alive while kernels run.
struct SeqsArg {
  nsa::Seqs seqs;
  at::Tensor cu_seqlens;      // contiguous int32 [N + 1], or undefined
  at::Tensor cu_seqlens_cmp;  // int32 [N + 1], or undefined
};
SeqsArg make_seqs(const Checker& c, const at::Tensor& q,
                  const std::optional<at::Tensor>& cu_seqlens, int64_t cmp_rows = -1,
                  int64_t block_size = 1, int64_t block_stride = 1);

// The accumulation dtype of lse for inputs of dtype `dtype`: float64 for float64, else float32.
at::ScalarType lse_dtype(at::ScalarType dtype);

// Torch tensor -> kernel view (strides in elements) and dtype code.
nsa::View view_of(const at::Tensor& t);
nsa::Dtype dtype_of(at::ScalarType dtype);

// Whether t's device has kernels for t's dtype: every float dtype on the CPU, bfloat16/float16
// on CUDA; NotImplementedError for other devices or a build without CUDA (`arg` names t).
void check_device_dtype(const Checker& c, const at::Tensor& t, const char* arg);

// Whether q's device has kernels for these inputs: every float dtype and head dim on the CPU;
// bfloat16/float16 and the compiled (D, Dv) pairs on CUDA (head_dim_v < 0: the op reads no
// values, only D matters); NotImplementedError for other devices or a build without CUDA.
// Never a silent fallback to another device.
void check_device(const Checker& c, const at::Tensor& q, int64_t head_dim, int64_t head_dim_v);

// The CUDA kernels copy rows with 16-byte loads: a CUDA bf16/fp16 [B, T, heads, dim] tensor whose
// data pointer or strides are not multiples of 16 bytes is replaced by a contiguous copy. Any
// other tensor (CPU, other dtypes, malformed shapes left for the checks) is returned as is.
at::Tensor aligned(const at::Tensor& t);
// Whether aligned(t) is t itself.
bool is_aligned(const at::Tensor& t);

// Hyper-parameter checks of docs/design.md section 1 (ValueError naming the argument). Every integer
// is bounded before it is narrowed to the params' int. Sizes (block_size, block_stride,
// select_size) are at most kMaxSize: a sequence has fewer than 2^31 tokens. num_selected sizes
// the [B, T, H, n] output: at most kMaxSelected. window_size is clamped instead (any window past
// the sequence is the whole causal past).
constexpr int64_t kMaxSize = int64_t(1) << 30;
constexpr int64_t kMaxSelected = int64_t(1) << 16;
void check_size(const Checker& c, const char* arg, int64_t v, int64_t max = kMaxSize);
void check_compression(const Checker& c, int64_t block_size, int64_t block_stride);
void check_selection(const Checker& c, int64_t block_stride, int64_t select_size,
                     int64_t num_selected, int64_t num_initial, int64_t num_local);
void check_scale(const Checker& c, double scale);

// Saved forward tensors and the incoming gradient of a backward op: o and dout [B, T, HQ, Dv] in
// q's dtype, lse [B, T, HQ] in lse_dtype, all on q's device.
void check_bwd_inputs(const Checker& c, const at::Tensor& q, const at::Tensor& v,
                      const at::Tensor& dout, const at::Tensor& o, const at::Tensor& lse);

// The outputs of an attention forward: o [B, T, HQ, Dv] in q's dtype, lse [B, T, HQ] in lse_dtype.
std::tuple<at::Tensor, at::Tensor> new_attn_outputs(const at::Tensor& q, const at::Tensor& v);

// The outputs of an attention backward: dq, dk, dv shaped like q, k, v; points p at them and at
// dout (fill_attn_bwd).
std::tuple<at::Tensor, at::Tensor, at::Tensor> new_attn_grads(nsa::AttnParams& p, const at::Tensor& dout,
                                                              const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v);

// Fills the fields shared by the attention branches; the backward ones stay null.
void fill_attn(nsa::AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& o, const at::Tensor& lse, const nsa::Seqs& seqs, double scale);
// Adds the backward tensors.
void fill_attn_bwd(nsa::AttnParams& p, const at::Tensor& dout, const at::Tensor& dq,
                   const at::Tensor& dk, const at::Tensor& dv);

// A new output tensor. With NSA_POISON_OUTPUTS=1 in the environment it is filled with NaN (float)
// or INT32_MIN (int) first, so that elements a kernel fails to write show up in tests.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// at::parallel_for as the kernels' ParallelFor.
void torch_parallel_for(nsa::index_t n, nsa::index_t grain,
                        const std::function<void(nsa::index_t, nsa::index_t)>& fn);

}  // namespace nsa_torch
