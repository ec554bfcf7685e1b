// What a latency-bound decoding step is made of, measured on the GPU at hand (sm_90), so that a
// new shape of the step for few sequences can be judged before it is written (docs/performance.md,
// "Decoding"). A standalone program, no torch (it shares the kernels' copy helpers, mma.cuh):
//
//     nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -o /tmp/gpu_latency tools/gpu_latency.cu
//     /tmp/gpu_latency            # or: bash benchmarks/gpu_check.sh latency
//
// 1. stream: a fixed volume (the compressed K/V a 128k step reads for one sequence, and 1 GiB)
//    streamed from device memory into shared memory by N thread blocks, each through a ring of
//    `depth` 16 KB slots, with one block per SM (its shared memory keeps a second out) or two;
//    loads by bulk copies (cp.async.bulk, one issuing thread, an mbarrier per slot) or by 16-byte
//    cp.async from 128 threads as the decode kernels load today; also as clusters of 16 blocks.
//    Says whether few blocks (64: 16 per (sequence, KV head) at B = 1, H = 4) can stream at the
//    rate 256 reach, and whether equal blocks end together.
// 2. chains of dependent operations by one thread (ns per link): an L2 load (__ldcg over an
//    L2-resident table), idle and while the whole GPU streams beside it; an atomicAdd's return.
// 3. a counter hand-off between two thread blocks (a release and an increment, polled with an
//    acquire load on another SM), the way the step's kernels wait for each other: ns per one-way
//    hand-off, idle.
// 4. clusters of 2 to 16 blocks: a cluster barrier (arrive.release + wait.acquire), and a chain of
//    loads from another block's shared memory (DSMEM); and how many 16-block clusters of one block
//    per SM are resident at once (cudaOccupancyMaxActiveClusters).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../csrc/nsa/cuda/common/mma.cuh"

using nsa::cuda::smem_addr;

#define CHECK(x)                                                                                 \
  do {                                                                                           \
    cudaError_t err_ = (x);                                                                      \
    if (err_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(err_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

constexpr int kSlotBytes = 16 * 1024;
constexpr int kThreads = 128;

__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// ---------------------------------------------------------------- 1. streaming
// Block i streams bytes [i * per, (i + 1) * per) of src (per a multiple of kSlotBytes), slot by
// slot through `depth` ring slots; every thread reads one word of each landed slot (the consumer),
// and the slot is refilled after a barrier. sink keeps the reads.
__global__ void stream_bulk(const unsigned char* src, size_t per, int depth, unsigned* sink, uint64_t* times) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) uint64_t full[16];
  if (threadIdx.x == 0) times[2 * blockIdx.x] = now_ns();
  const int slots = int(per / kSlotBytes);
  const unsigned char* base = src + size_t(blockIdx.x) * per;
  auto issue = [&](int k) {
    const uint32_t bar = smem_addr(&full[k % depth]);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(kSlotBytes) : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
            smem_addr(smem + (k % depth) * kSlotBytes)),
        "l"(base + size_t(k) * kSlotBytes), "r"(kSlotBytes), "r"(bar)
        : "memory");
  };
  if (threadIdx.x == 0) {
    for (int i = 0; i < depth; ++i) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(&full[i])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x == 0)
    for (int k = 0; k < depth && k < slots; ++k) issue(k);
  unsigned acc = 0;
  for (int k = 0; k < slots; ++k) {
    const uint32_t bar = smem_addr(&full[k % depth]), parity = uint32_t(k / depth) & 1u;
    uint32_t done = 0;
    while (!done)
      asm volatile(
          "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
          : "=r"(done)
          : "r"(bar), "r"(parity)
          : "memory");
    acc += reinterpret_cast<const unsigned*>(smem + (k % depth) * kSlotBytes)[threadIdx.x * 32];
    __syncthreads();  // every thread has read the slot
    if (threadIdx.x == 0 && k + depth < slots) {
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the reads before the bulk write
      issue(k + depth);
    }
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
  if (threadIdx.x == 0) times[2 * blockIdx.x + 1] = now_ns();
}

