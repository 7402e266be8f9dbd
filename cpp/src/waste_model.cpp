#include "infercept/waste_model.h"

#include <algorithm>

namespace infercept {

double discard_waste(const CostModel& cost, int64_t context_tokens, int64_t other_tokens) {
  // One step computes the context and attends over it.
  double t_fwd = cost.step_time_s(static_cast<double>(context_tokens), static_cast<double>(context_tokens));
  double m = static_cast<double>(cost.kv_bytes_per_token);
  return t_fwd * context_tokens * m + t_fwd * other_tokens * m;
}

double preserve_waste(const CostModel& cost, int64_t context_tokens, double intercept_s) {
  return intercept_s * context_tokens * static_cast<double>(cost.kv_bytes_per_token);
}

double swap_waste(const CostModel& cost, int64_t context_tokens, int64_t batch_tokens) {
  return 2 * cost.swap_time_s(static_cast<double>(context_tokens)) * batch_tokens *
         static_cast<double>(cost.kv_bytes_per_token);
}

double chunked_discard_waste(const CostModel& cost, int64_t context_tokens, int64_t other_tokens,
                             int64_t num_chunks) {
  num_chunks = std::max<int64_t>(1, num_chunks);
  double m = static_cast<double>(cost.kv_bytes_per_token);
  // Chunk k of n attends over the k/n of the context rebuilt so far: C*(n+1)/2 token reads in
  // all (0 in the paper's model, where T_fwd has no attention term). They lengthen the
  // recompute and every step the chunks ride in.
  double n = static_cast<double>(num_chunks);
  double attention_s = cost.attention_s_per_context_token * static_cast<double>(context_tokens) * (n + 1) / 2;
  double own = (cost.forward_time_s(static_cast<double>(context_tokens)) + attention_s) * context_tokens * m / 2;
  double chunk_tokens = static_cast<double>(context_tokens) / n;
  double others = (n * cost.forward_time_s(chunk_tokens) + attention_s) * other_tokens * m;
  return own + others;
}

}  // namespace infercept
