// CUDA swap microbenchmarks (label `bench`; exits 77 = skipped without a device).
//  1. Batched swap bandwidth: CudaSwapEngine moving N scattered blocks per layer (one
//     gather/scatter kernel per layer and direction) against one large cudaMemcpyAsync of the
//     same bytes between pinned host memory and the device. Goal: ratio >= 0.9 at >= 64 blocks.
//  2. Hidden swap: the fraction of a swap-in's time hidden behind a forward-sized stand-in
//     (per layer, a device-to-device copy on the compute stream) when pipelined layer by layer,
//     with the swap inside the budget (swap time about half the forward). Goal: >= 90%.
#include <chrono>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "cuda_bench_util.h"
#include "cuda_swap_engine.h"

using infercept::BlockCopy;
using infercept::SwapEngineConfig;
using infercept::cuda::CudaSwapEngine;

namespace {

constexpr int32_t kLayers = 8;
constexpr int64_t kBlockBytes = 16 * 8 * 128 * 2;  // 16 tokens x 8 KV heads x 128 dims, fp16: 32 KiB

double host_median_s(const std::function<void()>& fn, int repeats = 20) {
  for (int i = 0; i < 3; ++i) fn();
  std::vector<double> samples;
  for (int i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    samples.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return median(samples);
}

std::vector<BlockCopy> scattered(int32_t n, int32_t num_device_blocks, std::mt19937& rng) {
  std::vector<int32_t> ids(num_device_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<BlockCopy> out;
  for (int32_t i = 0; i < n; ++i) out.push_back(BlockCopy{ids[i], i});
  return out;
}

}  // namespace

int main() {
  if (!has_cuda_device()) {
    std::printf("bench_cuda_swap: no CUDA device, skipped\n");
    return kSkipExitCode;
  }
  cudaDeviceProp prop{};
  BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (%d SMs)\n", prop.name, prop.multiProcessorCount);

  SwapEngineConfig config;
  config.num_layers = kLayers;
  config.block_bytes = kBlockBytes;
  config.num_device_blocks = 2048;
  config.num_host_blocks = 1024;
  std::vector<void*> buffers;
  CudaSwapEngine engine(config);
  for (int32_t l = 0; l < kLayers; ++l) {
    void *k = nullptr, *v = nullptr;
    BENCH_CUDA(cudaMalloc(&k, config.num_device_blocks * kBlockBytes));
    BENCH_CUDA(cudaMalloc(&v, config.num_device_blocks * kBlockBytes));
    BENCH_CUDA(cudaMemset(k, 3, config.num_device_blocks * kBlockBytes));
    BENCH_CUDA(cudaMemset(v, 5, config.num_device_blocks * kBlockBytes));
    engine.register_device_layer(l, k, v);
    buffers.push_back(k);
    buffers.push_back(v);
  }
  cudaStream_t stream;
  BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  engine.set_compute_stream(reinterpret_cast<std::uintptr_t>(stream));
  std::mt19937 rng(1);

  std::printf("\n1. batched swap vs one cudaMemcpyAsync (%d layers, K+V, %lld-byte blocks)\n", kLayers,
              static_cast<long long>(kBlockBytes));
  std::printf("%8s %10s %12s %12s %12s %12s %8s %8s\n", "blocks", "MiB", "in GB/s", "memcpy H2D", "out GB/s",
              "memcpy D2H", "in ratio", "out ratio");
  for (int32_t n : {16, 64, 256, 1024}) {
    const auto list = scattered(n, config.num_device_blocks, rng);
    std::vector<BlockCopy> in;
    for (const BlockCopy& c : list) in.push_back(BlockCopy{c.dst, c.src});
    const double bytes = static_cast<double>(n) * config.bytes_per_block_copy();
    const double out_s = host_median_s([&] { engine.begin_step(list, {}); engine.finish_step(); });
    const double in_s = host_median_s([&] { engine.begin_step({}, in); engine.finish_step(); });
    void *host = nullptr, *device = nullptr;
    BENCH_CUDA(cudaHostAlloc(&host, static_cast<size_t>(bytes), cudaHostAllocDefault));
    BENCH_CUDA(cudaMalloc(&device, static_cast<size_t>(bytes)));
    const double h2d_s = time_on_stream_s(stream, [&] { BENCH_CUDA(cudaMemcpyAsync(device, host, static_cast<size_t>(bytes), cudaMemcpyHostToDevice, stream)); });
    const double d2h_s = time_on_stream_s(stream, [&] { BENCH_CUDA(cudaMemcpyAsync(host, device, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost, stream)); });
    cudaFreeHost(host);
    cudaFree(device);
    std::printf("%8d %10.1f %12.2f %12.2f %12.2f %12.2f %8.3f %8.3f\n", n, bytes / (1 << 20), bytes / in_s * 1e-9,
                bytes / h2d_s * 1e-9, bytes / out_s * 1e-9, bytes / d2h_s * 1e-9, h2d_s / in_s, d2h_s / out_s);
  }

  std::printf("\n2. hidden swap-in behind a forward-sized stand-in (per layer: device copy on the compute stream)\n");
  const int32_t n = 256;
  std::vector<BlockCopy> in;
  for (int32_t i = 0; i < n; ++i) in.push_back(BlockCopy{i, 1024 + i});
  const double swap_s = host_median_s([&] { engine.begin_step({}, in); engine.finish_step(); });
  // Size the per-layer stand-in so the forward takes about twice the swap (inside the budget).
  const double bandwidth = measured_device_bandwidth(stream);
  const size_t layer_bytes = static_cast<size_t>(2.0 * swap_s / kLayers * bandwidth / 2.0);
  void *a = nullptr, *b = nullptr;
  BENCH_CUDA(cudaMalloc(&a, layer_bytes));
  BENCH_CUDA(cudaMalloc(&b, layer_bytes));
  auto forward = [&](bool with_swap) {
    if (with_swap) engine.begin_step({}, in);
    for (int32_t l = 0; l < kLayers; ++l) {
      if (with_swap) engine.wait_layer(l);
      BENCH_CUDA(cudaMemcpyAsync(b, a, layer_bytes, cudaMemcpyDeviceToDevice, stream));
    }
    if (with_swap) engine.finish_step();
    BENCH_CUDA(cudaStreamSynchronize(stream));
  };
  const double forward_s = host_median_s([&] { forward(false); });
  const double both_s = host_median_s([&] { forward(true); });
  const double hidden = std::clamp(1.0 - (both_s - forward_s) / swap_s, 0.0, 1.0);
  std::printf("swap alone %.3f ms, forward alone %.3f ms, pipelined %.3f ms: hidden fraction %.3f (goal >= 0.9)\n",
              swap_s * 1e3, forward_s * 1e3, both_s * 1e3, hidden);
  cudaFree(a);
  cudaFree(b);
  for (void* p : buffers) cudaFree(p);
  cudaStreamDestroy(stream);
  return 0;
}
