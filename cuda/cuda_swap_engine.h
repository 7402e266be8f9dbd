#pragma once
// The CUDA backend of the swap engine (swap_engine.h): the device KV cache is GPU memory, the
// host pool is pinned, mapped host memory, and the copies run on two dedicated copy streams,
// one per direction, while the forward runs on the caller's compute stream.
//
// One step (StepPlan swap_out / swap_in, block ids that the scheduler already chunked to its
// per-iteration budget):
//   begin_step   records `step_begin` on the compute stream; both copy streams wait on it (a
//                swap-out never reads a block before the compute that wrote it has finished, a
//                swap-in never overwrites a block a previous forward may still read). Then, per
//                layer l, one gather/scatter kernel per direction over the block-id list (K and
//                V together), each followed by that direction's layer-l event.
//   wait_layer   makes the compute stream wait on layer l's swap-in event (cudaStreamWaitEvent:
//                no host sync; layer l's compute waits for layer l's swap-in only).
//   finish_step  synchronises both copy streams (blocks are freed by the scheduler only after
//                the copies have finished) and the end of the forward, then reads the stats off
//                events (device time, not host time).
//
// The copy kernel reads and writes the pinned pool through its mapped device address
// (zero-copy), so one launch moves every block of a layer in one direction: no per-block
// cudaMemcpyAsync, no staging buffer.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "infercept/swap_engine.h"

namespace infercept::cuda {

/// Swap engine over one CUDA device (the current device at construction). Not thread-safe: one
/// thread (the model runner) drives steps.
class CudaSwapEngine : public SwapEngine {
 public:
  /// Allocates the pinned host pool (config.host_pool_bytes(), cudaHostAlloc mapped + portable,
  /// zeroed), the copy streams (non-blocking) and the events. `max_copy_ctas` caps the CTAs
  /// one copy kernel occupies (the copies share the SMs with the forward); 0 picks the default
  /// (32). Throws InvalidArgumentError for a bad config, CudaError when there is no device or
  /// an allocation fails.
  explicit CudaSwapEngine(const SwapEngineConfig& config, int32_t max_copy_ctas = 0);
  /// Synchronises a step still in flight (its errors are dropped) and frees everything.
  ~CudaSwapEngine() override;

  CudaSwapEngine(const CudaSwapEngine&) = delete;
  CudaSwapEngine& operator=(const CudaSwapEngine&) = delete;

  /// The stream the forward runs on, as an integer handle (torch.cuda.current_stream()
  /// .cuda_stream; 0 is the legacy default stream). Used by the next begin_step / wait_layer /
  /// finish_step. Throws StateError while a step is in flight.
  void set_compute_stream(std::uintptr_t stream);
  std::uintptr_t compute_stream() const { return reinterpret_cast<std::uintptr_t>(compute_stream_); }

  /// The device this engine copies to and from.
  int32_t device() const { return device_; }
  int32_t max_copy_ctas() const { return max_copy_ctas_; }

  void register_device_layer(int32_t layer, void* key_ptr, void* value_ptr) override;
  void begin_step(const std::vector<BlockCopy>& swap_out,
                  const std::vector<BlockCopy>& swap_in) override;
  /// Enqueues the compute stream's wait for layer `layer`'s swap-in; returns at once (the host
  /// never blocks here). stall_s is measured on the device at finish_step.
  void wait_layer(int32_t layer) override;
  SwapStepStats finish_step() override;
  bool is_step_in_flight() const override { return is_step_in_flight_; }
  SwapCounters counters() const override { return counters_; }
  /// A pinned host block: host-readable once finish_step() has returned.
  const std::byte* host_block_ptr(int32_t layer, bool is_value, BlockId block) const override;

 private:
  // Base of a layer's K or V host blocks: the host address, or the mapped device address.
  std::byte* host_layer(int32_t layer, bool is_value, bool is_mapped) const;
  void release();
  void launch_copies(cudaStream_t stream, const int32_t* pairs, int32_t num_pairs, bool to_host);
  void synchronize_quietly();

  int32_t device_ = 0;
  int32_t max_copy_ctas_ = 32;
  std::byte* host_pool_ = nullptr;  // pinned, mapped; [num_layers][K, V][num_host_blocks] blocks
  std::byte* host_pool_device_ = nullptr;  // the same memory's device address
  std::vector<std::byte*> device_keys_;    // [num_layers] base of each layer's device K cache
  std::vector<std::byte*> device_values_;  // [num_layers]

  // The step's (src, dst) pairs: written to pinned staging, uploaded once per step and
  // direction to device memory that the copy kernels read. [capacity][2] int32 each.
  int32_t* staging_pairs_ = nullptr;
  int32_t* device_pairs_ = nullptr;
  size_t pair_capacity_ = 0;

  cudaStream_t compute_stream_ = nullptr;  // not owned
  cudaStream_t swap_in_stream_ = nullptr;
  cudaStream_t swap_out_stream_ = nullptr;
  cudaEvent_t step_begin_ = nullptr;       // compute stream, at begin_step
  cudaEvent_t forward_end_ = nullptr;      // compute stream, at finish_step
  cudaEvent_t swap_in_start_ = nullptr, swap_in_end_ = nullptr;
  cudaEvent_t swap_out_start_ = nullptr, swap_out_end_ = nullptr;
  std::vector<cudaEvent_t> swap_in_done_;   // [num_layers] layer l's swap-in has landed
  std::vector<cudaEvent_t> swap_out_done_;  // [num_layers] layer l's swap-out has landed
  std::vector<cudaEvent_t> compute_at_wait_;  // [num_layers] compute reached wait_layer(l)
  std::vector<bool> has_waited_;              // [num_layers] wait_layer(l) enqueued a wait

  bool is_step_in_flight_ = false;
  bool has_swap_in_ = false;
  bool has_swap_out_ = false;
  SwapStepStats step_stats_;
  SwapCounters counters_;
};

}  // namespace infercept::cuda
