// The CPU layer ops against plain double-precision references, over awkward sizes, and their
// argument checks (nothing written on a throw).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "infercept/cpu_layer_ops.h"
#include "infercept/errors.h"

namespace infercept {
namespace {

std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

std::vector<double> reference_norm(const float* row, const float* weight, int64_t hidden,
                                   float eps) {
  double sum = 0.0;
  for (int64_t i = 0; i < hidden; ++i) sum += static_cast<double>(row[i]) * row[i];
  const double inv = 1.0 / std::sqrt(sum / hidden + eps);
  std::vector<double> out(hidden);
  for (int64_t i = 0; i < hidden; ++i) out[i] = row[i] * inv * weight[i];
  return out;
}

TEST(SiluMul, MatchesReferenceAndLeavesTheUpHalf) {
  for (const int64_t intermediate : {int64_t{1}, int64_t{7}, int64_t{1536}}) {
    const int64_t rows = 3;
    auto gate_up = random_floats(rows * 2 * intermediate, 9);
    for (float& v : gate_up) v *= 8.0f;
    gate_up[0] = -200.0f;  // e^-g past the clamp: silu -> -0
    if (intermediate > 1) gate_up[1] = 200.0f;  // e^-g -> 0: silu(g) = g
    const auto before = gate_up;
    silu_mul(gate_up.data(), rows, intermediate);
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = before.data() + r * 2 * intermediate;
      for (int64_t i = 0; i < intermediate; ++i) {
        const double g = row[i], u = row[intermediate + i];
        const double want = g / (1.0 + std::exp(-g)) * u;
        ASSERT_NEAR(gate_up[r * 2 * intermediate + i], want, 4e-7 * (1 + std::abs(want)))
            << "row " << r << " column " << i << " gate " << g;
        ASSERT_EQ(gate_up[r * 2 * intermediate + intermediate + i], row[intermediate + i]);
      }
    }
  }
}

TEST(SiluMul, EveryBodyTheCpuHasGivesTheBaselinesBits) {
  // 5 rows x 1539 columns: every body's vector loop and its scalar tail, split over threads.
  const int64_t rows = 5, intermediate = 1539;
  auto input = random_floats(rows * 2 * intermediate, 11);
  for (float& v : input) v *= 12.0f;
  input[3] = -100.0f, input[4] = 100.0f, input[5] = 0.0f, input[6] = -0.0f;
  auto want = input;
  silu_mul(want.data(), rows, intermediate, SiluBody::kBaseline);
  for (SiluBody body : {SiluBody::kAuto, SiluBody::kAvx2, SiluBody::kAvx512}) {
    if (!silu_body_available(body)) {
      EXPECT_THROW(silu_mul(input.data(), rows, intermediate, body), InvalidArgumentError);
      continue;
    }
    auto got = input;
    silu_mul(got.data(), rows, intermediate, body);
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_EQ(std::memcmp(&got[i], &want[i], sizeof(float)), 0)
          << "body " << static_cast<int>(body) << " element " << i << ": " << got[i] << " vs " << want[i];
    }
  }
}

class RmsNormSizes : public ::testing::TestWithParam<std::pair<int64_t, int64_t>> {};

TEST_P(RmsNormSizes, MatchesReferenceOutOfPlaceAndInPlace) {
  const auto [rows, hidden] = GetParam();
  const auto x = random_floats(rows * hidden, 1);
  const auto weight = random_floats(hidden, 2);
  std::vector<float> out(rows * hidden), in_place = x;
  rms_norm(out.data(), x.data(), weight.data(), rows, hidden, 1e-5f);
  rms_norm(in_place.data(), in_place.data(), weight.data(), rows, hidden, 1e-5f);
  for (int64_t r = 0; r < rows; ++r) {
    const auto want = reference_norm(x.data() + r * hidden, weight.data(), hidden, 1e-5f);
    for (int64_t i = 0; i < hidden; ++i) {
      ASSERT_NEAR(out[r * hidden + i], want[i], 1e-5 * (1 + std::abs(want[i]))) << r << "," << i;
      ASSERT_EQ(in_place[r * hidden + i], out[r * hidden + i]);
    }
  }
}

TEST_P(RmsNormSizes, AddRmsNormLeavesTheSumInResidualAndItsNormInX) {
  const auto [rows, hidden] = GetParam();
  auto x = random_floats(rows * hidden, 3);
  auto residual = random_floats(rows * hidden, 4);
  const auto weight = random_floats(hidden, 5);
  std::vector<float> sum(rows * hidden);
  for (size_t i = 0; i < sum.size(); ++i) sum[i] = residual[i] + x[i];
  add_rms_norm(x.data(), residual.data(), weight.data(), rows, hidden, 1e-6f);
  EXPECT_EQ(residual, sum);  // the add is exact: the same float32 sums
  for (int64_t r = 0; r < rows; ++r) {
    const auto want = reference_norm(sum.data() + r * hidden, weight.data(), hidden, 1e-6f);
    for (int64_t i = 0; i < hidden; ++i) {
      ASSERT_NEAR(x[r * hidden + i], want[i], 1e-5 * (1 + std::abs(want[i])));
    }
  }
}

// Rows 1 (decode), 3, 7, 33 and 200 (the last past the threshold that forks threads); hidden
// 1, 5 (no vector lane fits), 576 (SmolLM2).
INSTANTIATE_TEST_SUITE_P(Shapes, RmsNormSizes,
                         ::testing::Values(std::pair<int64_t, int64_t>{1, 1}, std::pair{1, 576},
                                           std::pair{3, 5}, std::pair{7, 576},
                                           std::pair{33, 17}, std::pair{200, 576}));

