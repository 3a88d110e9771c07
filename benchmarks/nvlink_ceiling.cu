// How fast can SMs write to the other GPUs, with nothing else going on? Every GPU of one
// process writes the same number of bytes to every other GPU at once (the dispatch's
// all-to-all pattern without routing, flags or permute), by one of:
//   ce        the copy engines: cudaMemcpyPeerAsync to each peer, one stream per peer
//   st        SM stores only (16 bytes a lane from registers, no loads)
//   copy      SM loads of local memory, then stores to the peer (4 vectors in flight a lane)
//   tma_st    bulk stores from a shared-memory piece filled once (D groups in flight a warp)
//   tma_copy  bulk load local -> shared, bulk store shared -> peer (S stages a warp), as the
//             dispatch's copy-engine senders do (dispatch_copy.cu) but without chunks or flags
// and prints the rate per GPU: off-GPU bytes / the slowest GPU's kernel time (median of
// --reps, all GPUs released together by a host flag). It tells whether the transfer kernel
// is below the link or below what SMs can drive (results: benchmarks/RESULTS.md and
// docs/DESIGN.md, "Measured ceilings").
//
// Then the cost of one exchange step, the unit of the small-batch (decode) path: every
// GPU writes N bytes to every other GPU, each block releases a counter on each peer
// (fence + red.release.sys, as publish does), and every block waits (ld.acquire.sys) for
// every peer's blocks before the next step; time per step, averaged over 200 steps.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc -Icsrc/include \
//        benchmarks/nvlink_ceiling.cu -o nvlink_ceiling && ./nvlink_ceiling [MB per peer = 56] [reps = 10] [exchange]
// (a third argument `exchange`: the exchange steps only)
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "common/tma.cuh"

