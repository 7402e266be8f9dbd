#include "infercept/cpu_layer_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "cpu_features.h"
#include "infercept/errors.h"

// Built with -ffp-contract=off (CMakeLists.txt): no multiply-add is fused, so the rotation
// rounds exactly as torch's separate multiplies and add do, whatever -march a build uses.
// The loops are plain so that -O3 vectorises them for the baseline x86-64 (SSE2) the wheel
// targets; at a few thousand floats a call they are bound by memory, not by vector width.
// SiLU is the exception, ~30 operations a float: its loop is also compiled for AVX2 and
// AVX-512 (target attributes, picked at run time), from the same source.

#ifdef _OPENMP
#define INFERCEPT_PRAGMA(x) _Pragma(#x)
#else
#define INFERCEPT_PRAGMA(x)
#endif

namespace infercept {
namespace {

constexpr const char* kRmsNorm = "rms_norm";
constexpr const char* kAddRmsNorm = "add_rms_norm";
constexpr const char* kRotary = "rotary_write_kv";
constexpr const char* kSiluMul = "silu_mul";

// Rows are split over OpenMP threads only for prefill-sized work: at decode a fork costs more
// than the row loop.
constexpr int64_t kParallelFloats = 1 << 16;
constexpr int64_t kParallelSiluColumns = 1 << 13;

// 1 / sqrt(mean(x^2) + eps) of one row, with a vectorised float32 sum.
float inverse_rms(const float* x, int64_t hidden, float eps) {
  float sum = 0.0f;
  INFERCEPT_PRAGMA(omp simd reduction(+ : sum))
  for (int64_t i = 0; i < hidden; ++i) sum += x[i] * x[i];
  return 1.0f / std::sqrt(sum / static_cast<float>(hidden) + eps);
}

void scale_row(float* out, const float* x, const float* weight, int64_t hidden, float inv) {
  for (int64_t i = 0; i < hidden; ++i) out[i] = x[i] * inv * weight[i];
}

// Rotates one head of head_dim floats in place (rotate-half).
void rotate_head(float* x, const float* cos, const float* sin, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float lo = x[i], hi = x[i + half];
    x[i] = lo * cos[i] - hi * sin[i];
    x[i + half] = hi * cos[i + half] + lo * sin[i + half];
  }
}

// e^x without a libm call, so that the loop over a row vectorises: x = n ln2 + r with
// |r| <= ln2 / 2 (ln2 split in two for an exact n ln2), e^r by Cephes' expf polynomial, 2^n put
// into the exponent bits. x is clamped to [-87.3, 88.3], where 2^n stays a normal float.
inline float exp_poly(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  // Round to nearest by the 1.5 * 2^23 trick: exact for |x log2 e| < 2^22, no rounding mode.
  constexpr float kRound = 12582912.0f;
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return er * scale;
}

// silu(gate) * up over one row, in place in gate. Always inlined into each body below, so every
// body compiles the same operations in the same order (no contraction in this file): the
// vector widths differ, the results do not.
__attribute__((always_inline)) inline void silu_row(float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + exp_poly(-g)) * up[i];
  }
}

void silu_row_baseline(float* gate, const float* up, int64_t n) { silu_row(gate, up, n); }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The same loop vectorised 16 and 8 wide, called only when the CPU has the instructions.
__attribute__((target("avx512f,prefer-vector-width=512")))
void silu_row_avx512(float* gate, const float* up, int64_t n) { silu_row(gate, up, n); }

__attribute__((target("avx2"))) void silu_row_avx2(float* gate, const float* up, int64_t n) {
  silu_row(gate, up, n);
}
#endif

using SiluRowFn = void (*)(float*, const float*, int64_t);

SiluRowFn silu_row_body(SiluBody body) {
  if (!silu_body_available(body)) {
    throw_invalid_argument("silu_mul", body == SiluBody::kAvx512 ? "body kAvx512 needs a CPU with AVX-512F"
                                                                 : "body kAvx2 needs a CPU with AVX2");
  }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (body == SiluBody::kAuto) {
    body = detail::cpu_has_avx512f() ? SiluBody::kAvx512
           : detail::cpu_has_avx2_fma() ? SiluBody::kAvx2
                                         : SiluBody::kBaseline;
  }
  if (body == SiluBody::kAvx512) return &silu_row_avx512;
  if (body == SiluBody::kAvx2) return &silu_row_avx2;
#endif
  return &silu_row_baseline;
}

const Device kCpu{DeviceType::kCpu, 0};

}  // namespace

