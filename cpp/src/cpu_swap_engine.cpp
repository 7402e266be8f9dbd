#include "infercept/cpu_swap_engine.h"

#include <chrono>
#include <cstring>
#include <new>
#include <string>

#include "infercept/errors.h"

namespace infercept {

namespace {

using Clock = std::chrono::steady_clock;

// Host pool alignment: a cache line, so that block-sized memcpy runs start aligned when
// block_bytes is a multiple of 64 (it is for every real KV shape).
constexpr std::align_val_t kHostAlignment{64};

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

void CpuSwapEngine::AlignedFree::operator()(std::byte* p) const {
  ::operator delete(p, kHostAlignment);
}

CpuSwapEngine::CpuSwapEngine(const SwapEngineConfig& config)
    : SwapEngine(config),
      device_keys_(config.num_layers, nullptr),
      device_values_(config.num_layers, nullptr) {
  const size_t bytes = config_.host_pool_bytes();
  host_pool_.reset(static_cast<std::byte*>(::operator new(bytes, kHostAlignment)));
  std::memset(host_pool_.get(), 0, bytes);
  worker_ = std::thread([this] { run_worker(); });
}

CpuSwapEngine::~CpuSwapEngine() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    is_stopping_ = true;
  }
  work_ready_.notify_one();
  worker_.join();  // the worker finishes a job it holds before it sees is_stopping_
}

std::byte* CpuSwapEngine::host_block(int32_t layer, bool is_value, BlockId block) const {
  const size_t index = (static_cast<size_t>(layer) * 2 + (is_value ? 1 : 0)) * config_.num_host_blocks + block;
  return host_pool_.get() + index * static_cast<size_t>(config_.block_bytes);
}

std::byte* CpuSwapEngine::device_block(int32_t layer, bool is_value, BlockId block) const {
  std::byte* base = is_value ? device_values_[layer] : device_keys_[layer];
  return base + static_cast<size_t>(block) * static_cast<size_t>(config_.block_bytes);
}

void CpuSwapEngine::register_device_layer(int32_t layer, void* key_ptr, void* value_ptr) {
  check_layer(config_, "register_device_layer", layer);
  if (key_ptr == nullptr || value_ptr == nullptr) {
    throw InvalidArgumentError("register_device_layer: layer " + std::to_string(layer) +
                               " got a null " + (key_ptr == nullptr ? "key" : "value") + " pointer");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (is_step_in_flight_) {
    // The worker reads the base pointers without the lock while it copies.
    throw StateError("register_device_layer: a step is in flight; call finish_step() first");
  }
  device_keys_[layer] = static_cast<std::byte*>(key_ptr);
  device_values_[layer] = static_cast<std::byte*>(value_ptr);
}

void CpuSwapEngine::begin_step(const std::vector<BlockCopy>& swap_out,
                               const std::vector<BlockCopy>& swap_in) {
  check_swap_step(config_, swap_out, swap_in);
  std::vector<CopyRun> out_runs = coalesce_copies(swap_out);
  std::vector<CopyRun> in_runs = coalesce_copies(swap_in);
  const bool has_copies = !swap_out.empty() || !swap_in.empty();

  std::unique_lock<std::mutex> lock(mutex_);
  if (is_step_in_flight_) {
    throw StateError("begin_step: the previous step is still in flight; call finish_step() first");
  }
  if (has_copies) {
    for (int32_t layer = 0; layer < config_.num_layers; ++layer) {
      if (device_keys_[layer] == nullptr) {
        throw StateError("begin_step: device layer " + std::to_string(layer) +
                         " is not registered; call register_device_layer() for all " +
                         std::to_string(config_.num_layers) + " layers first");
      }
    }
  }
  is_step_in_flight_ = true;
  error_ = nullptr;
  step_stats_ = SwapStepStats{};
  step_stats_.num_blocks_out = static_cast<int32_t>(swap_out.size());
  step_stats_.num_blocks_in = static_cast<int32_t>(swap_in.size());
  step_stats_.num_bytes = static_cast<int64_t>(swap_out.size() + swap_in.size()) * config_.bytes_per_block_copy();
  if (!has_copies) {
    num_layers_done_ = config_.num_layers;
    return;
  }
  num_layers_done_ = 0;
  swap_out_runs_ = std::move(out_runs);
  swap_in_runs_ = std::move(in_runs);
  is_copying_ = true;
  lock.unlock();
  work_ready_.notify_one();
}

void CpuSwapEngine::wait_layer(int32_t layer) {
  check_layer(config_, "wait_layer", layer);
  std::unique_lock<std::mutex> lock(mutex_);
  if (!is_step_in_flight_) return;
  auto is_ready = [&] { return num_layers_done_ > layer || error_ != nullptr; };
  if (!is_ready()) {
    const auto start = Clock::now();
    layer_done_.wait(lock, is_ready);
    step_stats_.stall_s += seconds_since(start);
  }
  // Layers before the failing one were copied and may be computed; this one was not.
  if (num_layers_done_ <= layer) std::rethrow_exception(error_);
}

SwapStepStats CpuSwapEngine::finish_step() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (!is_step_in_flight_) return SwapStepStats{};
  if (is_copying_) {
    const auto start = Clock::now();
    layer_done_.wait(lock, [&] { return !is_copying_; });
    step_stats_.drain_s += seconds_since(start);
  }
  is_step_in_flight_ = false;
  swap_out_runs_.clear();
  swap_in_runs_.clear();
  if (error_ != nullptr) {
    std::exception_ptr error = error_;
    error_ = nullptr;
    std::rethrow_exception(error);
  }
  const int64_t bytes_per_copy = config_.bytes_per_block_copy();
  counters_.num_blocks_out += step_stats_.num_blocks_out;
  counters_.num_blocks_in += step_stats_.num_blocks_in;
  counters_.num_bytes_out += step_stats_.num_blocks_out * bytes_per_copy;
  counters_.num_bytes_in += step_stats_.num_blocks_in * bytes_per_copy;
  return step_stats_;
}

