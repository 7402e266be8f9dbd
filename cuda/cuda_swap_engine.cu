#include "cuda_swap_engine.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "cuda_check.h"
#include "infercept/errors.h"

namespace infercept::cuda {

namespace {

constexpr int kCopyThreads = 256;
constexpr int kCopyUnroll = 4;  // independent loads in flight per thread before the stores
constexpr int32_t kDefaultCopyCtas = 32;

// One layer, one direction: for each (src, dst) pair and each of K, V, copies block src of the
// source pool to block dst of the destination pool. A CTA takes one (pair, K|V) unit at a time;
// its threads stride over the block's Vec words, kCopyUnroll loads before kCopyUnroll stores.
//   pairs: [num_pairs][2] int32 (src, dst) in device memory
//   src_*/dst_*: base of this layer's K / V pool (device memory or mapped pinned host memory)
template <typename Vec>
__global__ void __launch_bounds__(kCopyThreads)
copy_blocks_kernel(const Vec* __restrict__ src_k, const Vec* __restrict__ src_v,
                   Vec* __restrict__ dst_k, Vec* __restrict__ dst_v,
                   const int32_t* __restrict__ pairs, int32_t num_pairs, int64_t words_per_block) {
  const int64_t num_units = 2 * int64_t{num_pairs};
  for (int64_t unit = blockIdx.x; unit < num_units; unit += gridDim.x) {
    const int64_t pair = unit >> 1;
    const bool is_value = (unit & 1) != 0;
    const Vec* src = (is_value ? src_v : src_k) + pairs[2 * pair] * words_per_block;
    Vec* dst = (is_value ? dst_v : dst_k) + pairs[2 * pair + 1] * words_per_block;
    for (int64_t base = threadIdx.x; base < words_per_block; base += kCopyThreads * kCopyUnroll) {
      Vec words[kCopyUnroll];
#pragma unroll
      for (int i = 0; i < kCopyUnroll; ++i) {
        const int64_t w = base + int64_t{i} * kCopyThreads;
        if (w < words_per_block) words[i] = src[w];
      }
#pragma unroll
      for (int i = 0; i < kCopyUnroll; ++i) {
        const int64_t w = base + int64_t{i} * kCopyThreads;
        if (w < words_per_block) dst[w] = words[i];
      }
    }
  }
}

bool is_aligned(const void* p, size_t alignment) {
  return reinterpret_cast<std::uintptr_t>(p) % alignment == 0;
}

float elapsed_ms(cudaEvent_t start, cudaEvent_t end) {
  float ms = 0;
  INFERCEPT_CUDA_CHECK(cudaEventElapsedTime(&ms, start, end));
  return ms;
}

void create_event(cudaEvent_t* event, bool is_timed) {
  INFERCEPT_CUDA_CHECK(cudaEventCreateWithFlags(event, is_timed ? cudaEventDefault : cudaEventDisableTiming));
}

}  // namespace

CudaSwapEngine::CudaSwapEngine(const SwapEngineConfig& config, int32_t max_copy_ctas)
    : SwapEngine(config),
      max_copy_ctas_(max_copy_ctas > 0 ? max_copy_ctas : kDefaultCopyCtas),
      device_keys_(config.num_layers, nullptr),
      device_values_(config.num_layers, nullptr),
      swap_in_done_(config.num_layers, nullptr),
      swap_out_done_(config.num_layers, nullptr),
      compute_at_wait_(config.num_layers, nullptr),
      has_waited_(config.num_layers, false) {
  if (max_copy_ctas < 0) {
    throw InvalidArgumentError("CudaSwapEngine: max_copy_ctas=" + std::to_string(max_copy_ctas) +
                               " must be >= 0 (0 picks the default)");
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    throw CudaError("CudaSwapEngine: no CUDA device is visible to this process");
  }
  int device = 0;
  INFERCEPT_CUDA_CHECK(cudaGetDevice(&device));
  device_ = device;
  try {
    const size_t bytes = config_.host_pool_bytes();
    void* pool = nullptr;
    INFERCEPT_CUDA_CHECK(cudaHostAlloc(&pool, bytes, cudaHostAllocMapped | cudaHostAllocPortable));
    host_pool_ = static_cast<std::byte*>(pool);
    std::memset(host_pool_, 0, bytes);
    void* mapped = nullptr;
    INFERCEPT_CUDA_CHECK(cudaHostGetDevicePointer(&mapped, pool, 0));
    host_pool_device_ = static_cast<std::byte*>(mapped);  // touch every page now, not during the first swap
    INFERCEPT_CUDA_CHECK(cudaStreamCreateWithFlags(&swap_in_stream_, cudaStreamNonBlocking));
    INFERCEPT_CUDA_CHECK(cudaStreamCreateWithFlags(&swap_out_stream_, cudaStreamNonBlocking));
    create_event(&step_begin_, false);
    create_event(&forward_end_, true);
    create_event(&swap_in_start_, true);
    create_event(&swap_in_end_, true);
    create_event(&swap_out_start_, true);
    create_event(&swap_out_end_, true);
    for (int32_t layer = 0; layer < config_.num_layers; ++layer) {
      // Timed: finish_step reads the stall of layer l as compute_at_wait -> swap_in_done.
      create_event(&swap_in_done_[layer], true);
      create_event(&swap_out_done_[layer], false);
      create_event(&compute_at_wait_[layer], true);
    }
  } catch (...) {
    release();  // frees what was created; every handle starts null
    throw;
  }
}

CudaSwapEngine::~CudaSwapEngine() {
  if (is_step_in_flight_) synchronize_quietly();
  release();
}

void CudaSwapEngine::release() {
  auto destroy = [](cudaEvent_t& e) {
    if (e != nullptr) cudaEventDestroy(e);
    e = nullptr;
  };
  for (auto* events : {&swap_in_done_, &swap_out_done_, &compute_at_wait_}) {
    for (cudaEvent_t& e : *events) destroy(e);
  }
  for (cudaEvent_t* e : {&step_begin_, &forward_end_, &swap_in_start_, &swap_in_end_,
                         &swap_out_start_, &swap_out_end_}) {
    destroy(*e);
  }
  if (swap_in_stream_ != nullptr) cudaStreamDestroy(swap_in_stream_);
  if (swap_out_stream_ != nullptr) cudaStreamDestroy(swap_out_stream_);
  swap_in_stream_ = swap_out_stream_ = nullptr;
  if (device_pairs_ != nullptr) cudaFree(device_pairs_);
  if (staging_pairs_ != nullptr) cudaFreeHost(staging_pairs_);
  if (host_pool_ != nullptr) cudaFreeHost(host_pool_);
  device_pairs_ = nullptr;
  staging_pairs_ = nullptr;
  host_pool_ = nullptr;
  host_pool_device_ = nullptr;
}

void CudaSwapEngine::synchronize_quietly() {
  if (swap_in_stream_ != nullptr) cudaStreamSynchronize(swap_in_stream_);
  if (swap_out_stream_ != nullptr) cudaStreamSynchronize(swap_out_stream_);
  cudaGetLastError();
  is_step_in_flight_ = false;
}

std::byte* CudaSwapEngine::host_layer(int32_t layer, bool is_value, bool is_mapped) const {
  const size_t index = (static_cast<size_t>(layer) * 2 + (is_value ? 1 : 0)) * config_.num_host_blocks;
  return (is_mapped ? host_pool_device_ : host_pool_) + index * static_cast<size_t>(config_.block_bytes);
}

void CudaSwapEngine::set_compute_stream(std::uintptr_t stream) {
  if (is_step_in_flight_) {
    throw StateError("set_compute_stream: a step is in flight; call finish_step() first");
  }
  compute_stream_ = reinterpret_cast<cudaStream_t>(stream);
}

void CudaSwapEngine::register_device_layer(int32_t layer, void* key_ptr, void* value_ptr) {
  check_layer(config_, "register_device_layer", layer);
  if (key_ptr == nullptr || value_ptr == nullptr) {
    throw InvalidArgumentError("register_device_layer: layer " + std::to_string(layer) +
                               " got a null " + (key_ptr == nullptr ? "key" : "value") + " pointer");
  }
  if (is_step_in_flight_) {
    throw StateError("register_device_layer: a step is in flight; call finish_step() first");
  }
  for (void* p : {key_ptr, value_ptr}) {
    cudaPointerAttributes attributes{};
    if (cudaPointerGetAttributes(&attributes, p) != cudaSuccess) {
      cudaGetLastError();
      attributes.type = cudaMemoryTypeUnregistered;
    }
    if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged) {
      throw InvalidArgumentError("register_device_layer: layer " + std::to_string(layer) +
                                 " pointer is not CUDA device memory (a CPU KV cache needs the "
                                 "CPU swap engine)");
    }
    if (attributes.device != device_) {
      throw InvalidArgumentError("register_device_layer: layer " + std::to_string(layer) +
                                 " lives on device " + std::to_string(attributes.device) +
                                 " but the engine was created on device " + std::to_string(device_));
    }
  }
  device_keys_[layer] = static_cast<std::byte*>(key_ptr);
  device_values_[layer] = static_cast<std::byte*>(value_ptr);
}

