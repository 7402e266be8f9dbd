#pragma once
// Shared helpers of the GPU tests (label `gpu`): skip without a device, checked CUDA calls,
// host-side float16/bfloat16 conversion for references.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>

#include "device_info.h"

#define SKIP_WITHOUT_CUDA_DEVICE()                                           \
  do {                                                                       \
    if (infercept::cuda::num_devices() == 0) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

#define ASSERT_CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr << ": " << cudaGetErrorString(cudaGetLastError())

namespace gpu_test {

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

/// bfloat16 <-> float on the host (round to nearest even).
inline uint16_t float_to_bf16(float f) {
  uint32_t bits = float_to_bits(f);
  bits += 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}
inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t{h} << 16); }

/// IEEE half <-> float on the host (normal range and zero; the tests stay in [-4, 4]).
inline uint16_t float_to_half(float f) {
  const uint32_t bits = float_to_bits(f);
  const uint32_t sign = (bits >> 16) & 0x8000;
  const int32_t exponent = static_cast<int32_t>((bits >> 23) & 0xff) - 127 + 15;
  uint32_t mantissa = bits & 0x7fffff;
  if (exponent <= 0) return static_cast<uint16_t>(sign);  // flush tiny values to zero
  uint32_t half = sign | (static_cast<uint32_t>(exponent) << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) ++half;
  return static_cast<uint16_t>(half);
}
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exponent = (h >> 10) & 0x1f;
  const uint32_t mantissa = h & 0x3ff;
  if (exponent == 0) return bits_to_float(sign);  // zero (no subnormals in the tests)
  return bits_to_float(sign | ((exponent - 15 + 127) << 23) | (mantissa << 13));
}

}  // namespace gpu_test
