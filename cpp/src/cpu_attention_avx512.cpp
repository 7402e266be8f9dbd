#include "cpu_attention_avx512.h"

#include "cpu_attention_prefetch.h"

// Compiled without -mavx512f (the wheel runs on any x86-64): each function below carries a
// target attribute instead, and cpu_attention.cpp calls it only after checking the running CPU.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define INFERCEPT_AVX512_PATH 1
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_ps() (a self-initialised variable) as the
// unused merge source and then warn -W(maybe-)uninitialized wherever they are inlined (GCC PR
// 105593, fixed in 13): silenced for this file only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>

namespace infercept::detail {

#ifdef INFERCEPT_AVX512_PATH

namespace {

#define INFERCEPT_AVX512 __attribute__((target("avx512f")))

// exp(x) for x <= 0, sixteen at a time: the same 2^n * e^r split and degree-7 polynomial as the
// portable kernel's exp_nonpositive, so every body agrees to float rounding.
INFERCEPT_AVX512 inline __m512 exp_nonpositive16(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f);
  const __m512 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  // Truncation toward zero of x * log2e - 0.5 (<= 0), as the scalar cast does.
  const __m512i n = _mm512_cvttps_epi32(_mm512_sub_ps(_mm512_mul_ps(x, log2e),
                                                      _mm512_set1_ps(0.5f)));
  const __m512 nf = _mm512_cvtepi32_ps(n);
  const __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(nf, ln2_hi)),
                                 _mm512_mul_ps(nf, ln2_lo));
  __m512 poly = _mm512_set1_ps(1.0f / 5040.0f);
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 720.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 120.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 24.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 6.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(0.5f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
  const __m512i exponent = _mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(poly, _mm512_castsi512_ps(exponent));
}

// Sixteen dot products' partial sums, sixteen lanes each, reduced to one vector of sixteen sums
// in two stages of two levels each, every level one pair of shuffles and an add per output
// (45 instructions in all, instead of sixteen full reductions):
//   sum4: a[0..3] -> c, 128-bit lane l of c = four partials of a[l];
//   sum16: c[0..3] (from sum4) -> f, lane 4 * l + k of f = the sum of c[k]'s lane l.
// So sum16 of sum4s over tokens {k, k + 4, k + 8, k + 12} (k = 0..3) puts token t in lane t.
INFERCEPT_AVX512 inline __m512 sum4(const __m512 a[4]) {
  const __m512 b0 = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44),
                                  _mm512_shuffle_f32x4(a[0], a[1], 0xEE));
  const __m512 b1 = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44),
                                  _mm512_shuffle_f32x4(a[2], a[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(b0, b1, 0x88), _mm512_shuffle_f32x4(b0, b1, 0xDD));
}

INFERCEPT_AVX512 inline __m512 sum16(const __m512 c[4]) {
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x44),
                                  _mm512_shuffle_ps(c[0], c[1], 0xEE));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_ps(c[2], c[3], 0x44),
                                  _mm512_shuffle_ps(c[2], c[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(e0, e1, 0x88), _mm512_shuffle_ps(e0, e1, 0xDD));
}

// Scores of kG query rows query + g * head_dim against sixteen key rows keys + t *
// token_stride, as one vector per query (lane t = token t) in out[g]. Each key vector is
// loaded once for the kG queries, which stay in registers (kG * kQVectors <= 12 of the 32).
// Rows past num_rows (< 16 in a block's last chunk) re-read the last row; the caller discards
// those lanes.
template <int kG, int kQVectors>
INFERCEPT_AVX512 inline void scores16(const float* query, int64_t head_dim, const float* keys,
                                      int64_t token_stride, int64_t num_rows, __m512 out[kG]) {
  __m512 q[kG][kQVectors];
  for (int g = 0; g < kG; ++g) {
    for (int v = 0; v < kQVectors; ++v) q[g][v] = _mm512_loadu_ps(query + g * head_dim + 16 * v);
  }
  __m512 c[kG][4];
  for (int k = 0; k < 4; ++k) {
    __m512 a[kG][4];
    for (int l = 0; l < 4; ++l) {
      const float* row = keys + std::min<int64_t>(4 * l + k, num_rows - 1) * token_stride;
      for (int v = 0; v < kQVectors; ++v) {
        const __m512 x = _mm512_loadu_ps(row + 16 * v);
        for (int g = 0; g < kG; ++g) {
          a[g][l] = v == 0 ? _mm512_mul_ps(q[g][0], x) : _mm512_fmadd_ps(q[g][v], x, a[g][l]);
        }
      }
    }
    for (int g = 0; g < kG; ++g) c[g][k] = sum4(a[g]);
  }
  for (int g = 0; g < kG; ++g) out[g] = sum16(c[g]);
}