namespace {

#define CHECK(call)                                                                              \
  do {                                                                                           \
    cudaError_t err_ = (call);                                                                   \
    if (err_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

constexpr int kMaxGpus = 8;
constexpr int kPiece = 8192;  // bytes a warp moves per step (a bulk copy, or 16 vectors a lane)
constexpr int kThreads = 512;
constexpr uint64_t kGateTimeoutNs = 2'000'000'000;

struct Job {
  const char* src;             // this GPU's source: [peers][bytes_per_peer]
  char* dst[kMaxGpus];         // each GPU's receive buffer as mapped here: [sources][bytes_per_peer]
  int64_t bytes_per_peer;
  int rank, world, warps;      // warps per block that work (the rest exit)
  int depth;                   // tma_st: groups in flight; tma_copy: stages
  const volatile int* gate;    // host-mapped: the kernels start together
  unsigned long long* clock;   // [2]: first block's start, last block's end (globaltimer ns)
};

// Piece p of this warp goes to peer q = p % (W - 1) (rotated from rank + 1), at offset
// (p / (W - 1)) * kPiece of that peer's region for this rank.
__device__ __forceinline__ void piece_address(const Job& j, int64_t p, char*& dst, const char*& src) {
  const int peers = j.world - 1, q = static_cast<int>(p % peers);
  const int peer = (j.rank + 1 + q) % j.world;
  const int64_t off = (p / peers) * kPiece;
  dst = j.dst[peer] + (int64_t)j.rank * j.bytes_per_peer + off;
  src = j.src + (int64_t)q * j.bytes_per_peer + off;
}

__device__ bool wait_gate(const volatile int* gate) {
  const uint64_t start = hep::ptx::globaltimer_ns();
  while (*gate == 0) {
    if (hep::ptx::globaltimer_ns() - start > kGateTimeoutNs) return false;
  }
  return true;
}

enum Mode { kStore, kCopy, kTmaStore, kTmaCopy };

template <Mode kMode>
__device__ __forceinline__ void write_pieces(const Job& j, char* smem);

// Timed from the gate, not from the launch: the GPUs are launched one after another.
// A block's end is taken after every thread's writes are acknowledged (fence.sc.sys).
template <Mode kMode>
__global__ void __launch_bounds__(kThreads, 1) write_peers(const __grid_constant__ Job j) {
  extern __shared__ __align__(128) char smem[];
  if (threadIdx.x == 0) {
    if (!wait_gate(j.gate)) asm volatile("trap;");
    atomicMin(&j.clock[0], static_cast<unsigned long long>(hep::ptx::globaltimer_ns()));
  }
  __syncthreads();
  if (threadIdx.x / 32 < j.warps) write_pieces<kMode>(j, smem);
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) atomicMax(&j.clock[1], static_cast<unsigned long long>(hep::ptx::globaltimer_ns()));
}

template <Mode kMode>
__device__ __forceinline__ void write_pieces(const Job& j, char* smem) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t pieces = j.bytes_per_peer / kPiece * (j.world - 1);
  const int64_t warps = (int64_t)gridDim.x * j.warps;
  const int64_t first = (int64_t)blockIdx.x * j.warps + warp;
  char* dst;
  const char* src;

  if constexpr (kMode == kStore || kMode == kCopy) {
    constexpr int kVectors = kPiece / 16 / 32;  // per lane and piece
    for (int64_t p = first; p < pieces; p += warps) {
      piece_address(j, p, dst, src);
      int4* d = reinterpret_cast<int4*>(dst) + lane;
      const int4* s = reinterpret_cast<const int4*>(src) + lane;
      for (int v0 = 0; v0 < kVectors; v0 += 4) {
        int4 x[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          x[u] = kMode == kCopy ? hep::ptx::ld_nc_v4(s + 32 * (v0 + u)) : make_int4(lane, v0 + u, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) hep::ptx::st_global_v4(d + 32 * (v0 + u), x[u]);
      }
    }
  } else if constexpr (kMode == kTmaStore) {
    char* piece = smem + warp * kPiece;  // contents do not matter
    if (lane == 0) {
      int64_t issued = 0;
      for (int64_t p = first; p < pieces; p += warps, ++issued) {
        piece_address(j, p, dst, src);
        hep::tma::store(dst, piece, kPiece);
        hep::tma::commit_group();
        // at most `depth` groups in flight (wait_group.read needs a constant)
        if (issued >= j.depth) {
          switch (j.depth) {
            case 1: hep::tma::wait_group_read<1>(); break;
            case 2: hep::tma::wait_group_read<2>(); break;
            case 4: hep::tma::wait_group_read<4>(); break;
            default: hep::tma::wait_group_read<8>(); break;
          }
        }
      }
      hep::tma::wait_all();
    }
  } else {  // kTmaCopy: stages of kPiece bytes, loads issued stages - 1 ahead
    const int S = j.depth;
    char* ring = smem + (int64_t)warp * S * kPiece;
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + (int64_t)j.warps * S * kPiece) + warp * S;
    if (lane == 0) {
      for (int i = 0; i < S; ++i) hep::tma::mbarrier_init(&bars[i]);
      hep::tma::fence_mbarrier_init();
      const int64_t mine = first < pieces ? (pieces - first + warps - 1) / warps : 0;
      auto load = [&](int64_t i) {
        piece_address(j, first + i * warps, dst, src);
        hep::tma::load(ring + (i % S) * kPiece, src, kPiece, &bars[i % S]);
      };
      for (int64_t i = 0; i < S - 1 && i < mine; ++i) load(i);
      uint32_t parity = 0;
      for (int64_t i = 0; i < mine; ++i) {
        const int stage = static_cast<int>(i % S);
        const uint64_t start = hep::ptx::globaltimer_ns();
        while (!hep::tma::mbarrier_try_wait(&bars[stage], (parity >> stage) & 1)) {
          if (hep::ptx::globaltimer_ns() - start > kGateTimeoutNs) asm volatile("trap;");
        }
        parity ^= 1u << stage;
        piece_address(j, first + i * warps, dst, src);
        hep::tma::store(dst, ring + stage * kPiece, kPiece);
        hep::tma::commit_group();
        if (i + S - 1 < mine) {
          hep::tma::wait_group_read<1>();  // piece i - 1's store has read the stage about to load
          load(i + S - 1);
        }
      }
      hep::tma::wait_all();
    }
    __syncwarp();
  }
}

struct Exchange {
  char* dst[kMaxGpus];            // each GPU's receive buffer as mapped here
  uint64_t* arrivals[kMaxGpus];   // each GPU's counters [sources] as mapped here
  int64_t bytes_per_peer;         // N, a multiple of 16 * blockDim.x * gridDim.x or 0
  int rank, world, steps;
  const volatile int* gate;
  unsigned long long* clock;
};

__global__ void __launch_bounds__(kThreads, 1) exchange_steps(const __grid_constant__ Exchange x) {
  if (threadIdx.x == 0) {
    if (!wait_gate(x.gate)) asm volatile("trap;");
    atomicMin(&x.clock[0], static_cast<unsigned long long>(hep::ptx::globaltimer_ns()));
  }
  __syncthreads();
  const int64_t slice = x.bytes_per_peer / gridDim.x / 16;  // vectors per block and peer
  for (int step = 1; step <= x.steps; ++step) {
    for (int q = 1; q < x.world; ++q) {
      const int peer = (x.rank + q) % x.world;
      int4* d = reinterpret_cast<int4*>(x.dst[peer] + (int64_t)x.rank * x.bytes_per_peer) + blockIdx.x * slice;
      for (int64_t v = threadIdx.x; v < slice; v += blockDim.x) hep::ptx::st_global_v4(d + v, make_int4(step, 0, 0, 0));
    }
    __syncthreads();
    const int peer = (x.rank + 1 + threadIdx.x) % x.world;
    if (threadIdx.x < x.world - 1) {
      hep::ptx::fence_acq_rel_sys();
      hep::ptx::red_add_release_sys(x.arrivals[peer] + x.rank, 1);
      const uint64_t* mine = x.arrivals[x.rank] + peer;
      const uint64_t expected = (uint64_t)step * gridDim.x, start = hep::ptx::globaltimer_ns();
      while (hep::ptx::ld_acquire_sys(mine) < expected) {
        if (hep::ptx::globaltimer_ns() - start > kGateTimeoutNs) asm volatile("trap;");
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) atomicMax(&x.clock[1], static_cast<unsigned long long>(hep::ptx::globaltimer_ns()));
}

struct Gpu {
  char* src = nullptr;
  char* dst = nullptr;
  unsigned long long* clock = nullptr;
  uint64_t* arrivals = nullptr;  // [kMaxGpus]
  cudaStream_t streams[kMaxGpus] = {};
  cudaEvent_t start = nullptr, stop = nullptr;
};

struct Setup {
  int world = 0;
  int64_t bytes_per_peer = 0;
  std::vector<Gpu> gpus;
  volatile int* gate = nullptr;  // pinned, mapped
};

// The gate as the kernels see it.
const volatile int* device_gate(const Setup& s) {
  int* gate = nullptr;
  CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&gate), const_cast<int*>(s.gate), 0));
  return gate;
}

