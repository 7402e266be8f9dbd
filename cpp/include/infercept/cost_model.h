#pragma once
// Iteration and transfer times as functions of token counts, fitted from measured samples:
// T_fwd interpolates measured points where the profile has them (a real forward is far from
// affine at small batches), else is affine like T_swap. The scheduler sizes its swap budget
// and the waste equations from this model; the simulator advances its clock by it.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace infercept {

/// seconds = intercept_s + slope_s_per_token * num_tokens, fitted by least squares.
struct AffineFit {
  double intercept_s = 0;
  double slope_s_per_token = 0;
  std::vector<std::pair<double, double>> samples;  // (num_tokens, seconds) it was fitted to

  double operator()(double num_tokens) const { return intercept_s + slope_s_per_token * num_tokens; }

  /// Least-squares line through (num_tokens, seconds) samples; needs two distinct token counts.
  static AffineFit fit(const std::vector<std::pair<double, double>>& samples);
};

/// T_fwd, T_swap and the memory facts the scheduler needs, for one model on one machine.
struct CostModel {
  std::string name;
  std::string source;               // where the numbers come from: "measured ..." or "paper ..."
  AffineFit forward;                // T_fwd(num_batched_tokens), where no points are given
  /// Measured T_fwd (num_batched_tokens, seconds), attention term removed, ascending in both.
  /// With two or more, T_fwd interpolates them linearly: flat below the first, continuing the
  /// last segment's slope past the last.
  std::vector<std::pair<double, double>> forward_points;
  /// Seconds per context token the batch attends to (reading its KV); 0 in the paper's model,
  /// where T_fwd depends on the batched tokens alone.
  double attention_s_per_context_token = 0;
  AffineFit swap;                   // T_swap(num_tokens), one direction
  int64_t kv_bytes_per_token = 0;   // M: K and V of all layers
  int32_t saturation_tokens = 0;    // S: past it T_fwd grows linearly; the token budget
  int64_t kv_capacity_tokens = 0;   // device KV capacity of the setup the profile describes

  double forward_time_s(double num_tokens) const;
  /// Throws InvalidArgumentError naming the first point that is not positive or not ascending.
  static void check_forward_points(const std::vector<std::pair<double, double>>& points);
  /// T_fwd of a step that computes `num_tokens` and attends over `num_context_tokens` in all.
  double step_time_s(double num_tokens, double num_context_tokens) const {
    return forward_time_s(num_tokens) + attention_s_per_context_token * num_context_tokens;
  }
  double swap_time_s(double num_tokens) const { return num_tokens <= 0 ? 0 : swap(num_tokens); }

  /// N_i with T_swap(N_i) = T_fwd(B_i): tokens one iteration of B_i tokens (attending over
  /// `num_context_tokens`) can hide a copy behind.
  int64_t swap_budget_tokens(int64_t num_batched_tokens, int64_t num_context_tokens = 0) const;

  std::string to_json() const;
  /// Parses a profile; throws InvalidArgumentError naming the missing or bad field.
  static CostModel from_json(const std::string& text);
  void save(const std::string& path) const;
  static CostModel load(const std::string& path);

  /// Profiles built from the InferCept paper's published constants (see cost_model.cpp);
  /// `name` is one of builtin_names(). A "+attn" suffix adds an attention term: reading each
  /// context token's KV once per step at the GPUs' memory bandwidth (an assumption).
  static CostModel builtin(const std::string& name);
  static std::vector<std::string> builtin_names();
};

}  // namespace infercept
