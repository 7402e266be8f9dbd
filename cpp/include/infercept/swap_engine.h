#pragma once
// The swap engine: moves the KV blocks that a StepPlan's swap_out / swap_in lists name between
// the device KV cache and a host pool that the engine owns, pipelined layer by layer with the
// forward pass. One interface, two backends: CpuSwapEngine (a worker thread and memcpy, always
// built) and the CUDA engine (copy stream, pinned pool, per-layer events).
//
// Memory layout, per layer and per K / V (the paged KV tensors of the model):
//   device: [num_device_blocks] blocks of block_bytes, contiguous, at a registered base pointer
//   host:   [num_host_blocks]   blocks of block_bytes, contiguous, owned by the engine
// A BlockCopy moves one block id in every layer, K and V: 2 * num_layers * block_bytes bytes.
//
// One step, driven by the model runner (a single thread):
//   begin_step(plan.swap_out, plan.swap_in)   starts all copies, layer 0 first
//   for each layer l: wait_layer(l); compute layer l
//   finish_step()                             waits for the rest, returns SwapStepStats
//
// Why copying every layer ahead of the forward is safe: the scheduler guarantees that the
// forward of the same step does not write a swap-out source block (the request being swapped
// out is not scheduled) and does not read a swap-in destination block before wait_layer(l) has
// returned for that layer (the request being swapped in attends over it only in layer l, after
// the wait). The sources of a step's copies stay allocated until the scheduler's update(), so
// no later allocation can reuse them while they are read.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "infercept/kv_cache_manager.h"
#include "infercept/types.h"

namespace infercept {

/// The shapes a swap engine serves: the same for the device cache and the host pool except for
/// the number of blocks.
struct SwapEngineConfig {
  int32_t num_layers = 0;
  int64_t block_bytes = 0;        // one block of one layer's K (or V)
  int32_t num_device_blocks = 0;  // blocks per layer of the device cache
  int32_t num_host_blocks = 0;    // blocks per layer of the host pool

  /// Bytes of the host pool: num_layers * 2 * num_host_blocks * block_bytes.
  size_t host_pool_bytes() const;
  /// Bytes one BlockCopy moves: every layer, K and V.
  int64_t bytes_per_block_copy() const { return 2 * int64_t{num_layers} * block_bytes; }
  /// Throws InvalidArgumentError naming the field and its limit unless every count is positive
  /// and the host pool's size fits in memory addresses.
  void validate() const;
};

/// What one step's copies did. Returned by finish_step().
struct SwapStepStats {
  int64_t num_bytes = 0;       // bytes copied, both directions, all layers, K and V
  int32_t num_blocks_out = 0;  // block ids swapped out (each in every layer)
  int32_t num_blocks_in = 0;   // block ids swapped in
  double copy_s = 0;           // seconds the copy worker spent copying
  double stall_s = 0;          // seconds callers were blocked in wait_layer(): the forward waited
  double drain_s = 0;          // seconds finish_step() was blocked on copies the forward did not hide
};

/// Totals since construction, over the steps that finished without error.
struct SwapCounters {
  int64_t num_bytes_out = 0;
  int64_t num_bytes_in = 0;
  int64_t num_blocks_out = 0;
  int64_t num_blocks_in = 0;
};

/// A run of consecutive block ids copied by one contiguous copy: blocks
/// [src, src + num_blocks) -> [dst, dst + num_blocks).
struct CopyRun {
  BlockId src = 0;
  BlockId dst = 0;
  int32_t num_blocks = 0;
};

/// Merges neighbouring copies whose src and dst both advance by one into runs, keeping the
/// order. Swap-out and swap-in lists of one request usually come out of the pools as runs, so a
/// layer's copies collapse to a few large ones.
std::vector<CopyRun> coalesce_copies(const std::vector<BlockCopy>& copies);

/// Checks one step's copy lists against the pools; throws InvalidArgumentError naming the list,
/// the index, the block id and the limit when a swap-out src is not a device block, a swap-out
/// dst not a host block (and the other way round for swap-in), when two copies write the same
/// block, or when a block is both written by one direction and read by the other (the copies of
/// one layer would race).
void check_swap_step(const SwapEngineConfig& config, const std::vector<BlockCopy>& swap_out,
                     const std::vector<BlockCopy>& swap_in);

/// Throws InvalidArgumentError naming `what`, the layer and the range unless
/// 0 <= layer < config.num_layers.
void check_layer(const SwapEngineConfig& config, const char* what, int32_t layer);

/// check_layer, then throws InvalidArgumentError naming `what`, the block and the host pool's
/// range unless 0 <= block < config.num_host_blocks.
void check_host_block(const SwapEngineConfig& config, const char* what, int32_t layer, BlockId block);

/// Moves KV blocks between the device cache and the engine's host pool, one layer at a time.
/// Not thread-safe across callers: one thread (the model runner) drives a step; counters() may
/// be read from any thread.
class SwapEngine {
 public:
  virtual ~SwapEngine() = default;

  const SwapEngineConfig& config() const { return config_; }

  /// Records where layer `layer`'s device K and V caches start. Every layer must be registered
  /// before a step with copies. Throws InvalidArgumentError for a layer out of range or a null
  /// pointer, StateError while a step is in flight.
  virtual void register_device_layer(int32_t layer, void* key_ptr, void* value_ptr) = 0;

  /// Checks both lists (check_swap_step) and starts the copies: for layer 0, 1, ...: the
  /// swap-in copies (host src -> device dst), then the swap-out copies (device src -> host dst),
  /// then layer done. A step with no copies is done at once. Throws StateError when the
  /// previous step was not finished or a layer is not registered; nothing is copied then.
  virtual void begin_step(const std::vector<BlockCopy>& swap_out,
                          const std::vector<BlockCopy>& swap_in) = 0;

  /// Blocks until layer `layer`'s copies of the current step are done; returns at once outside
  /// a step. Rethrows the copy worker's error if it failed at or before this layer.
  virtual void wait_layer(int32_t layer) = 0;

  /// Waits for every layer and ends the step. Outside a step returns empty stats. Rethrows the
  /// copy worker's error (the step is ended either way, so the next begin_step may follow).
  virtual SwapStepStats finish_step() = 0;

  /// Whether a step has begun and not yet finished.
  virtual bool is_step_in_flight() const = 0;

  virtual SwapCounters counters() const = 0;

  /// Start of one host block of one layer's K (is_value false) or V cache: block_bytes bytes,
  /// host-readable on every backend. For tests and debugging; do not read it during a step.
  virtual const std::byte* host_block_ptr(int32_t layer, bool is_value, BlockId block) const = 0;

 protected:
  explicit SwapEngine(const SwapEngineConfig& config) : config_(config) { config_.validate(); }

  SwapEngineConfig config_;
};

}  // namespace infercept
