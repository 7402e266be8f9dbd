// CUDA paged decode attention (label `bench`; exits 77 = skipped without a device): achieved
// bytes/s (each K/V row of each sequence's context counted once, plus query and output) against
// the device's measured copy bandwidth (a 1 GiB device-to-device copy), as a ratio.
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "attention_kernels.h"
#include "cuda_bench_util.h"

using infercept::cuda::DType;

int main() {
  if (!has_cuda_device()) {
    std::printf("bench_cuda_attention: no CUDA device, skipped\n");
    return kSkipExitCode;
  }
  cudaDeviceProp prop{};
  BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t stream;
  BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const double copy_bandwidth = measured_device_bandwidth(stream);
  std::printf("device: %s, measured copy bandwidth %.1f GB/s\n", prop.name, copy_bandwidth * 1e-9);
  std::printf("%6s %6s %6s %5s %6s %10s %10s %8s\n", "dtype", "batch", "ctx", "heads", "hdim", "us", "GB/s", "ratio");

  const int64_t block_size = 16, num_heads = 32, num_kv_heads = 8;
  for (auto [dtype, name] : {std::pair{DType::kFloat16, "fp16"}, std::pair{DType::kFloat32, "fp32"}}) {
    for (int64_t head_dim : {64, 128}) {
      for (auto [batch, context] : {std::pair<int64_t, int64_t>{33, 4097}, {64, 1024}, {256, 512}}) {
        const int64_t blocks_per_seq = (context + block_size - 1) / block_size;
        const int64_t num_blocks = batch * blocks_per_seq;
        const int64_t elem = infercept::cuda::dtype_size(dtype);
        const size_t cache_bytes = static_cast<size_t>(num_blocks * block_size * num_kv_heads * head_dim * elem);
        const size_t q_bytes = static_cast<size_t>(batch * num_heads * head_dim * elem);
        void *k, *v, *q, *o;
        int32_t *tables, *lens;
        BENCH_CUDA(cudaMalloc(&k, cache_bytes));
        BENCH_CUDA(cudaMalloc(&v, cache_bytes));
        BENCH_CUDA(cudaMalloc(&q, q_bytes));
        BENCH_CUDA(cudaMalloc(&o, q_bytes));
        BENCH_CUDA(cudaMemset(k, 0x3c, cache_bytes));  // small finite values in both dtypes, not zeros
        BENCH_CUDA(cudaMemset(v, 0x3b, cache_bytes));
        BENCH_CUDA(cudaMemset(q, 0x3a, q_bytes));
        std::vector<int32_t> ids(num_blocks);
        std::iota(ids.begin(), ids.end(), 0);
        std::shuffle(ids.begin(), ids.end(), std::mt19937(3));
        std::vector<int32_t> context_lens(batch, static_cast<int32_t>(context));
        BENCH_CUDA(cudaMalloc(&tables, ids.size() * 4));
        BENCH_CUDA(cudaMalloc(&lens, context_lens.size() * 4));
        BENCH_CUDA(cudaMemcpy(tables, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
        BENCH_CUDA(cudaMemcpy(lens, context_lens.data(), context_lens.size() * 4, cudaMemcpyHostToDevice));
        infercept::cuda::PagedAttentionProblem p;
        p.out = o; p.query = q; p.key_cache = k; p.value_cache = v;
        p.block_tables = tables; p.context_lens = lens;
        p.num_rows = p.num_seqs = batch;
        p.num_heads = num_heads; p.num_kv_heads = num_kv_heads; p.head_dim = head_dim;
        p.block_size = block_size; p.max_blocks = blocks_per_seq; p.num_blocks = num_blocks;
        p.scale = 0.088f; p.dtype = dtype;
        const double s = time_on_stream_s(stream, [&] { infercept::cuda::paged_attention(p, stream); });
        const double bytes = 2.0 * batch * context * num_kv_heads * head_dim * elem + 2.0 * q_bytes;
        std::printf("%6s %6lld %6lld %5lld %6lld %10.1f %10.1f %8.3f\n", name, static_cast<long long>(batch),
                    static_cast<long long>(context), static_cast<long long>(num_heads), static_cast<long long>(head_dim),
                    s * 1e6, bytes / s * 1e-9, bytes / s / copy_bandwidth);
        for (void* ptr : {k, v, q, o}) cudaFree(ptr);
        cudaFree(tables);
        cudaFree(lens);
      }
    }
  }
  cudaStreamDestroy(stream);
  return 0;
}
