#pragma once
// The bodies of the CPU linear kernel (cpu_linear.cpp splits the work and dispatches to one).
// Private to the library: the public entry points are in infercept/cpu_linear.h.
#include <cstdint>

#include "cpu_features.h"
#include "infercept/cpu_linear.h"

namespace infercept::detail {

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
