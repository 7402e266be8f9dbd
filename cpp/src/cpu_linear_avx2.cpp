#include "cpu_linear_bodies.h"

// Compiled without -mavx2 (the wheel runs on any x86-64): each function below carries a target
// attribute instead, and cpu_linear.cpp calls it only after checking the running CPU.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define INFERCEPT_LINEAR_AVX2_PATH 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

namespace infercept::detail {

#ifdef INFERCEPT_LINEAR_AVX2_PATH

namespace {

#define INFERCEPT_AVX2 __attribute__((target("avx2,fma")))

// A tile of kRows rows x one panel (two ymm of 8 columns): 2 * kRows accumulators, at most 12
// of the 16 registers, leaving two for the panel's row k and one for the broadcast. Tiles of
// 1-2 rows keep kSplit sets of accumulators over k mod kSplit so that more than two FMA
// chains are in flight (see cpu_linear_avx512.cpp).
template <int kRows>
INFERCEPT_AVX2 void tile(const LinearProblem& p, int64_t row, int64_t panel) {
  constexpr int kSplit = kRows <= 2 ? 2 : 1;
  const int64_t num_k = p.in_features;
  const float* weight = p.packed_weight + panel * num_k * kLinearPanelWidth;  // [K][16]
  const float* x = p.x + row * p.x_row_stride;
  const int64_t x_stride = p.x_row_stride;

  __m256 acc[kSplit][kRows][2];
  for (int s = 0; s < kSplit; ++s)
    for (int r = 0; r < kRows; ++r) acc[s][r][0] = acc[s][r][1] = _mm256_setzero_ps();

  int64_t k = 0;
  for (; k + kSplit <= num_k; k += kSplit) {
    for (int s = 0; s < kSplit; ++s) {
      const float* w = weight + (k + s) * kLinearPanelWidth;
      const __m256 low = _mm256_loadu_ps(w), high = _mm256_loadu_ps(w + 8);
      for (int r = 0; r < kRows; ++r) {
        const __m256 xr = _mm256_broadcast_ss(x + r * x_stride + k + s);
        acc[s][r][0] = _mm256_fmadd_ps(xr, low, acc[s][r][0]);
        acc[s][r][1] = _mm256_fmadd_ps(xr, high, acc[s][r][1]);
      }
    }
  }
  for (; k < num_k; ++k) {
    const float* w = weight + k * kLinearPanelWidth;
    const __m256 low = _mm256_loadu_ps(w), high = _mm256_loadu_ps(w + 8);
    for (int r = 0; r < kRows; ++r) {
      const __m256 xr = _mm256_broadcast_ss(x + r * x_stride + k);
      acc[0][r][0] = _mm256_fmadd_ps(xr, low, acc[0][r][0]);
      acc[0][r][1] = _mm256_fmadd_ps(xr, high, acc[0][r][1]);
    }
  }

  const int64_t column = panel * kLinearPanelWidth;
  const int64_t num_columns = std::min<int64_t>(kLinearPanelWidth, p.out_features - column);
  alignas(32) float bias[kLinearPanelWidth] = {};
  if (p.bias != nullptr) std::memcpy(bias, p.bias + column, num_columns * sizeof(float));
  const __m256 bias_low = _mm256_load_ps(bias), bias_high = _mm256_load_ps(bias + 8);
  for (int r = 0; r < kRows; ++r) {
    __m256 low = acc[0][r][0], high = acc[0][r][1];
    for (int s = 1; s < kSplit; ++s) {
      low = _mm256_add_ps(low, acc[s][r][0]);
      high = _mm256_add_ps(high, acc[s][r][1]);
    }
    low = _mm256_add_ps(low, bias_low);
    high = _mm256_add_ps(high, bias_high);
    float* out = p.out + (row + r) * p.out_row_stride + column;
    if (num_columns == kLinearPanelWidth) {
      _mm256_storeu_ps(out, low);
      _mm256_storeu_ps(out + 8, high);
    } else {  // the last panel of an N that is not a multiple of 16
      alignas(32) float sums[kLinearPanelWidth];
      _mm256_store_ps(sums, low);
      _mm256_store_ps(sums + 8, high);
      std::memcpy(out, sums, num_columns * sizeof(float));
    }
  }
}

using TileFn = void (*)(const LinearProblem&, int64_t, int64_t);

constexpr int kMaxRows = 6;

template <int... kRows>
constexpr auto tile_table(std::integer_sequence<int, kRows...>) {
  return std::array<TileFn, sizeof...(kRows)>{&tile<kRows + 1>...};
}

}  // namespace

void linear_block_avx2(const LinearProblem& p, int64_t row_begin, int64_t row_end,
                       int64_t panel_begin, int64_t panel_end) {
  static constexpr auto kTiles = tile_table(std::make_integer_sequence<int, kMaxRows>());
  // Panels outside, row tiles inside: a panel is read from memory once, then from L2.
  for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
    for (int64_t row = row_begin; row < row_end; row += kMaxRows) {
      const int64_t rows = std::min<int64_t>(kMaxRows, row_end - row);
      kTiles[rows - 1](p, row, panel);
    }
  }
}

#else  // not x86-64 GCC/Clang: never called (cpu_has_avx2_fma() is false)

void linear_block_avx2(const LinearProblem& p, int64_t row_begin, int64_t row_end,
                       int64_t panel_begin, int64_t panel_end) {
  linear_block_portable(p, row_begin, row_end, panel_begin, panel_end);
}

#endif

}  // namespace infercept::detail
