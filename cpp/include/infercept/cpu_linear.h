#pragma once
// y = x W^T (+ bias) on the CPU over a float32 weight packed once into column panels,
// framework-free: raw pointers and sizes, no torch.
//
// Why a packed layout: at one row (decode at batch 1) the product is a pass over the weight,
// so its speed is the rate the weight streams from memory. Panels of kLinearPanelWidth output
// columns, each stored k-major ([K][16]), make that pass a single sequential read per thread;
// at many rows the same panels feed a register-blocked microkernel (rows x 32 columns of
// accumulators) that reads each panel from L2 once per tile of rows.
//
// Two layers (STYLE.md §3): the pointer functions taking a LinearProblem are the bottom one,
// what C++ tests and microbenchmarks call; the overloads over TensorViews are the adapter that
// the binding calls, which checks every tensor's device, dtype, shape and strides.
#include <cstdint>

#include "infercept/tensor_view.h"

namespace infercept {

/// Output columns per packed panel: one 512-bit vector of float32.
constexpr int64_t kLinearPanelWidth = 16;

/// Panels of a packed [out_features, in_features] weight: ceil(out_features / 16).
inline int64_t linear_num_panels(int64_t out_features) {
  return (out_features + kLinearPanelWidth - 1) / kLinearPanelWidth;
}

/// Writes the packed layout of `weight` [out_features, in_features] (rows `weight_row_stride`
/// floats apart) into `packed` [num_panels, in_features, 16]:
///   packed[p][k][j] = weight[p * 16 + j][k], and 0 for p * 16 + j >= out_features.
/// Throws InvalidArgumentError unless the sizes are positive, the stride >= in_features and
/// the pointers are non-null.
void pack_linear_weight(const float* weight, int64_t out_features, int64_t in_features,
                        int64_t weight_row_stride, float* packed);

/// Which body computes the product: kAuto takes the widest the running CPU has (AVX-512F,
/// then AVX2+FMA, then the portable loops); the others force one (tests compare them; a body
/// the CPU lacks throws).
enum class CpuLinearImpl { kAuto, kPortable, kAvx2, kAvx512 };

/// One call. x and out are row-major with their own row strides (x may be a column slice of a
/// wider tensor):
///   out            [num_rows, out_features]      written, rows out_row_stride floats apart
///   x              [num_rows, in_features]       rows x_row_stride floats apart
///   packed_weight  [num_panels, in_features, 16] from pack_linear_weight
///   bias           [out_features] or null
struct LinearProblem {
  float* out = nullptr;
  const float* x = nullptr;
  const float* packed_weight = nullptr;
  const float* bias = nullptr;
  int64_t num_rows = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t x_row_stride = 0;
  int64_t out_row_stride = 0;
  CpuLinearImpl impl = CpuLinearImpl::kAuto;
};

/// Throws InvalidArgumentError, naming the value and the limit it broke, unless num_rows >= 0,
/// in_features and out_features are positive, the row strides are at least the row lengths,
/// and (when num_rows > 0) out, x and packed_weight are non-null.
void check_linear_problem(const LinearProblem& problem);

/// Checks `problem` (as above), then writes out = x W^T + bias in float32. Parallel with
/// OpenMP when the library was built with it: the panels are split between the threads, so
/// each thread streams its own part of the weight. Throws InvalidArgumentError (also for a
/// forced body the CPU lacks); on a throw `out` is unchanged.
void cpu_linear(const LinearProblem& problem);

/// The adapter of pack_linear_weight: `weight` [out_features, in_features] float32 on the CPU,
/// rows contiguous (any row stride); `packed` [num_panels, in_features, 16] float32,
/// contiguous, written. Throws InvalidArgumentError naming the tensor.
void pack_linear_weight(const TensorView& packed, const TensorView& weight);

/// The adapter of cpu_linear: `x` [num_rows, in_features] float32 on the CPU with contiguous
/// rows (any row stride); `packed_weight` [num_panels, in_features, 16] contiguous; `bias`
/// [out_features] contiguous or null; `out` [num_rows, out_features] contiguous, sharing no
/// memory with the inputs. out_features is read off `out`. Throws InvalidArgumentError naming
/// the tensor, what it is and what was expected.
void cpu_linear(const TensorView& out, const TensorView& x, const TensorView& packed_weight,
                const TensorView* bias);

/// Whether the running CPU has the body (always true for kAuto and kPortable).
bool cpu_linear_has(CpuLinearImpl impl);

}  // namespace infercept
