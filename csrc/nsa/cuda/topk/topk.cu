// Entry point of the top-n block selection on CUDA: argument checks, the launch shape and the
// shared-memory layout (the kernel is in topk_kernel.cuh, its launches in launch.cuh).
#include <algorithm>
#include <stdexcept>
#include <string>

#include "../kernels.h"
#include "launch.h"

namespace nsa::cuda {
namespace {

using topk::invalid;
using topk::Shape;

int align16(int x) { return (x + 15) / 16 * 16; }

// Shared memory per block the launch shape aims at: two blocks per SM (228 KB on H100/H200, 1 KB
// of each block reserved by the system; less on A100).
int smem_budget(int smem_per_sm) { return std::min(110 * 1024, smem_per_sm / 2 - 1024); }

// Shared-memory layout of s (segments and tokens set).
void layout(const TopkParams& p, Shape& s) {
  const int P = s.tokens, n = p.num_selected, rows = s.segs * s.seg_rows;
  const int warps = topk::kernel_warps(p.head_dim, s.resident != 0);
  const int q_bytes = align16(rows * p.head_dim * 2);
  // Resident: Q moves to registers before the per-token state is first written, so that state
  // lives over q_s.
  int off = s.resident ? 0 : q_bytes;
  s.off_scratch = off;
  off += s.reduce == 0 ? warps * s.seg_rows * topk::kScratchLd * 4 : 0;
  s.off_w = off;
  off += align16(P * s.ws * 4);
  s.off_list = off;
  off += align16(P * n * 8);
  s.off_cand = off;
  off += align16(P * s.cap * 8);
  s.off_theta = off;
  off += align16(P * 8);
  s.off_cnt = off;
  off += align16(P * 4);
  s.off_nacc = off;
  off += align16(P * 4);
  s.off_open = off;
  off += align16(2 * P * 4);
  s.off_k = std::max(off, q_bytes);
  if (s.wgmma) s.off_k = (s.off_k + 1023) / 1024 * 1024;  // the descriptors' swizzle atoms
  off = s.off_k + align16(2 * topk::kTileRows * p.head_dim * 2);
  s.off_lse = off;
  off += align16(rows * 4);
  s.off_nv = off;
  off += align16(rows * 4);
  s.smem = off;
}

// wgmma (p.plan.select, nsa/plan.cpp): one segment of 128 rows (128 / G tokens), its state within
// the budget with at least the fewest slots (else invalid: the plan cannot run). Otherwise
// G <= 32: units of 32 rows (32 / G tokens), Q in registers; G > 32: chunks of 64 rows (64 / G
// tokens, or one token in ceil(G / 64) chunks for G > 64). As many segments as fill the warps (256
// query rows), halved until the budget holds; G > 64 keeps all its chunks.
Shape make_shape(const TopkParams& p, int budget, bool wgmma) {
  Shape s{};
  const int G = p.num_heads / p.num_heads_k;
  s.group = G;
  s.resident = G <= topk::kMaxResidentGroup;
  s.seg_rows = s.resident ? topk::kUnitRows : topk::kRows;
  s.seg_tokens = G <= s.seg_rows ? s.seg_rows / G : 1;
  s.reduce = G > topk::kRows ? topk::kRows : ((G & (G - 1)) == 0 ? G : 0);
  s.cpr = p.block_size / p.block_stride;
  s.cpb = p.select_size / p.block_stride;
  // Slots: the blocks touching one tile's 64 cells, or the whole tail in one round if larger;
  // more (up to kMaxCand) where shared memory allows, so that merges (and their warp-serial
  // work) come every few tiles instead of after each.
  const int per_tile = 63 / s.cpb + 2;
  const int min_cap = std::min(topk::kMaxCand, std::max(per_tile, 1 + p.num_selected + p.num_local));
  s.ws = (s.cpr - 1 + topk::kTileRows) | 1;
  s.scale_log2 = float(p.scale * 1.4426950408889634);
  auto fits = [&](int cap) {
    s.cap = cap;
    s.merge_at = std::max(0, cap - per_tile);
    s.tokens = s.segs * s.seg_tokens;
    layout(p, s);
    return s.smem <= budget;
  };
  if (wgmma) {
    s.wgmma = 1;
    s.resident = 0;
    s.segs = 1;
    s.seg_rows = topk::kWgRows;
    s.seg_tokens = topk::kWgRows / G;
    if (fits(topk::kMaxCand) || fits(min_cap)) return s;
    invalid("select=\"wgmma\" cannot run: it needs " + std::to_string(s.smem) + " bytes of shared memory per block, "
            "more than the budget of " + std::to_string(budget) + " (G = " + std::to_string(G) + ", D = " +
            std::to_string(p.head_dim) + ", block_size / block_stride = " + std::to_string(s.cpr) +
            ", num_selected = " + std::to_string(p.num_selected) + ")");
  }
  if (G > topk::kRows) {
    s.segs = (G + topk::kRows - 1) / topk::kRows;
    s.tokens = 1;
    s.cap = topk::kMaxCand;
    s.merge_at = std::max(0, s.cap - per_tile);
    layout(p, s);
    return s;
  }
  // Resident: a power of two <= warps (the warps of a unit split the key tile evenly). For each
  // count of segments, the most slots first; segments are halved when even the fewest do not fit.
  for (s.segs = s.resident ? topk::kernel_warps(p.head_dim, true) : 4;; s.segs /= 2) {
    if (fits(topk::kMaxCand) || fits(min_cap) || s.segs == 1) break;
  }
  return s;
}

}  // namespace

void select_topk(const TopkParams& p, cudaStream_t stream) {
  if (p.dtype != Dtype::kBFloat16 && p.dtype != Dtype::kFloat16)
    invalid("dtype must be bfloat16 or float16 on CUDA");
  if (!supported_head_dim(p.head_dim))
    invalid("head dim D must be one of " + head_dims_list(false) + " on CUDA, got " + std::to_string(p.head_dim));
  if (p.num_heads_k < 1 || p.num_heads < 1 || p.num_heads % p.num_heads_k != 0)
    invalid("num_heads (" + std::to_string(p.num_heads) + ") must be a positive multiple of num_heads_k (" +
            std::to_string(p.num_heads_k) + ")");
  if (p.block_stride < 1 || p.block_size < 1 || p.block_size % p.block_stride != 0 ||
      p.select_size < 1 || p.select_size % p.block_stride != 0)
    invalid("block_stride must divide block_size and select_size, got block_size = " +
            std::to_string(p.block_size) + ", block_stride = " + std::to_string(p.block_stride) +
            ", select_size = " + std::to_string(p.select_size));
  if (p.num_selected > topk::kMaxSelected)
    invalid("num_selected > " + std::to_string(topk::kMaxSelected) + " unsupported on CUDA, got " +
            std::to_string(p.num_selected));
  if (p.num_selected < 1 || p.num_initial < 0 || p.num_local < 0 ||
      p.num_initial + p.num_local > p.num_selected)
    invalid("need 1 <= num_selected and num_initial + num_local <= num_selected, got num_selected = " +
            std::to_string(p.num_selected) + ", num_initial = " + std::to_string(p.num_initial) +
            ", num_local = " + std::to_string(p.num_local));

  const DeviceFacts& dev = p.plan.device;
  const Shape s = make_shape(p, smem_budget(dev.smem_per_sm), p.plan.select == SelectKernel::kWgmma);
  const bool packed = p.seqs.cu_seqlens != nullptr;
  if (p.seqs.num_seqs <= 0 || p.seqs.seqlen <= 0 || p.seqs.batch <= 0) return;
  const index_t tiles = num_virtual_tiles(p.seqs, p.seqs.seqlen, 1, s.tokens);
  if (tiles > index_t(0x7fffffff) || p.num_heads_k > 65535 || (!packed && p.seqs.batch > 65535))
    invalid("grid too large (tiles = " + std::to_string(tiles) + ", H = " + std::to_string(p.num_heads_k) +
            ", B = " + std::to_string(p.seqs.batch) + ")");
  const dim3 grid(unsigned(tiles), unsigned(p.num_heads_k), unsigned(packed ? 1 : p.seqs.batch));
  if (p.dtype == Dtype::kBFloat16)
    topk::launch_select<__nv_bfloat16>(p, s, dev.smem_per_block, grid, stream);
  else
    topk::launch_select<__half>(p, s, dev.smem_per_block, grid, stream);
}

}  // namespace nsa::cuda
