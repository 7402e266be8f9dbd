#pragma once
// The AVX2+FMA body of the CPU decode-attention kernel (cpu_attention.cpp dispatches to it).
// Private to the library: the public entry points are in infercept/cpu_attention.h.
#include <cstdint>

#include "cpu_features.h"
#include "infercept/cpu_attention.h"

namespace infercept::detail {

/// Floats of scratch attend_avx2 needs for `rows` query heads: scores of one block padded to
/// whole vectors, and per head a running maximum and sum, and the block's rescale factor and
/// sum.
inline int64_t avx2_scratch_floats(int64_t rows, int64_t block_size) {
  return rows * ((block_size + 7) / 8 * 8) + 4 * rows;
}

/// Attention of sequence `seq`'s query heads that read KV heads [kv_begin, kv_end), written to
/// problem.out; the problem is already checked and head_dim is a multiple of 8. Each block's
/// K and V rows of those heads are read once, in address order (one task per sequence keeps
/// them contiguous). `scratch` holds avx2_scratch_floats(rows, block_size) floats, rows =
/// (kv_end - kv_begin) * group. Call only when cpu_has_avx2_fma().
void attend_avx2(const PagedDecodeProblem& problem, int64_t seq, int64_t kv_begin,
                 int64_t kv_end, float* scratch);

}  // namespace infercept::detail
