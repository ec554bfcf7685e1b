// Launch templates of the attention kernels: dtype and head-dim dispatch, shared-memory limits,
// grids, launch checks. Instantiated per (dtype, branch) by the files in cmp/, slc/, swa/. Which
// kernel runs is the params' plan (nsa/plan.h, filled by the binding).
#pragma once

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../common/cuda_check.h"
#include "../head_dims.h"
#include "bwd.cuh"
#include "fwd_wgmma.cuh"
#include "fwd_wide.cuh"
#include "slc_blocks.cuh"
#include "slc_warp.cuh"

namespace nsa::cuda {

template <Branch B>
constexpr const char* op_name() {
  return B == Branch::kCmp ? "nsa.compressed_attention"
                           : B == Branch::kSlc ? "nsa.selected_attention" : "nsa.sliding_window_attention";
}

// Opts kernel in to `bytes` of dynamic shared memory. More than the device allows is an error
// naming branch B's op (the selected branch's block union grows with num_selected: with
// D = Dv = 256 and G >= 64 the dq kernel passes sm_90's 227 KB beyond about 45 blocks).
template <Branch B, typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)) != cudaSuccess) {
    (void)cudaGetLastError();  // (reported here instead)
    throw std::invalid_argument(std::string(op_name<B>()) + ": a kernel needs " + std::to_string(bytes) +
                                " bytes of shared memory per thread block, more than the device allows");
  }
}

// Shared memory of the selected branch's block union (0 for the other branches).
template <Branch B, typename P>
size_t union_bytes(const P& p) {
  if constexpr (B == Branch::kSlc) return block_union_bytes(p.seqs.seqlen, p.select_size, p.num_selected);
  return 0;
}

// Launches kernel on grid (nothing when the grid is empty) with `threads` threads and `smem` bytes
// of dynamic shared memory, then checks the launch (errors name branch B's op).
template <Branch B, typename Kernel, typename... Args>
void launch_kernel(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream, Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  set_smem<B>(kernel, smem);
  kernel<<<grid, threads, smem, stream>>>(args...);
  check_launch(op_name<B>());
}

// Launches a per-warp kernel of the selected branch (slc_warp.cuh) with `tiles_bytes` of tiles
// (slc_warp_tiles_bytes) before its items; args are the kernel's arguments after p.
template <typename Kernel, typename... Args>
void launch_slc_warp(const SlcParams& p, cudaStream_t stream, Kernel kernel, size_t tiles_bytes,
                     Args... args) {
  launch_kernel<Branch::kSlc>(kernel, query_grid(p, kWarpRows), 32, slc_warp_smem_bytes(tiles_bytes, p.num_selected),
                              stream, p, args...);
}

template <typename T, Branch B>
void run_fwd(const typename BranchParams<B>::type& p, cudaStream_t stream) {
  dispatch_head_dims(op_name<B>(), p.head_dim, p.head_dim_v, [&](auto d, auto dv) {
    constexpr int D = decltype(d)::value, DV = decltype(dv)::value;
    // (The plan picks kWide only for D, DV <= 128 and kWgmma only for D, DV in {64, 128}; the
    // selected branch by blocks runs from slc.cu.)
    if constexpr (B == Branch::kSlc) {
      if (p.plan.slc_fwd == SlcKernel::kWarp)
        return launch_slc_warp(p, stream, slc_fwd_warp_kernel<T, D, DV>, slc_warp_tiles_bytes<D, DV>(0));
    } else if constexpr (D <= 128 && DV <= 128) {
      if (p.plan.fwd == FwdKernel::kWide)
        return launch_kernel<B>(attn_fwd_wide_kernel<T, D, DV, B>, query_grid(p, kWideRows), kThreads,
                                fwd_wide_smem_bytes<D, DV>(), stream, p);
      if constexpr (wgmma_head_dims(D, DV)) {
        if (p.plan.fwd == FwdKernel::kWgmma)
          return launch_kernel<B>(attn_fwd_wgmma_kernel<T, D, DV, B>, query_grid(p), kThreads,
                                  fwd_wgmma_smem_bytes<D, DV>(), stream, p);
      }
    }
    launch_kernel<B>(attn_fwd_kernel<T, D, DV, B>, query_grid(p), kThreads,
                     fwd_smem_tiles_bytes<D, DV>() + union_bytes<B>(p), stream, p);
  });
}

