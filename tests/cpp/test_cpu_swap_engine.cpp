// CpuSwapEngine: bit-exact round trips, chunked swaps, per-layer waits, bad input, failures.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "infercept/cpu_swap_engine.h"
#include "infercept/errors.h"

using namespace infercept;

namespace {

// A fake device KV cache: per layer a K and a V array of [num_blocks][block_bytes] random bytes.
struct DeviceCache {
  DeviceCache(const SwapEngineConfig& config, uint32_t seed)
      : block_bytes(config.block_bytes), keys(config.num_layers), values(config.num_layers) {
    std::mt19937 rng(seed);
    for (int32_t l = 0; l < config.num_layers; ++l) {
      for (auto* cache : {&keys[l], &values[l]}) {
        cache->resize(static_cast<size_t>(config.num_device_blocks * config.block_bytes));
        for (auto& byte : *cache) byte = static_cast<unsigned char>(rng());
      }
    }
  }

  void register_with(SwapEngine& engine) {
    for (size_t l = 0; l < keys.size(); ++l) {
      engine.register_device_layer(static_cast<int32_t>(l), keys[l].data(), values[l].data());
    }
  }

  // Bytes of block `block` of layer `layer` (K or V).
  std::vector<unsigned char> block(size_t layer, bool is_value, BlockId block) const {
    const auto& cache = is_value ? values[layer] : keys[layer];
    auto begin = cache.begin() + static_cast<std::ptrdiff_t>(block * block_bytes);
    return {begin, begin + block_bytes};
  }

  void zero(BlockId block) {
    for (size_t l = 0; l < keys.size(); ++l) {
      std::memset(keys[l].data() + block * block_bytes, 0, static_cast<size_t>(block_bytes));
      std::memset(values[l].data() + block * block_bytes, 0, static_cast<size_t>(block_bytes));
    }
  }

  int64_t block_bytes;
  std::vector<std::vector<unsigned char>> keys;    // [num_layers][num_blocks * block_bytes]
  std::vector<std::vector<unsigned char>> values;  // [num_layers][num_blocks * block_bytes]
};

std::vector<unsigned char> host_bytes(const SwapEngine& engine, int32_t layer, bool is_value, BlockId block) {
  const auto* p = reinterpret_cast<const unsigned char*>(engine.host_block_ptr(layer, is_value, block));
  return {p, p + engine.config().block_bytes};
}

SwapEngineConfig small_config() {
  SwapEngineConfig config;
  config.num_layers = 4;
  config.block_bytes = 200;  // not a multiple of 64: blocks of the host pool are unaligned too
  config.num_device_blocks = 16;
  config.num_host_blocks = 12;
  return config;
}

SwapStepStats run_step(SwapEngine& engine, const std::vector<BlockCopy>& swap_out,
                       const std::vector<BlockCopy>& swap_in) {
  engine.begin_step(swap_out, swap_in);
  for (int32_t l = 0; l < engine.config().num_layers; ++l) engine.wait_layer(l);
  return engine.finish_step();
}

// Throws `what` from copy_layer at `fail_layer`; records the layers it copied.
class FaultyEngine : public CpuSwapEngine {
 public:
  FaultyEngine(const SwapEngineConfig& config, int32_t fail_layer, std::chrono::milliseconds delay)
      : CpuSwapEngine(config), fail_layer(fail_layer), delay(delay) {}

  std::atomic<int32_t> fail_layer;
  std::chrono::milliseconds delay;
  std::atomic<int32_t> num_layers_copied{0};

 protected:
  void copy_layer(int32_t layer, const std::vector<CopyRun>& swap_out,
                  const std::vector<CopyRun>& swap_in) override {
    std::this_thread::sleep_for(delay);
    if (layer == fail_layer) throw std::runtime_error("injected failure at layer " + std::to_string(layer));
    CpuSwapEngine::copy_layer(layer, swap_out, swap_in);
    num_layers_copied = layer + 1;
  }
};

}  // namespace

