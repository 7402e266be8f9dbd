#include "cpu_features.h"

namespace infercept::detail {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

#else  // no x86-64 GCC/Clang: the portable bodies only.

bool cpu_has_avx2_fma() { return false; }
bool cpu_has_avx512f() { return false; }

#endif

}  // namespace infercept::detail