// The same with 16-byte cp.async from every thread, kDepth slots deep (kDepth - 1 in flight while
// one is read), as run_tiles does.
template <int kDepth>
__global__ void stream_cpasync(const unsigned char* src, size_t per, unsigned* sink, uint64_t* times) {
  using namespace nsa::cuda;
  extern __shared__ __align__(128) unsigned char smem[];
  if (threadIdx.x == 0) times[2 * blockIdx.x] = now_ns();
  const int slots = int(per / kSlotBytes);
  const unsigned char* base = src + size_t(blockIdx.x) * per;
  auto issue = [&](int k) {
    unsigned char* dst = smem + (k % kDepth) * kSlotBytes;
    const unsigned char* from = base + size_t(k) * kSlotBytes;
    for (int i = threadIdx.x * 16; i < kSlotBytes; i += kThreads * 16) cp_async_16(dst + i, from + i, true);
  };
  for (int k = 0; k < kDepth - 1; ++k) {
    if (k < slots) issue(k);
    cp_async_commit();
  }
  unsigned acc = 0;
  for (int k = 0; k < slots; ++k) {
    cp_async_wait<kDepth - 2>();  // slot k's group is complete
    __syncthreads();
    if (k + kDepth - 1 < slots) issue(k + kDepth - 1);
    cp_async_commit();
    acc += reinterpret_cast<const unsigned*>(smem + (k % kDepth) * kSlotBytes)[threadIdx.x * 32];
  }
  cp_async_wait<0>();
  if (acc == 0x9e3779b9u) sink[0] = acc;
  if (threadIdx.x == 0) times[2 * blockIdx.x + 1] = now_ns();
}
using CpAsyncKernel = void (*)(const unsigned char*, size_t, unsigned*, uint64_t*);
// The instantiation for a ring depth the cases use (nullptr for another).
CpAsyncKernel cpasync_kernel(int depth) {
  switch (depth) {
    case 3: return stream_cpasync<3>;
    case 4: return stream_cpasync<4>;
    case 6: return stream_cpasync<6>;
    case 8: return stream_cpasync<8>;
    default: return nullptr;
  }
}

// ---------------------------------------------------------------- 2. dependent chains
// One thread follows `links` links of a random cycle over `n` words (L2-resident, read with
// __ldcg), then as many dependent atomicAdds; ns per link of each into out[0], out[1].
__global__ void chains(const unsigned* next, int links, unsigned* counter, double* out) {
  if (threadIdx.x != 0) return;
  unsigned i = 0;
  for (int k = 0; k < 32; ++k) i = __ldcg(next + i);  // warm
  uint64_t t0 = now_ns();
  for (int k = 0; k < links; ++k) i = __ldcg(next + i);
  uint64_t t1 = now_ns();
  unsigned x = i & 1u;
  for (int k = 0; k < links; ++k) x = atomicAdd(counter, x & 1u) & 1u;
  uint64_t t2 = now_ns();
  out[0] = double(t1 - t0) / links;
  out[1] = double(t2 - t1) / links;
  if (x == 7u) counter[1] = i;
}

// Long streaming beside the chains: every resident block reads its share of src, `rounds` times.
__global__ void stream_plain(const uint4* src, size_t n, int rounds, unsigned* sink) {
  unsigned acc = 0;
  for (int r = 0; r < rounds; ++r)
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
      const uint4 v = __ldcs(src + i);
      acc ^= v.x ^ v.w;
    }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

// ---------------------------------------------------------------- 3. counter hand-off
// Blocks 0 and 1 (on different SMs: each takes more than half an SM's shared memory) pass a
// count back and forth `rounds` times: block b waits for the count to reach its turn (acquire
// loads), then releases and increments it. ns per one-way hand-off into out[0].
__global__ void handoff(unsigned* count, int rounds, double* out) {
  extern __shared__ unsigned char keep_apart[];
  if (threadIdx.x != 0) return;
  const unsigned me = blockIdx.x;
  const uint64_t t0 = now_ns();
  for (unsigned turn = me; turn < unsigned(2 * rounds); turn += 2) {
    unsigned seen;
    do asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(count) : "memory");
    while (seen < turn);
    asm volatile("fence.acq_rel.gpu;" ::: "memory");
    atomicAdd(count, 1u);
  }
  if (me == 0) out[0] = double(now_ns() - t0) / (2.0 * rounds);
  (void)keep_apart;
}

