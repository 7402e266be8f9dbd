#pragma once
// Observed tool durations, per tool, and the TTL rule the continuum policy picks from them.
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace infercept {

/// What the core has seen each tool take (intercept to resume), the latest kMaxSamples per
/// tool. Tools are named by the caller ("" when it does not say) and numbered here.
class ToolDurations {
 public:
  static constexpr size_t kMaxSamples = 256;

  /// The tool's number, assigned at its first mention.
  int32_t id(const std::string& tool_name);
  void record(int32_t tool, double duration_s);
  /// [<= kMaxSamples] durations of the tool, oldest overwritten first (unordered).
  const std::vector<double>& samples(int32_t tool) const;
  /// Mean over every tool's samples; < 0 when none was seen.
  double mean_s() const;
  int32_t num_tools() const { return static_cast<int32_t>(samples_.size()); }

 private:
  std::unordered_map<std::string, int32_t> ids_;
  std::vector<std::vector<double>> samples_;  // [tool][sample]
  std::vector<size_t> next_;                  // [tool] ring position once full
  double sum_s_ = 0;                          // over the samples held
  int64_t num_held_ = 0;
};

/// Continuum's cost-benefit rule (arXiv 2511.02230, docs/baselines.md): the TTL tau that
/// maximizes  U(tau) = P(T <= tau) * benefit_s - cost_s_per_s * E[min(T, tau)]
/// over the tool-duration distribution T: the pin saves `benefit_s` (reload plus queueing) if
/// the tool returns within tau, and costs `cost_s_per_s` for every second it holds memory.
/// `samples` is T's empirical distribution; with fewer than kMinSamples of them T is taken as
/// exponential with mean `prior_mean_s` (the paper's cold start). Returns 0 (do not pin) when
/// no tau > 0 has U > 0, or when there are too few samples and no prior (prior_mean_s < 0).
double continuum_ttl_s(const std::vector<double>& samples, double prior_mean_s, double benefit_s,
                       double cost_s_per_s);

/// Samples a TTL decision needs before it trusts them over the cold-start prior.
constexpr size_t kMinTtlSamples = 3;

}  // namespace infercept