void rms_norm(float* out, const float* x, const float* weight, int64_t num_rows, int64_t hidden,
              float eps) {
  INFERCEPT_PRAGMA(omp parallel for if (num_rows * hidden >= kParallelFloats))
  for (int64_t r = 0; r < num_rows; ++r) {
    const float* row = x + r * hidden;
    scale_row(out + r * hidden, row, weight, hidden, inverse_rms(row, hidden, eps));
  }
}

void add_rms_norm(float* x, float* residual, const float* weight, int64_t num_rows,
                  int64_t hidden, float eps) {
  INFERCEPT_PRAGMA(omp parallel for if (num_rows * hidden >= kParallelFloats))
  for (int64_t r = 0; r < num_rows; ++r) {
    float* sum = residual + r * hidden;
    const float* delta = x + r * hidden;
    for (int64_t i = 0; i < hidden; ++i) sum[i] += delta[i];
    scale_row(x + r * hidden, sum, weight, hidden, inverse_rms(sum, hidden, eps));
  }
}

bool silu_body_available(SiluBody body) {
  switch (body) {
    case SiluBody::kAvx512:
      return detail::cpu_has_avx512f();
    case SiluBody::kAvx2:
      return detail::cpu_has_avx2_fma();
    case SiluBody::kAuto:
    case SiluBody::kBaseline:
      return true;
  }
  return false;
}

void silu_mul(float* gate_up, int64_t num_rows, int64_t intermediate, SiluBody body) {
  // ~30 float operations a column (exp_poly and a division): worth a second thread from a
  // few rows on, unlike the memory-bound ops here (at 32 rows of 1536, serially and 4 wide,
  // it was 9% of a decode step while the other thread waited).
  const SiluRowFn row = silu_row_body(body);
  INFERCEPT_PRAGMA(omp parallel for if (num_rows * intermediate >= kParallelSiluColumns))
  for (int64_t r = 0; r < num_rows; ++r) {
    float* gate = gate_up + r * 2 * intermediate;
    row(gate, gate + intermediate, intermediate);
  }
}

void check_rotary_write(const RotaryCacheWrite& w) {
  check_positive(kRotary, "num_heads", w.num_heads);
  check_positive(kRotary, "num_kv_heads", w.num_kv_heads);
  check_positive(kRotary, "num_slots", w.num_slots);
  if (w.head_dim < 2 || w.head_dim % 2 != 0) {
    throw_invalid_argument(kRotary, "head_dim=" + std::to_string(w.head_dim) +
         " must be even and >= 2 (rotate-half pairs)");
  }
  for (int64_t t = 0; t < w.num_tokens; ++t) {
    if (w.slot_mapping[t] < 0 || w.slot_mapping[t] >= w.num_slots) {
      throw_invalid_argument(kRotary, "slot_mapping[" + std::to_string(t) + "]=" +
           std::to_string(w.slot_mapping[t]) + " must be in [0, num_slots=" +
           std::to_string(w.num_slots) + ")");
    }
  }
}

void rotary_write_kv(const RotaryCacheWrite& w) {
  check_rotary_write(w);
  const int64_t d = w.head_dim;
  const int64_t rotated_heads = w.num_heads + w.num_kv_heads;
  const int64_t token_floats = (rotated_heads + w.num_kv_heads) * d;
  const size_t kv_bytes = static_cast<size_t>(w.num_kv_heads * d) * sizeof(float);
  INFERCEPT_PRAGMA(omp parallel for if (w.num_tokens * token_floats >= kParallelFloats))
  for (int64_t t = 0; t < w.num_tokens; ++t) {
    float* token = w.qkv + t * token_floats;
    for (int64_t h = 0; h < rotated_heads; ++h) rotate_head(token + h * d, w.cos + t * d, w.sin + t * d, d);
    const int64_t slot = w.slot_mapping[t];
    std::memcpy(w.key_cache + slot * w.num_kv_heads * d, token + w.num_heads * d, kv_bytes);
    std::memcpy(w.value_cache + slot * w.num_kv_heads * d, token + rotated_heads * d, kv_bytes);
  }
}

void rms_norm(const TensorView& out, const TensorView& x, const TensorView& weight, float eps) {
  check_ndim(kRmsNorm, "x", x, 2, "[num_rows, hidden]");
  const int64_t rows = x.shape[0], hidden = x.shape[1];
  check_tensor(kRmsNorm, "x", x, ScalarType::kFloat32, kCpu, {rows, hidden});
  check_tensor(kRmsNorm, "out", out, ScalarType::kFloat32, kCpu, {rows, hidden});
  check_tensor(kRmsNorm, "weight", weight, ScalarType::kFloat32, kCpu, {hidden});
  if (out.data != x.data) check_disjoint(kRmsNorm, "out", out, "x", x);
  check_disjoint(kRmsNorm, "out", out, "weight", weight);
  rms_norm(out.data_as<float>(), x.data_as<const float>(), weight.data_as<const float>(), rows,
           hidden, eps);
}

