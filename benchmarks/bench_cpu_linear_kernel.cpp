// The packed CPU linear kernel alone (the raw-pointer layer, no Python) at SmolLM2-135M's
// shapes (fused qkv 576 -> 960, o 576 -> 576, gate/up 576 -> 3072, down 1536 -> 576, LM head
// 576 -> 49152) for each body and row count. Prints the fastest and the median milliseconds
// per call, the weight GB/s at the fastest (what bounds 1-4 rows) and the GFLOPS.
//
// Each call reads another copy of the weight, cycled over at least 256 MiB (more than the
// last-level cache, as the 30 layers' 538 MB are), so the weight comes from memory. The first
// line is the machine's read bandwidth: the best of several OpenMP sums over 1 GiB.
// Arguments (all optional): threads come from OMP_NUM_THREADS; INFERCEPT_BENCH_REPEATS sets
// the calls per cell (default 40); INFERCEPT_BENCH_ROWS a comma list of row counts;
// INFERCEPT_BENCH_BODY one body (avx512, avx2 or portable).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "infercept/cpu_linear.h"

using namespace infercept;

namespace {

struct LayerShape {
  const char* name;
  int64_t in_features, out_features;
};

constexpr LayerShape kShapes[] = {{"qkv", 576, 960}, {"o", 576, 576}, {"gate_up", 576, 3072},
                                  {"down", 1536, 576}, {"lm_head", 576, 49152}};
constexpr int64_t kCycleBytes = int64_t{256} << 20;

double seconds_since(std::chrono::steady_clock::time_point begin) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
}

// Best of 7 passes over 1 GiB, each thread summing its contiguous half into 16 partial sums
// (independent chains the compiler keeps in vector registers without reordering a sum).
double read_bandwidth_gb_s() {
  constexpr int64_t kLanes = 16;
  std::vector<float> data((int64_t{1} << 30) / 4, 1.0f);
  const int64_t num_blocks = static_cast<int64_t>(data.size()) / kLanes;
  double best = 1e30, total = 0.0;
  for (int repeat = 0; repeat < 7; ++repeat) {
    const auto begin = std::chrono::steady_clock::now();
    float sum = 0.0f;
#ifdef _OPENMP
#pragma omp parallel for reduction(+ : sum) schedule(static)
#endif
    for (int64_t chunk = 0; chunk < 64; ++chunk) {
      float partial[kLanes] = {};
      for (int64_t b = chunk * num_blocks / 64; b < (chunk + 1) * num_blocks / 64; ++b) {
        for (int64_t j = 0; j < kLanes; ++j) partial[j] += data[b * kLanes + j];
      }
      for (float v : partial) sum += v;
    }
    best = std::min(best, seconds_since(begin));
    total += sum;
  }
  if (total < 0) std::printf("impossible\n");
  return static_cast<double>(data.size()) * 4.0 / best / 1e9;
}

void run_cell(const LayerShape& shape, int64_t rows, CpuLinearImpl impl, const char* impl_name,
              int repeats) {
  const int64_t packed_floats =
      linear_num_panels(shape.out_features) * shape.in_features * kLinearPanelWidth;
  const int64_t num_copies = std::max<int64_t>(2, kCycleBytes / (packed_floats * 4));
  std::vector<float> weights(num_copies * packed_floats);
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (int64_t i = 0; i < packed_floats; ++i) weights[i] = uniform(rng);
  for (int64_t c = 1; c < num_copies; ++c) {
    std::copy(weights.begin(), weights.begin() + packed_floats, weights.begin() + c * packed_floats);
  }
  std::vector<float> x(rows * shape.in_features), out(rows * shape.out_features);
  for (float& v : x) v = uniform(rng);
  LinearProblem p;
  p.out = out.data();
  p.x = x.data();
  p.num_rows = rows;
  p.in_features = shape.in_features;
  p.out_features = shape.out_features;
  p.x_row_stride = shape.in_features;
  p.out_row_stride = shape.out_features;
  p.impl = impl;
  std::vector<double> times;
  for (int call = 0; call < repeats + 2; ++call) {
    p.packed_weight = weights.data() + (call % num_copies) * packed_floats;
    const auto begin = std::chrono::steady_clock::now();
    cpu_linear(p);
    if (call >= 2) times.push_back(seconds_since(begin));
  }
  std::sort(times.begin(), times.end());
  const double best = times.front(), median = times[times.size() / 2];
  const double weight_gb = shape.in_features * shape.out_features * 4.0 / 1e9;
  const double gflop = 2.0 * rows * shape.in_features * shape.out_features / 1e9;
  std::printf("%-8s %-8s rows %4lld  best %8.3f ms  median %8.3f ms  %6.1f GB/s  %6.1f GFLOPS\n",
              impl_name, shape.name, static_cast<long long>(rows), best * 1e3, median * 1e3,
              weight_gb / best, gflop / best);
}

}  // namespace

int main() {
  const char* repeats_env = std::getenv("INFERCEPT_BENCH_REPEATS");
  const int repeats = repeats_env != nullptr ? std::atoi(repeats_env) : 40;
  std::vector<int64_t> row_counts = {1, 2, 4, 8, 16, 32, 128, 512};
  if (const char* rows_env = std::getenv("INFERCEPT_BENCH_ROWS")) {
    row_counts.clear();
    std::string list = rows_env;
    for (size_t start = 0; start < list.size();) {
      const size_t comma = std::min(list.find(',', start), list.size());
      row_counts.push_back(std::atoll(list.substr(start, comma - start).c_str()));
      start = comma + 1;
    }
  }
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  std::printf("threads %d, read bandwidth %.2f GB/s (best of 7 sums over 1 GiB)\n", threads,
              read_bandwidth_gb_s());
  const struct {
    CpuLinearImpl impl;
    const char* name;
  } bodies[] = {{CpuLinearImpl::kAvx512, "avx512"}, {CpuLinearImpl::kAvx2, "avx2"},
                {CpuLinearImpl::kPortable, "portable"}};
  const char* only_body = std::getenv("INFERCEPT_BENCH_BODY");
  for (const auto& body : bodies) {
    if (only_body != nullptr && std::string(only_body) != body.name) continue;
    if (!cpu_linear_has(body.impl)) {
      std::printf("%s: absent on this CPU\n", body.name);
      continue;
    }
    for (const LayerShape& shape : kShapes) {
      for (int64_t rows : row_counts) {
        // The portable body is the fallback: its large cells only show how slow it is.
        if (body.impl == CpuLinearImpl::kPortable && rows > 32) continue;
        run_cell(shape, rows, body.impl, body.name, repeats);
      }
    }
  }
  return 0;
}
