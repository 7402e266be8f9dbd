#pragma once
// The __global__ kernel of paged_attention (attention_kernels.h).
//
// Grid: x = query row, y = query head; one CTA of kAttentionThreads (4 warps) per (row, head).
// The warps split the row's attended tokens round-robin; lane i of a warp holds head_dim / 32
// consecutive elements of q, of the running output and of each K/V row it reads (one 8- or
// 16-byte load per lane per row). Per token: a warp-wide dot product (shuffle reduction) and a
// streaming (online) softmax update in float32. At the end the 4 warps' partial (max, sum,
// output) triples are merged through shared memory. K/V are read once per query head; the
// query heads of one GQA group re-read the same rows, mostly from L2.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace infercept::cuda::kernels {

constexpr int kAttentionThreads = 128;

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// N consecutive elements loaded as one aligned word.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kAttentionThreads)
paged_attention_kernel(T* __restrict__ out,                  // [num_rows, num_heads, kHeadDim]
                       const T* __restrict__ query,          // [num_rows, num_heads, kHeadDim]
                       const T* __restrict__ key_cache,      // [num_blocks, block_size, num_kv_heads, kHeadDim]
                       const T* __restrict__ value_cache,    // same
                       const int32_t* __restrict__ block_tables,  // [num_seqs, max_blocks]
                       const int32_t* __restrict__ context_lens,  // [num_seqs]
                       const int32_t* __restrict__ query_start,   // [num_seqs + 1] or null
                       int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads,
                       int32_t block_size, int32_t max_blocks, int32_t num_blocks, float scale) {
  constexpr int kWarps = kAttentionThreads / 32;
  constexpr int kPerLane = kHeadDim / 32;
  using Vec = Pack<T, kPerLane>;
  const int64_t row = blockIdx.x;
  const int32_t head = blockIdx.y;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  // Which sequence the row belongs to, and how many of its tokens the row attends to.
  int32_t seq = static_cast<int32_t>(row);
  int32_t query_len = 1;
  int32_t query_index = 0;
  if (query_start != nullptr) {
    int32_t lo = 0, hi = num_seqs - 1;  // last s with query_start[s] <= row
    while (lo < hi) {
      const int32_t mid = (lo + hi + 1) / 2;
      if (query_start[mid] <= row) lo = mid; else hi = mid - 1;
    }
    seq = lo;
    query_len = query_start[seq + 1] - query_start[seq];
    query_index = static_cast<int32_t>(row - query_start[seq]);
  }
  const int32_t context_len = context_lens[seq];
  const int32_t num_attended = context_len - query_len + query_index + 1;
  bool is_bad = context_len < 1 || static_cast<int64_t>(context_len) > int64_t{max_blocks} * block_size ||
                num_attended < 1 || num_attended > context_len;

  const int64_t out_offset = (row * num_heads + head) * kHeadDim;
  float q[kPerLane];
  {
    const Vec qv = *reinterpret_cast<const Vec*>(query + out_offset + lane * kPerLane);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) q[i] = to_float(qv.v[i]) * scale;
  }
  const int32_t kv_head = head / (num_heads / num_kv_heads);
  const int64_t row_stride = int64_t{num_kv_heads} * kHeadDim;
  const int64_t lane_offset = int64_t{kv_head} * kHeadDim + lane * kPerLane;
  const int32_t* table = block_tables + int64_t{seq} * max_blocks;

  float running_max = -INFINITY;
  float running_sum = 0.0f;
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.0f;

  if (!is_bad) {
    for (int32_t t = warp; t < num_attended; t += kWarps) {
      const int32_t block = table[t / block_size];
      if (block < 0 || block >= num_blocks) {  // the same for every lane: the loop ends warp-wide
        is_bad = true;
        break;
      }
      const int64_t offset = (int64_t{block} * block_size + t % block_size) * row_stride + lane_offset;
      const Vec kv = *reinterpret_cast<const Vec*>(key_cache + offset);
      const Vec vv = *reinterpret_cast<const Vec*>(value_cache + offset);
      float score = 0.0f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) score += q[i] * to_float(kv.v[i]);
      score = warp_sum(score);
      const float new_max = fmaxf(running_max, score);
      const float correction = expf(running_max - new_max);
      const float weight = expf(score - new_max);
      running_sum = running_sum * correction + weight;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] = acc[i] * correction + weight * to_float(vv.v[i]);
      running_max = new_max;
    }
  }

  __shared__ float warp_max[kWarps];
  __shared__ float warp_sum_exp[kWarps];
  __shared__ float warp_out[kWarps][kHeadDim];
  if (lane == 0) {
    warp_max[warp] = running_max;
    warp_sum_exp[warp] = running_sum;
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) warp_out[warp][lane * kPerLane + i] = acc[i];
  const bool any_bad = __syncthreads_or(is_bad);

  T* out_row = out + out_offset;
  for (int d = threadIdx.x; d < kHeadDim; d += kAttentionThreads) {
    if (any_bad) {
      out_row[d] = from_float<T>(NAN);
      continue;
    }
    float global_max = warp_max[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) global_max = fmaxf(global_max, warp_max[w]);
    float total = 0.0f, value = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float factor = expf(warp_max[w] - global_max);  // 0 for a warp that saw no token
      total += warp_sum_exp[w] * factor;
      value += warp_out[w][d] * factor;
    }
    out_row[d] = from_float<T>(value / total);
  }
}

}  // namespace infercept::cuda::kernels