void add_rms_norm(const TensorView& x, const TensorView& residual, const TensorView& weight,
                  float eps) {
  check_ndim(kAddRmsNorm, "x", x, 2, "[num_rows, hidden]");
  const int64_t rows = x.shape[0], hidden = x.shape[1];
  check_tensor(kAddRmsNorm, "x", x, ScalarType::kFloat32, kCpu, {rows, hidden});
  check_tensor(kAddRmsNorm, "residual", residual, ScalarType::kFloat32, kCpu, {rows, hidden});
  check_tensor(kAddRmsNorm, "weight", weight, ScalarType::kFloat32, kCpu, {hidden});
  check_disjoint(kAddRmsNorm, "x", x, "residual", residual);
  check_disjoint(kAddRmsNorm, "x", x, "weight", weight);
  check_disjoint(kAddRmsNorm, "residual", residual, "weight", weight);
  add_rms_norm(x.data_as<float>(), residual.data_as<float>(), weight.data_as<const float>(), rows,
               hidden, eps);
}

void silu_mul(const TensorView& gate_up) {
  check_ndim(kSiluMul, "gate_up", gate_up, 2, "[num_rows, 2 * intermediate]");
  const int64_t rows = gate_up.shape[0], width = gate_up.shape[1];
  if (width < 2 || width % 2 != 0) {
    throw_invalid_argument(kSiluMul, "gate_up has " + std::to_string(width) +
         " columns, expected 2 * intermediate (even, >= 2)");
  }
  check_tensor(kSiluMul, "gate_up", gate_up, ScalarType::kFloat32, kCpu, {rows, width});
  silu_mul(gate_up.data_as<float>(), rows, width / 2);
}

void rotary_write_kv(const TensorView& qkv, const TensorView& cos, const TensorView& sin,
                     const TensorView& key_cache, const TensorView& value_cache,
                     const TensorView& slot_mapping) {
  check_ndim(kRotary, "qkv", qkv, 3, "[num_tokens, num_heads + 2 * num_kv_heads, head_dim]");
  check_ndim(kRotary, "key_cache", key_cache, 4,
             "[num_blocks, block_size, num_kv_heads, head_dim]");
  const int64_t tokens = qkv.shape[0], heads_total = qkv.shape[1], d = qkv.shape[2];
  const int64_t blocks = key_cache.shape[0], block_size = key_cache.shape[1];
  const int64_t kv_heads = key_cache.shape[2];
  if (heads_total <= 2 * kv_heads) {
    throw_invalid_argument(kRotary, "qkv has " + std::to_string(heads_total) +
         " heads, expected num_heads + 2 * num_kv_heads with num_kv_heads=" +
         std::to_string(kv_heads) + " (key_cache) and num_heads >= 1");
  }
  check_tensor(kRotary, "qkv", qkv, ScalarType::kFloat32, kCpu, {tokens, heads_total, d});
  check_tensor(kRotary, "cos", cos, ScalarType::kFloat32, kCpu, {tokens, d});
  check_tensor(kRotary, "sin", sin, ScalarType::kFloat32, kCpu, {tokens, d});
  check_tensor(kRotary, "key_cache", key_cache, ScalarType::kFloat32, kCpu,
               {blocks, block_size, kv_heads, d});
  check_tensor(kRotary, "value_cache", value_cache, ScalarType::kFloat32, kCpu,
               {blocks, block_size, kv_heads, d});
  check_tensor(kRotary, "slot_mapping", slot_mapping, ScalarType::kInt64, kCpu, {tokens});
  check_disjoint(kRotary, "key_cache", key_cache, "qkv", qkv);
  check_disjoint(kRotary, "value_cache", value_cache, "qkv", qkv);
  check_disjoint(kRotary, "key_cache", key_cache, "value_cache", value_cache);
  RotaryCacheWrite w;
  w.qkv = qkv.data_as<float>();
  w.cos = cos.data_as<const float>();
  w.sin = sin.data_as<const float>();
  w.key_cache = key_cache.data_as<float>();
  w.value_cache = value_cache.data_as<float>();
  w.slot_mapping = slot_mapping.data_as<const int64_t>();
  w.num_tokens = tokens;
  w.num_heads = heads_total - 2 * kv_heads;
  w.num_kv_heads = kv_heads;
  w.head_dim = d;
  w.num_slots = blocks * block_size;
  rotary_write_kv(w);
}

}  // namespace infercept
