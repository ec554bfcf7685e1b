// Entry points of the decoding step on CUDA (kernels.h): argument checks, the workspace layout
// (decode.h), and the launches in stream order. Kernels Z and B are launched from here, the others
// from their per-dtype files.
#include <algorithm>
#include <climits>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../common/cuda_check.h"
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
  if (p.plan.cmp_splits < 1 || p.plan.slc_splits < 1 || p.plan.sel_splits < 1 || p.plan.sel_splits > kMaxSelectSplits ||
      p.plan.batch_chunks < 1 || p.plan.batch_chunks > kMaxBatchChunks)
    invalid("the plan's splits must be >= 1 (sel_splits <= " + str(kMaxSelectSplits) + ", batch_chunks <= " +
            str(kMaxBatchChunks) + "), got cmp_splits = " + str(p.plan.cmp_splits) + ", slc_splits = " +
            str(p.plan.slc_splits) + ", sel_splits = " + str(p.plan.sel_splits) + ", batch_chunks = " +
            str(p.plan.batch_chunks));
  const index_t rows = index_t(p.num_queries) * (p.num_heads / p.num_heads_k);
  if (p.batch > 65535 || index_t(p.num_heads_k) * ((rows + kBlockRows - 1) / kBlockRows) > 65535 ||
      p.num_queries > 65535 || cmp_tiles(p.cmp_capacity) > INT_MAX / kTileKeys || rows > INT_MAX / 2 ||
      index_t(p.batch) * p.num_queries * p.num_heads > INT_MAX ||
      index_t(p.batch) * p.num_heads_k * (p.num_queries + 5) > INT_MAX)
    invalid("shape too large for the launch grids (B = " + str(p.batch) + ", S = " + str(p.num_queries) + ", HQ = " +
            str(p.num_heads) + ", H = " + str(p.num_heads_k) + ", cmp_capacity = " + str(p.cmp_capacity) + ")");
}

size_t align256(size_t x) { return (x + 255) / 256 * 256; }

// v from sequence b0 on (elements of `bytes` bytes).
View from_sequence(View v, index_t b0, size_t bytes) {
  if (v.data) v.data = static_cast<unsigned char*>(v.data) + b0 * v.batch_stride * index_t(bytes);
  return v;
}

// The params of the step's sequences [b0, b0 + nb) as a step of their own: every tensor indexed
// by sequence starts at b0 (a paged cache's pool stays, its block table moves).
DecodeParams chunk_params(const DecodeParams& p, int b0, int nb) {
  DecodeParams c = p;
  c.batch = nb;
  const size_t t = 2;  // bfloat16 or float16 (check)
  c.q = from_sequence(p.q, b0, t);
  if (p.block_table == nullptr) {
    c.k = from_sequence(p.k, b0, t);
    c.v = from_sequence(p.v, b0, t);
    c.k_swa = from_sequence(p.k_swa, b0, t);
    c.v_swa = from_sequence(p.v_swa, b0, t);
  } else {
    c.block_table = p.block_table + index_t(b0) * p.block_table_stride;
  }
  c.k_cmp = from_sequence(p.k_cmp, b0, t);
  c.v_cmp = from_sequence(p.v_cmp, b0, t);
  for (int i = 0; i < 3; ++i) c.gate[i] = from_sequence(p.gate[i], b0, t);
  c.o = from_sequence(p.o, b0, t);
  c.block_indices = from_sequence(p.block_indices, b0, sizeof(int32_t));
  c.seqlens = p.seqlens + b0;
  return c;
}

