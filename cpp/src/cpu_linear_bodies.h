#pragma once
// The bodies of the CPU linear kernel (cpu_linear.cpp splits the work and dispatches to one).
// Private to the library: the public entry points are in infercept/cpu_linear.h.
#include <cstdint>

#include "infercept/cpu_linear.h"

namespace infercept::detail {

/// Whether the running CPU has AVX-512F (always false off x86-64 GCC/Clang builds).
bool cpu_has_avx512f();

/// Whether the running CPU has AVX2 and FMA (always false off x86-64 GCC/Clang builds).
bool cpu_has_avx2_and_fma();

/// Each body writes out[row_begin:row_end, 16 * panel_begin : min(16 * panel_end, N)] of an
/// already checked problem, reading only those panels of the packed weight. Call the AVX bodies
/// only when the CPU has them.
void linear_block_portable(const LinearProblem& problem, int64_t row_begin, int64_t row_end,
                           int64_t panel_begin, int64_t panel_end);
void linear_block_avx2(const LinearProblem& problem, int64_t row_begin, int64_t row_end,
                       int64_t panel_begin, int64_t panel_end);
void linear_block_avx512(const LinearProblem& problem, int64_t row_begin, int64_t row_end,
                         int64_t panel_begin, int64_t panel_end);

}  // namespace infercept::detail
