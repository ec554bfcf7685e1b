// Entry points of the decoding step on CUDA (kernels.h): argument checks, the workspace layout
// (decode.h), and the launches in stream order. Kernels Z and B are launched from here, the others
// from their per-dtype files.
#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>

#include "../kernels.h"
#include "counters.cuh"
#include "launch_kernel.h"
#include "select.cuh"

namespace nsa::cuda {
namespace decode {
namespace {

[[noreturn]] void invalid(const std::string& what) { throw std::invalid_argument(std::string(kOp) + ": " + what); }

std::string str(index_t x) { return std::to_string(x); }

// What the kernels assume of the params beyond the binding's checks of the tensors.
void check(const DecodeParams& p) {
  if (p.dtype != Dtype::kBFloat16 && p.dtype != Dtype::kFloat16) invalid("dtype must be bfloat16 or float16 on CUDA");
  if (!supported_head_dims(p.head_dim, p.head_dim_v))
    invalid("head dims (D, Dv) must be one of " + head_dims_list(true) + " on CUDA, got (" + str(p.head_dim) + ", " +
            str(p.head_dim_v) + ")");
  if (p.num_heads_k < 1 || p.num_heads < 1 || p.num_heads % p.num_heads_k != 0)
    invalid("num_heads (" + str(p.num_heads) + ") must be a positive multiple of num_heads_k (" + str(p.num_heads_k) +
            ")");
  if (p.batch < 0 || p.num_queries < 1)
    invalid("need B >= 0 and S >= 1, got B = " + str(p.batch) + ", S = " + str(p.num_queries));
  if (p.block_stride < 1 || p.block_size < p.block_stride || p.block_size % p.block_stride != 0 ||
      p.select_size < p.block_stride || p.select_size % p.block_stride != 0)
    invalid("block_stride must divide block_size and select_size, got block_size = " + str(p.block_size) +
            ", block_stride = " + str(p.block_stride) + ", select_size = " + str(p.select_size));
  if (p.num_selected < 1 || p.num_selected > kMaxSelected)
    invalid("num_selected must be in [1, " + str(kMaxSelected) + "] on CUDA, got " + str(p.num_selected));
  if (p.num_initial < 0 || p.num_local < 0 || p.num_initial + p.num_local > p.num_selected)
    invalid("need num_initial, num_local >= 0 and num_initial + num_local <= num_selected, got " +
            str(p.num_initial) + ", " + str(p.num_local) + ", " + str(p.num_selected));
  if (p.window_size < 1) invalid("window_size must be >= 1, got " + str(p.window_size));
  if (p.capacity < 1 || p.capacity > INT_MAX) invalid("capacity must be in [1, 2^31 - 1], got " + str(p.capacity));
  if (p.cmp_capacity < num_cmp_tokens(p.capacity, p.block_size, p.block_stride))
    invalid("cmp_capacity (" + str(p.cmp_capacity) + ") must hold Nc(capacity) = " +
            str(num_cmp_tokens(p.capacity, p.block_size, p.block_stride)) + " compressed tokens");
  if (p.block_table != nullptr && (p.page_size < 1 || p.page_size % p.select_size != 0 || p.num_pages < 1 ||
                                   p.num_pages > INT_MAX || p.capacity % p.page_size != 0))
    invalid("paged caches need page_size a multiple of select_size dividing capacity and 1 <= num_pages < 2^31, got "
            "page_size = " + str(p.page_size) + ", select_size = " + str(p.select_size) + ", capacity = " +
            str(p.capacity) + ", num_pages = " + str(p.num_pages));
  if (p.block_table == nullptr && p.page_size != p.capacity)
    invalid("a contiguous cache has page_size = capacity, got " + str(p.page_size) + " and " + str(p.capacity));
  if (p.plan.cmp_splits < 1 || p.plan.slc_splits < 1 || p.plan.sel_splits < 1 || p.plan.sel_splits > kMaxSelectSplits)
    invalid("the plan's splits must be >= 1 (sel_splits <= " + str(kMaxSelectSplits) + "), got cmp_splits = " +
            str(p.plan.cmp_splits) + ", slc_splits = " + str(p.plan.slc_splits) + ", sel_splits = " +
            str(p.plan.sel_splits));
  const index_t rows = index_t(p.num_queries) * (p.num_heads / p.num_heads_k);
  if (p.batch > 65535 || index_t(p.num_heads_k) * ((rows + kBlockRows - 1) / kBlockRows) > 65535 ||
      p.num_queries > 65535 || cmp_tiles(p.cmp_capacity) > INT_MAX / kTileKeys || rows > INT_MAX / 2 ||
      index_t(p.batch) * p.num_queries * p.num_heads > INT_MAX ||
      index_t(p.batch) * p.num_heads_k * (p.num_queries + 5) > INT_MAX)
    invalid("shape too large for the launch grids (B = " + str(p.batch) + ", S = " + str(p.num_queries) + ", HQ = " +
            str(p.num_heads) + ", H = " + str(p.num_heads_k) + ", cmp_capacity = " + str(p.cmp_capacity) + ")");
}

size_t align256(size_t x) { return (x + 255) / 256 * 256; }

}  // namespace

Workspace make_workspace(const DecodeParams& p, void* base) {
  Workspace ws;
  ws.rows = group_rows(p);
  ws.row_blocks = row_blocks(p);
  ws.tiles = int(cmp_tiles(p.cmp_capacity));
  ws.split_tiles = (ws.tiles + p.plan.cmp_splits - 1) / p.plan.cmp_splits;
  ws.cpr = p.block_size / p.block_stride;
  ws.cpb = p.select_size / p.block_stride;
  ws.slots = tile_slots(ws.cpr, ws.cpb);
  ws.sel_round = select_round(group_size(p), ws.cpb, ws.cpr);
  ws.sel_tiles = select_round_tiles(ws.sel_round, ws.cpb, ws.cpr);
  const size_t bh = size_t(p.batch) * p.num_heads_k, R = size_t(ws.rows), DV = size_t(p.head_dim_v);
  const size_t cs = size_t(p.plan.cmp_splits), ss = size_t(p.plan.slc_splits), T = size_t(ws.tiles);
  unsigned char* at = static_cast<unsigned char*>(base);
  size_t off = 0;
  auto take = [&](size_t bytes) {
    unsigned char* ptr = at ? at + off : nullptr;
    off += align256(bytes);
    return ptr;
  };
  ws.cmp_o = reinterpret_cast<float*>(take(bh * cs * R * DV * 4));
  ws.cmp_ml = reinterpret_cast<float*>(take(bh * cs * R * 2 * 4));
  ws.tile_m = reinterpret_cast<float*>(take(bh * T * R * 4));
  ws.tile_u = reinterpret_cast<float*>(take(bh * T * size_t(ws.slots) * R * 4));
  const size_t queries = bh * size_t(p.num_queries);
  ws.sel_keys = reinterpret_cast<uint64_t*>(take(queries * size_t(p.plan.sel_splits) * size_t(p.num_selected) * 8));
  ws.num_counters = int(queries + 5 * bh);  // check() bounds B H (S + 5) below 2^31
  ws.counters = reinterpret_cast<unsigned*>(take(size_t(ws.num_counters) * 4));
  if (ws.counters) {
    ws.sel_count = ws.counters;
    ws.scan_done = ws.sel_count + queries;
    ws.sel_done = ws.scan_done + bh;
    ws.slc_done = ws.sel_done + bh;
    ws.win_done = ws.slc_done + bh;
    ws.key_done = ws.win_done + bh;
  }
  ws.sp_o = reinterpret_cast<float*>(take(bh * ss * 2 * R * DV * 4));
  ws.sp_ml = reinterpret_cast<float*>(take(bh * ss * 2 * R * 2 * 4));
  ws.bad = reinterpret_cast<int32_t*>(take(size_t(p.batch) * p.num_queries * p.num_heads_k * 4));
  ws.bytes = off;
  return ws;
}

// Kernel Z, launched plainly first in the step (the previous step has completed): zeroes the n
// counters (counters.cuh). The kernels after it count only after their wait_prior_grid(), which
// covers Z, and wait on a counter only once the first of them has seen Z complete (after_reset).
__global__ void __launch_bounds__(256) decode_reset_kernel(unsigned* counters, int n) {
  allow_next_grid();
  for (int i = blockIdx.x * 256 + threadIdx.x; i < n; i += gridDim.x * 256) counters[i] = 0;
}

void launch_reset(const DecodeParams& p, const Workspace& ws, cudaStream_t stream) {
  const dim3 grid(unsigned(std::min(1024, (ws.num_counters + 255) / 256)));
  launch_kernel(p, decode_reset_kernel, grid, 256, 0, false, stream, ws.counters, ws.num_counters);
}

void launch_select(const DecodeParams& p, const Workspace& ws, cudaStream_t stream) {
  const dim3 grid(unsigned(p.plan.sel_splits * p.num_queries), unsigned(p.num_heads_k), unsigned(p.batch));
  launch_kernel(p, decode_select_kernel, grid, kSelectThreads, select_smem_bytes(group_size(p), ws.sel_tiles, ws.slots),
                true, stream, p, ws);
}

// The step's kernels in launch order: Z, then A, B, C, D with W before A, after A or after B
// (plan.window_order).
template <typename T>
void launch_step(const DecodeParams& p, const Workspace& ws, cudaStream_t stream) {
  const WindowOrder order = p.plan.window_order;
  launch_reset(p, ws, stream);
  Workspace first = ws;
  first.after_reset = true;
  if (order == WindowOrder::kBeforeScan) launch_window<T>(p, first, stream);
  launch_cmp<T>(p, order == WindowOrder::kBeforeScan ? ws : first, stream);
  if (order == WindowOrder::kAfterScan) launch_window<T>(p, ws, stream);
  launch_select(p, ws, stream);
  if (order == WindowOrder::kAfterSelect) launch_window<T>(p, ws, stream);
  launch_sparse<T>(p, ws, stream);
  launch_combine<T>(p, ws, stream);
}

}  // namespace decode

size_t decode_workspace_bytes(const DecodeParams& p) {
  decode::check(p);
  return decode::make_workspace(p, nullptr).bytes;
}

void decode_attention(const DecodeParams& p, void* workspace, cudaStream_t stream) {
  decode::check(p);
  if (p.batch == 0) return;
  const decode::Workspace ws = decode::make_workspace(p, workspace);
  if (p.dtype == Dtype::kBFloat16) decode::launch_step<__nv_bfloat16>(p, ws, stream);
  else decode::launch_step<__half>(p, ws, stream);
}

}  // namespace nsa::cuda