TEST(CpuSwapEngine, RoundTripIsBitExactInEveryLayer) {
  const SwapEngineConfig config = small_config();
  CpuSwapEngine engine(config);
  DeviceCache device(config, 1);
  const DeviceCache original = device;
  device.register_with(engine);

  const std::vector<BlockCopy> out = {{3, 0}, {4, 1}, {5, 2}, {9, 7}};
  SwapStepStats stats = run_step(engine, out, {});
  EXPECT_EQ(stats.num_blocks_out, 4);
  EXPECT_EQ(stats.num_blocks_in, 0);
  EXPECT_EQ(stats.num_bytes, 4 * 2 * config.num_layers * config.block_bytes);
  for (const BlockCopy& c : out) {
    for (int32_t l = 0; l < config.num_layers; ++l) {
      EXPECT_EQ(host_bytes(engine, l, false, c.dst), original.block(l, false, c.src)) << "layer " << l;
      EXPECT_EQ(host_bytes(engine, l, true, c.dst), original.block(l, true, c.src)) << "layer " << l;
    }
    device.zero(c.src);
  }

  // Back into other device blocks, in another order.
  const std::vector<BlockCopy> in = {{7, 0}, {0, 10}, {1, 11}, {2, 12}};
  stats = run_step(engine, {}, in);
  EXPECT_EQ(stats.num_blocks_in, 4);
  const BlockId home[] = {9, 3, 4, 5};  // where each swapped-in block came from originally
  for (size_t i = 0; i < in.size(); ++i) {
    for (int32_t l = 0; l < config.num_layers; ++l) {
      EXPECT_EQ(device.block(l, false, in[i].dst), original.block(l, false, home[i]));
      EXPECT_EQ(device.block(l, true, in[i].dst), original.block(l, true, home[i]));
    }
  }
  // Untouched device blocks are untouched.
  EXPECT_EQ(device.block(2, true, 15), original.block(2, true, 15));

  const SwapCounters counters = engine.counters();
  EXPECT_EQ(counters.num_blocks_out, 4);
  EXPECT_EQ(counters.num_blocks_in, 4);
  EXPECT_EQ(counters.num_bytes_out, 4 * config.bytes_per_block_copy());
  EXPECT_EQ(counters.num_bytes_in, 4 * config.bytes_per_block_copy());
}

TEST(CpuSwapEngine, ChunkedSwapsInterleaveBothDirections) {
  // Request A (device blocks 0..9) goes out 3 blocks a step while request B (host 12..15)
  // comes in 2 blocks a step, as the scheduler chunks them to a budget.
  SwapEngineConfig config = small_config();
  config.num_host_blocks = 16;
  CpuSwapEngine engine(config);
  DeviceCache device(config, 2);
  device.register_with(engine);
  // Put B on the host first: device 12..15 -> host 12..15.
  run_step(engine, {{12, 12}, {13, 13}, {14, 14}, {15, 15}}, {});
  const DeviceCache original = device;

  std::vector<BlockCopy> a_out;
  for (BlockId b = 9; b >= 0; --b) a_out.push_back({b, 9 - b});  // back of the device part first
  const std::vector<BlockCopy> b_in = {{12, 12}, {13, 13}, {14, 14}, {15, 15}};
  for (BlockId b = 12; b < 16; ++b) device.zero(b);

  size_t next_out = 0, next_in = 0;
  while (next_out < a_out.size() || next_in < b_in.size()) {
    std::vector<BlockCopy> out, in;
    for (int i = 0; i < 3 && next_out < a_out.size(); ++i) out.push_back(a_out[next_out++]);
    for (int i = 0; i < 2 && next_in < b_in.size(); ++i) in.push_back(b_in[next_in++]);
    run_step(engine, out, in);
  }
  for (const BlockCopy& c : a_out) {
    for (int32_t l = 0; l < config.num_layers; ++l) {
      EXPECT_EQ(host_bytes(engine, l, false, c.dst), original.block(l, false, c.src));
      EXPECT_EQ(host_bytes(engine, l, true, c.dst), original.block(l, true, c.src));
    }
  }
  const DeviceCache before_b(config, 2);  // the same seed: B's bytes before they went out
  for (BlockId b = 12; b < 16; ++b) {
    for (int32_t l = 0; l < config.num_layers; ++l) {
      EXPECT_EQ(device.block(l, false, b), before_b.block(l, false, b));
      EXPECT_EQ(device.block(l, true, b), before_b.block(l, true, b));
    }
  }
  EXPECT_EQ(engine.counters().num_blocks_out, 4 + 10);
  EXPECT_EQ(engine.counters().num_blocks_in, 4);
}

