#pragma once
// Helpers of the CUDA microbenchmarks: skip code, checked calls, event timing, the device's
// measured copy bandwidth.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

// ctest marks a test that exits with this code as skipped (SKIP_RETURN_CODE).
constexpr int kSkipExitCode = 77;

#define BENCH_CUDA(expr)                                                                   \
  do {                                                                                     \
    cudaError_t status_ = (expr);                                                          \
    if (status_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s failed: %s (%s:%d)\n", #expr, cudaGetErrorString(status_), __FILE__, __LINE__); \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

inline bool has_cuda_device() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return count > 0;
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// Median seconds of `fn` (which enqueues work on `stream`), timed with events after warm-up.
inline double time_on_stream_s(cudaStream_t stream, const std::function<void()>& fn, int repeats = 20) {
  cudaEvent_t start, end;
  BENCH_CUDA(cudaEventCreate(&start));
  BENCH_CUDA(cudaEventCreate(&end));
  for (int i = 0; i < 3; ++i) fn();
  BENCH_CUDA(cudaStreamSynchronize(stream));
  std::vector<double> samples;
  for (int i = 0; i < repeats; ++i) {
    BENCH_CUDA(cudaEventRecord(start, stream));
    fn();
    BENCH_CUDA(cudaEventRecord(end, stream));
    BENCH_CUDA(cudaEventSynchronize(end));
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, start, end));
    samples.push_back(ms * 1e-3);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(end);
  return median(samples);
}

/// Device memory bandwidth in bytes/s: a 1 GiB device-to-device copy, read + write bytes.
inline double measured_device_bandwidth(cudaStream_t stream) {
  const size_t bytes = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  BENCH_CUDA(cudaMalloc(&a, bytes));
  BENCH_CUDA(cudaMalloc(&b, bytes));
  BENCH_CUDA(cudaMemsetAsync(a, 1, bytes, stream));
  const double s = time_on_stream_s(stream, [&] { BENCH_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream)); });
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / s;
}
