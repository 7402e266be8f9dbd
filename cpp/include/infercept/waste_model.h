#pragma once
// The paper's waste equations (DESIGN.md §2). Each returns device memory-time in byte-seconds:
// the memory a choice keeps from serving anyone, multiplied by how long.
//
// C: context tokens of the intercepted request; M: KV bytes per token (in the cost model);
// C_other: tokens of the other running requests; C_batch: tokens of the running batch.
// T_fwd of a recompute includes the profile's attention term where it has one (`+attn`
// profiles, measured ones): a chunk attends over the context rebuilt so far, a*C*(n+1)/2 over
// n chunks. With the paper's profiles (a = 0) the equations are the paper's.
#include <cstdint>

#include "infercept/cost_model.h"

namespace infercept {

/// Equation 1: T_fwd(C)*C*M + T_fwd(C)*C_other*M — the request's own memory while it is
/// recomputed in one go, plus everyone else held up by that recomputation (T_fwd(C) + a*C with
/// an attention term).
double discard_waste(const CostModel& cost, int64_t context_tokens, int64_t other_tokens);

/// Equation 2: T_INT*C*M — the context held idle on the device for the whole intercept.
double preserve_waste(const CostModel& cost, int64_t context_tokens, double intercept_s);

/// Equation 3: 2*T_swap(C)*C_batch*M — the batch stalled while the context goes out and back.
double swap_waste(const CostModel& cost, int64_t context_tokens, int64_t batch_tokens);

/// Equation 4: T_fwd(C)*C*M/2 + n*T_fwd(C/n)*C_other*M — recomputation in n chunks: the
/// request's memory grows linearly while it is rebuilt, and each chunk holds the others up.
/// With an attention term A = a*C*(n+1)/2 is added to T_fwd(C) and to n*T_fwd(C/n).
double chunked_discard_waste(const CostModel& cost, int64_t context_tokens, int64_t other_tokens,
                             int64_t num_chunks);

}  // namespace infercept
