// The CPU paged decode-attention kernel alone (the raw-pointer layer, no Python): one layer's
// call at SmolLM2-135M shapes (9 query heads, 3 KV heads, head_dim 64, block_size 16, float32)
// for each body, batch and context. Prints the fastest and the median milliseconds per call,
// and at the fastest the GFLOPS (2 * 2 * head_dim flops per query head and token: scores and
// V) and the K/V GB/s read.
//
// Every sequence's blocks are shuffled over a cache of at least 128 MiB, larger than the
// last-level cache as a 30-layer model's is, and each call reads another slice of it, so K/V
// come from memory.
// Arguments (all optional): threads come from OMP_NUM_THREADS; INFERCEPT_BENCH_REPEATS sets
// the calls per cell (default 30); INFERCEPT_BENCH_CACHE_MIB the K/V cycled through (default
// 128; 0 leaves only the 4 copies, so small cells run from L2/L3 and time the arithmetic).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "infercept/cpu_attention.h"

using namespace infercept;

namespace {

constexpr int64_t kNumHeads = 9, kNumKvHeads = 3, kHeadDim = 64, kBlockSize = 16;
// The K/V MiB the calls of one cell cycle through by default (at least 4 copies of the
// batch's blocks).
constexpr int64_t kDefaultCacheMib = 128;

struct Cell {
  int64_t batch, context;
};

// On a shared machine the fastest call is the one least disturbed by other work.
double min_ms(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

double median_ms(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void run_cell(const Cell& cell, CpuAttentionImpl impl, const char* impl_name, int repeats,
              int64_t cache_bytes) {
  const int64_t blocks_per_seq = (cell.context + kBlockSize - 1) / kBlockSize;
  const int64_t token_floats = kNumKvHeads * kHeadDim;
  const int64_t call_bytes = cell.batch * blocks_per_seq * kBlockSize * token_floats * 8;
  const int64_t num_copies = std::max<int64_t>(4, cache_bytes / call_bytes);
  const int64_t num_blocks = num_copies * cell.batch * blocks_per_seq;
  std::vector<float> keys(num_blocks * kBlockSize * token_floats);
  std::vector<float> values(keys.size());
  std::vector<float> query(cell.batch * kNumHeads * kHeadDim), out(query.size());
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  for (auto* v : {&keys, &values, &query}) {
    for (float& x : *v) x = normal(rng);
  }
  std::vector<int32_t> order(num_blocks);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  // tables[copy] [batch, blocks_per_seq]: disjoint slices of the shuffled block ids.
  std::vector<std::vector<int32_t>> tables(num_copies);
  for (int64_t copy = 0; copy < num_copies; ++copy) {
    const int64_t first = copy * cell.batch * blocks_per_seq;
    tables[copy].assign(order.begin() + first, order.begin() + first + cell.batch * blocks_per_seq);
  }
  std::vector<int32_t> lens(cell.batch, static_cast<int32_t>(cell.context));

  PagedDecodeProblem p;
  p.out = out.data();
  p.query = query.data();
  p.key_cache = keys.data();
  p.value_cache = values.data();
  p.context_lens = lens.data();
  p.num_seqs = cell.batch;
  p.num_heads = kNumHeads;
  p.num_kv_heads = kNumKvHeads;
  p.head_dim = kHeadDim;
  p.block_size = kBlockSize;
  p.max_blocks = blocks_per_seq;
  p.num_blocks = num_blocks;
  p.scale = 0.125f;
  p.impl = impl;
  std::vector<double> times_ms;
  for (int i = 0; i < repeats + 2; ++i) {
    p.block_tables = tables[i % num_copies].data();
    const auto start = std::chrono::steady_clock::now();
    paged_decode_attention(p);
    const auto stop = std::chrono::steady_clock::now();
    if (i >= 2) times_ms.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
  }
  const double ms = min_ms(times_ms);
  const double tokens = static_cast<double>(cell.batch) * cell.context;
  const double flops = tokens * kNumHeads * 4.0 * kHeadDim;
  const double bytes = tokens * 2.0 * token_floats * sizeof(float);
  std::printf("%-8s batch %3lld context %5lld: min %8.4f ms (median %8.4f)  %6.1f GFLOPS  "
              "%5.1f GB/s\n", impl_name, static_cast<long long>(cell.batch),
              static_cast<long long>(cell.context), ms, median_ms(times_ms), flops / ms * 1e-6,
              bytes / ms * 1e-6);
}

}  // namespace

int main() {
  const char* env = std::getenv("INFERCEPT_BENCH_REPEATS");
  const int repeats = env ? std::max(1, std::atoi(env)) : 30;
  const char* cache_env = std::getenv("INFERCEPT_BENCH_CACHE_MIB");
  const int64_t cache_bytes = (cache_env ? std::max(0, std::atoi(cache_env)) : kDefaultCacheMib)
                              << 20;
  std::vector<std::pair<CpuAttentionImpl, const char*>> impls = {
      {CpuAttentionImpl::kPortable, "portable"}};
  if (cpu_attention_has_avx2()) impls.push_back({CpuAttentionImpl::kAvx2, "avx2"});
  for (const Cell cell : {Cell{1, 256}, Cell{1, 512}, Cell{8, 256}, Cell{8, 512}, Cell{32, 256},
                          Cell{32, 512}}) {
    for (const auto& [impl, name] : impls) run_cell(cell, impl, name, repeats, cache_bytes);
  }
  return 0;
}
