#include "infercept/tool_durations.h"

#include <algorithm>
#include <cmath>

#include "infercept/errors.h"

namespace infercept {

int32_t ToolDurations::id(const std::string& tool_name) {
  auto [it, inserted] = ids_.try_emplace(tool_name, static_cast<int32_t>(samples_.size()));
  if (inserted) {
    samples_.emplace_back();
    next_.push_back(0);
  }
  return it->second;
}

void ToolDurations::record(int32_t tool, double duration_s) {
  if (tool < 0 || tool >= num_tools()) {
    throw InvalidArgumentError("unknown tool number " + std::to_string(tool) + "; tools are [0, " +
                               std::to_string(num_tools()) + ")");
  }
  duration_s = std::max(0.0, duration_s);
  std::vector<double>& held = samples_[tool];
  if (held.size() < kMaxSamples) {
    held.push_back(duration_s);
    ++num_held_;
  } else {
    size_t& slot = next_[tool];
    sum_s_ -= held[slot];
    held[slot] = duration_s;
    slot = (slot + 1) % kMaxSamples;
  }
  sum_s_ += duration_s;
}

const std::vector<double>& ToolDurations::samples(int32_t tool) const {
  static const std::vector<double> kNone;
  return tool >= 0 && tool < num_tools() ? samples_[tool] : kNone;
}

double ToolDurations::mean_s() const { return num_held_ > 0 ? sum_s_ / static_cast<double>(num_held_) : -1; }

double continuum_ttl_s(const std::vector<double>& samples, double prior_mean_s, double benefit_s,
                       double cost_s_per_s) {
  std::vector<double> durations;
  if (samples.size() >= kMinTtlSamples) {
    durations = samples;
  } else {
    if (prior_mean_s < 0) return 0;
    // Cold start: an exponential of the prior mean, as the quantiles at (i + 0.5) / n.
    constexpr int kNumQuantiles = 32;
    for (int i = 0; i < kNumQuantiles; ++i) {
      durations.push_back(-prior_mean_s * std::log(1 - (i + 0.5) / kNumQuantiles));
    }
  }
  std::sort(durations.begin(), durations.end());
  // U is a step function in tau that only rises at a sample, while the cost keeps growing:
  // the best tau is one of the samples. Sweep them in order, keeping E[min(T, tau)] running.
  const double n = static_cast<double>(durations.size());
  double best_ttl_s = 0, best_utility = 0;
  double sum_below_s = 0;  // durations <= tau so far
  for (size_t i = 0; i < durations.size(); ++i) {
    double tau = durations[i];
    sum_below_s += tau;
    double returned = static_cast<double>(i + 1) / n;  // P(T <= tau)
    double held_s = (sum_below_s + tau * (n - static_cast<double>(i + 1))) / n;  // E[min(T, tau)]
    double utility = returned * benefit_s - cost_s_per_s * held_s;
    if (utility > best_utility) best_utility = utility, best_ttl_s = tau;
  }
  // A tool that returns at once still needs the pin to outlast the step it returns in.
  return best_utility > 0 ? std::max(best_ttl_s, 1e-6) : 0;
}

}  // namespace infercept
