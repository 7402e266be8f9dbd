// The CPU paged decode-attention kernel alone (the raw-pointer layer, no Python): one layer's
// call at SmolLM2-135M shapes (9 query heads, 3 KV heads, head_dim 64, block_size 16, float32)
// for each body the CPU has, batch and context. Prints the fastest and the median milliseconds
// per call, and at the fastest the GFLOPS (2 * 2 * head_dim flops per query head and token:
// scores and V) and the K/V GB/s read.
//
// Every sequence's blocks are shuffled over a cache of at least 128 MiB, larger than the
// last-level cache as a 30-layer model's is, and each call reads another slice of it, so K/V
// come from memory. Two read-only yardsticks run first and beside each cell:
//   - "stream": a plain sequential read of 512 MiB on the same threads (the read bandwidth);
//   - "gather": the cell's own block reads (every sequence's K and V blocks in table order,
//     summed as integers, no arithmetic to speak of), what the kernel could reach if it were
//     free.
// Arguments (all optional): threads come from OMP_NUM_THREADS; INFERCEPT_BENCH_REPEATS sets
// the calls per cell (default 30); INFERCEPT_BENCH_CACHE_MIB the K/V cycled through (default
// 128; 0 leaves only the 4 copies, so small cells run from L2/L3 and time the arithmetic);
// INFERCEPT_BENCH_BLOCK_SIZE the tokens per block (default 16); INFERCEPT_BENCH_BODIES which
// bodies run (default all the CPU has; e.g. "avx2,avx512").
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "infercept/cpu_attention.h"

using namespace infercept;

namespace {

constexpr int64_t kNumHeads = 9, kNumKvHeads = 3, kHeadDim = 64;
int64_t kBlockSize = 16;  // INFERCEPT_BENCH_BLOCK_SIZE
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

// Sum of words [begin, end) as integers: associative, so the compiler vectorises it, and the
// result is used, so the reads are not dropped.
uint64_t sum_words(const uint64_t* begin, const uint64_t* end) {
  uint64_t sum = 0;
  for (const uint64_t* w = begin; w < end; ++w) sum += *w;
  return sum;
}

volatile uint64_t g_sink;  // keeps the yardsticks' sums alive

// Sequential read bandwidth in GB/s over `bytes` split evenly across the threads, fastest of
// `repeats` passes.
double stream_read_gbps(int64_t bytes, int repeats) {
  const int64_t words = bytes / 8;
  std::vector<uint64_t> buffer(words, 1);
  double best_ms = 1e30;
  for (int i = 0; i < repeats + 1; ++i) {
    const auto start = std::chrono::steady_clock::now();
    uint64_t total = 0;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) reduction(+ : total)
#endif
    for (int64_t chunk = 0; chunk < 64; ++chunk) {
      total += sum_words(buffer.data() + chunk * words / 64, buffer.data() + (chunk + 1) * words / 64);
    }
    const auto stop = std::chrono::steady_clock::now();
    g_sink = total;
    if (i > 0) best_ms = std::min(best_ms, std::chrono::duration<double, std::milli>(stop - start).count());
  }
  return static_cast<double>(bytes) / best_ms * 1e-6;
}

// Milliseconds to read, without computing on them, the K and V blocks of `table` [batch,
// blocks_per_seq] (whole blocks: all KV heads), a sequence per task as the kernel does.
double gather_read_ms(const float* keys, const float* values, const int32_t* table,
                      int64_t batch, int64_t blocks_per_seq, int64_t block_floats) {
  const auto start = std::chrono::steady_clock::now();
  uint64_t total = 0;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : total)
#endif
  for (int64_t seq = 0; seq < batch; ++seq) {
    for (int64_t b = 0; b < blocks_per_seq; ++b) {
      const int64_t offset = static_cast<int64_t>(table[seq * blocks_per_seq + b]) * block_floats;
      for (const float* cache : {keys, values}) {
        const auto* words = reinterpret_cast<const uint64_t*>(cache + offset);
        total += sum_words(words, words + block_floats / 2);
      }
    }
  }
  const auto stop = std::chrono::steady_clock::now();
  g_sink = total;
  return std::chrono::duration<double, std::milli>(stop - start).count();
}

