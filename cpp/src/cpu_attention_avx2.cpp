#include "cpu_attention_avx2.h"

// Compiled without -mavx2 (the wheel runs on any x86-64): each function below carries a target
// attribute instead, and cpu_attention.cpp calls it only after checking the running CPU.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define INFERCEPT_AVX2_PATH 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>

namespace infercept::detail {

#ifdef INFERCEPT_AVX2_PATH

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

namespace {

#define INFERCEPT_AVX2 __attribute__((target("avx2,fma")))

// How many blocks ahead the K/V rows are prefetched (2 measured no better than 1 on a 2-core
// EPYC at 32 sequences of 320 tokens).
constexpr int64_t kPrefetchBlocks = 1;

// exp(x) for x <= 0, eight at a time: the same 2^n * e^r split and degree-7 polynomial as the
// portable kernel's exp_nonpositive, so both paths agree to float rounding.
INFERCEPT_AVX2 inline __m256 exp_nonpositive8(__m256 x) {
  const __m256 log2e = _mm256_set1_ps(1.44269504f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f);
  const __m256 ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  // Truncation toward zero of x * log2e - 0.5 (<= 0), as the scalar cast does.
  const __m256i n = _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_mul_ps(x, log2e),
                                                      _mm256_set1_ps(0.5f)));
  const __m256 nf = _mm256_cvtepi32_ps(n);
  const __m256 r = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(nf, ln2_hi)),
                                 _mm256_mul_ps(nf, ln2_lo));
  __m256 poly = _mm256_set1_ps(1.0f / 5040.0f);
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f / 720.0f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f / 120.0f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f / 24.0f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f / 6.0f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(0.5f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(poly, _mm256_castsi256_ps(exponent));
}

INFERCEPT_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// q . k over head_dim (a multiple of 8) with two independent FMA chains.
INFERCEPT_AVX2 inline float dot8(const float* q, const float* k, int64_t head_dim) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= head_dim; d += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), _mm256_loadu_ps(k + d + 8), a1);
  }
  if (d < head_dim) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), a0);
  return horizontal_sum(_mm256_add_ps(a0, a1));
}

// acc[0:kVectors * 8] = acc * factor + sum_t weights[t] * rows[t], the accumulator held in
// registers across the block's tokens: one load and store of acc per block, not per token.
template <int kVectors>
INFERCEPT_AVX2 inline void accumulate(float* acc, float factor, const float* weights,
                                      const float* rows, int64_t row_stride, int64_t num_rows) {
  __m256 a[kVectors];
  const __m256 f = _mm256_set1_ps(factor);
  for (int v = 0; v < kVectors; ++v) a[v] = _mm256_mul_ps(_mm256_loadu_ps(acc + 8 * v), f);
  for (int64_t t = 0; t < num_rows; ++t) {
    const __m256 w = _mm256_broadcast_ss(weights + t);
    const float* row = rows + t * row_stride;
    for (int v = 0; v < kVectors; ++v) a[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 8 * v), a[v]);
  }
  for (int v = 0; v < kVectors; ++v) _mm256_storeu_ps(acc + 8 * v, a[v]);
}

// The same over a whole head: chunks of 64 floats (8 registers), then the remainder.
INFERCEPT_AVX2 void accumulate_head(float* acc, float factor, const float* weights,
                                    const float* rows, int64_t row_stride, int64_t num_rows,
                                    int64_t head_dim) {
  int64_t d = 0;
  for (; d + 64 <= head_dim; d += 64) {
    accumulate<8>(acc + d, factor, weights, rows + d, row_stride, num_rows);
  }
  switch ((head_dim - d) / 8) {
    case 0: break;
    case 1: accumulate<1>(acc + d, factor, weights, rows + d, row_stride, num_rows); break;
    case 2: accumulate<2>(acc + d, factor, weights, rows + d, row_stride, num_rows); break;
    case 3: accumulate<3>(acc + d, factor, weights, rows + d, row_stride, num_rows); break;
    case 4: accumulate<4>(acc + d, factor, weights, rows + d, row_stride, num_rows); break;
    case 5: accumulate<5>(acc + d, factor, weights, rows + d, row_stride, num_rows); break;
    case 6: accumulate<6>(acc + d, factor, weights, rows + d, row_stride, num_rows); break;
    default: accumulate<7>(acc + d, factor, weights, rows + d, row_stride, num_rows); break;
  }
}

}  // namespace