// The workspace of the step's sequences [b0, ...): every buffer is sequence-major (decode.h), so
// the same buffers from sequence b0 on.
Workspace chunk_workspace(const Workspace& ws, const DecodeParams& p, int b0) {
  Workspace c = ws;
  const size_t b = size_t(b0), H = size_t(p.num_heads_k), S = size_t(p.num_queries), R = size_t(ws.rows);
  const size_t DV = size_t(p.head_dim_v), T = size_t(ws.tiles);
  const size_t cs = size_t(p.plan.cmp_splits), ss = size_t(p.plan.slc_splits);
  c.cmp_o += b * H * cs * R * DV;
  c.cmp_ml += b * H * cs * R * 2;
  c.tile_m += b * H * T * R;
  c.tile_u += b * H * T * size_t(ws.slots) * R;
  c.sel_keys += b * S * H * size_t(p.plan.sel_splits) * size_t(p.num_selected);
  c.sel_count += b * S * H;
  c.scan_done += b * H;
  c.sel_done += b * H;
  c.slc_done += b * H;
  c.win_done += b * H;
  c.key_done += b * H;
  c.sp_o += b * H * ss * 2 * R * DV;
  c.sp_ml += b * H * ss * 2 * R * 2;
  c.bad += b * S * H;
  return c;
}

