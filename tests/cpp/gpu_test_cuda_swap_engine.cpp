// CudaSwapEngine on a real device (label `gpu`; every test skips without one): round trips are
// bit-exact, the pipelined step equals the serial one, and the step protocol's errors.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "cuda_swap_engine.h"
#include "gpu_test_util.h"
#include "infercept/errors.h"

using infercept::BlockCopy;
using infercept::InvalidArgumentError;
using infercept::StateError;
using infercept::SwapEngineConfig;
using infercept::cuda::CudaSwapEngine;

namespace {

// A device KV cache of num_layers x {K, V} x num_blocks blocks, filled with random bytes.
struct DeviceCache {
  SwapEngineConfig config;
  std::vector<void*> keys, values;
  std::vector<std::vector<unsigned char>> host_copy;  // [layer * 2 + is_value] the initial bytes

  explicit DeviceCache(const SwapEngineConfig& c, uint32_t seed) : config(c) {
    std::mt19937 rng(seed);
    const size_t bytes = static_cast<size_t>(c.num_device_blocks) * c.block_bytes;
    for (int32_t layer = 0; layer < c.num_layers; ++layer) {
      for (int kv = 0; kv < 2; ++kv) {
        void* p = nullptr;
        EXPECT_EQ(cudaMalloc(&p, bytes), cudaSuccess);
        std::vector<unsigned char> data(bytes);
        for (auto& b : data) b = static_cast<unsigned char>(rng());
        EXPECT_EQ(cudaMemcpy(p, data.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
        (kv == 0 ? keys : values).push_back(p);
        host_copy.push_back(std::move(data));
      }
    }
  }
  ~DeviceCache() {
    for (void* p : keys) cudaFree(p);
    for (void* p : values) cudaFree(p);
  }
  void register_with(CudaSwapEngine& engine) {
    for (int32_t layer = 0; layer < config.num_layers; ++layer) engine.register_device_layer(layer, keys[layer], values[layer]);
  }
  std::vector<unsigned char> block(int32_t layer, bool is_value, int32_t b) const {
    std::vector<unsigned char> out(config.block_bytes);
    void* base = is_value ? values[layer] : keys[layer];
    EXPECT_EQ(cudaMemcpy(out.data(), static_cast<unsigned char*>(base) + static_cast<size_t>(b) * config.block_bytes,
                         config.block_bytes, cudaMemcpyDeviceToHost),
              cudaSuccess);
    return out;
  }
  std::vector<unsigned char> initial_block(int32_t layer, bool is_value, int32_t b) const {
    const auto& data = host_copy[layer * 2 + (is_value ? 1 : 0)];
    return {data.begin() + static_cast<size_t>(b) * config.block_bytes,
            data.begin() + static_cast<size_t>(b + 1) * config.block_bytes};
  }
};

SwapEngineConfig small_config(int64_t block_bytes = 4096) {
  SwapEngineConfig c;
  c.num_layers = 3;
  c.block_bytes = block_bytes;
  c.num_device_blocks = 40;
  c.num_host_blocks = 48;
  return c;
}

std::vector<BlockCopy> copies(const std::vector<std::pair<int32_t, int32_t>>& pairs) {
  std::vector<BlockCopy> out;
  for (auto [s, d] : pairs) out.push_back(BlockCopy{s, d});
  return out;
}

void round_trip(int64_t block_bytes) {
  const SwapEngineConfig config = small_config(block_bytes);
  DeviceCache cache(config, 7);
  CudaSwapEngine engine(config);
  cache.register_with(engine);
  // Out of order, with runs and gaps, to host blocks in another order.
  const auto out = copies({{5, 0}, {6, 1}, {7, 2}, {0, 47}, {39, 10}, {20, 30}, {21, 29}});
  engine.begin_step(out, {});
  for (int32_t l = 0; l < config.num_layers; ++l) engine.wait_layer(l);
  const auto stats = engine.finish_step();
  EXPECT_EQ(stats.num_blocks_out, 7);
  EXPECT_EQ(stats.num_bytes, 7 * config.bytes_per_block_copy());
  for (int32_t l = 0; l < config.num_layers; ++l) {
    for (bool v : {false, true}) {
      for (const BlockCopy& c : out) {
        const std::byte* host = engine.host_block_ptr(l, v, c.dst);
        const auto expected = cache.initial_block(l, v, c.src);
        ASSERT_EQ(std::memcmp(host, expected.data(), config.block_bytes), 0) << "layer " << l << " block " << c.src;
      }
    }
  }
  // Back into other device blocks.
  const auto in = copies({{0, 11}, {1, 12}, {2, 13}, {47, 3}, {10, 38}, {30, 25}, {29, 26}});
  engine.begin_step({}, in);
  for (int32_t l = 0; l < config.num_layers; ++l) engine.wait_layer(l);
  engine.finish_step();
  for (int32_t l = 0; l < config.num_layers; ++l) {
    for (bool v : {false, true}) {
      for (size_t i = 0; i < in.size(); ++i) {
        ASSERT_EQ(cache.block(l, v, in[i].dst), cache.initial_block(l, v, out[i].src)) << "layer " << l;
      }
    }
  }
  const auto counters = engine.counters();
  EXPECT_EQ(counters.num_blocks_out, 7);
  EXPECT_EQ(counters.num_blocks_in, 7);
}

}  // namespace

TEST(CudaSwapEngine, RoundTripIsBitExact) {
  SKIP_WITHOUT_CUDA_DEVICE();
  round_trip(4096);  // 16-byte words
}

TEST(CudaSwapEngine, RoundTripOfOddBlockSizeIsBitExact) {
  SKIP_WITHOUT_CUDA_DEVICE();
  round_trip(1000 + 3);  // byte path
}

TEST(CudaSwapEngine, BothDirectionsInOneStepWithPipelinedComputeEqualSerial) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const SwapEngineConfig config = small_config();
  DeviceCache cache(config, 11);
  CudaSwapEngine engine(config);
  cache.register_with(engine);
  // Fill host blocks 0..3 first.
  engine.begin_step(copies({{0, 0}, {1, 1}, {2, 2}, {3, 3}}), {});
  engine.finish_step();

