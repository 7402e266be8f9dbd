// Bandwidth of CpuSwapEngine's batched block swaps against one memcpy of the same bytes.
//
// Blocks have SmolLM2-135M's shape: 16 tokens x 3 KV heads x 64 dims x 4 bytes = 12 KiB per
// layer per K or V, 30 layers, so one block id moves 30 x 2 x 12 KiB = 720 KiB. Each row swaps
// N block ids in one step (begin_step + finish_step) and reports GB/s and the ratio to a single
// memcpy of N x 720 KiB between two other buffers (same thread count: one). Two id patterns:
// scattered (random ids, one memcpy per block and layer) and contiguous (runs coalesce to one
// memcpy per layer and K/V). Best of a few repetitions; every buffer is touched before timing.
//
// Reading the ratio: past glibc's non-temporal threshold (a fraction of the L3 size) the single
// large memcpy switches to streaming stores, which skip reading the destination into cache, and
// runs up to ~2x faster; the engine's per-block and per-layer copies stay below that threshold.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "infercept/cpu_swap_engine.h"

using namespace infercept;

namespace {

constexpr int32_t kNumLayers = 30;
constexpr int64_t kBlockBytes = 16 * 3 * 64 * 4;
constexpr int32_t kMaxBlocks = 1024;
constexpr int kRepetitions = 4;

using Clock = std::chrono::steady_clock;

template <typename F>
double best_seconds(F&& run) {
  double best = 1e30;
  for (int r = 0; r < kRepetitions; ++r) {
    const auto start = Clock::now();
    run();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - start).count());
  }
  return best;
}

// Block ids 0..n-1, shuffled when `scattered`.
std::vector<BlockId> block_ids(int32_t n, bool scattered, std::mt19937& rng) {
  std::vector<BlockId> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  if (scattered) std::shuffle(ids.begin(), ids.end(), rng);
  return ids;
}

// The CPU model from /proc/cpuinfo (Linux), to print beside the figures.
std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown CPU";
}

}  // namespace

int main() {
  SwapEngineConfig config;
  config.num_layers = kNumLayers;
  config.block_bytes = kBlockBytes;
  config.num_device_blocks = kMaxBlocks;
  config.num_host_blocks = kMaxBlocks;
  CpuSwapEngine engine(config);

  // The "device" cache: [num_layers] K and V arrays of [kMaxBlocks][kBlockBytes], zeroed (touched).
  const size_t layer_bytes = static_cast<size_t>(kMaxBlocks) * kBlockBytes;
  std::vector<std::vector<std::byte>> keys(kNumLayers, std::vector<std::byte>(layer_bytes));
  std::vector<std::vector<std::byte>> values(kNumLayers, std::vector<std::byte>(layer_bytes));
  for (int32_t l = 0; l < kNumLayers; ++l) engine.register_device_layer(l, keys[l].data(), values[l].data());

  const size_t max_bytes = static_cast<size_t>(kMaxBlocks) * config.bytes_per_block_copy();
  std::vector<std::byte> memcpy_src(max_bytes, std::byte{1}), memcpy_dst(max_bytes, std::byte{0});

  std::printf("CpuSwapEngine vs one memcpy: %d layers x K,V x %lld B blocks = %lld KiB per block id\n",
              kNumLayers, static_cast<long long>(kBlockBytes),
              static_cast<long long>(config.bytes_per_block_copy() / 1024));
  std::printf("machine: %s, %u hardware threads; one copy worker\n", cpu_model().c_str(),
              std::thread::hardware_concurrency());
  std::printf("%7s %9s %10s | %12s %12s %12s %12s | %8s %8s\n", "blocks", "MiB", "memcpy", "out scat",
              "in scat", "out contig", "in contig", "scat", "contig");
  std::printf("%7s %9s %10s | %12s %12s %12s %12s | %8s %8s\n", "", "", "GB/s", "GB/s", "GB/s", "GB/s",
              "GB/s", "ratio", "ratio");

  std::mt19937 rng(7);
  for (int32_t n : {64, 128, 256, 512, 1024}) {
    const size_t bytes = static_cast<size_t>(n) * config.bytes_per_block_copy();
    const double memcpy_s = best_seconds([&] { std::memcpy(memcpy_dst.data(), memcpy_src.data(), bytes); });

    double seconds[2][2];  // [scattered][direction: out, in]
    for (bool scattered : {true, false}) {
      const std::vector<BlockId> device_ids = block_ids(n, scattered, rng);
      const std::vector<BlockId> host_ids = block_ids(n, scattered, rng);
      std::vector<BlockCopy> out(n), in(n);
      for (int32_t i = 0; i < n; ++i) {
        out[i] = {device_ids[i], host_ids[i]};
        in[i] = {host_ids[i], device_ids[i]};
      }
      seconds[scattered][0] = best_seconds([&] { engine.begin_step(out, {}); engine.finish_step(); });
      seconds[scattered][1] = best_seconds([&] { engine.begin_step({}, in); engine.finish_step(); });
    }
    const double gb = static_cast<double>(bytes) / 1e9;
    const double scattered_s = (seconds[1][0] + seconds[1][1]) / 2;
    const double contiguous_s = (seconds[0][0] + seconds[0][1]) / 2;
    std::printf("%7d %9.1f %10.2f | %12.2f %12.2f %12.2f %12.2f | %8.2f %8.2f\n", n,
                static_cast<double>(bytes) / (1 << 20), gb / memcpy_s, gb / seconds[1][0], gb / seconds[1][1],
                gb / seconds[0][0], gb / seconds[0][1], memcpy_s / scattered_s, memcpy_s / contiguous_s);
  }
  std::printf("ratio = memcpy time / mean(out, in) swap time; 1.00 is memcpy speed\n");
  return 0;
}