bool CpuSwapEngine::is_step_in_flight() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return is_step_in_flight_;
}

SwapCounters CpuSwapEngine::counters() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return counters_;
}

const std::byte* CpuSwapEngine::host_block_ptr(int32_t layer, bool is_value, BlockId block) const {
  check_host_block(config_, "host_block_ptr", layer, block);
  return host_block(layer, is_value, block);
}

void CpuSwapEngine::copy_layer(int32_t layer, const std::vector<CopyRun>& swap_out,
                               const std::vector<CopyRun>& swap_in) {
  const size_t block_bytes = static_cast<size_t>(config_.block_bytes);
  for (bool is_value : {false, true}) {
    for (const CopyRun& run : swap_in) {
      std::memcpy(device_block(layer, is_value, run.dst), host_block(layer, is_value, run.src),
                  run.num_blocks * block_bytes);
    }
  }
  for (bool is_value : {false, true}) {
    for (const CopyRun& run : swap_out) {
      std::memcpy(host_block(layer, is_value, run.dst), device_block(layer, is_value, run.src),
                  run.num_blocks * block_bytes);
    }
  }
}

void CpuSwapEngine::run_worker() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      work_ready_.wait(lock, [&] { return is_copying_ || is_stopping_; });
      if (!is_copying_) return;
    }
    // While is_copying_ the caller leaves the runs and the device pointers alone.
    double copy_s = 0;
    for (int32_t layer = 0; layer < config_.num_layers; ++layer) {
      std::exception_ptr error;
      const auto start = Clock::now();
      try {
        copy_layer(layer, swap_out_runs_, swap_in_runs_);
      } catch (...) {
        error = std::current_exception();
      }
      copy_s += seconds_since(start);
      const bool is_last = error != nullptr || layer + 1 == config_.num_layers;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (error != nullptr) {
          error_ = error;
        } else {
          num_layers_done_ = layer + 1;
        }
        if (is_last) {
          is_copying_ = false;
          step_stats_.copy_s = copy_s;
        }
      }
      layer_done_.notify_all();
      if (is_last) break;
    }
  }
}

}  // namespace infercept