INFERCEPT_AVX2 void attend_avx2(const PagedDecodeProblem& p, int64_t seq, int64_t kv_begin,
                                int64_t kv_end, float* scratch) {
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t head_dim = p.head_dim;
  const int64_t block_size = p.block_size;
  const int64_t token_stride = p.num_kv_heads * head_dim;
  const int64_t block_stride = block_size * token_stride;
  const int64_t first_row = (seq * p.num_heads + kv_begin * group) * head_dim;
  const int64_t rows = (kv_end - kv_begin) * group;  // query heads handled here
  const float* query = p.query + first_row;  // [rows, head_dim]
  float* acc = p.out + first_row;            // [rows, head_dim], the accumulators
  const int32_t* table = p.block_tables + seq * p.max_blocks;
  const int64_t context_len = p.context_lens[seq];
  // scratch: [rows, padded_block] scores, then exp(score - running max), padded to 8 floats
  // so the exp runs on whole vectors (the pad lanes are never summed); then [rows] running
  // maxima and [rows] running sums.
  const int64_t padded_block = (block_size + 7) / 8 * 8;
  float* probs = scratch;
  float* running_max = scratch + rows * padded_block;
  float* running_sum = running_max + rows;
  std::fill(acc, acc + rows * head_dim, 0.0f);
  std::fill(running_max, running_max + rows, -std::numeric_limits<float>::infinity());
  std::fill(running_sum, running_sum + rows, 0.0f);

  for (int64_t start = 0, b = 0; start < context_len; start += block_size, ++b) {
    const int64_t num_tokens = std::min(block_size, context_len - start);
    const int64_t block_offset = static_cast<int64_t>(table[b]) * block_stride;
    // The blocks are scattered, so the hardware prefetcher cannot guess the next one: ask for
    // its K and V rows of these heads now, while this block is computed.
    if (start + kPrefetchBlocks * block_size < context_len) {
      const int64_t next = static_cast<int64_t>(table[b + kPrefetchBlocks]) * block_stride;
      const int64_t next_tokens =
          std::min(block_size, context_len - start - kPrefetchBlocks * block_size);
      for (int64_t t = 0; t < next_tokens; ++t) {
        const int64_t row = next + t * token_stride + kv_begin * head_dim;
        for (int64_t d = 0; d < (kv_end - kv_begin) * head_dim; d += 16) {
          _mm_prefetch(reinterpret_cast<const char*>(p.key_cache + row + d), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(p.value_cache + row + d), _MM_HINT_T0);
        }
      }
    }
    for (int64_t kv_head = kv_begin; kv_head < kv_end; ++kv_head) {
      const int64_t offset = block_offset + kv_head * head_dim;
      const float* keys = p.key_cache + offset;
      const float* values = p.value_cache + offset;
      const int64_t first = (kv_head - kv_begin) * group;  // this head's first query row
      // Scores of every query of the group against each K row (read once from memory, then
      // from L1 for the group's other queries).
      for (int64_t t = 0; t < num_tokens; ++t) {
        const float* key = keys + t * token_stride;
        for (int64_t j = first; j < first + group; ++j) {
          probs[j * padded_block + t] = p.scale * dot8(query + j * head_dim, key, head_dim);
        }
      }
      for (int64_t j = first; j < first + group; ++j) {
        float* row = probs + j * padded_block;
        float block_max = row[0];
        for (int64_t t = 1; t < num_tokens; ++t) block_max = std::max(block_max, row[t]);
        const float new_max = std::max(running_max[j], block_max);
        const __m256 shift = _mm256_set1_ps(new_max);
        __m256 sums = _mm256_setzero_ps();
        int64_t t = 0;
        for (; t + 8 <= num_tokens; t += 8) {
          const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(row + t), shift));
          _mm256_storeu_ps(row + t, e);
          sums = _mm256_add_ps(sums, e);
        }
        float block_sum = horizontal_sum(sums);
        if (t < num_tokens) {
          // The last partial vector: its pad lanes hold scores of no token, so zero them.
          alignas(32) float tail[8] = {};
          std::copy(row + t, row + num_tokens, tail);
          alignas(32) float e[8];
          _mm256_store_ps(e, exp_nonpositive8(_mm256_sub_ps(_mm256_load_ps(tail), shift)));
          for (int64_t i = 0; i < num_tokens - t; ++i) {
            row[t + i] = e[i];
            block_sum += e[i];
          }
        }
        // exp(-inf) = 0 on the first block, when acc and running_sum are still zero.
        const float correction = std::exp(running_max[j] - new_max);
        running_sum[j] = running_sum[j] * correction + block_sum;
        running_max[j] = new_max;
        accumulate_head(acc + j * head_dim, correction, row, values, token_stride, num_tokens,
                        head_dim);
      }
    }
  }
  for (int64_t j = 0; j < rows; ++j) {
    const __m256 inverse = _mm256_set1_ps(1.0f / running_sum[j]);
    float* row = acc + j * head_dim;
    for (int64_t d = 0; d < head_dim; d += 8) {
      _mm256_storeu_ps(row + d, _mm256_mul_ps(_mm256_loadu_ps(row + d), inverse));
    }
  }
}

#else  // no x86-64 GCC/Clang: the portable kernel only.

bool cpu_has_avx2_fma() { return false; }

void attend_avx2(const PagedDecodeProblem&, int64_t, int64_t, int64_t, float*) {}

#endif

}  // namespace infercept::detail