TEST(CpuSwapEngine, WaitLayerReturnsOnceThatLayerIsCopied) {
  SwapEngineConfig config = small_config();
  config.num_layers = 6;
  FaultyEngine engine(config, /*fail_layer=*/-1, std::chrono::milliseconds(5));
  DeviceCache device(config, 3);
  device.register_with(engine);

  engine.begin_step({{1, 1}}, {{2, 2}});
  for (int32_t l = 0; l < config.num_layers; ++l) {
    engine.wait_layer(l);
    // Layer l is copied; the worker copies in layer order, so no later layer is needed first.
    EXPECT_GE(engine.num_layers_copied.load(), l + 1);
  }
  const SwapStepStats stats = engine.finish_step();
  EXPECT_GT(stats.stall_s, 0.0);   // the first waits found their layer still copying
  EXPECT_GE(stats.copy_s, 0.025);  // 6 layers x 5 ms
  EXPECT_EQ(engine.num_layers_copied.load(), config.num_layers);
  EXPECT_FALSE(engine.is_step_in_flight());
}

TEST(CpuSwapEngine, FinishStepWaitsForEveryLayerWithoutWaitLayer) {
  SwapEngineConfig config = small_config();
  FaultyEngine engine(config, -1, std::chrono::milliseconds(3));
  DeviceCache device(config, 4);
  device.register_with(engine);
  engine.begin_step({{0, 0}}, {});
  const SwapStepStats stats = engine.finish_step();
  EXPECT_EQ(engine.num_layers_copied.load(), config.num_layers);
  EXPECT_GT(stats.drain_s, 0.0);
  EXPECT_EQ(stats.stall_s, 0.0);
  EXPECT_EQ(host_bytes(engine, 3, true, 0), device.block(3, true, 0));
}

TEST(CpuSwapEngine, BadBlockIdsNameTheIdAndTheLimit) {
  const SwapEngineConfig config = small_config();  // 16 device blocks, 12 host blocks
  CpuSwapEngine engine(config);
  DeviceCache device(config, 5);
  device.register_with(engine);

  auto expect_rejected = [&](const std::vector<BlockCopy>& out, const std::vector<BlockCopy>& in,
                             const std::string& message) {
    try {
      engine.begin_step(out, in);
      FAIL() << "expected InvalidArgumentError containing: " << message;
    } catch (const InvalidArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find(message), std::string::npos) << e.what();
    }
    EXPECT_FALSE(engine.is_step_in_flight());
  };
  expect_rejected({{16, 0}}, {}, "swap_out[0].src=16 is not a device block: the device pool holds blocks 0..15");
  expect_rejected({{0, 1}, {1, 12}}, {}, "swap_out[1].dst=12 is not a host block: the host pool holds blocks 0..11");
  expect_rejected({}, {{-1, 0}}, "swap_in[0].src=-1 is not a host block");
  expect_rejected({}, {{0, 0}, {1, 99}}, "swap_in[1].dst=99 is not a device block: the device pool holds blocks 0..15");
  expect_rejected({{0, 5}, {1, 5}}, {}, "swap_out writes block 5 twice");
  expect_rejected({}, {{0, 3}, {1, 3}}, "swap_in writes block 3 twice");
  expect_rejected({{4, 0}}, {{1, 4}}, "device block 4 is both a swap_in dst and a swap_out src");
  expect_rejected({{4, 1}}, {{1, 5}}, "host block 1 is both a swap_out dst and a swap_in src");

  // Nothing was copied and the engine still works.
  EXPECT_EQ(engine.counters().num_blocks_out, 0);
  run_step(engine, {{4, 0}}, {});
  EXPECT_EQ(host_bytes(engine, 0, false, 0), device.block(0, false, 4));

  EXPECT_THROW(engine.wait_layer(4), InvalidArgumentError);
  EXPECT_THROW(engine.host_block_ptr(0, false, 12), InvalidArgumentError);
  EXPECT_THROW(engine.register_device_layer(-1, device.keys[0].data(), device.values[0].data()),
               InvalidArgumentError);
  EXPECT_THROW(engine.register_device_layer(0, nullptr, device.values[0].data()), InvalidArgumentError);
}