// ---------------------------------------------------------------- 4. clusters
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ unsigned cluster_rank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ unsigned cluster_size() {
  unsigned n;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
  return n;
}

// `iters` cluster barriers, then thread 0 of each block follows a chain of `iters` loads from the
// next block's shared memory; block 0 writes ns per barrier and per remote load.
__global__ void cluster_latency(int iters, double* out) {
  __shared__ unsigned table[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) table[i] = (i * 37 + 11) & 255;
  cluster_sync();
  const uint64_t t0 = now_ns();
  for (int k = 0; k < iters; ++k) cluster_sync();
  const uint64_t t1 = now_ns();
  uint64_t t2 = t1;
  if (threadIdx.x == 0) {
    const unsigned peer = (cluster_rank() + 1) % cluster_size();
    uint32_t remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(table)), "r"(peer));
    unsigned i = 0;
    const uint64_t t = now_ns();
    for (int k = 0; k < iters; ++k) {
      unsigned v;
      asm volatile("ld.shared::cluster.u32 %0, [%1];" : "=r"(v) : "r"(remote + 4 * i) : "memory");
      i = v;
    }
    t2 = now_ns();
    if (blockIdx.x == 0) {
      out[0] = double(t1 - t0) / iters;
      out[1] = double(t2 - t) / iters + (i == 999u ? 1.0 : 0.0);
    }
  }
  cluster_sync();  // no block leaves while another reads its shared memory
}

// ---------------------------------------------------------------- host
// Median time (ms) of `reps` runs of launch() (which returns its launch's error) after one
// warm-up; -1 where the launch is refused (e.g. a cluster shape the GPU cannot place).
template <typename Launch>
float time_ms(cudaStream_t s, int reps, const Launch& launch) {
  if (launch() != cudaSuccess) {
    (void)cudaGetLastError();
    return -1.f;
  }
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int r = 0; r < reps; ++r) {
    CHECK(cudaEventRecord(a, s));
    CHECK(launch());
    CHECK(cudaEventRecord(b, s));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  CHECK(cudaGetLastError());
  std::sort(t.begin(), t.end());
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return t[t.size() / 2];
}