void CudaSwapEngine::launch_copies(cudaStream_t stream, const int32_t* pairs, int32_t num_pairs,
                                   bool to_host) {
  const int64_t block_bytes = config_.block_bytes;
  const int grid = static_cast<int>(std::min<int64_t>(2 * int64_t{num_pairs}, max_copy_ctas_));
  for (int32_t layer = 0; layer < config_.num_layers; ++layer) {
    // The kernel reaches the pinned pool through its mapped device address (zero-copy).
    const std::byte* src_k = to_host ? device_keys_[layer] : host_layer(layer, false, true);
    const std::byte* src_v = to_host ? device_values_[layer] : host_layer(layer, true, true);
    std::byte* dst_k = to_host ? host_layer(layer, false, true) : device_keys_[layer];
    std::byte* dst_v = to_host ? host_layer(layer, true, true) : device_values_[layer];
    const bool is_wide = block_bytes % 16 == 0 && is_aligned(src_k, 16) && is_aligned(src_v, 16) &&
                         is_aligned(dst_k, 16) && is_aligned(dst_v, 16);
    if (is_wide) {
      copy_blocks_kernel<uint4><<<grid, kCopyThreads, 0, stream>>>(
          reinterpret_cast<const uint4*>(src_k), reinterpret_cast<const uint4*>(src_v),
          reinterpret_cast<uint4*>(dst_k), reinterpret_cast<uint4*>(dst_v), pairs, num_pairs,
          block_bytes / 16);
    } else {
      copy_blocks_kernel<unsigned char><<<grid, kCopyThreads, 0, stream>>>(
          reinterpret_cast<const unsigned char*>(src_k), reinterpret_cast<const unsigned char*>(src_v),
          reinterpret_cast<unsigned char*>(dst_k), reinterpret_cast<unsigned char*>(dst_v), pairs,
          num_pairs, block_bytes);
    }
    INFERCEPT_CUDA_CHECK_LAUNCH("copy_blocks_kernel");
    INFERCEPT_CUDA_CHECK(cudaEventRecord((to_host ? swap_out_done_ : swap_in_done_)[layer], stream));
  }
}