// The kernels' clock, reset on the GPU's stream before a launch (start = max, end = 0).
void reset_clock(Gpu& g) {
  const unsigned long long clock_init[2] = {~0ull, 0ull};
  CHECK(cudaMemcpyAsync(g.clock, clock_init, sizeof(clock_init), cudaMemcpyHostToDevice, g.streams[0]));
}

// Nanoseconds from the first block's start to the last block's end (after a sync).
unsigned long long clock_ns(const Gpu& g) {
  unsigned long long clock[2];
  CHECK(cudaMemcpy(clock, g.clock, sizeof(clock), cudaMemcpyDeviceToHost));
  return clock[1] - clock[0];
}

// One run: every GPU waits at the gate, then writes; returns the slowest GPU's ms (the
// copy engines: CUDA events, launched one GPU after another without a gate).
float run_once(Setup& s, const std::string& mode, int blocks, int warps, int depth) {
  *s.gate = 0;
  for (int d = 0; d < s.world; ++d) {
    Gpu& g = s.gpus[d];
    CHECK(cudaSetDevice(d));
    reset_clock(g);
    CHECK(cudaEventRecord(g.start, g.streams[0]));
    if (mode == "ce") {
      for (int q = 0; q < s.world - 1; ++q) {  // streams[1..] wait for the same start
        const int peer = (d + 1 + q) % s.world;
        CHECK(cudaStreamWaitEvent(g.streams[q + 1], g.start));
        CHECK(cudaMemcpyPeerAsync(s.gpus[peer].dst + (int64_t)d * s.bytes_per_peer, peer,
                                  g.src + (int64_t)q * s.bytes_per_peer, d, s.bytes_per_peer, g.streams[q + 1]));
        cudaEvent_t done;
        CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
        CHECK(cudaEventRecord(done, g.streams[q + 1]));
        CHECK(cudaStreamWaitEvent(g.streams[0], done));
        CHECK(cudaEventDestroy(done));
      }
    } else {
      Job j{};
      j.src = g.src;
      for (int r = 0; r < s.world; ++r) j.dst[r] = s.gpus[r].dst;
      j.bytes_per_peer = s.bytes_per_peer;
      j.rank = d;
      j.world = s.world;
      j.warps = warps;
      j.depth = depth;
      j.clock = g.clock;
      j.gate = device_gate(s);
      const size_t shared = mode == "tma_st"     ? (size_t)warps * kPiece
                            : mode == "tma_copy" ? (size_t)warps * depth * (kPiece + 8)
                                                 : 0;
      if (mode == "st") write_peers<kStore><<<blocks, kThreads, shared, g.streams[0]>>>(j);
      if (mode == "copy") write_peers<kCopy><<<blocks, kThreads, shared, g.streams[0]>>>(j);
      if (mode == "tma_st") write_peers<kTmaStore><<<blocks, kThreads, shared, g.streams[0]>>>(j);
      if (mode == "tma_copy") write_peers<kTmaCopy><<<blocks, kThreads, shared, g.streams[0]>>>(j);
      CHECK(cudaGetLastError());
    }
    CHECK(cudaEventRecord(g.stop, g.streams[0]));
  }
  *s.gate = 1;  // the copy-engine mode does not wait for it
  float slowest = 0.f;
  for (int d = 0; d < s.world; ++d) {
    CHECK(cudaSetDevice(d));
    CHECK(cudaEventSynchronize(s.gpus[d].stop));
    float ms = 0.f;
    if (mode == "ce") {
      CHECK(cudaEventElapsedTime(&ms, s.gpus[d].start, s.gpus[d].stop));
    } else {
      ms = static_cast<float>(clock_ns(s.gpus[d])) * 1e-6f;
    }
    slowest = std::max(slowest, ms);
  }
  return slowest;
}