int main() {
  int dev = 0, sms = 0, smem_sm = 0, smem_block = 0;
  CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, dev));
  sms = prop.multiProcessorCount;
  smem_sm = int(prop.sharedMemPerMultiprocessor);
  smem_block = int(prop.sharedMemPerBlockOptin);
  std::printf("GPU: %s, %d SMs, %d KB shared memory per SM\n", prop.name, sms, smem_sm / 1024);
  // Dynamic shared memory up to what the block may opt in to, less the kernel's static arrays.
  auto allow_smem = [&](const void* kernel) {
    cudaFuncAttributes attr;
    CHECK(cudaFuncGetAttributes(&attr, kernel));
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               smem_block - int(attr.sharedSizeBytes)));
  };
  allow_smem(reinterpret_cast<const void*>(stream_bulk));
  for (int depth : {3, 4, 6, 8}) allow_smem(reinterpret_cast<const void*>(cpasync_kernel(depth)));
  allow_smem(reinterpret_cast<const void*>(handoff));
  CHECK(cudaFuncSetAttribute(stream_bulk, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));

  const size_t big = size_t(1) << 30;
  unsigned char* src = nullptr;
  unsigned* sink = nullptr;
  double* out = nullptr;
  CHECK(cudaMalloc(&src, big));
  CHECK(cudaMemset(src, 1, big));
  CHECK(cudaMalloc(&sink, 1024));
  CHECK(cudaMemset(sink, 0, 1024));
  CHECK(cudaMallocManaged(&out, 8 * sizeof(double)));
  cudaStream_t s, s2;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  CHECK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));

  // A device-to-device copy of 512 MB: the rate the benchmark's byte floor uses.
  const float copy_ms =
      time_ms(s, 5, [&] { return cudaMemcpyAsync(src + big / 2, src, big / 2, cudaMemcpyDeviceToDevice, s); });
  const double copy_gbs = 2.0 * double(big / 2) / (copy_ms * 1e6);
  std::printf("copy of 512 MB: %.0f GB/s (read + write)\n\n", copy_gbs);

  // 128k tokens: Nc = 8191 compressed tokens, K and V, 128 dims, 2 bytes, 4 KV heads.
  const size_t step_bytes = size_t(8192) * 128 * 2 * 2 * 4;
  uint64_t* times = nullptr;
  CHECK(cudaMallocManaged(&times, size_t(4 * sms) * sizeof(uint64_t)));
  std::printf("block ends: us after the first block's start, min / median / max over blocks (last run)\n");
  std::printf("| loads | blocks | per SM | cluster | depth (16 KB slots) | volume MB | us | GB/s | GB/s per block |"
              " block ends |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  struct Case { bool bulk; int blocks, per_sm, cluster, depth; };
  std::vector<Case> cases;
  for (int depth : {3, 4, 6, 8, 12}) cases.push_back({true, 64, 1, 1, depth});
  for (int depth : {4, 8, 12}) cases.push_back({true, 64, 1, 16, depth});
  for (int depth : {4, 8}) cases.push_back({true, 128, 1, 1, depth});
  for (int depth : {3, 6}) cases.push_back({true, 256, 2, 1, depth});
  for (int depth : {3, 4, 8}) cases.push_back({false, 64, 1, 1, depth});
  for (int depth : {3, 6}) cases.push_back({false, 256, 2, 1, depth});
  for (const size_t volume : {step_bytes, big}) {
    for (const Case& c : cases) {
      if (c.blocks > c.per_sm * sms) continue;
      const size_t per = volume / c.blocks / kSlotBytes * kSlotBytes;
      // One block per SM: more than half an SM's shared memory; two: the ring alone.
      size_t smem = size_t(c.depth) * kSlotBytes;
      if (c.per_sm == 1) smem = std::max(smem, size_t(smem_sm) / 2 + 8 * 1024);
      if (smem > size_t(smem_block) || (c.per_sm == 2 && 2 * (smem + 2048) > size_t(smem_sm))) continue;
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(c.blocks);
      cfg.blockDim = dim3(kThreads);
      cfg.dynamicSmemBytes = smem;
      cfg.stream = s;
      cudaLaunchAttribute attr[1];
      if (c.cluster > 1) {
        attr[0].id = cudaLaunchAttributeClusterDimension;
        attr[0].val.clusterDim.x = c.cluster;
        attr[0].val.clusterDim.y = attr[0].val.clusterDim.z = 1;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
      }
      const float ms = time_ms(s, 7, [&] {
        const unsigned char* from = src;
        if (c.bulk) return cudaLaunchKernelEx(&cfg, stream_bulk, from, per, c.depth, sink, times);
        return cudaLaunchKernelEx(&cfg, cpasync_kernel(c.depth), from, per, sink, times);
      });
      if (ms < 0) {
        std::printf("| %s | %d | %d | %d | %d | | refused | | | |\n", c.bulk ? "bulk" : "cp.async", c.blocks, c.per_sm,
                    c.cluster, c.depth);
        continue;
      }
      CHECK(cudaDeviceSynchronize());
      uint64_t first = times[0];
      std::vector<double> ends;
      for (int i = 0; i < c.blocks; ++i) first = std::min(first, times[2 * i]);
      for (int i = 0; i < c.blocks; ++i) ends.push_back(double(times[2 * i + 1] - first) / 1e3);
      std::sort(ends.begin(), ends.end());
      const double bytes = double(per) * c.blocks, gbs = bytes / (ms * 1e6);
      std::printf("| %s | %d | %d | %d | %d | %.1f | %.1f | %.0f | %.1f | %.1f / %.1f / %.1f |\n",
                  c.bulk ? "bulk" : "cp.async", c.blocks, c.per_sm, c.cluster, c.depth, bytes / 1e6, ms * 1e3, gbs,
                  gbs / c.blocks, ends.front(), ends[ends.size() / 2], ends.back());
    }
  }

  // Dependent chains: a random cycle over 4096 words (16 KB, L2-resident).
  const int n = 4096, links = 256;
  std::vector<unsigned> perm(n), next(n);
  for (int i = 0; i < n; ++i) perm[i] = i;
  uint64_t rng = 88172645463325252ull;
  for (int i = n - 1; i > 0; --i) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    std::swap(perm[i], perm[rng % (i + 1)]);
  }
  for (int i = 0; i < n; ++i) next[perm[i]] = perm[(i + 1) % n];
  unsigned *d_next = nullptr, *counter = nullptr;
  CHECK(cudaMalloc(&d_next, n * 4));
  CHECK(cudaMemcpy(d_next, next.data(), n * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMalloc(&counter, 64));
  CHECK(cudaMemset(counter, 0, 64));
  std::printf("\n| chain (one thread, dependent) | idle ns per link | beside a full-GPU stream ns per link |\n");
  std::printf("|---|---|---|\n");
  chains<<<1, 32, 0, s>>>(d_next, links, counter, out);
  CHECK(cudaStreamSynchronize(s));
  const double l2_idle = out[0], atom_idle = out[1];
  // The stream first (every SM but a few: blocks of 1024 threads, (SMs - 4) of them), the chains
  // after it on another stream, on an SM it leaves free.
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  CHECK(cudaEventRecord(a, s2));
  stream_plain<<<sms - 4, 1024, 0, s2>>>(reinterpret_cast<const uint4*>(src), big / 16, 4, sink);
  CHECK(cudaEventRecord(b, s2));
  chains<<<1, 32, 0, s>>>(d_next, links, counter, out);
  CHECK(cudaStreamSynchronize(s));
  CHECK(cudaStreamSynchronize(s2));
  CHECK(cudaGetLastError());
  float stream_ms = 0;
  CHECK(cudaEventElapsedTime(&stream_ms, a, b));
  std::printf("| L2 load (__ldcg) | %.0f | %.0f |\n", l2_idle, out[0]);
  std::printf("| atomicAdd's return | %.0f | %.0f |\n", atom_idle, out[1]);
  std::printf("(the stream beside them: %.0f GB/s)\n", 4.0 * double(big) / (stream_ms * 1e6));

  CHECK(cudaMemset(counter, 0, 64));
  handoff<<<2, 32, smem_sm / 2 + 8 * 1024, s>>>(counter, 1000, out);
  CHECK(cudaStreamSynchronize(s));
  CHECK(cudaGetLastError());
  std::printf("\ncounter hand-off between two SMs (release + atomicAdd, acquire polls): %.0f ns one way\n", out[0]);

  std::printf("\n| cluster blocks | barrier ns | DSMEM dependent load ns |\n|---|---|---|\n");
  CHECK(cudaFuncSetAttribute(cluster_latency, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  for (int size : {2, 4, 8, 16}) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(size);
    cfg.blockDim = dim3(kThreads);
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = size;
    attr[0].val.clusterDim.y = attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, cluster_latency, 1000, out);
    if (err != cudaSuccess) {
      std::printf("| %d | refused: %s | |\n", size, cudaGetErrorString(err));
      (void)cudaGetLastError();
      continue;
    }
    CHECK(cudaStreamSynchronize(s));
    std::printf("| %d | %.0f | %.0f |\n", size, out[0], out[1]);
  }
  {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(16 * 8);
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = size_t(smem_sm) / 2 + 8 * 1024;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 16;
    attr[0].val.clusterDim.y = attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    const cudaError_t err = cudaOccupancyMaxActiveClusters(&clusters, stream_bulk, &cfg);
    if (err == cudaSuccess) std::printf("\n16-block clusters of one block per SM resident at once: %d\n", clusters);
    else std::printf("\n16-block clusters: occupancy query failed: %s\n", cudaGetErrorString(err));
    (void)cudaGetLastError();
  }
  return 0;
}
