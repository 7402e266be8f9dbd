// The packed CPU linear kernel against a plain double-precision loop over awkward shapes, every
// body the CPU has, strided x rows and a bias; the tensor adapter's checks.
#include "infercept/cpu_linear.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "infercept/errors.h"

namespace infercept {
namespace {

struct Shape {
  int64_t rows, in_features, out_features;
};

constexpr CpuLinearImpl kBodies[] = {CpuLinearImpl::kAuto, CpuLinearImpl::kPortable,
                                     CpuLinearImpl::kAvx2, CpuLinearImpl::kAvx512};

const char* name_of(CpuLinearImpl impl) {
  switch (impl) {
    case CpuLinearImpl::kAuto: return "auto";
    case CpuLinearImpl::kPortable: return "portable";
    case CpuLinearImpl::kAvx2: return "avx2";
    case CpuLinearImpl::kAvx512: return "avx512";
  }
  return "?";
}

// Random weight, bias and x (rows `x_pad` floats wider than in_features, the pad filled with
// NaN so that reading it shows); runs the kernel on the packed weight and a double reference
// on the plain one; returns the largest difference relative to sqrt(K) (the sums' scale).
double max_error(const Shape& s, CpuLinearImpl impl, bool with_bias, int64_t x_pad,
                 uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  const int64_t x_stride = s.in_features + x_pad;
  std::vector<float> weight(s.out_features * s.in_features), bias(s.out_features);
  std::vector<float> x(s.rows * x_stride, std::nanf(""));
  for (float& w : weight) w = normal(rng);
  for (float& b : bias) b = normal(rng);
  for (int64_t r = 0; r < s.rows; ++r)
    for (int64_t k = 0; k < s.in_features; ++k) x[r * x_stride + k] = normal(rng);
  std::vector<float> packed(linear_num_panels(s.out_features) * s.in_features *
                            kLinearPanelWidth);
  pack_linear_weight(weight.data(), s.out_features, s.in_features, s.in_features, packed.data());
  // One spare column per row: the kernel must not write past out_features.
  const int64_t out_stride = s.out_features + 1;
  std::vector<float> out(s.rows * out_stride, -7.0f);
  LinearProblem p;
  p.out = out.data();
  p.x = x.data();
  p.packed_weight = packed.data();
  p.bias = with_bias ? bias.data() : nullptr;
  p.num_rows = s.rows;
  p.in_features = s.in_features;
  p.out_features = s.out_features;
  p.x_row_stride = x_stride;
  p.out_row_stride = out_stride;
  p.impl = impl;
  cpu_linear(p);
  double worst = 0.0;
  for (int64_t r = 0; r < s.rows; ++r) {
    EXPECT_EQ(out[r * out_stride + s.out_features], -7.0f) << "row " << r << " written past N";
    for (int64_t n = 0; n < s.out_features; ++n) {
      double want = with_bias ? bias[n] : 0.0;
      for (int64_t k = 0; k < s.in_features; ++k) {
        want += static_cast<double>(x[r * x_stride + k]) * weight[n * s.in_features + k];
      }
      const double error = std::abs(out[r * out_stride + n] - want);
      worst = std::max(worst, std::isnan(error) ? INFINITY : error);
    }
  }
  return worst / std::sqrt(static_cast<double>(s.in_features));
}

TEST(CpuLinear, PackedLayoutIsPanelsOfSixteenColumnsPaddedWithZeros) {
  const int64_t n = 17, k = 3;
  std::vector<float> weight(n * k);
  for (int64_t i = 0; i < n * k; ++i) weight[i] = static_cast<float>(i);
  std::vector<float> packed(2 * k * 16, -1.0f);
  pack_linear_weight(weight.data(), n, k, k, packed.data());
  EXPECT_EQ(packed[0 * 16 + 0], weight[0 * k + 0]);   // panel 0, k 0, column 0
  EXPECT_EQ(packed[2 * 16 + 5], weight[5 * k + 2]);   // panel 0, k 2, column 5
  EXPECT_EQ(packed[(k + 1) * 16 + 0], weight[16 * k + 1]);  // panel 1, k 1, column 16
  EXPECT_EQ(packed[(k + 1) * 16 + 1], 0.0f);          // column 17 does not exist
}

TEST(CpuLinear, EveryBodyMatchesTheReferenceOnAwkwardShapes) {
  bool ran_any = false;
  for (CpuLinearImpl impl : kBodies) {
    if (!cpu_linear_has(impl)) continue;
    ran_any = true;
    uint32_t seed = 0;
    for (int64_t rows : {1, 3, 7, 19, 33}) {
      for (int64_t out_features : {5, 17, 49, 64}) {
        for (int64_t in_features : {1, 7, 64, 576}) {
          const Shape s{rows, in_features, out_features};
          const bool with_bias = seed % 2 == 0;
          const int64_t pad = seed % 3 == 0 ? 0 : 5;
          EXPECT_LT(max_error(s, impl, with_bias, pad, ++seed), 1e-5)
              << name_of(impl) << " rows=" << rows << " N=" << out_features
              << " K=" << in_features << " bias=" << with_bias << " pad=" << pad;
        }
      }
    }
  }
  EXPECT_TRUE(ran_any);
}

// Every body at the model's shapes and row counts (odd panel counts, chunked row ranges, the
// threads' split of the panels), forcing each one: skipped where the CPU lacks it.
class CpuLinearBody : public ::testing::TestWithParam<CpuLinearImpl> {};

TEST_P(CpuLinearBody, MatchesTheReferenceAtModelShapes) {
  if (!cpu_linear_has(GetParam())) GTEST_SKIP() << name_of(GetParam()) << " absent on this CPU";
  const Shape shapes[] = {{1, 576, 960}, {4, 576, 576}, {32, 1536, 576}, {150, 576, 208},
                          {2, 576, 1000}};
  uint32_t seed = 100;
  for (const Shape& s : shapes) {
    EXPECT_LT(max_error(s, GetParam(), true, 3, ++seed), 1e-5)
        << name_of(GetParam()) << " rows=" << s.rows << " N=" << s.out_features
        << " K=" << s.in_features;
  }
}

INSTANTIATE_TEST_SUITE_P(Bodies, CpuLinearBody, ::testing::ValuesIn(kBodies),
                         [](const auto& info) { return std::string(name_of(info.param)); });

TEST(CpuLinear, ZeroRowsWritesNothingAndBadSizesThrow) {
  LinearProblem p;
  p.in_features = 4;
  p.out_features = 3;
  p.x_row_stride = 4;
  p.out_row_stride = 3;
  EXPECT_NO_THROW(cpu_linear(p));  // 0 rows, null pointers: nothing to do
  p.x_row_stride = 3;
  EXPECT_THROW(cpu_linear(p), InvalidArgumentError);
  p.x_row_stride = 4;
  p.num_rows = 1;
  try {
    cpu_linear(p);
    FAIL() << "null pointers accepted";
  } catch (const InvalidArgumentError& error) {
    EXPECT_NE(std::string(error.what()).find("non-null"), std::string::npos) << error.what();
  }
  float w[1] = {};
  EXPECT_THROW(pack_linear_weight(w, 0, 1, 1, w), InvalidArgumentError);
}

TEST(CpuLinear, AdapterChecksShapesAndNamesTheTensor) {
  std::vector<float> weight(17 * 8, 1.0f), packed(2 * 8 * 16), x(3 * 8, 1.0f), out(3 * 17);
  std::vector<float> bias(17, 0.5f);
  const Device cpu{DeviceType::kCpu, 0};
  pack_linear_weight(contiguous_view(packed.data(), ScalarType::kFloat32, cpu, {2, 8, 16}),
                     contiguous_view(weight.data(), ScalarType::kFloat32, cpu, {17, 8}));
  const TensorView bias_view = contiguous_view(bias.data(), ScalarType::kFloat32, cpu, {17});
  cpu_linear(contiguous_view(out.data(), ScalarType::kFloat32, cpu, {3, 17}),
             contiguous_view(x.data(), ScalarType::kFloat32, cpu, {3, 8}),
             contiguous_view(packed.data(), ScalarType::kFloat32, cpu, {2, 8, 16}), &bias_view);
  for (float y : out) EXPECT_FLOAT_EQ(y, 8.5f);

  // A packed weight of the wrong panel count: the message names it and both shapes.
  try {
    cpu_linear(contiguous_view(out.data(), ScalarType::kFloat32, cpu, {3, 17}),
               contiguous_view(x.data(), ScalarType::kFloat32, cpu, {3, 8}),
               contiguous_view(packed.data(), ScalarType::kFloat32, cpu, {1, 8, 16}), nullptr);
    FAIL() << "wrong packed shape accepted";
  } catch (const InvalidArgumentError& error) {
    const std::string what = error.what();
    EXPECT_NE(what.find("packed_weight has shape [1, 8, 16], expected [2, 8, 16]"),
              std::string::npos) << what;
  }
  // x of the wrong dtype.
  EXPECT_THROW(cpu_linear(contiguous_view(out.data(), ScalarType::kFloat32, cpu, {3, 17}),
                          contiguous_view(x.data(), ScalarType::kInt32, cpu, {3, 8}),
                          contiguous_view(packed.data(), ScalarType::kFloat32, cpu, {2, 8, 16}),
                          nullptr),
               InvalidArgumentError);
  // out aliasing x.
  EXPECT_THROW(cpu_linear(contiguous_view(x.data(), ScalarType::kFloat32, cpu, {1, 17}),
                          contiguous_view(x.data(), ScalarType::kFloat32, cpu, {1, 8}),
                          contiguous_view(packed.data(), ScalarType::kFloat32, cpu, {2, 8, 16}),
                          nullptr),
               InvalidArgumentError);
}

}  // namespace
}  // namespace infercept
