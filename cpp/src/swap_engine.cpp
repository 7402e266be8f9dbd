// The backend-independent part of the swap engine: shape checks, copy-list checks, coalescing.
#include "infercept/swap_engine.h"

#include <algorithm>
#include <limits>
#include <string>

#include "infercept/errors.h"

namespace infercept {

namespace {

void check_block(const char* list, size_t index, const char* end, BlockId block, const char* pool,
                 int32_t num_blocks) {
  if (block < 0 || block >= num_blocks) {
    throw InvalidArgumentError(std::string(list) + "[" + std::to_string(index) + "]." + end + "=" +
                               std::to_string(block) + " is not a " + pool + " block: the " + pool +
                               " pool holds blocks 0.." + std::to_string(num_blocks - 1));
  }
}

// Throws when two copies of `copies` write the same block. `sorted` is scratch space.
void check_unique_dst(const char* list, const std::vector<BlockCopy>& copies,
                      std::vector<BlockId>& sorted) {
  sorted.clear();
  for (const BlockCopy& c : copies) sorted.push_back(c.dst);
  std::sort(sorted.begin(), sorted.end());
  auto dup = std::adjacent_find(sorted.begin(), sorted.end());
  if (dup != sorted.end()) {
    throw InvalidArgumentError(std::string(list) + " writes block " + std::to_string(*dup) +
                               " twice: every dst of one step must be distinct");
  }
}

// Throws when a block that `writer` writes is one that `reader` reads (same pool).
void check_no_overlap(const char* writer, const std::vector<BlockCopy>& writes, const char* reader,
                      const std::vector<BlockCopy>& reads, const char* pool,
                      std::vector<BlockId>& sorted) {
  sorted.clear();
  for (const BlockCopy& c : reads) sorted.push_back(c.src);
  std::sort(sorted.begin(), sorted.end());
  for (const BlockCopy& c : writes) {
    if (std::binary_search(sorted.begin(), sorted.end(), c.dst)) {
      throw InvalidArgumentError(std::string(pool) + " block " + std::to_string(c.dst) +
                                 " is both a " + writer + " dst and a " + reader +
                                 " src in one step");
    }
  }
}

}  // namespace

size_t SwapEngineConfig::host_pool_bytes() const {
  return static_cast<size_t>(num_layers) * 2 * static_cast<size_t>(num_host_blocks) *
         static_cast<size_t>(block_bytes);
}

void SwapEngineConfig::validate() const {
  check_positive("swap engine", "num_layers", num_layers);
  check_positive("swap engine", "block_bytes", block_bytes);
  check_positive("swap engine", "num_device_blocks", num_device_blocks);
  check_positive("swap engine", "num_host_blocks", num_host_blocks);
  // Both pools are addressed as base + block * block_bytes; keep every offset in range.
  // num_layers * 2 * num_host_blocks < 2^63 since both counts are int32.
  const int64_t max_bytes = std::numeric_limits<int64_t>::max();
  const int64_t num_host_layer_blocks = int64_t{num_layers} * 2 * num_host_blocks;
  if (block_bytes > max_bytes / num_host_layer_blocks || block_bytes > max_bytes / num_device_blocks) {
    throw InvalidArgumentError("swap engine: num_layers=" + std::to_string(num_layers) +
                               " x 2 x num_host_blocks=" + std::to_string(num_host_blocks) +
                               " x block_bytes=" + std::to_string(block_bytes) +
                               " exceeds the 2^63-byte limit");
  }
}

std::vector<CopyRun> coalesce_copies(const std::vector<BlockCopy>& copies) {
  std::vector<CopyRun> runs;
  for (const BlockCopy& c : copies) {
    if (!runs.empty()) {
      CopyRun& last = runs.back();
      if (c.src == last.src + last.num_blocks && c.dst == last.dst + last.num_blocks) {
        ++last.num_blocks;
        continue;
      }
    }
    runs.push_back(CopyRun{c.src, c.dst, 1});
  }
  return runs;
}

void check_layer(const SwapEngineConfig& config, const char* what, int32_t layer) {
  if (layer < 0 || layer >= config.num_layers) {
    throw InvalidArgumentError(std::string(what) + ": layer=" + std::to_string(layer) +
                               " is out of range: the engine has layers 0.." + std::to_string(config.num_layers - 1));
  }
}

void check_host_block(const SwapEngineConfig& config, const char* what, int32_t layer, BlockId block) {
  check_layer(config, what, layer);
  if (block < 0 || block >= config.num_host_blocks) {
    throw InvalidArgumentError(std::string(what) + ": block=" + std::to_string(block) +
                               " is not a host block: the host pool holds blocks 0.." +
                               std::to_string(config.num_host_blocks - 1));
  }
}

void check_swap_step(const SwapEngineConfig& config, const std::vector<BlockCopy>& swap_out,
                     const std::vector<BlockCopy>& swap_in) {
  for (size_t i = 0; i < swap_out.size(); ++i) {
    check_block("swap_out", i, "src", swap_out[i].src, "device", config.num_device_blocks);
    check_block("swap_out", i, "dst", swap_out[i].dst, "host", config.num_host_blocks);
  }
  for (size_t i = 0; i < swap_in.size(); ++i) {
    check_block("swap_in", i, "src", swap_in[i].src, "host", config.num_host_blocks);
    check_block("swap_in", i, "dst", swap_in[i].dst, "device", config.num_device_blocks);
  }
  std::vector<BlockId> scratch;
  check_unique_dst("swap_out", swap_out, scratch);
  check_unique_dst("swap_in", swap_in, scratch);
  check_no_overlap("swap_in", swap_in, "swap_out", swap_out, "device", scratch);
  check_no_overlap("swap_out", swap_out, "swap_in", swap_in, "host", scratch);
}

}  // namespace infercept
