#pragma once
// The AVX-512 body of the CPU decode-attention kernel (cpu_attention.cpp dispatches to it).
// Private to the library: the public entry points are in infercept/cpu_attention.h.
#include <cstdint>

#include "cpu_features.h"
#include "infercept/cpu_attention.h"

namespace infercept::detail {

/// Floats of scratch attend_avx512 needs for `rows` query heads: scores of one block padded to
/// whole 16-float vectors, and per head a running maximum and sum, and the block's rescale
/// factor and sum.
inline int64_t avx512_scratch_floats(int64_t rows, int64_t block_size) {
  return rows * ((block_size + 15) / 16 * 16) + 4 * rows;
}

/// Attention of sequence `seq`'s query heads that read KV heads [kv_begin, kv_end), written to
/// problem.out; the problem is already checked and head_dim is a multiple of 16. Scores are
/// taken sixteen tokens a vector, and each V row is loaded once for up to four query heads of
/// a GQA group. `scratch` holds avx512_scratch_floats(rows, block_size) floats, rows =
/// (kv_end - kv_begin) * group. Call only when cpu_has_avx512f().
void attend_avx512(const PagedDecodeProblem& problem, int64_t seq, int64_t kv_begin,
                   int64_t kv_end, float* scratch);

}  // namespace infercept::detail