// A float buffer aligned to a 64-byte cache line.
class AlignedFloats {
 public:
  explicit AlignedFloats(int64_t size)
      : data_(static_cast<float*>(std::aligned_alloc(64, (size * sizeof(float) + 63) / 64 * 64))) {}
  ~AlignedFloats() { std::free(data_); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  float* data() { return data_; }

 private:
  float* data_;
};

struct Body {
  CpuAttentionImpl impl;
  const char* name;
};

// One cell: its caches and tables are built once, then the bodies and the gather yardstick
// take turns call by call (body 1, body 2, ..., gather, body 1, ...), so load from other work
// falls on all alike.
void run_cell(const Cell& cell, const std::vector<Body>& bodies, int repeats,
              int64_t cache_bytes) {
  const int64_t blocks_per_seq = (cell.context + kBlockSize - 1) / kBlockSize;
  const int64_t token_floats = kNumKvHeads * kHeadDim;
  const int64_t block_floats = kBlockSize * token_floats;
  const int64_t call_bytes = cell.batch * blocks_per_seq * block_floats * 8;
  const int64_t num_copies = std::max<int64_t>(4, cache_bytes / call_bytes);
  const int64_t num_blocks = num_copies * cell.batch * blocks_per_seq;
  // The caches 64-byte aligned, as torch allocates them (a large std::vector is 16 bytes past
  // a page, so every 64-byte row load would straddle two lines).
  const int64_t cache_floats = num_blocks * block_floats;
  AlignedFloats keys(cache_floats), values(cache_floats);
  std::vector<float> query(cell.batch * kNumHeads * kHeadDim), out(query.size());
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  for (float* v : {keys.data(), values.data()}) {
    for (int64_t i = 0; i < cache_floats; ++i) v[i] = normal(rng);
  }
  for (float& x : query) x = normal(rng);
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
  // times_ms[i]: body i's calls; the last row the gather yardstick's.
  std::vector<std::vector<double>> times_ms(bodies.size() + 1);
  int64_t call = 0;
  for (int i = 0; i < repeats + 2; ++i) {
    for (size_t body = 0; body <= bodies.size(); ++body, ++call) {
      const int32_t* table = tables[call % num_copies].data();
      double ms;
      if (body < bodies.size()) {
        p.block_tables = table;
        p.impl = bodies[body].impl;
        const auto start = std::chrono::steady_clock::now();
        paged_decode_attention(p);
        const auto stop = std::chrono::steady_clock::now();
        ms = std::chrono::duration<double, std::milli>(stop - start).count();
      } else {
        ms = gather_read_ms(keys.data(), values.data(), table, cell.batch, blocks_per_seq,
                            block_floats);
      }
      if (i >= 2) times_ms[body].push_back(ms);
    }
  }
  const double tokens = static_cast<double>(cell.batch) * cell.context;
  const double flops = tokens * kNumHeads * 4.0 * kHeadDim;
  const double bytes = tokens * 2.0 * token_floats * sizeof(float);
  for (size_t body = 0; body <= bodies.size(); ++body) {
    const double ms = min_ms(times_ms[body]);
    const bool gather = body == bodies.size();
    std::printf("%-8s batch %3lld context %5lld: min %8.4f ms (median %8.4f)  %6.1f GFLOPS  "
                "%5.1f GB/s\n", gather ? "gather" : bodies[body].name,
                static_cast<long long>(cell.batch), static_cast<long long>(cell.context), ms,
                median_ms(times_ms[body]), gather ? 0.0 : flops / ms * 1e-6, bytes / ms * 1e-6);
  }
}

}  // namespace

int main() {
  const char* env = std::getenv("INFERCEPT_BENCH_REPEATS");
  const int repeats = env ? std::max(1, std::atoi(env)) : 30;
  const char* cache_env = std::getenv("INFERCEPT_BENCH_CACHE_MIB");
  const int64_t cache_bytes = (cache_env ? std::max(0, std::atoi(cache_env)) : kDefaultCacheMib)
                              << 20;
  const char* block_env = std::getenv("INFERCEPT_BENCH_BLOCK_SIZE");
  if (block_env) kBlockSize = std::max(1, std::atoi(block_env));
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  std::printf("threads %d, block_size %lld, K/V cycled through %lld MiB\n", threads,
              static_cast<long long>(kBlockSize), static_cast<long long>(cache_bytes >> 20));
  std::printf("stream   read 512 MiB: %5.1f GB/s\n", stream_read_gbps(int64_t{512} << 20, 5));
  std::vector<Body> bodies;
  const char* only = std::getenv("INFERCEPT_BENCH_BODIES");
  auto wanted = [&](const char* name) { return !only || std::strstr(only, name) != nullptr; };
  if (wanted("portable")) bodies.push_back({CpuAttentionImpl::kPortable, "portable"});
  if (cpu_attention_has_avx2() && wanted("avx2")) {
    bodies.push_back({CpuAttentionImpl::kAvx2, "avx2"});
  }
  if (cpu_attention_has_avx512() && wanted("avx512")) {
    bodies.push_back({CpuAttentionImpl::kAvx512, "avx512"});
  }
  for (const Cell cell : {Cell{1, 256}, Cell{1, 512}, Cell{8, 256}, Cell{8, 512}, Cell{32, 256},
                          Cell{32, 512}}) {
    run_cell(cell, bodies, repeats, cache_bytes);
  }
  return 0;
}
