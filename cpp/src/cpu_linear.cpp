#include "infercept/cpu_linear.h"

#include <algorithm>
#include <cstdint>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_linear_bodies.h"
#include "infercept/errors.h"

namespace infercept {
namespace {

constexpr char kOp[] = "cpu_linear";

// Below this many multiply-adds a second thread costs more to wake than it saves.
constexpr int64_t kMinParallelMacs = int64_t{1} << 16;

using BlockFn = void (*)(const LinearProblem&, int64_t, int64_t, int64_t, int64_t);

BlockFn choose_body(CpuLinearImpl impl) {
  switch (impl) {
    case CpuLinearImpl::kPortable:
      return &detail::linear_block_portable;
    case CpuLinearImpl::kAvx2:
      if (!detail::cpu_has_avx2_fma()) throw_invalid_argument(kOp, "impl=kAvx2 needs a CPU with AVX2 and FMA");
      return &detail::linear_block_avx2;
    case CpuLinearImpl::kAvx512:
      if (!detail::cpu_has_avx512f()) throw_invalid_argument(kOp, "impl=kAvx512 needs a CPU with AVX-512F");
      return &detail::linear_block_avx512;
    case CpuLinearImpl::kAuto:
      break;
  }
  if (detail::cpu_has_avx512f()) return &detail::linear_block_avx512;
  if (detail::cpu_has_avx2_fma()) return &detail::linear_block_avx2;
  return &detail::linear_block_portable;
}

}  // namespace

namespace detail {

// Tiles of up to 4 rows x one panel with float[16] accumulators: plain loops the compiler
// vectorises for baseline x86-64 (SSE2) or any other target.
void linear_block_portable(const LinearProblem& p, int64_t row_begin, int64_t row_end,
                           int64_t panel_begin, int64_t panel_end) {
  constexpr int64_t kTileRows = 4;
  const int64_t num_k = p.in_features;
  for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
    const float* weight = p.packed_weight + panel * num_k * kLinearPanelWidth;  // [K][16]
    const int64_t column = panel * kLinearPanelWidth;
    const int64_t num_columns = std::min(kLinearPanelWidth, p.out_features - column);
    for (int64_t row = row_begin; row < row_end; row += kTileRows) {
      const int64_t rows = std::min(kTileRows, row_end - row);
      float acc[kTileRows][kLinearPanelWidth] = {};
      for (int64_t k = 0; k < num_k; ++k) {
        const float* w = weight + k * kLinearPanelWidth;
        for (int64_t r = 0; r < rows; ++r) {
          const float xr = p.x[(row + r) * p.x_row_stride + k];
          for (int64_t j = 0; j < kLinearPanelWidth; ++j) acc[r][j] += xr * w[j];
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* out = p.out + (row + r) * p.out_row_stride + column;
        for (int64_t j = 0; j < num_columns; ++j) {
          out[j] = acc[r][j] + (p.bias != nullptr ? p.bias[column + j] : 0.0f);
        }
      }
    }
  }
}

}  // namespace detail

void pack_linear_weight(const float* weight, int64_t out_features, int64_t in_features,
                        int64_t weight_row_stride, float* packed) {
  constexpr char op[] = "pack_linear_weight";
  if (out_features <= 0) throw_invalid_argument(op, "out_features=" + std::to_string(out_features) + " must be > 0");
  if (in_features <= 0) throw_invalid_argument(op, "in_features=" + std::to_string(in_features) + " must be > 0");
  if (weight_row_stride < in_features) {
    throw_invalid_argument(op, "weight_row_stride=" + std::to_string(weight_row_stride) +
                 " must be >= in_features=" + std::to_string(in_features));
  }
  if (weight == nullptr || packed == nullptr) throw_invalid_argument(op, "weight and packed must be non-null");
  const int64_t num_panels = linear_num_panels(out_features);
  for (int64_t panel = 0; panel < num_panels; ++panel) {
    float* dst = packed + panel * in_features * kLinearPanelWidth;
    for (int64_t k = 0; k < in_features; ++k) {
      for (int64_t j = 0; j < kLinearPanelWidth; ++j) {
        const int64_t n = panel * kLinearPanelWidth + j;
        dst[k * kLinearPanelWidth + j] = n < out_features ? weight[n * weight_row_stride + k] : 0.0f;
      }
    }
  }
}

void check_linear_problem(const LinearProblem& p) {
  if (p.num_rows < 0) throw_invalid_argument(kOp, "num_rows=" + std::to_string(p.num_rows) + " must be >= 0");
  if (p.in_features <= 0) {
    throw_invalid_argument(kOp, "in_features=" + std::to_string(p.in_features) + " must be > 0");
  }
  if (p.out_features <= 0) {
    throw_invalid_argument(kOp, "out_features=" + std::to_string(p.out_features) + " must be > 0");
  }
  if (p.x_row_stride < p.in_features) {
    throw_invalid_argument(kOp, "x_row_stride=" + std::to_string(p.x_row_stride) + " must be >= in_features=" +
                  std::to_string(p.in_features));
  }
  if (p.out_row_stride < p.out_features) {
    throw_invalid_argument(kOp, "out_row_stride=" + std::to_string(p.out_row_stride) +
                  " must be >= out_features=" + std::to_string(p.out_features));
  }
  if (p.num_rows > 0 && (p.out == nullptr || p.x == nullptr || p.packed_weight == nullptr)) {
    throw_invalid_argument(kOp, "out, x and packed_weight must be non-null");
  }
}

void cpu_linear(const LinearProblem& p) {
  check_linear_problem(p);
  const BlockFn body = choose_body(p.impl);
  if (p.num_rows == 0) return;
  const int64_t num_panels = linear_num_panels(p.out_features);
  // Threads split the panels in pairs (the AVX-512 tile's width), each a contiguous range: at
  // one row every thread streams its own part of the weight in address order.
  const int64_t num_pairs = (num_panels + 1) / 2;
  const int64_t macs = p.num_rows * p.in_features * p.out_features;
#ifdef _OPENMP
  const int64_t wanted = macs < kMinParallelMacs ? 1 : omp_get_max_threads();
  const int num_threads = static_cast<int>(std::max<int64_t>(1, std::min(wanted, num_pairs)));
#else
  const int num_threads = 1;
#endif
#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads)
#endif
  {
#ifdef _OPENMP
    const int64_t thread = omp_get_thread_num();
#else
    const int64_t thread = 0;
#endif
    const int64_t panel_begin = std::min(num_panels, num_pairs * thread / num_threads * 2);
    const int64_t panel_end = std::min(num_panels, num_pairs * (thread + 1) / num_threads * 2);
    // All rows at once: each panel pair is then read from memory exactly once, and x streams
    // past it from L2/L3 (a tile reads 8 x K floats per 8 * 32 * K multiply-adds, little next
    // to the FMA work). Cutting the rows into L2-sized chunks re-read the weight per chunk and
    // measured ~5-10 % slower at 128-512 rows on the 2-core Zen 4.
    body(p, 0, p.num_rows, panel_begin, panel_end);
  }
}

void pack_linear_weight(const TensorView& packed, const TensorView& weight) {
  constexpr char op[] = "pack_linear_weight";
  const Device cpu{DeviceType::kCpu, 0};
  check_ndim(op, "weight", weight, 2, "[out_features, in_features]");
  if (weight.device != cpu) {
    throw_invalid_argument(op, "weight is on " + to_string(weight.device) + ", expected " + to_string(cpu));
  }
  if (weight.dtype != ScalarType::kFloat32) {
    throw_invalid_argument(op, "weight is " + to_string(weight.dtype) + ", expected float32");
  }
  const int64_t out_features = weight.shape[0], in_features = weight.shape[1];
  if (out_features <= 0 || in_features <= 0) {
    throw_invalid_argument(op, "weight has shape [" + std::to_string(out_features) + ", " +
                 std::to_string(in_features) + "], expected both sizes > 0");
  }
  if (in_features > 1 && weight.strides[1] != 1) {
    throw_invalid_argument(op, "weight has column stride " + std::to_string(weight.strides[1]) +
                 ", expected 1 (contiguous rows)");
  }
  if (out_features > 1 && weight.strides[0] < in_features) {
    throw_invalid_argument(op, "weight has row stride " + std::to_string(weight.strides[0]) +
                 ", expected >= in_features=" + std::to_string(in_features));
  }
  check_tensor(op, "packed", packed, ScalarType::kFloat32, cpu,
               {linear_num_panels(out_features), in_features, kLinearPanelWidth});
  check_disjoint(op, "packed", packed, "weight", weight);
  pack_linear_weight(weight.data_as<const float>(), out_features, in_features,
                     out_features > 1 ? weight.strides[0] : in_features, packed.data_as<float>());
}

void cpu_linear(const TensorView& out, const TensorView& x, const TensorView& packed_weight,
                const TensorView* bias) {
  const Device cpu{DeviceType::kCpu, 0};
  check_ndim(kOp, "x", x, 2, "[num_rows, in_features]");
  check_ndim(kOp, "out", out, 2, "[num_rows, out_features]");
  check_ndim(kOp, "packed_weight", packed_weight, 3, "[num_panels, in_features, 16]");
  if (x.device != cpu) throw_invalid_argument(kOp, "x is on " + to_string(x.device) + ", expected cpu");
  if (x.dtype != ScalarType::kFloat32) {
    throw_invalid_argument(kOp, "x is " + to_string(x.dtype) + ", expected float32");
  }
  const int64_t num_rows = x.shape[0], in_features = x.shape[1], out_features = out.shape[1];
  if (in_features > 1 && x.strides[1] != 1) {
    throw_invalid_argument(kOp, "x has column stride " + std::to_string(x.strides[1]) +
                  ", expected 1 (contiguous rows)");
  }
  const int64_t x_row_stride = num_rows > 1 ? x.strides[0] : in_features;
  if (x_row_stride < in_features) {
    throw_invalid_argument(kOp, "x has row stride " + std::to_string(x_row_stride) + ", expected >= in_features=" +
                  std::to_string(in_features));
  }
  if (in_features <= 0 || out_features <= 0) {
    throw_invalid_argument(kOp, "in_features=" + std::to_string(in_features) + " and out_features=" +
                  std::to_string(out_features) + " must be > 0");
  }
  check_tensor(kOp, "packed_weight", packed_weight, ScalarType::kFloat32, cpu,
               {linear_num_panels(out_features), in_features, kLinearPanelWidth});
  check_tensor(kOp, "out", out, ScalarType::kFloat32, cpu, {num_rows, out_features});
  check_disjoint(kOp, "out", out, "x", x);
  check_disjoint(kOp, "out", out, "packed_weight", packed_weight);
  LinearProblem p;
  if (bias != nullptr) {
    check_tensor(kOp, "bias", *bias, ScalarType::kFloat32, cpu, {out_features});
    check_disjoint(kOp, "out", out, "bias", *bias);
    p.bias = bias->data_as<const float>();
  }
  p.out = out.data_as<float>();
  p.x = x.data_as<const float>();
  p.packed_weight = packed_weight.data_as<const float>();
  p.num_rows = num_rows;
  p.in_features = in_features;
  p.out_features = out_features;
  p.x_row_stride = x_row_stride;
  p.out_row_stride = out_features;
  cpu_linear(p);
}

bool cpu_linear_has(CpuLinearImpl impl) {
  switch (impl) {
    case CpuLinearImpl::kAvx2:
      return detail::cpu_has_avx2_fma();
    case CpuLinearImpl::kAvx512:
      return detail::cpu_has_avx512f();
    case CpuLinearImpl::kAuto:
    case CpuLinearImpl::kPortable:
      return true;
  }
  return false;
}

}  // namespace infercept
