#pragma once
// The CPU backend of the swap engine: the "device" KV cache is host memory too (the CPU model
// runner's tensors), and one worker thread copies the blocks with memcpy while the caller
// computes. Same step protocol and the same guarantees as the CUDA engine (swap_engine.h).
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "infercept/swap_engine.h"

namespace infercept {

/// Swap engine over host memory with one copy worker thread (started in the constructor, joined
/// in the destructor). The host pool is one 64-byte aligned allocation, zeroed up front so that
/// the first swap does not pay page faults, laid out [num_layers][K, V][num_host_blocks] blocks.
class CpuSwapEngine : public SwapEngine {
 public:
  /// Allocates the host pool (config.host_pool_bytes()) and starts the worker. Throws
  /// InvalidArgumentError for a bad config, std::bad_alloc when the pool does not fit.
  explicit CpuSwapEngine(const SwapEngineConfig& config);
  /// Waits for a step still in flight (its errors are dropped) and joins the worker.
  ~CpuSwapEngine() override;

  CpuSwapEngine(const CpuSwapEngine&) = delete;
  CpuSwapEngine& operator=(const CpuSwapEngine&) = delete;

  void register_device_layer(int32_t layer, void* key_ptr, void* value_ptr) override;
  void begin_step(const std::vector<BlockCopy>& swap_out,
                  const std::vector<BlockCopy>& swap_in) override;
  void wait_layer(int32_t layer) override;
  SwapStepStats finish_step() override;
  bool is_step_in_flight() const override;
  SwapCounters counters() const override;
  const std::byte* host_block_ptr(int32_t layer, bool is_value, BlockId block) const override;

 protected:
  /// The worker's unit of work: copies one layer's runs, K and V. Virtual so that tests can
  /// inject a failure; an override must not outlive the engine's step (finish it first).
  virtual void copy_layer(int32_t layer, const std::vector<CopyRun>& swap_out,
                          const std::vector<CopyRun>& swap_in);

 private:
  struct AlignedFree {
    void operator()(std::byte* p) const;
  };

  std::byte* host_block(int32_t layer, bool is_value, BlockId block) const;
  std::byte* device_block(int32_t layer, bool is_value, BlockId block) const;
  void run_worker();

  std::unique_ptr<std::byte[], AlignedFree> host_pool_;
  std::vector<std::byte*> device_keys_;    // [num_layers] base of each layer's device K cache
  std::vector<std::byte*> device_values_;  // [num_layers] base of each layer's device V cache

  // Everything below is guarded by mutex_. The worker owns the current job's runs while
  // is_copying_ is true; the caller reads progress through num_layers_done_ and error_.
  mutable std::mutex mutex_;
  std::condition_variable work_ready_;   // worker waits: a job was posted, or stop
  std::condition_variable layer_done_;   // callers wait: a layer finished, or the job ended
  bool is_stopping_ = false;
  bool is_step_in_flight_ = false;
  bool is_copying_ = false;              // the worker holds a job
  std::vector<CopyRun> swap_out_runs_;   // the current job: device -> host
  std::vector<CopyRun> swap_in_runs_;    // host -> device
  int32_t num_layers_done_ = 0;          // layers [0, num_layers_done_) of the step are copied
  std::exception_ptr error_;             // the worker's failure, at layer num_layers_done_
  SwapStepStats step_stats_;
  SwapCounters counters_;

  std::thread worker_;  // last: started once every member above exists
};

}  // namespace infercept