void measure(Setup& s, const std::string& mode, int blocks, int warps, int depth, int reps) {
  std::vector<float> ms;
  for (int i = 0; i < reps + 2; ++i) {
    const float t = run_once(s, mode, blocks, warps, depth);
    if (i >= 2) ms.push_back(t);  // two warm-ups
  }
  std::sort(ms.begin(), ms.end());
  const float median = ms[ms.size() / 2];
  const double bytes = (double)s.bytes_per_peer * (s.world - 1);
  std::printf("%-9s blocks %3d warps %2d depth %d   %7.1f us   %6.1f GB/s off-GPU per GPU\n", mode.c_str(), blocks,
              warps, depth, median * 1e3, bytes / (median * 1e-3) / 1e9);
  std::fflush(stdout);
}

// Microseconds per exchange step of `bytes` to each peer with `blocks` blocks per GPU
// (the slowest GPU's average over the steps).
void measure_exchange(Setup& s, int64_t bytes, int blocks) {
  constexpr int kSteps = 200;
  float slowest = 0.f;
  *s.gate = 0;
  for (int d = 0; d < s.world; ++d) {
    CHECK(cudaSetDevice(d));
    CHECK(cudaMemset(s.gpus[d].arrivals, 0, kMaxGpus * sizeof(uint64_t)));
    CHECK(cudaDeviceSynchronize());
  }
  for (int d = 0; d < s.world; ++d) {
    Gpu& g = s.gpus[d];
    CHECK(cudaSetDevice(d));
    reset_clock(g);
    Exchange x{};
    for (int r = 0; r < s.world; ++r) {
      x.dst[r] = s.gpus[r].dst;
      x.arrivals[r] = s.gpus[r].arrivals;
    }
    x.bytes_per_peer = bytes;
    x.rank = d;
    x.world = s.world;
    x.steps = kSteps;
    x.gate = device_gate(s);
    x.clock = g.clock;
    exchange_steps<<<blocks, kThreads, 0, g.streams[0]>>>(x);
    CHECK(cudaGetLastError());
  }
  *s.gate = 1;
  for (int d = 0; d < s.world; ++d) {
    CHECK(cudaSetDevice(d));
    CHECK(cudaDeviceSynchronize());
    slowest = std::max(slowest, static_cast<float>(clock_ns(s.gpus[d])) * 1e-3f / kSteps);
  }
  std::printf("exchange  blocks %3d   %9.1f KB to each peer   %7.2f us per step\n", blocks, bytes / 1e3, slowest);
  std::fflush(stdout);
}

