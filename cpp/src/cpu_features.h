#pragma once
// What the running CPU can execute, asked once per process. The SIMD bodies of the CPU kernels
// (attention, linear) are compiled with target attributes, not -m flags, so the wheel runs on
// any x86-64; their dispatchers call a body only when the probe here says the CPU has it.
// Private to the library.

namespace infercept::detail {

/// Whether the running CPU has AVX2 and FMA (always false off x86-64 GCC/Clang builds).
bool cpu_has_avx2_fma();

/// Whether the running CPU has AVX-512F, with the OS saving the zmm state (GCC and Clang check
/// xgetbv before reporting it); always false off x86-64 GCC/Clang builds.
bool cpu_has_avx512f();

}  // namespace infercept::detail