void CudaSwapEngine::begin_step(const std::vector<BlockCopy>& swap_out,
                                const std::vector<BlockCopy>& swap_in) {
  check_swap_step(config_, swap_out, swap_in);
  if (is_step_in_flight_) {
    throw StateError("begin_step: the previous step is still in flight; call finish_step() first");
  }
  has_swap_out_ = !swap_out.empty();
  has_swap_in_ = !swap_in.empty();
  if (has_swap_out_ || has_swap_in_) {
    for (int32_t layer = 0; layer < config_.num_layers; ++layer) {
      if (device_keys_[layer] == nullptr) {
        throw StateError("begin_step: device layer " + std::to_string(layer) +
                         " is not registered; call register_device_layer() for all " +
                         std::to_string(config_.num_layers) + " layers first");
      }
    }
  }
  step_stats_ = SwapStepStats{};
  step_stats_.num_blocks_out = static_cast<int32_t>(swap_out.size());
  step_stats_.num_blocks_in = static_cast<int32_t>(swap_in.size());
  step_stats_.num_bytes =
      static_cast<int64_t>(swap_out.size() + swap_in.size()) * config_.bytes_per_block_copy();
  std::fill(has_waited_.begin(), has_waited_.end(), false);
  if (!has_swap_out_ && !has_swap_in_) {
    is_step_in_flight_ = true;
    return;
  }

  INFERCEPT_CUDA_CHECK(cudaSetDevice(device_));
  const size_t num_pairs = swap_out.size() + swap_in.size();
  if (num_pairs > pair_capacity_) {
    // Between steps: the previous step's kernels and uploads have finished (finish_step).
    const size_t capacity = std::max(num_pairs, 2 * pair_capacity_);
    if (device_pairs_ != nullptr) INFERCEPT_CUDA_CHECK(cudaFree(device_pairs_));
    if (staging_pairs_ != nullptr) INFERCEPT_CUDA_CHECK(cudaFreeHost(staging_pairs_));
    device_pairs_ = staging_pairs_ = nullptr;
    pair_capacity_ = 0;
    INFERCEPT_CUDA_CHECK(cudaMalloc(&device_pairs_, capacity * 2 * sizeof(int32_t)));
    INFERCEPT_CUDA_CHECK(cudaHostAlloc(&staging_pairs_, capacity * 2 * sizeof(int32_t), cudaHostAllocDefault));
    pair_capacity_ = capacity;
  }
  // Layout: swap-in pairs first, then swap-out pairs.
  int32_t* staged = staging_pairs_;
  for (const BlockCopy& c : swap_in) { *staged++ = c.src; *staged++ = c.dst; }
  for (const BlockCopy& c : swap_out) { *staged++ = c.src; *staged++ = c.dst; }
  const size_t in_pairs = swap_in.size();

  try {
    INFERCEPT_CUDA_CHECK(cudaEventRecord(step_begin_, compute_stream_));
    if (has_swap_in_) {
      cudaStream_t s = swap_in_stream_;
      INFERCEPT_CUDA_CHECK(cudaStreamWaitEvent(s, step_begin_, 0));
      INFERCEPT_CUDA_CHECK(cudaEventRecord(swap_in_start_, s));
      INFERCEPT_CUDA_CHECK(cudaMemcpyAsync(device_pairs_, staging_pairs_, in_pairs * 2 * sizeof(int32_t),
                                           cudaMemcpyHostToDevice, s));
      launch_copies(s, device_pairs_, static_cast<int32_t>(in_pairs), /*to_host=*/false);
      INFERCEPT_CUDA_CHECK(cudaEventRecord(swap_in_end_, s));
    }
    if (has_swap_out_) {
      cudaStream_t s = swap_out_stream_;
      int32_t* pairs = device_pairs_ + 2 * in_pairs;
      INFERCEPT_CUDA_CHECK(cudaStreamWaitEvent(s, step_begin_, 0));
      INFERCEPT_CUDA_CHECK(cudaEventRecord(swap_out_start_, s));
      INFERCEPT_CUDA_CHECK(cudaMemcpyAsync(pairs, staging_pairs_ + 2 * in_pairs,
                                           swap_out.size() * 2 * sizeof(int32_t),
                                           cudaMemcpyHostToDevice, s));
      launch_copies(s, pairs, static_cast<int32_t>(swap_out.size()), /*to_host=*/true);
      INFERCEPT_CUDA_CHECK(cudaEventRecord(swap_out_end_, s));
    }
  } catch (...) {
    synchronize_quietly();  // nothing half-enqueued may still run when the caller frees blocks
    throw;
  }
  is_step_in_flight_ = true;
}