// The same for one query and any head_dim (a multiple of 16), the query re-read from L1.
INFERCEPT_AVX512 inline __m512 scores16_any(const float* query, int64_t head_dim,
                                            const float* keys, int64_t token_stride,
                                            int64_t num_rows) {
  __m512 c[4];
  for (int k = 0; k < 4; ++k) {
    __m512 a[4];
    for (int l = 0; l < 4; ++l) {
      const float* row = keys + std::min<int64_t>(4 * l + k, num_rows - 1) * token_stride;
      a[l] = _mm512_setzero_ps();
      for (int64_t d = 0; d < head_dim; d += 16) {
        a[l] = _mm512_fmadd_ps(_mm512_loadu_ps(query + d), _mm512_loadu_ps(row + d), a[l]);
      }
    }
    c[k] = sum4(a);
  }
  return sum16(c);
}

// Scaled scores of query rows [0, num_queries) (query [num_queries, head_dim]) against one
// block's num_tokens key rows, into probs [num_queries, padded_block]; lanes past the last
// token are -inf. Queries go in packs of three at head_dim 64, of two at 128.
INFERCEPT_AVX512 void score_block(const float* query, int64_t num_queries, int64_t head_dim,
                                  const float* keys, int64_t token_stride, int64_t num_tokens,
                                  float scale, float* probs, int64_t padded_block) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < num_tokens; t += 16) {
    const int64_t n = std::min<int64_t>(16, num_tokens - t);
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
    const float* k = keys + t * token_stride;
    for (int64_t j = 0; j < num_queries;) {
      __m512 raw[3];
      int64_t pack = 1;
      const float* q = query + j * head_dim;
      if (head_dim == 64 && num_queries - j >= 3) {
        scores16<3, 4>(q, head_dim, k, token_stride, n, raw);
        pack = 3;
      } else if (head_dim == 64) {
        scores16<1, 4>(q, head_dim, k, token_stride, n, raw);
      } else if (head_dim == 128 && num_queries - j >= 2) {
        scores16<2, 8>(q, head_dim, k, token_stride, n, raw);
        pack = 2;
      } else if (head_dim == 128) {
        scores16<1, 8>(q, head_dim, k, token_stride, n, raw);
      } else {
        raw[0] = scores16_any(q, head_dim, k, token_stride, n);
      }
      for (int64_t g = 0; g < pack; ++g) {
        _mm512_storeu_ps(probs + (j + g) * padded_block + t,
                         _mm512_mask_mul_ps(minus_inf, valid, scale_v, raw[g]));
      }
      j += pack;
    }
  }
}

