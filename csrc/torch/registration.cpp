// Schemas of the nsa:: ops and their CPU/CUDA kernels. Fake (meta) kernels and autograd are
// registered from Python (nsa_torch/ops.py). The same functions serve both devices: each
// runs the kernel of its tensors' device.
#include <torch/library.h>

#include "ops.h"

#ifndef NSA_NO_PYTHON_MODULE
#include <Python.h>

#include "debug_module.h"
#ifdef NSA_WITH_CUDA
#include "nsa/cuda/head_dims.h"
#endif

// `import nsa_torch._C` loads this library (and so runs the registrations below); the ops are
// reached through torch.ops.nsa. The module holds the hooks of nsa_torch._debug
// (debug_module.cpp) and one constant: CUDA_HEAD_DIMS, the (D, Dv) pairs with CUDA kernels
// (nsa/cuda/head_dims.h) as a tuple of int pairs, empty in a build without CUDA.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nsa_torch::kDebugMethods,
                               nullptr, nullptr, nullptr, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (!m) return nullptr;
#ifdef NSA_WITH_CUDA
  PyObject* dims = PyTuple_New(nsa::cuda::kNumHeadDims);
  for (int i = 0; dims && i < nsa::cuda::kNumHeadDims; ++i) {
    PyObject* pair = Py_BuildValue("(ii)", nsa::cuda::kHeadDims[i].d, nsa::cuda::kHeadDims[i].dv);
    if (!pair) Py_CLEAR(dims);
    else PyTuple_SET_ITEM(dims, i, pair);  // steals the reference
  }
#else
  PyObject* dims = PyTuple_New(0);
#endif
  if (!dims || PyModule_AddObject(m, "CUDA_HEAD_DIMS", dims) < 0) {
    Py_XDECREF(dims);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
#endif

TORCH_LIBRARY(nsa, m) {
  m.def(
      "compressed_attention_fwd(Tensor q, Tensor k_cmp, Tensor v_cmp, Tensor? cu_seqlens, "
      "int block_size, int block_stride, float scale) -> (Tensor o, Tensor lse)");
  m.def(
      "compressed_attention_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k_cmp, "
      "Tensor v_cmp, Tensor o, Tensor lse, Tensor? cu_seqlens, int block_size, "
      "int block_stride, float scale) -> (Tensor dq, Tensor dk_cmp, Tensor dv_cmp)");
  m.def(
      "select_blocks(Tensor q, Tensor k_cmp, Tensor lse, Tensor? cu_seqlens, int block_size, "
      "int block_stride, int select_size, int num_selected, int num_initial, int num_local, "
      "float scale) -> Tensor");
  m.def(
      "selected_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor block_indices, "
      "Tensor? cu_seqlens, int select_size, float scale) -> (Tensor o, Tensor lse)");
  m.def(
      "selected_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor block_indices, "
      "Tensor o, Tensor lse, Tensor? cu_seqlens, int select_size, float scale) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "sliding_window_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, "
      "int window_size, float scale) -> (Tensor o, Tensor lse)");
  m.def(
      "sliding_window_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor o, "
      "Tensor lse, Tensor? cu_seqlens, int window_size, float scale) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "gated_sum(Tensor o_cmp, Tensor o_slc, Tensor o_swa, Tensor g_cmp, Tensor g_slc, "
      "Tensor g_swa) -> Tensor");
  m.def(
      "gated_sum_bwd(Tensor dout, Tensor o_cmp, Tensor o_slc, Tensor o_swa, Tensor g_cmp, "
      "Tensor g_slc, Tensor g_swa) -> (Tensor do_cmp, Tensor do_slc, Tensor do_swa, "
      "Tensor dg_cmp, Tensor dg_slc, Tensor dg_swa)");
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? k_swa_cache, "
      "Tensor? v_swa_cache, Tensor k_cmp_cache, Tensor v_cmp_cache, Tensor g_cmp, Tensor g_slc, "
      "Tensor g_swa, Tensor cache_seqlens, Tensor? block_table, int block_size, "
      "int block_stride, int select_size, int num_selected, int num_initial, int num_local, "
      "int window_size, float scale) -> (Tensor o, Tensor block_indices)");
}

#define NSA_IMPLS(m)                                                             \
  m.impl("compressed_attention_fwd", &nsa_torch::compressed_attention_fwd);      \
  m.impl("compressed_attention_bwd", &nsa_torch::compressed_attention_bwd);      \
  m.impl("select_blocks", &nsa_torch::select_blocks);                            \
  m.impl("selected_attention_fwd", &nsa_torch::selected_attention_fwd);          \
  m.impl("selected_attention_bwd", &nsa_torch::selected_attention_bwd);          \
  m.impl("sliding_window_attention_fwd", &nsa_torch::sliding_window_attention_fwd); \
  m.impl("sliding_window_attention_bwd", &nsa_torch::sliding_window_attention_bwd); \
  m.impl("gated_sum", &nsa_torch::gated_sum);                                    \
  m.impl("gated_sum_bwd", &nsa_torch::gated_sum_bwd);                            \
  m.impl("decode_attention", &nsa_torch::decode_attention)

TORCH_LIBRARY_IMPL(nsa, CPU, m) { NSA_IMPLS(m); }
TORCH_LIBRARY_IMPL(nsa, CUDA, m) { NSA_IMPLS(m); }