// Grid of the dkdv kernel: key tiles (or virtual blocks x tiles per block) x KV heads x batch.
template <Branch B, typename P>
dim3 key_grid(const P& p, index_t vblocks) {
  const unsigned z = unsigned(p.seqs.cu_seqlens ? 1 : p.seqs.batch);
  if constexpr (B == Branch::kSlc) {
    const index_t per_block = tiles_per_block(p.select_size);
    const index_t x = p.seqs.cu_seqlens ? vblocks : num_select_blocks(p.seqs.seqlen, p.select_size);
    return dim3(unsigned(x * per_block), unsigned(p.num_heads_k), z);
  } else {
    const index_t total = B == Branch::kCmp ? p.seqs.cmp_seqlen : p.seqs.seqlen;
    return dim3(unsigned(num_virtual_tiles(p.seqs, total, 1, kKeys)), unsigned(p.num_heads_k), z);
  }
}

// How the dkdv kernel splits its long key tiles (see DkdvSplit): by the plan's p.plan.split token
// ranges (nsa/plan.h), for every compressed key tile and the selected branch's first
// kSlcSplitBlocks blocks of each sequence; never for the window branch (its key tiles see at
// most window_size + 63 queries). Without the split, the thread block of the first compressed key
// tile (seen by every query) loops over all T * G / 64 row tiles alone: at 64k it alone takes
// longer than the rest of the kernel (benchmarks/NOTES.md).
constexpr int kSlcSplitBlocks = 4;

template <Branch B, typename P>
DkdvSplit plan_dkdv_split(const P& p, index_t vblocks) {
  DkdvSplit sp;
  if (B == Branch::kSwa || p.plan.split <= 1) return sp;
  sp.count = p.plan.split;
  const index_t zrows = p.seqs.cu_seqlens ? 1 : p.seqs.batch;
  if constexpr (B == Branch::kCmp) {
    sp.slots = zrows * p.num_heads_k * index_t(key_grid<B>(p, vblocks).x);
  } else if constexpr (B == Branch::kSlc) {
    sp.lead_tiles = kSlcSplitBlocks * tiles_per_block(p.select_size);
    sp.seq_slots = p.seqs.cu_seqlens ? p.seqs.num_seqs : 1;
    sp.slots = zrows * p.num_heads_k * sp.seq_slots * sp.lead_tiles;
  }
  return sp;
}

// Workspace slices start at multiples of 256 bytes.
inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }

// Bytes of the fp32 partials of a split plan, rounded to 256.
inline size_t split_bytes(const DkdvSplit& sp, const AttnParams& p) {
  if (sp.count <= 1) return 0;
  return align256(size_t(sp.count) * size_t(sp.slots) * kKeys * size_t(p.head_dim + p.head_dim_v) *
                  sizeof(float));
}

// delta must hold B * T * HQ floats, partial split_bytes(plan_dkdv_split(p, rix.vblocks), p)
// bytes. rix is used by the selected branch only. The selected branch's dQ by blocks is computed
// elsewhere (slc.cu); delta still is here.
template <typename T, Branch B>
void run_bwd(const typename BranchParams<B>::type& p, float* delta, const ReverseIndex& rix,
             float* partial, cudaStream_t stream) {
  const index_t rows = index_t(p.seqs.batch) * p.seqs.seqlen * p.num_heads;
  if (rows > 0) {
    View dlse;
    if constexpr (B == Branch::kCmp) dlse = p.dlse;
    attn_bwd_delta_kernel<T><<<unsigned((rows + 3) / 4), kThreads, 0, stream>>>(p, dlse, delta);
    check_launch(op_name<B>());
  }
  dispatch_head_dims(op_name<B>(), p.head_dim, p.head_dim_v, [&](auto d, auto dv) {
    constexpr int D = decltype(d)::value, DV = decltype(dv)::value;
    // (The plan picks kWgmma only for D, DV in {64, 128}.)
    const bool wgmma = p.plan.bwd == BwdKernel::kWgmma;
    if (B == Branch::kSlc && p.plan.slc_dq == SlcKernel::kBlocks) {
      // (slc.cu computes dq)
    } else if (B == Branch::kSlc && p.plan.slc_dq == SlcKernel::kWarp) {
      if constexpr (B == Branch::kSlc)
        launch_slc_warp(p, stream, slc_dq_warp_kernel<T, D, DV>, slc_warp_tiles_bytes<D, DV>(D + DV), delta);
    } else {
      auto kernel = attn_bwd_dq_kernel<T, D, DV, B>;
      if constexpr (wgmma_head_dims(D, DV)) {
        if (wgmma) kernel = attn_bwd_dq_kernel<T, D, DV, B, true>;
      }
      launch_kernel<B>(kernel, query_grid(p), kThreads, dq_smem_tiles_bytes<D, DV>() + union_bytes<B>(p), stream, p,
                       delta);
    }
    const dim3 kgrid = key_grid<B>(p, rix.vblocks);
    if (kgrid.x > 0 && kgrid.y > 0 && kgrid.z > 0) {
      DkdvSplit split = plan_dkdv_split<B>(p, rix.vblocks);
      split.partial = partial;
      auto launch_dkdv = [&](auto kernel) {
        launch_kernel<B>(kernel, dim3(kgrid.x, kgrid.y, kgrid.z * split.count), kThreads, dkdv_smem_bytes<D, DV>(),
                         stream, p, delta, rix, split);
      };
      if constexpr (dkdv_two_passes<D, DV>()) {
        launch_dkdv(attn_bwd_dkdv_kernel<T, D, DV, B, false, DkdvOut::kDv>);
        launch_dkdv(attn_bwd_dkdv_kernel<T, D, DV, B, false, DkdvOut::kDk>);
      } else {
        auto kernel = attn_bwd_dkdv_kernel<T, D, DV, B>;
        if constexpr (wgmma_head_dims(D, DV)) {
          if (wgmma) kernel = attn_bwd_dkdv_kernel<T, D, DV, B, true>;
        }
        launch_dkdv(kernel);
      }
      if (split.count > 1)
        launch_kernel<B>(attn_bwd_dkdv_reduce_kernel<T, D, DV, B>, kgrid, kThreads, 0, stream, p, split);
    }
  });
}