void CudaSwapEngine::wait_layer(int32_t layer) {
  check_layer(config_, "wait_layer", layer);
  if (!is_step_in_flight_ || !has_swap_in_ || has_waited_[layer]) return;
  INFERCEPT_CUDA_CHECK(cudaEventRecord(compute_at_wait_[layer], compute_stream_));
  INFERCEPT_CUDA_CHECK(cudaStreamWaitEvent(compute_stream_, swap_in_done_[layer], 0));
  has_waited_[layer] = true;
}

SwapStepStats CudaSwapEngine::finish_step() {
  if (!is_step_in_flight_) return SwapStepStats{};
  if (!has_swap_in_ && !has_swap_out_) {
    is_step_in_flight_ = false;
    return step_stats_;
  }
  // The step ends here whatever happens: the scheduler frees the swapped blocks next.
  is_step_in_flight_ = false;
  cudaError_t status = cudaEventRecord(forward_end_, compute_stream_);
  const cudaError_t in_status = cudaStreamSynchronize(swap_in_stream_);
  const cudaError_t out_status = cudaStreamSynchronize(swap_out_stream_);
  if (status == cudaSuccess) status = cudaEventSynchronize(forward_end_);
  INFERCEPT_CUDA_CHECK(in_status);
  INFERCEPT_CUDA_CHECK(out_status);
  INFERCEPT_CUDA_CHECK(status);

  // Device-side accounting. stall: for each layer whose compute waited, how long the swap-in
  // landed after the compute reached the wait. drain: how long copies ran past the forward.
  double copy_ms = 0, stall_ms = 0, drain_ms = 0;
  if (has_swap_in_) {
    copy_ms += elapsed_ms(swap_in_start_, swap_in_end_);
    for (int32_t layer = 0; layer < config_.num_layers; ++layer) {
      if (has_waited_[layer]) stall_ms += std::max(0.0f, elapsed_ms(compute_at_wait_[layer], swap_in_done_[layer]));
    }
    drain_ms = std::max<double>(drain_ms, elapsed_ms(forward_end_, swap_in_end_));
  }
  if (has_swap_out_) {
    copy_ms += elapsed_ms(swap_out_start_, swap_out_end_);
    drain_ms = std::max<double>(drain_ms, elapsed_ms(forward_end_, swap_out_end_));
  }
  step_stats_.copy_s = copy_ms * 1e-3;
  step_stats_.stall_s = stall_ms * 1e-3;
  step_stats_.drain_s = std::max(0.0, drain_ms) * 1e-3;

  const int64_t bytes_per_copy = config_.bytes_per_block_copy();
  counters_.num_blocks_out += step_stats_.num_blocks_out;
  counters_.num_blocks_in += step_stats_.num_blocks_in;
  counters_.num_bytes_out += step_stats_.num_blocks_out * bytes_per_copy;
  counters_.num_bytes_in += step_stats_.num_blocks_in * bytes_per_copy;
  return step_stats_;
}

const std::byte* CudaSwapEngine::host_block_ptr(int32_t layer, bool is_value, BlockId block) const {
  check_host_block(config_, "host_block_ptr", layer, block);
  return host_layer(layer, is_value, false) + static_cast<size_t>(block) * static_cast<size_t>(config_.block_bytes);
}

}  // namespace infercept::cuda
