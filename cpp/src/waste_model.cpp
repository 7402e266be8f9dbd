#include "infercept/waste_model.h"

#include <algorithm>

namespace infercept {

double discard_waste(const CostModel& cost, int64_t context_tokens, int64_t other_tokens) {
  double t_fwd = cost.forward_time_s(static_cast<double>(context_tokens));
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
  double own = cost.forward_time_s(static_cast<double>(context_tokens)) * context_tokens * m / 2;
  double chunk_tokens = static_cast<double>(context_tokens) / static_cast<double>(num_chunks);
  double others = static_cast<double>(num_chunks) * cost.forward_time_s(chunk_tokens) * other_tokens * m;
  return own + others;
}

}  // namespace infercept
