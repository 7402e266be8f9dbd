// TensorView and the adapters' checks: each bad argument fails naming the tensor, what it is and
// what was expected.
#include "infercept/tensor_view.h"

#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "infercept/cpu_attention.h"
#include "infercept/errors.h"

namespace infercept {
namespace {

const Device kCpu{DeviceType::kCpu, 0};

// The message of the InvalidArgumentError `call` throws, or "" when it throws none.
std::string error_of(const std::function<void()>& call) {
  try {
    call();
  } catch (const InvalidArgumentError& error) {
    return error.what();
  }
  return "";
}

TEST(TensorView, ContiguousViewIsRowMajor) {
  const TensorView view = contiguous_view(nullptr, ScalarType::kFloat16, kCpu, {2, 3, 4});
  EXPECT_EQ(view.numel(), 24);
  EXPECT_EQ(view.strides[0], 12);
  EXPECT_EQ(view.strides[2], 1);
  EXPECT_EQ(view.span_bytes(), 48);
  EXPECT_TRUE(view.is_contiguous());
  TensorView transposed = view;
  std::swap(transposed.shape[1], transposed.shape[2]);
  std::swap(transposed.strides[1], transposed.strides[2]);
  EXPECT_FALSE(transposed.is_contiguous());
  TensorView single_row = contiguous_view(nullptr, ScalarType::kFloat32, kCpu, {1, 5});
  single_row.strides[0] = 99;  // a size-1 dimension's stride is never stepped
  EXPECT_TRUE(single_row.is_contiguous());
}

TEST(TensorView, ChecksNameTheTensorTheValueAndTheExpectation) {
  std::vector<float> data(24);
  const TensorView view = contiguous_view(data.data(), ScalarType::kFloat32, kCpu, {2, 3, 4});
  auto check = [&](const TensorView& t, ScalarType dtype, Device device) {
    return error_of([&] { check_tensor("op", "x", t, dtype, device, {2, 3, 4}); });
  };
  EXPECT_EQ(check(view, ScalarType::kFloat32, kCpu), "");
  EXPECT_EQ(check(view, ScalarType::kBFloat16, kCpu), "op: x is float32, expected bfloat16");
  EXPECT_EQ(check(view, ScalarType::kFloat32, Device{DeviceType::kCuda, 1}),
            "op: x is on cpu, expected cuda:1");
  TensorView strided = view;
  strided.strides[0] = 13;
  EXPECT_EQ(check(strided, ScalarType::kFloat32, kCpu),
            "op: x with shape [2, 3, 4] has strides [13, 4, 1], expected contiguous strides "
            "[12, 4, 1]");
  EXPECT_EQ(error_of([&] { check_tensor("op", "x", view, ScalarType::kFloat32, kCpu, {2, 4}); }),
            "op: x has shape [2, 3, 4], expected [2, 4]");
  EXPECT_EQ(error_of([&] { check_ndim("op", "x", view, 2, "[rows, cols]"); }),
            "op: x has shape [2, 3, 4], expected 2 dimensions [rows, cols]");
  const TensorView tail = contiguous_view(data.data() + 23, ScalarType::kFloat32, kCpu, {1});
  const TensorView after = contiguous_view(data.data() + 24, ScalarType::kFloat32, kCpu, {1});
  EXPECT_EQ(error_of([&] { check_disjoint("op", "y", tail, "x", view); }),
            "op: y overlaps x in memory; the kernel writes it while reading x");
  EXPECT_EQ(error_of([&] { check_disjoint("op", "y", after, "x", view); }), "");
}

TEST(TensorView, CpuAdapterNamesTheTensorItRejects) {
  std::vector<float> query(8), out(8), cache(32);
  std::vector<int64_t> tables = {1};
  std::vector<int32_t> lens = {3};
  const auto f32 = ScalarType::kFloat32;
  const TensorView cache_view = contiguous_view(cache.data(), f32, kCpu, {2, 4, 1, 4});
  EXPECT_EQ(error_of([&] {
              paged_decode_attention(
                  contiguous_view(out.data(), f32, kCpu, {1, 2, 4}),
                  contiguous_view(query.data(), f32, kCpu, {1, 2, 4}), cache_view, cache_view,
                  contiguous_view(tables.data(), ScalarType::kInt64, kCpu, {1, 1}),
                  contiguous_view(lens.data(), ScalarType::kInt32, kCpu, {1}), 0.5f);
            }),
            "paged_decode_attention: block_tables is int64, expected int32");
}

}  // namespace
}  // namespace infercept
