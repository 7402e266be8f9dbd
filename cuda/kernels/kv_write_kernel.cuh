#pragma once
// The __global__ kernel of write_kv_cache (attention_kernels.h). Grid: one CTA per token;
// its threads copy the token's K row and V row ([num_kv_heads * head_dim] elements) as Word
// units into row `slot` of the caches viewed as [num_blocks * block_size, row].
#include <cstdint>

namespace infercept::cuda::kernels {

constexpr int kKvWriteThreads = 128;

template <typename Word>
__global__ void __launch_bounds__(kKvWriteThreads)
kv_write_kernel(const Word* __restrict__ key, const Word* __restrict__ value,
                Word* __restrict__ key_cache, Word* __restrict__ value_cache,
                const int64_t* __restrict__ slot_mapping, int64_t words_per_row, int64_t num_slots) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0 || slot >= num_slots) return;  // padding (or an invalid slot): nothing to write
  const Word* k = key + token * words_per_row;
  const Word* v = value + token * words_per_row;
  Word* kc = key_cache + slot * words_per_row;
  Word* vc = value_cache + slot * words_per_row;
  for (int64_t i = threadIdx.x; i < words_per_row; i += kKvWriteThreads) {
    const Word kw = k[i];
    const Word vw = v[i];
    kc[i] = kw;
    vc[i] = vw;
  }
}

}  // namespace infercept::cuda::kernels
