#include "cpu_attention_avx2.h"

#include "cpu_attention_prefetch.h"

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

namespace {

#define INFERCEPT_AVX2 __attribute__((target("avx2,fma")))

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

INFERCEPT_AVX2 inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// Lane i of the result is the sum of a[i]'s eight lanes: eight dot products finished with six
// horizontal adds and one cross-lane add, instead of a full reduction per dot product.
INFERCEPT_AVX2 inline __m256 transpose_sum(const __m256 a[8]) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  // s0123 = [0 1 2 3 | 0 1 2 3] over the low and high 128-bit halves of a[0..3], likewise s4567.
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                       _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// Scores of one query [head_dim] against eight key rows keys + t * token_stride, t < 8, as
// one vector (lane t = token t). Rows past num_rows (< 8 in a block's last chunk) re-read the
// last row; the caller discards those lanes.
INFERCEPT_AVX2 inline __m256 scores8(const float* query, const float* keys, int64_t token_stride,
                                     int64_t num_rows, int64_t head_dim) {
  const float* row[8];
  for (int64_t t = 0; t < 8; ++t) row[t] = keys + std::min(t, num_rows - 1) * token_stride;
  __m256 a[8];
  for (int t = 0; t < 8; ++t) a[t] = _mm256_setzero_ps();
  for (int64_t d = 0; d < head_dim; d += 8) {
    const __m256 q = _mm256_loadu_ps(query + d);
    for (int t = 0; t < 8; ++t) a[t] = _mm256_fmadd_ps(q, _mm256_loadu_ps(row[t] + d), a[t]);
  }
  return transpose_sum(a);
}

// For kRows query heads r at once: acc_r[0:kVectors * 8] = acc_r * factors[r] + sum_t
// weights[r * weight_stride + t] * rows[t], the accumulators held in registers across the
// block's tokens. Each V row is loaded once for all kRows heads (12 accumulators + 3 weights
// + 1 row vector fill the 16 registers at kRows = 3, kVectors = 4).
template <int kRows, int kVectors>
INFERCEPT_AVX2 inline void accumulate(float* acc, int64_t acc_stride, const float* factors,
                                      const float* weights, int64_t weight_stride,
                                      const float* rows, int64_t row_stride, int64_t num_rows) {
  __m256 a[kRows][kVectors];
  for (int r = 0; r < kRows; ++r) {
    const __m256 f = _mm256_set1_ps(factors[r]);
    for (int v = 0; v < kVectors; ++v) {
      a[r][v] = _mm256_mul_ps(_mm256_loadu_ps(acc + r * acc_stride + 8 * v), f);
    }
  }
  for (int64_t t = 0; t < num_rows; ++t) {
    __m256 w[kRows];
    for (int r = 0; r < kRows; ++r) w[r] = _mm256_broadcast_ss(weights + r * weight_stride + t);
    const float* row = rows + t * row_stride;
    for (int v = 0; v < kVectors; ++v) {
      const __m256 x = _mm256_loadu_ps(row + 8 * v);
      for (int r = 0; r < kRows; ++r) a[r][v] = _mm256_fmadd_ps(w[r], x, a[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVectors; ++v) _mm256_storeu_ps(acc + r * acc_stride + 8 * v, a[r][v]);
  }
}

// The same over whole heads (head_dim a multiple of 8): chunks of 32 floats, then the rest.
template <int kRows>
INFERCEPT_AVX2 void accumulate_heads(float* acc, const float* factors, const float* weights,
                                     int64_t weight_stride, const float* rows,
                                     int64_t row_stride, int64_t num_rows, int64_t head_dim) {
  int64_t d = 0;
  for (; d + 32 <= head_dim; d += 32) {
    accumulate<kRows, 4>(acc + d, head_dim, factors, weights, weight_stride, rows + d,
                         row_stride, num_rows);
  }
  switch ((head_dim - d) / 8) {
    case 0: break;
    case 1: accumulate<kRows, 1>(acc + d, head_dim, factors, weights, weight_stride, rows + d,
                                 row_stride, num_rows); break;
    case 2: accumulate<kRows, 2>(acc + d, head_dim, factors, weights, weight_stride, rows + d,
                                 row_stride, num_rows); break;
    default: accumulate<kRows, 3>(acc + d, head_dim, factors, weights, weight_stride, rows + d,
                                  row_stride, num_rows); break;
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
  // scratch: [rows, padded_block] exp(score - running max), padded to whole vectors (pad
  // lanes hold 0 and are never read); then [rows] each of running maxima, running sums, the
  // block's rescale factors and the block's sums.
  const int64_t padded_block = (block_size + 7) / 8 * 8;
  float* probs = scratch;
  float* running_max = scratch + rows * padded_block;
  float* running_sum = running_max + rows;
  float* correction = running_sum + rows;
  float* block_sum = correction + rows;
  std::fill(acc, acc + rows * head_dim, 0.0f);
  std::fill(running_max, running_max + rows, -std::numeric_limits<float>::infinity());
  std::fill(running_sum, running_sum + rows, 0.0f);
  const __m256 scale = _mm256_set1_ps(p.scale);
  const __m256i lane_ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  RowPrefetcher prefetcher(p, table, context_len, kv_begin, kv_end);
  prefetcher.start();

  for (int64_t start = 0, b = 0; start < context_len; start += block_size, ++b) {
    const int64_t num_tokens = std::min(block_size, context_len - start);
    const int64_t block_offset = static_cast<int64_t>(table[b]) * block_stride;
    for (int64_t kv_head = kv_begin; kv_head < kv_end; ++kv_head) {
      const int64_t offset = block_offset + kv_head * head_dim;
      const float* keys = p.key_cache + offset;
      const float* values = p.value_cache + offset;
      const int64_t first = (kv_head - kv_begin) * group;  // this head's first query row
      // As many rows prefetched as this (block, KV head) reads: half before its scores, half
      // before its V pass.
      prefetcher.advance(num_tokens / 2);
      for (int64_t j = first; j < first + group; ++j) {
        // Scaled scores, eight tokens a vector; lanes past the block's last token are -inf.
        float* row = probs + j * padded_block;
        __m256 block_max = minus_inf;
        for (int64_t t = 0; t < num_tokens; t += 8) {
          __m256 s = _mm256_mul_ps(scale, scores8(query + j * head_dim, keys + t * token_stride,
                                                  token_stride, num_tokens - t, head_dim));
          const __m256 valid = _mm256_castsi256_ps(
              _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(num_tokens - t)), lane_ids));
          s = _mm256_blendv_ps(minus_inf, s, valid);
          _mm256_storeu_ps(row + t, s);
          block_max = _mm256_max_ps(block_max, s);
        }
        const float new_max = std::max(running_max[j], horizontal_max(block_max));
        const __m256 shift = _mm256_set1_ps(new_max);
        __m256 sums = _mm256_setzero_ps();
        for (int64_t t = 0; t < num_tokens; t += 8) {
          // exp_nonpositive8(-inf) is ~1e-38, not 0: the pad lanes are zeroed by hand.
          const __m256 s = _mm256_loadu_ps(row + t);
          const __m256 e = _mm256_and_ps(exp_nonpositive8(_mm256_sub_ps(s, shift)),
                                         _mm256_cmp_ps(s, minus_inf, _CMP_NEQ_OQ));
          _mm256_storeu_ps(row + t, e);
          sums = _mm256_add_ps(sums, e);
        }
        block_sum[j] = horizontal_sum(sums);
        correction[j] = running_max[j] - new_max;  // its exp is taken below, 8 heads at a time
        running_max[j] = new_max;
      }
      // The rescale factors exp(old max - new max). On the first block the old max is -inf
      // and the factor ~1e-38 (exp_nonpositive8's floor), which multiplies zeros.
      for (int64_t j = first; j < first + group; j += 8) {
        const int64_t n = std::min<int64_t>(8, first + group - j);
        alignas(32) float lanes[8] = {};
        std::copy(correction + j, correction + j + n, lanes);
        _mm256_store_ps(lanes, exp_nonpositive8(_mm256_load_ps(lanes)));
        for (int64_t i = 0; i < n; ++i) {
          correction[j + i] = lanes[i];
          running_sum[j + i] = running_sum[j + i] * lanes[i] + block_sum[j + i];
        }
      }
      prefetcher.advance(num_tokens - num_tokens / 2);
      // V rows: up to three of the group's heads per pass, so each row is loaded once per pass.
      for (int64_t j = first; j < first + group;) {
        float* a = acc + j * head_dim;
        const float* w = probs + j * padded_block;
        switch (std::min<int64_t>(first + group - j, 3)) {
          case 3: accumulate_heads<3>(a, correction + j, w, padded_block, values, token_stride,
                                      num_tokens, head_dim); j += 3; break;
          case 2: accumulate_heads<2>(a, correction + j, w, padded_block, values, token_stride,
                                      num_tokens, head_dim); j += 2; break;
          default: accumulate_heads<1>(a, correction + j, w, padded_block, values, token_stride,
                                       num_tokens, head_dim); j += 1; break;
        }
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

void attend_avx2(const PagedDecodeProblem&, int64_t, int64_t, int64_t, float*) {}

#endif

}  // namespace infercept::detail
