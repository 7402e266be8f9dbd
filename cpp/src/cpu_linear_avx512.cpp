#include "cpu_linear_bodies.h"

// Compiled without -mavx512f (the wheel runs on any x86-64): each function below carries a
// target attribute instead, and cpu_linear.cpp calls it only after checking the running CPU.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define INFERCEPT_AVX512_PATH 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <utility>

namespace infercept::detail {

#ifdef INFERCEPT_AVX512_PATH

namespace {

#define INFERCEPT_AVX512 __attribute__((target("avx512f")))

// A tile of kRows rows x kPanels panels: kRows * kPanels zmm accumulators, at most 8 x 2 = 16
// of the 32 registers, leaving room for the weight vectors and the broadcasts. Each k step
// loads kPanels weight vectors (the panels' row k, 64 bytes each) and broadcasts each row's
// x[k]: kRows * kPanels FMAs per kPanels + kRows loads.
//
// With few accumulators (the 1- and 2-row tiles of decode) one FMA chain per accumulator
// would cap a core at one 64-byte vector per FMA latency; kSplit independent sets over k
// (k mod kSplit), summed at the end, keep several loads in flight. No software prefetch: the
// weight is read in address order, which the hardware prefetchers follow; prefetching 1 or 4
// KiB ahead measured no faster at 1 and 4 rows on the 2-core Zen 4 (within its wide noise).
template <int kRows, int kPanels>
INFERCEPT_AVX512 void tile(const LinearProblem& p, int64_t row, int64_t panel) {
  constexpr int kSplit = kRows * kPanels <= 2 ? 4 : (kRows * kPanels <= 4 ? 2 : 1);
  const int64_t num_k = p.in_features;
  const int64_t panel_floats = num_k * kLinearPanelWidth;
  const float* weight = p.packed_weight + panel * panel_floats;  // [kPanels][K][16]
  const float* x = p.x + row * p.x_row_stride;                    // [kRows] rows
  const int64_t x_stride = p.x_row_stride;

  __m512 acc[kSplit][kRows][kPanels];
  for (int s = 0; s < kSplit; ++s)
    for (int r = 0; r < kRows; ++r)
      for (int q = 0; q < kPanels; ++q) acc[s][r][q] = _mm512_setzero_ps();

  int64_t k = 0;
  for (; k + kSplit <= num_k; k += kSplit) {
    for (int s = 0; s < kSplit; ++s) {
      __m512 w[kPanels];
      for (int q = 0; q < kPanels; ++q) {
        w[q] = _mm512_loadu_ps(weight + q * panel_floats + (k + s) * kLinearPanelWidth);
      }
      for (int r = 0; r < kRows; ++r) {
        const __m512 xr = _mm512_set1_ps(x[r * x_stride + k + s]);
        for (int q = 0; q < kPanels; ++q) acc[s][r][q] = _mm512_fmadd_ps(xr, w[q], acc[s][r][q]);
      }
    }
  }
  for (; k < num_k; ++k) {
    for (int q = 0; q < kPanels; ++q) {
      const __m512 w = _mm512_loadu_ps(weight + q * panel_floats + k * kLinearPanelWidth);
      for (int r = 0; r < kRows; ++r) {
        acc[0][r][q] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * x_stride + k]), w, acc[0][r][q]);
      }
    }
  }

  for (int q = 0; q < kPanels; ++q) {
    const int64_t column = (panel + q) * kLinearPanelWidth;
    const int64_t num_columns = std::min<int64_t>(kLinearPanelWidth, p.out_features - column);
    const __mmask16 mask = static_cast<__mmask16>((1u << num_columns) - 1u);
    const __m512 bias = p.bias != nullptr ? _mm512_maskz_loadu_ps(mask, p.bias + column)
                                          : _mm512_setzero_ps();
    for (int r = 0; r < kRows; ++r) {
      __m512 sum = acc[0][r][q];
      for (int s = 1; s < kSplit; ++s) sum = _mm512_add_ps(sum, acc[s][r][q]);
      _mm512_mask_storeu_ps(p.out + (row + r) * p.out_row_stride + column, mask,
                            _mm512_add_ps(sum, bias));
    }
  }
}

using TileFn = void (*)(const LinearProblem&, int64_t, int64_t);

constexpr int kMaxRows = 8;

template <int kPanels, int... kRows>
constexpr auto tile_table(std::integer_sequence<int, kRows...>) {
  return std::array<TileFn, sizeof...(kRows)>{&tile<kRows + 1, kPanels>...};
}

}  // namespace

void linear_block_avx512(const LinearProblem& p, int64_t row_begin, int64_t row_end,
                         int64_t panel_begin, int64_t panel_end) {
  static constexpr auto kPairTiles = tile_table<2>(std::make_integer_sequence<int, kMaxRows>());
  static constexpr auto kSingleTiles =
      tile_table<1>(std::make_integer_sequence<int, kMaxRows>());
  // Panels outside, row tiles inside. With several rows a tile covers a panel pair (K x 32
  // floats, 72 KiB at K = 576), read from memory once and then from L2 by every further tile of
  // rows. With one row (batch-1 decode) no further tile re-reads it, so a tile covers one panel
  // and the thread reads its part of the weight as a single stream in address order, where a
  // pair would read two streams K x 16 floats apart. The 1-row tiles of either width split k
  // the same way (kSplit 4), so the result is bit-equal. A 113 MB GEMV on the 2-core Zen 4 read
  // at ~51 GB/s by single panels against ~44 by pairs (best of 20, interleaved; a plain AVX-512
  // sum over the same bytes ~48).
  const int64_t panels_per_tile = row_end - row_begin == 1 ? 1 : 2;
  for (int64_t panel = panel_begin; panel < panel_end; panel += panels_per_tile) {
    const auto& tiles =
        panels_per_tile == 2 && panel + 1 < panel_end ? kPairTiles : kSingleTiles;
    for (int64_t row = row_begin; row < row_end; row += kMaxRows) {
      const int64_t rows = std::min<int64_t>(kMaxRows, row_end - row);
      tiles[rows - 1](p, row, panel);
    }
  }
}

#else  // not x86-64 GCC/Clang: never called (cpu_has_avx512f() is false)

void linear_block_avx512(const LinearProblem& p, int64_t row_begin, int64_t row_end,
                         int64_t panel_begin, int64_t panel_end) {
  linear_block_portable(p, row_begin, row_end, panel_begin, panel_end);
}

#endif

}  // namespace infercept::detail