// For kRows query heads r at once: acc_r[0:kVectors * 16] = acc_r * factors[r] + sum_t
// weights[r * weight_stride + t] * rows[t], the accumulators held in registers across the
// block's tokens, each V row loaded once for all kRows heads (at kRows = 4, kVectors = 4: 16
// accumulators, 4 weights and a row vector of the 32 registers).
template <int kRows, int kVectors>
INFERCEPT_AVX512 inline void accumulate(float* acc, int64_t acc_stride, const float* factors,
                                        const float* weights, int64_t weight_stride,
                                        const float* rows, int64_t row_stride,
                                        int64_t num_rows) {
  __m512 a[kRows][kVectors];
  for (int r = 0; r < kRows; ++r) {
    const __m512 f = _mm512_set1_ps(factors[r]);
    for (int v = 0; v < kVectors; ++v) {
      a[r][v] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * acc_stride + 16 * v), f);
    }
  }
  for (int64_t t = 0; t < num_rows; ++t) {
    __m512 w[kRows];
    for (int r = 0; r < kRows; ++r) w[r] = _mm512_set1_ps(weights[r * weight_stride + t]);
    const float* row = rows + t * row_stride;
    for (int v = 0; v < kVectors; ++v) {
      const __m512 x = _mm512_loadu_ps(row + 16 * v);
      for (int r = 0; r < kRows; ++r) a[r][v] = _mm512_fmadd_ps(w[r], x, a[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVectors; ++v) _mm512_storeu_ps(acc + r * acc_stride + 16 * v, a[r][v]);
  }
}

// The same over whole heads (head_dim a multiple of 16): chunks of 64 floats, then the rest.
template <int kRows>
INFERCEPT_AVX512 void accumulate_heads(float* acc, const float* factors, const float* weights,
                                       int64_t weight_stride, const float* rows,
                                       int64_t row_stride, int64_t num_rows, int64_t head_dim) {
  int64_t d = 0;
  for (; d + 64 <= head_dim; d += 64) {
    accumulate<kRows, 4>(acc + d, head_dim, factors, weights, weight_stride, rows + d,
                         row_stride, num_rows);
  }
  switch ((head_dim - d) / 16) {
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

INFERCEPT_AVX512 void attend_avx512(const PagedDecodeProblem& p, int64_t seq, int64_t kv_begin,
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
  const int64_t padded_block = (block_size + 15) / 16 * 16;
  float* probs = scratch;
  float* running_max = scratch + rows * padded_block;
  float* running_sum = running_max + rows;
  float* correction = running_sum + rows;
  float* block_sum = correction + rows;
  std::fill(acc, acc + rows * head_dim, 0.0f);
  std::fill(running_max, running_max + rows, -std::numeric_limits<float>::infinity());
  std::fill(running_sum, running_sum + rows, 0.0f);
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
      score_block(query + first * head_dim, group, head_dim, keys, token_stride, num_tokens,
                  p.scale, probs + first * padded_block, padded_block);
      for (int64_t j = first; j < first + group; ++j) {
        float* row = probs + j * padded_block;
        __m512 block_max = _mm512_loadu_ps(row);
        for (int64_t t = 16; t < num_tokens; t += 16) {
          block_max = _mm512_max_ps(block_max, _mm512_loadu_ps(row + t));
        }
        const float new_max = std::max(running_max[j], _mm512_reduce_max_ps(block_max));
        const __m512 shift = _mm512_set1_ps(new_max);
        __m512 sums = _mm512_setzero_ps();
        for (int64_t t = 0; t < num_tokens; t += 16) {
          // exp_nonpositive16(-inf) is ~1e-38, not 0: the pad lanes are zeroed by the mask.
          const int64_t n = std::min<int64_t>(16, num_tokens - t);
          const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
          const __m512 e = _mm512_maskz_mov_ps(
              valid, exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(row + t), shift)));
          _mm512_storeu_ps(row + t, e);
          sums = _mm512_add_ps(sums, e);
        }
        block_sum[j] = _mm512_reduce_add_ps(sums);
        correction[j] = running_max[j] - new_max;  // its exp is taken below, 16 heads at a time
        running_max[j] = new_max;
      }
      // The rescale factors exp(old max - new max). On the first block the old max is -inf
      // and the factor ~1e-38 (exp_nonpositive16's floor), which multiplies zeros.
      for (int64_t j = first; j < first + group; j += 16) {
        const int64_t n = std::min<int64_t>(16, first + group - j);
        const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
        const __m512 factors = exp_nonpositive16(_mm512_maskz_loadu_ps(valid, correction + j));
        _mm512_mask_storeu_ps(correction + j, valid, factors);
        const __m512 sums = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(valid, running_sum + j),
                                            factors, _mm512_maskz_loadu_ps(valid, block_sum + j));
        _mm512_mask_storeu_ps(running_sum + j, valid, sums);
      }
      prefetcher.advance(num_tokens - num_tokens / 2);
      // V rows: up to four of the group's heads per pass, so each row is loaded once per pass.
      for (int64_t j = first; j < first + group;) {
        float* a = acc + j * head_dim;
        const float* w = probs + j * padded_block;
        switch (std::min<int64_t>(first + group - j, 4)) {
          case 4: accumulate_heads<4>(a, correction + j, w, padded_block, values, token_stride,
                                      num_tokens, head_dim); j += 4; break;
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
    const __m512 inverse = _mm512_set1_ps(1.0f / running_sum[j]);
    float* row = acc + j * head_dim;
    for (int64_t d = 0; d < head_dim; d += 16) {
      _mm512_storeu_ps(row + d, _mm512_mul_ps(_mm512_loadu_ps(row + d), inverse));
    }
  }
}

#else  // no x86-64 GCC/Clang: the portable kernel only.

void attend_avx512(const PagedDecodeProblem&, int64_t, int64_t, int64_t, float*) {}

#endif

}  // namespace infercept::detail