// The events of a step in chunks (a fork after Z, a join per later chunk), per thread and device:
// a call records and waits on them before it returns, so the calls of a thread can share them.
class StepEvents {
 public:
  ~StepEvents() {
    for (auto& [device, events] : events_)
      for (cudaEvent_t e : events) (void)cudaEventDestroy(e);
  }
  cudaEvent_t* get(int count) {
    int device = 0;
    check_cuda(kOp, cudaGetDevice(&device), "cudaGetDevice failed");
    std::vector<cudaEvent_t>& events = events_[device];
    while (int(events.size()) < count) {
      cudaEvent_t e = nullptr;
      check_cuda(kOp, cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate failed");
      events.push_back(e);
    }
    return events.data();
  }

 private:
  std::map<int, std::vector<cudaEvent_t>> events_;
};

// Launch priority of chunk c of a step in chunks: the GPU's greatest for the first, one level
// less for each later one, down to the least (the default streams').
int chunk_priority(int c) {
  static const std::pair<int, int> range = [] {
    int least = 0, greatest = 0;
    if (cudaDeviceGetStreamPriorityRange(&least, &greatest) != cudaSuccess) (void)cudaGetLastError();
    return std::make_pair(least, greatest);
  }();
  return std::min(range.first, range.second + c);
}

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

// One chain of the step's kernels in launch order: A, B, C, D with W before A, after A or after B
// (plan.window_order). `after_reset`: its first kernel follows Z in the stream.
template <typename T>
void launch_chain(const DecodeParams& p, const Workspace& ws, bool after_reset, cudaStream_t stream) {
  const WindowOrder order = p.plan.window_order;
  Workspace first = ws;
  first.after_reset = after_reset;
  if (order == WindowOrder::kBeforeScan) launch_window<T>(p, first, stream);
  launch_cmp<T>(p, order == WindowOrder::kBeforeScan ? ws : first, stream);
  if (order == WindowOrder::kAfterScan) launch_window<T>(p, ws, stream);
  launch_select(p, ws, stream);
  if (order == WindowOrder::kAfterSelect) launch_window<T>(p, ws, stream);
  launch_sparse<T>(p, ws, stream);
  launch_combine<T>(p, ws, stream);
}

// The chains of a step in chunks of `per` sequences (launch_step); `forked` counts chunk 0 and
// the chunks whose stream has waited on `fork`.
template <typename T>
void launch_chains(const DecodeParams& p, const Workspace& ws, int per, cudaStream_t stream,
                   const cudaStream_t* chunk_streams, cudaEvent_t fork, int& forked) {
  index_t combine_first = 0;
  for (int c = 0, b0 = 0; b0 < p.batch; ++c, b0 += per) {
    DecodeParams cp = chunk_params(p, b0, std::min(per, p.batch - b0));
    const Workspace cw = chunk_workspace(ws, p, b0);
    // (numbers past INT_MAX trace nothing: clamped, they are past any trace's blocks)
    auto clamped = [](index_t x) { return int(std::min<index_t>(x, INT_MAX)); };
    const index_t units = index_t(b0) * p.num_heads_k * ws.row_blocks;
    cp.plan.trace_first[kTraceWindow] = cp.plan.trace_first[kTraceSparse] = clamped(units * p.plan.slc_splits);
    cp.plan.trace_first[kTraceScan] = clamped(units * p.plan.cmp_splits);
    cp.plan.trace_first[kTraceSelect] = clamped(index_t(b0) * p.num_heads_k * p.num_queries * p.plan.sel_splits);
    cp.plan.trace_first[kTraceCombine] = clamped(combine_first);
    combine_first += combine_blocks(cp);
    cp.plan.priority = chunk_priority(c);
    const cudaStream_t s = c == 0 ? stream : chunk_streams[c - 1];
    if (c > 0) {
      check_cuda(kOp, cudaStreamWaitEvent(s, fork, 0), "cudaStreamWaitEvent failed");
      forked = c + 1;
    }
    launch_chain<T>(cp, cw, c == 0, s);
  }
}

// The step: Z, then one chain over all sequences, or (plan.batch_chunks > 1) a chain per chunk of
// consecutive sequences, each a step of its own over its sequences: the first chunk's on
// `stream`, the others' on chunk_streams, forked after Z and joined back into `stream`. Chunk c's
// kernels launch at priority chunk_priority(c), so that as the first chunk's scan blocks leave,
// its selection, window and selected kernels get the SMs first and the next chunk's scan the rest:
// one chunk selects while the next streams. The trace numbers a chunk's blocks after the earlier
// chunks'.
template <typename T>
void launch_step(const DecodeParams& p, const Workspace& ws, cudaStream_t stream, const cudaStream_t* chunk_streams) {
  launch_reset(p, ws, stream);
  const int chunks = std::max(1, std::min(p.plan.batch_chunks, p.batch));
  if (chunks == 1) return launch_chain<T>(p, ws, true, stream);
  if (chunk_streams == nullptr) throw std::invalid_argument(std::string(kOp) + ": batch_chunks > 1 needs a stream per chunk");
  const int per = (p.batch + chunks - 1) / chunks;
  const int chains = (p.batch + per - 1) / per;
  thread_local StepEvents step_events;
  cudaEvent_t* events = step_events.get(chains);
  check_cuda(kOp, cudaEventRecord(events[0], stream), "cudaEventRecord failed");
  // Joins chunks 1 .. forked - 1 back into `stream`: after the last chain, and before an error
  // leaves the step (a capture with a stream not joined back would fail with another error).
  int forked = 1;
  auto join = [&] {
    for (int c = 1; c < forked; ++c) {
      check_cuda(kOp, cudaEventRecord(events[c], chunk_streams[c - 1]), "cudaEventRecord failed");
      check_cuda(kOp, cudaStreamWaitEvent(stream, events[c], 0), "cudaStreamWaitEvent failed");
    }
  };
  try {
    launch_chains<T>(p, ws, per, stream, chunk_streams, events[0], forked);
  } catch (...) {
    try {
      join();
    } catch (...) {  // the first error is the one to report
    }
    throw;
  }
  join();
}

}  // namespace decode

size_t decode_workspace_bytes(const DecodeParams& p) {
  decode::check(p);
  return decode::make_workspace(p, nullptr).bytes;
}

void decode_attention(const DecodeParams& p, void* workspace, cudaStream_t stream, const cudaStream_t* chunk_streams) {
  decode::check(p);
  if (p.batch == 0) return;
  const decode::Workspace ws = decode::make_workspace(p, workspace);
  if (p.dtype == Dtype::kBFloat16) decode::launch_step<__nv_bfloat16>(p, ws, stream, chunk_streams);
  else decode::launch_step<__half>(p, ws, stream, chunk_streams);
}

}  // namespace nsa::cuda