// The selected branch by blocks over the rows of one chunk (slc_blocks.cuh): the partials of every
// key tile (grid: the dK/dV kernel's, only the blocks the chunk's tokens can have chosen when
// there is one fixed-length sequence), then their merge into o and lse (forward) or dq (kDq;
// delta: attn_bwd_delta_kernel's).
template <typename T, bool kDq>
void run_slc_blocks(const SlcParams& p, const ReverseIndex& rix, const SlcPartials& part, const float* delta,
                    cudaStream_t stream) {
  constexpr Branch B = Branch::kSlc;
  dispatch_head_dims(op_name<B>(), p.head_dim, p.head_dim_v, [&](auto d, auto dv) {
    constexpr int D = decltype(d)::value, DV = decltype(dv)::value;
    if constexpr (wgmma_head_dims(D, DV)) {
      dim3 grid = key_grid<B>(p, rix.vblocks);
      if (!p.seqs.cu_seqlens && p.seqs.batch == 1) {
        const index_t last = part.row0 + part.rows - 1;  // the chunk's last token
        grid.x = unsigned(std::min<index_t>(grid.x, (last / p.select_size + 1) * tiles_per_block(p.select_size)));
      }
      grid.z *= unsigned(part.splits);
      launch_kernel<B>(slc_blocks_kernel<T, D, DV, kDq>, grid, kThreads, slc_blocks_smem_bytes<D, DV, kDq>(), stream,
                       p, rix, part, delta);
      const dim3 merge_grid(unsigned((part.rows * p.num_heads + kThreads / 32 - 1) / (kThreads / 32)));
      if constexpr (kDq)
        launch_kernel<B>(slc_dq_merge_kernel<T, D>, merge_grid, kThreads, 0, stream, p, part);
      else
        launch_kernel<B>(slc_merge_kernel<T, DV>, merge_grid, kThreads, 0, stream, p, part);
    } else {
      throw std::invalid_argument(std::string(op_name<B>()) + ": the selected branch by blocks needs D, Dv in {64, 128}");
    }
  });
}

// Entry points of one branch and dtype, defined by the instantiation files.
#define NSA_INSTANTIATE_ATTN(T, B)                                                                \
  template void run_fwd<T, B>(const typename BranchParams<B>::type&, cudaStream_t);              \
  template void run_bwd<T, B>(const typename BranchParams<B>::type&, float*, const ReverseIndex&, \
                              float*, cudaStream_t);
#define NSA_INSTANTIATE_SLC_BLOCKS(T)                                                                    \
  template void run_slc_blocks<T, false>(const SlcParams&, const ReverseIndex&, const SlcPartials&, const float*, \
                                         cudaStream_t);                                                   \
  template void run_slc_blocks<T, true>(const SlcParams&, const ReverseIndex&, const SlcPartials&, const float*,  \
                                        cudaStream_t);

}  // namespace nsa::cuda