  cudaStream_t compute;
  ASSERT_CUDA_OK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
  engine.set_compute_stream(reinterpret_cast<std::uintptr_t>(compute));
  // Swap host 0..3 into device 30..33 while swapping device 10..13 out to host 20..23; the
  // "forward" of layer l copies device blocks 30..33 of layer l to a result buffer right after
  // wait_layer(l), on the compute stream: it must see the swapped-in bytes.
  const size_t run_bytes = 4 * config.block_bytes;
  void* result = nullptr;
  ASSERT_CUDA_OK(cudaMalloc(&result, run_bytes * config.num_layers * 2));
  engine.begin_step(copies({{10, 20}, {11, 21}, {12, 22}, {13, 23}}), copies({{0, 30}, {1, 31}, {2, 32}, {3, 33}}));
  for (int32_t l = 0; l < config.num_layers; ++l) {
    engine.wait_layer(l);
    for (int kv = 0; kv < 2; ++kv) {
      auto* src = static_cast<unsigned char*>(kv ? cache.values[l] : cache.keys[l]) + 30 * config.block_bytes;
      ASSERT_CUDA_OK(cudaMemcpyAsync(static_cast<unsigned char*>(result) + (l * 2 + kv) * run_bytes, src, run_bytes,
                                     cudaMemcpyDeviceToDevice, compute));
    }
  }
  const auto stats = engine.finish_step();
  EXPECT_GE(stats.stall_s, 0.0);
  EXPECT_GT(stats.copy_s, 0.0);
  ASSERT_CUDA_OK(cudaStreamSynchronize(compute));
  std::vector<unsigned char> seen(run_bytes * config.num_layers * 2);
  ASSERT_CUDA_OK(cudaMemcpy(seen.data(), result, seen.size(), cudaMemcpyDeviceToHost));
  for (int32_t l = 0; l < config.num_layers; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      for (int32_t b = 0; b < 4; ++b) {
        const auto expected = cache.initial_block(l, kv == 1, b);  // device b -> host b -> device 30 + b
        ASSERT_EQ(std::memcmp(seen.data() + (l * 2 + kv) * run_bytes + b * config.block_bytes, expected.data(),
                              config.block_bytes),
                  0)
            << "layer " << l << " kv " << kv << " block " << b;
        ASSERT_EQ(std::memcmp(engine.host_block_ptr(l, kv == 1, 20 + b), cache.initial_block(l, kv == 1, 10 + b).data(),
                              config.block_bytes),
                  0);
      }
    }
  }
  cudaFree(result);
  cudaStreamDestroy(compute);
}

TEST(CudaSwapEngine, ProtocolErrors) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const SwapEngineConfig config = small_config();
  DeviceCache cache(config, 3);
  CudaSwapEngine engine(config);
  EXPECT_THROW(engine.begin_step(copies({{0, 0}}), {}), StateError);  // nothing registered
  std::vector<unsigned char> host(config.block_bytes);
  EXPECT_THROW(engine.register_device_layer(0, host.data(), host.data()), InvalidArgumentError);
  EXPECT_THROW(engine.register_device_layer(3, cache.keys[0], cache.values[0]), InvalidArgumentError);
  cache.register_with(engine);
  EXPECT_THROW(engine.begin_step(copies({{40, 0}}), {}), InvalidArgumentError);  // not a device block
  engine.begin_step(copies({{0, 0}}), {});
  EXPECT_TRUE(engine.is_step_in_flight());
  EXPECT_THROW(engine.begin_step({}, {}), StateError);
  EXPECT_THROW(engine.set_compute_stream(0), StateError);
  engine.finish_step();
  EXPECT_FALSE(engine.is_step_in_flight());
  EXPECT_EQ(engine.finish_step().num_bytes, 0);  // outside a step
  engine.begin_step({}, {});                      // empty step: done at once
  EXPECT_EQ(engine.finish_step().num_bytes, 0);
}