TEST(CpuSwapEngine, StepProtocolErrors) {
  const SwapEngineConfig config = small_config();
  CpuSwapEngine engine(config);
  DeviceCache device(config, 6);
  // A step with copies needs every layer registered.
  engine.register_device_layer(0, device.keys[0].data(), device.values[0].data());
  try {
    engine.begin_step({{0, 0}}, {});
    FAIL() << "expected StateError";
  } catch (const StateError& e) {
    EXPECT_NE(std::string(e.what()).find("device layer 1 is not registered"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(engine.is_step_in_flight());
  device.register_with(engine);

  engine.begin_step({{0, 0}}, {});
  EXPECT_THROW(engine.begin_step({}, {}), StateError);
  EXPECT_THROW(engine.register_device_layer(0, device.keys[0].data(), device.values[0].data()), StateError);
  engine.finish_step();
  // Outside a step, waits return at once and finish_step reports nothing.
  engine.wait_layer(2);
  const SwapStepStats stats = engine.finish_step();
  EXPECT_EQ(stats.num_bytes, 0);
}

TEST(CpuSwapEngine, EmptyStepCompletesImmediately) {
  const SwapEngineConfig config = small_config();
  CpuSwapEngine engine(config);  // no layer registered: an empty step does not need them
  engine.begin_step({}, {});
  EXPECT_TRUE(engine.is_step_in_flight());
  for (int32_t l = 0; l < config.num_layers; ++l) engine.wait_layer(l);
  const SwapStepStats stats = engine.finish_step();
  EXPECT_EQ(stats.num_bytes, 0);
  EXPECT_EQ(stats.num_blocks_out + stats.num_blocks_in, 0);
  EXPECT_EQ(stats.copy_s, 0.0);
  EXPECT_EQ(stats.stall_s, 0.0);
  EXPECT_FALSE(engine.is_step_in_flight());
}

TEST(CpuSwapEngine, WorkerErrorReachesTheCallerAndTheNextStepWorks) {
  const SwapEngineConfig config = small_config();
  FaultyEngine engine(config, /*fail_layer=*/2, std::chrono::milliseconds(0));
  DeviceCache device(config, 7);
  device.register_with(engine);

  engine.begin_step({{1, 1}}, {});
  engine.wait_layer(0);  // copied before the failure
  engine.wait_layer(1);
  EXPECT_THROW(
      {
        try {
          engine.wait_layer(2);
        } catch (const std::runtime_error& e) {
          EXPECT_STREQ(e.what(), "injected failure at layer 2");
          throw;
        }
      },
      std::runtime_error);
  EXPECT_THROW(engine.wait_layer(3), std::runtime_error);
  EXPECT_THROW(engine.finish_step(), std::runtime_error);
  EXPECT_FALSE(engine.is_step_in_flight());
  EXPECT_EQ(engine.counters().num_blocks_out, 0);  // a failed step is not counted

  engine.fail_layer = -1;
  run_step(engine, {{1, 1}}, {});
  EXPECT_EQ(host_bytes(engine, 3, false, 1), device.block(3, false, 1));
  EXPECT_EQ(engine.counters().num_blocks_out, 1);
}

TEST(CpuSwapEngine, ManyRandomStepsMatchAReferenceModel) {
  SwapEngineConfig config = small_config();
  config.num_device_blocks = 32;
  config.num_host_blocks = 24;
  CpuSwapEngine engine(config);
  DeviceCache device(config, 8);
  device.register_with(engine);
  // The reference: what every host block should hold (per layer, K and V), copied by hand.
  std::vector<std::vector<unsigned char>> host_ref(
      static_cast<size_t>(config.num_layers * 2 * config.num_host_blocks),
      std::vector<unsigned char>(static_cast<size_t>(config.block_bytes), 0));
  auto ref = [&](int32_t l, bool v, BlockId b) -> std::vector<unsigned char>& {
    return host_ref[static_cast<size_t>((l * 2 + (v ? 1 : 0)) * config.num_host_blocks + b)];
  };

  std::mt19937 rng(9);
  int64_t num_out = 0, num_in = 0;
  for (int step = 0; step < 300; ++step) {
    // Distinct device and host blocks per step; the first part goes out, the rest comes in.
    std::vector<BlockId> device_ids(config.num_device_blocks), host_ids(config.num_host_blocks);
    for (BlockId i = 0; i < config.num_device_blocks; ++i) device_ids[i] = i;
    for (BlockId i = 0; i < config.num_host_blocks; ++i) host_ids[i] = i;
    std::shuffle(device_ids.begin(), device_ids.end(), rng);
    std::shuffle(host_ids.begin(), host_ids.end(), rng);
    const int n_out = static_cast<int>(rng() % 6), n_in = static_cast<int>(rng() % 6);
    std::vector<BlockCopy> out, in;
    for (int i = 0; i < n_out; ++i) out.push_back({device_ids[i], host_ids[i]});
    for (int i = 0; i < n_in; ++i) in.push_back({host_ids[n_out + i], device_ids[n_out + i]});

    // Expected effect, computed from the state before the step.
    std::vector<std::vector<unsigned char>> expect_device;
    for (const BlockCopy& c : in) {
      for (int32_t l = 0; l < config.num_layers; ++l) {
        expect_device.push_back(ref(l, false, c.src));
        expect_device.push_back(ref(l, true, c.src));
      }
    }
    for (const BlockCopy& c : out) {
      for (int32_t l = 0; l < config.num_layers; ++l) {
        ref(l, false, c.dst) = device.block(l, false, c.src);
        ref(l, true, c.dst) = device.block(l, true, c.src);
      }
    }
    const SwapStepStats stats = run_step(engine, out, in);
    ASSERT_EQ(stats.num_bytes, (n_out + n_in) * config.bytes_per_block_copy());
    num_out += n_out;
    num_in += n_in;

    size_t k = 0;
    for (const BlockCopy& c : in) {
      for (int32_t l = 0; l < config.num_layers; ++l) {
        ASSERT_EQ(device.block(l, false, c.dst), expect_device[k++]) << "step " << step;
        ASSERT_EQ(device.block(l, true, c.dst), expect_device[k++]) << "step " << step;
      }
    }
  }
  for (int32_t l = 0; l < config.num_layers; ++l) {
    for (BlockId b = 0; b < config.num_host_blocks; ++b) {
      ASSERT_EQ(host_bytes(engine, l, false, b), ref(l, false, b));
      ASSERT_EQ(host_bytes(engine, l, true, b), ref(l, true, b));
    }
  }
  EXPECT_EQ(engine.counters().num_blocks_out, num_out);
  EXPECT_EQ(engine.counters().num_blocks_in, num_in);
}

TEST(SwapEngine, CoalesceCopiesMergesConsecutiveRuns) {
  const std::vector<CopyRun> runs = coalesce_copies({{0, 5}, {1, 6}, {2, 7}, {9, 8}, {3, 9}, {4, 10}});
  ASSERT_EQ(runs.size(), 3u);
  EXPECT_EQ(runs[0].src, 0);
  EXPECT_EQ(runs[0].dst, 5);
  EXPECT_EQ(runs[0].num_blocks, 3);
  EXPECT_EQ(runs[1].num_blocks, 1);
  EXPECT_EQ(runs[2].src, 3);
  EXPECT_EQ(runs[2].num_blocks, 2);
  EXPECT_TRUE(coalesce_copies({}).empty());
}

TEST(SwapEngine, ConfigRejectsNonPositiveSizes) {
  SwapEngineConfig config = small_config();
  config.block_bytes = 0;
  EXPECT_THROW(CpuSwapEngine{config}, InvalidArgumentError);
  config = small_config();
  config.num_host_blocks = -3;
  try {
    config.validate();
    FAIL();
  } catch (const InvalidArgumentError& e) {
    EXPECT_STREQ(e.what(), "swap engine: num_host_blocks=-3 must be > 0");
  }
  config = small_config();
  config.block_bytes = int64_t{1} << 40;
  config.num_host_blocks = 1 << 30;
  EXPECT_THROW(config.validate(), InvalidArgumentError);
}