struct RotaryCase {
  int64_t tokens, heads, kv_heads, head_dim, block_size, blocks;
};

class RotarySizes : public ::testing::TestWithParam<RotaryCase> {};

TEST_P(RotarySizes, RotatesQueryAndKeyHeadsAndWritesTheirSlots) {
  const RotaryCase c = GetParam();
  const int64_t heads_total = c.heads + 2 * c.kv_heads, d = c.head_dim;
  const int64_t slots = c.blocks * c.block_size;
  const auto original = random_floats(c.tokens * heads_total * d, 6);
  const auto cos = random_floats(c.tokens * d, 7), sin = random_floats(c.tokens * d, 8);
  std::vector<int64_t> slot_mapping(c.tokens);
  for (int64_t t = 0; t < c.tokens; ++t) slot_mapping[t] = (t * 7 + 3) % slots;  // scattered
  auto qkv = original;
  std::vector<float> key_cache(slots * c.kv_heads * d, -1.0f), value_cache = key_cache;
  RotaryCacheWrite w{qkv.data(), cos.data(), sin.data(), key_cache.data(), value_cache.data(),
                     slot_mapping.data(), c.tokens, c.heads, c.kv_heads, d, slots};
  rotary_write_kv(w);
  const int64_t half = d / 2;
  for (int64_t t = 0; t < c.tokens; ++t) {
    const float* cs = cos.data() + t * d;
    const float* sn = sin.data() + t * d;
    for (int64_t h = 0; h < heads_total; ++h) {
      const float* in = original.data() + (t * heads_total + h) * d;
      const float* got = qkv.data() + (t * heads_total + h) * d;
      for (int64_t i = 0; i < d; ++i) {
        // torch's arithmetic, op by op: x * cos + rotate_half(x) * sin.
        const float rotated = i < half ? -in[i + half] : in[i - half];
        const float want = h < c.heads + c.kv_heads ? in[i] * cs[i] + rotated * sn[i] : in[i];
        ASSERT_EQ(got[i], want) << "token " << t << " head " << h << " dim " << i;
      }
    }
    const int64_t slot = slot_mapping[t];
    for (int64_t i = 0; i < c.kv_heads * d; ++i) {
      ASSERT_EQ(key_cache[slot * c.kv_heads * d + i], qkv[(t * heads_total + c.heads) * d + i]);
      ASSERT_EQ(value_cache[slot * c.kv_heads * d + i],
                qkv[(t * heads_total + c.heads + c.kv_heads) * d + i]);
    }
  }
}

// SmolLM2's decode (9 query heads, 3 KV heads, 64) at 1 and 19 tokens, a prefill chunk past the
// thread threshold, MHA (group 1), the smallest even head_dim.
INSTANTIATE_TEST_SUITE_P(Shapes, RotarySizes,
                         ::testing::Values(RotaryCase{1, 9, 3, 64, 16, 4},
                                           RotaryCase{19, 9, 3, 64, 32, 2},
                                           RotaryCase{300, 9, 3, 64, 16, 40},
                                           RotaryCase{7, 4, 4, 128, 8, 3},
                                           RotaryCase{3, 1, 1, 2, 1, 5},
                                           RotaryCase{0, 9, 3, 64, 16, 1}));

TEST(RotaryWriteKv, SlotOutOfRangeThrowsNamingItAndWritesNothing) {
  std::vector<float> qkv(2 * 3 * 4, 1.0f), cos(2 * 4, 0.5f), sin(2 * 4, 0.5f);
  std::vector<float> cache(2 * 1 * 4, -1.0f);
  std::vector<int64_t> slots{1, 2};  // 2 slots: [0, 2)
  const auto before = qkv;
  RotaryCacheWrite w{qkv.data(), cos.data(), sin.data(), cache.data(), cache.data(),
                     slots.data(), 2, 1, 1, 4, 2};
  try {
    rotary_write_kv(w);
    FAIL() << "no throw";
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("slot_mapping[1]=2 must be in [0, num_slots=2)"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(qkv, before);
  EXPECT_EQ(cache, std::vector<float>(8, -1.0f));
  w.head_dim = 3;
  EXPECT_THROW(rotary_write_kv(w), InvalidArgumentError);
}

TEST(CpuLayerOpsAdapters, CheckShapesDtypesAndAliasing) {
  std::vector<float> x(2 * 8), weight(8), other(2 * 8);
  const Device cpu{DeviceType::kCpu, 0};
  const auto xv = contiguous_view(x.data(), ScalarType::kFloat32, cpu, {2, 8});
  const auto wv = contiguous_view(weight.data(), ScalarType::kFloat32, cpu, {8});
  const auto short_weight = contiguous_view(weight.data(), ScalarType::kFloat32, cpu, {7});
  const auto ov = contiguous_view(other.data(), ScalarType::kFloat32, cpu, {2, 8});
  const auto as_int = contiguous_view(other.data(), ScalarType::kInt32, cpu, {2, 8});
  EXPECT_NO_THROW(rms_norm(xv, xv, wv, 1e-5f));  // in place is allowed
  EXPECT_THROW(rms_norm(ov, xv, short_weight, 1e-5f), InvalidArgumentError);
  EXPECT_THROW(rms_norm(as_int, xv, wv, 1e-5f), InvalidArgumentError);
  EXPECT_NO_THROW(add_rms_norm(xv, ov, wv, 1e-5f));
  EXPECT_THROW(add_rms_norm(xv, xv, wv, 1e-5f), InvalidArgumentError);  // must be disjoint
}

}  // namespace
}  // namespace infercept