template <Mode kMode>
void allow_shared() {
  CHECK(cudaFuncSetAttribute(write_peers<kMode>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
}

// Every write mechanism at 24, 48 and 132 blocks a GPU (the bandwidth table).
void measure_rates(Setup& s, int reps) {
  measure(s, "ce", 0, 0, 0, reps);
  for (int blocks : {24, 48, 132}) {
    for (int warps : {4, 16}) {
      measure(s, "st", blocks, warps, 0, reps);
      measure(s, "copy", blocks, warps, 0, reps);
    }
  }
  for (int blocks : {24, 48, 132}) {
    for (int warps : {1, 2, 4, 16}) {
      for (int depth : {2, 8}) measure(s, "tma_st", blocks, warps, depth, reps);
    }
  }
  for (int blocks : {24, 48, 132}) {
    for (int warps : {1, 2, 4}) {
      for (int stages : {2, 4, 6}) {
        if ((size_t)warps * stages * (kPiece + 8) <= 200 * 1024) measure(s, "tma_copy", blocks, warps, stages, reps);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  Setup s;
  CHECK(cudaGetDeviceCount(&s.world));
  s.world = std::min(s.world, kMaxGpus);
  if (s.world < 2) {
    std::fprintf(stderr, "needs at least 2 GPUs, found %d\n", s.world);
    return 2;
  }
  const int64_t mb = argc > 1 ? std::atoll(argv[1]) : 56;  // ~164 MB off-GPU at 4 GPUs, as prefill-7168
  s.bytes_per_peer = mb * 1024 * 1024 / kPiece * kPiece;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 10;
  CHECK(cudaHostAlloc(reinterpret_cast<void**>(const_cast<int**>(&s.gate)), sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable));
  s.gpus.resize(s.world);
  for (int d = 0; d < s.world; ++d) {
    Gpu& g = s.gpus[d];
    CHECK(cudaSetDevice(d));
    for (int r = 0; r < s.world; ++r) {
      if (r != d) CHECK(cudaDeviceEnablePeerAccess(r, 0));
    }
    CHECK(cudaMalloc(&g.src, s.bytes_per_peer * (s.world - 1)));
    CHECK(cudaMalloc(&g.dst, s.bytes_per_peer * s.world));
    CHECK(cudaMalloc(&g.clock, 2 * sizeof(unsigned long long)));
    CHECK(cudaMalloc(&g.arrivals, kMaxGpus * sizeof(uint64_t)));
    CHECK(cudaMemset(g.src, 1, s.bytes_per_peer * (s.world - 1)));
    for (auto& stream : g.streams) CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CHECK(cudaEventCreate(&g.start));
    CHECK(cudaEventCreate(&g.stop));
    allow_shared<kTmaStore>();
    allow_shared<kTmaCopy>();
  }
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%d x %s, %.1f MB to each peer (%.1f MB off-GPU per GPU), median of %d\n", s.world, prop.name,
              s.bytes_per_peer / 1e6, s.bytes_per_peer * (s.world - 1) / 1e6, reps);

  const bool exchange_only = argc > 3 && std::string(argv[3]) == "exchange";
  if (!exchange_only) measure_rates(s, reps);
  // Exchange steps: the handshake alone, decode's routing (128 tokens x 8 slots x 8 bytes),
  // and rows of decode's 128 tokens at H = 7168 (~1.7 MB to each peer).
  for (int blocks : {1, 16, 24}) {
    for (int64_t bytes : {int64_t{0}, int64_t{8} << 10, int64_t{256} << 10, int64_t{1792} << 10}) {
      const int64_t unit = 16LL * kThreads * blocks;
      measure_exchange(s, (bytes + unit - 1) / unit * unit, blocks);
    }
  }
  return 0;
}
