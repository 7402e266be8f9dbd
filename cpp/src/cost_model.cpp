#include "infercept/cost_model.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "infercept/errors.h"

namespace infercept {
namespace {

using nlohmann::json;

json fit_to_json(const AffineFit& fit) {
  json samples = json::array();
  for (const auto& [num_tokens, seconds] : fit.samples) samples.push_back({num_tokens, seconds});
  return {{"intercept_s", fit.intercept_s}, {"slope_s_per_token", fit.slope_s_per_token}, {"samples", samples}};
}

AffineFit fit_from_json(const json& j, const char* field) {
  if (!j.contains(field) || !j[field].is_object()) {
    throw InvalidArgumentError(std::string("cost profile is missing the object '") + field + "'");
  }
  const json& f = j[field];
  AffineFit fit;
  for (const char* key : {"intercept_s", "slope_s_per_token"}) {
    if (!f.contains(key) || !f[key].is_number()) {
      throw InvalidArgumentError(std::string("cost profile field '") + field + "." + key +
                                 "' is missing or not a number");
    }
  }
  fit.intercept_s = f["intercept_s"].get<double>();
  fit.slope_s_per_token = f["slope_s_per_token"].get<double>();
  if (fit.intercept_s < 0 || fit.slope_s_per_token < 0) {
    throw InvalidArgumentError(std::string("cost profile field '") + field +
                               "' has a negative coefficient: intercept_s=" + f["intercept_s"].dump() +
                               ", slope_s_per_token=" + f["slope_s_per_token"].dump());
  }
  if (f.contains("samples")) {
    for (const json& s : f["samples"]) fit.samples.emplace_back(s.at(0).get<double>(), s.at(1).get<double>());
  }
  return fit;
}

// forward_points: [[num_tokens, seconds], ...], checked by CostModel::check_forward_points.
std::vector<std::pair<double, double>> points_from_json(const json& j) {
  std::vector<std::pair<double, double>> points;
  bool pairs = j.is_array();
  for (size_t i = 0; pairs && i < j.size(); ++i) {
    const json& p = j[i];
    pairs = p.is_array() && p.size() == 2 && p[0].is_number() && p[1].is_number();
    if (pairs) points.emplace_back(p[0].get<double>(), p[1].get<double>());
  }
  if (!pairs) {
    throw InvalidArgumentError(
        "cost profile field 'forward_points' must be a list of [num_tokens, seconds] pairs, got " + j.dump());
  }
  CostModel::check_forward_points(points);
  return points;
}

// K and V, every layer, every hidden unit.
int64_t kv_bytes_for_shape(int64_t num_layers, int64_t hidden_size, int64_t bytes_per_value) {
  return 2 * num_layers * hidden_size * bytes_per_value;
}

}  // namespace

AffineFit AffineFit::fit(const std::vector<std::pair<double, double>>& samples) {
  double n = static_cast<double>(samples.size());
  double sum_x = 0, sum_y = 0;
  for (const auto& [x, y] : samples) sum_x += x, sum_y += y;
  double mean_x = sum_x / n, mean_y = sum_y / n;
  double sxx = 0, sxy = 0;
  for (const auto& [x, y] : samples) sxx += (x - mean_x) * (x - mean_x), sxy += (x - mean_x) * (y - mean_y);
  if (samples.size() < 2 || sxx <= 0) {
    throw InvalidArgumentError("an affine fit needs samples at two or more distinct token counts, got " +
                               std::to_string(samples.size()) + " samples");
  }
  AffineFit fit;
  // A negative fitted intercept or slope is measurement noise around zero: clamp, and keep the
  // line through the mean so the fit still matches the samples on average.
  fit.slope_s_per_token = std::max(0.0, sxy / sxx);
  fit.intercept_s = std::max(0.0, mean_y - fit.slope_s_per_token * mean_x);
  fit.samples = samples;
  return fit;
}

void CostModel::check_forward_points(const std::vector<std::pair<double, double>>& points) {
  for (size_t i = 0; i < points.size(); ++i) {
    const auto& [num_tokens, seconds] = points[i];
    bool ascends = i == 0 || (num_tokens > points[i - 1].first && seconds >= points[i - 1].second);
    if (num_tokens <= 0 || seconds < 0 || !ascends) {
      throw InvalidArgumentError("forward_points must ascend (more tokens, no less time) with num_tokens > 0 and "
                                 "seconds >= 0; point " + std::to_string(i) + " is (" + std::to_string(num_tokens) +
                                 ", " + std::to_string(seconds) + ")");
    }
  }
}

double CostModel::forward_time_s(double num_tokens) const {
  if (forward_points.size() < 2) return forward(num_tokens);
  if (num_tokens <= forward_points.front().first) return forward_points.front().second;
  // The segment that holds num_tokens, or the last one to extrapolate from.
  size_t hi = 1;
  while (hi + 1 < forward_points.size() && forward_points[hi].first < num_tokens) ++hi;
  const auto& [n0, t0] = forward_points[hi - 1];
  const auto& [n1, t1] = forward_points[hi];
  return t0 + (t1 - t0) * (num_tokens - n0) / (n1 - n0);
}

int64_t CostModel::swap_budget_tokens(int64_t num_batched_tokens, int64_t num_context_tokens) const {
  double hide_s = step_time_s(static_cast<double>(num_batched_tokens), static_cast<double>(num_context_tokens)) -
                  swap.intercept_s;
  if (hide_s <= 0) return 0;
  if (swap.slope_s_per_token <= 0) return kv_capacity_tokens;  // free copies: no limit but memory
  return static_cast<int64_t>(std::floor(hide_s / swap.slope_s_per_token));
}

std::string CostModel::to_json() const {
  json j = {{"name", name},
            {"source", source},
            {"forward", fit_to_json(forward)},
            {"forward_points", json(forward_points)},
            {"attention_s_per_context_token", attention_s_per_context_token},
            {"swap", fit_to_json(swap)},
            {"kv_bytes_per_token", kv_bytes_per_token},
            {"saturation_tokens", saturation_tokens},
            {"kv_capacity_tokens", kv_capacity_tokens}};
  return j.dump(2);
}

CostModel CostModel::from_json(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    throw InvalidArgumentError(std::string("cost profile is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw InvalidArgumentError("cost profile must be a JSON object");
  CostModel model;
  model.name = j.value("name", "");
  model.source = j.value("source", "");
  model.forward = fit_from_json(j, "forward");
  if (j.contains("forward_points")) model.forward_points = points_from_json(j["forward_points"]);
  if (j.contains("attention_s_per_context_token")) {
    const json& value = j["attention_s_per_context_token"];
    if (!value.is_number() || value.get<double>() < 0) {
      throw InvalidArgumentError("cost profile field 'attention_s_per_context_token' must be a number >= 0, got " +
                                 value.dump());
    }
    model.attention_s_per_context_token = value.get<double>();
  }
  model.swap = fit_from_json(j, "swap");
  for (const char* key : {"kv_bytes_per_token", "saturation_tokens", "kv_capacity_tokens"}) {
    if (!j.contains(key) || !j[key].is_number_integer() || j[key].get<int64_t>() <= 0) {
      throw InvalidArgumentError(std::string("cost profile field '") + key + "' must be a positive integer, got " +
                                 (j.contains(key) ? j[key].dump() : std::string("nothing")));
    }
  }
  model.kv_bytes_per_token = j["kv_bytes_per_token"].get<int64_t>();
  model.saturation_tokens = j["saturation_tokens"].get<int32_t>();
  model.kv_capacity_tokens = j["kv_capacity_tokens"].get<int64_t>();
  return model;
}

void CostModel::save(const std::string& path) const {
  std::ofstream out(path);
  if (!out) throw InvalidArgumentError("cannot write cost profile to '" + path + "'");
  out << to_json() << "\n";
}

CostModel CostModel::load(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InvalidArgumentError("cannot read cost profile '" + path + "'");
  std::stringstream text;
  text << in.rdbuf();
  try {
    return from_json(text.str());
  } catch (const InvalidArgumentError& e) {
    throw InvalidArgumentError("'" + path + "': " + e.what());
  }
}

std::vector<std::string> CostModel::builtin_names() {
  return {"gptj-6b-a100", "vicuna-13b-2xa100", "gptj-6b-a100+attn", "vicuna-13b-2xa100+attn"};
}

// Published constants, not measurements of this machine. The forward fits are the paper's
// iteration-time fits; the rest are stated assumptions about the same setups:
// - host link: PCIe 4.0 x16 at 25 GB/s effective per direction, no fixed cost per copy;
// - KV capacity: 80 GB A100s, 90% of memory for the engine (vLLM's default), minus fp16 weights;
// - S (the saturation point, used as the token budget): 512 batched tokens.
CostModel CostModel::builtin(const std::string& name) {
  constexpr double kPcieBytesPerS = 25e9;
  constexpr double kA100Bytes = 80e9;
  constexpr double kA100HbmBytesPerS = 1.5e12;  // ~75% of the A100 80GB's 2.0 TB/s
  const std::string suffix = "+attn";
  bool with_attention = name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  if (with_attention) {
    CostModel model = builtin(name.substr(0, name.size() - suffix.size()));
    double num_gpus = name.rfind("vicuna", 0) == 0 ? 2 : 1;
    model.name = name;
    model.source += "; plus an assumed attention term: each context token's KV read once per step at " +
                    std::to_string(static_cast<int>(kA100HbmBytesPerS / 1e9)) + " GB/s per GPU";
    model.attention_s_per_context_token = model.kv_bytes_per_token / (kA100HbmBytesPerS * num_gpus);
    return model;
  }
  CostModel model;
  model.name = name;
  model.saturation_tokens = 512;
  if (name == "gptj-6b-a100") {
    model.source = "paper constants (InferCept, ICML 2024): GPT-J-6B, 1x A100, T_fwd = 0.0463 ms/token + 10 ms";
    model.forward.slope_s_per_token = 0.0463e-3;
    model.forward.intercept_s = 10e-3;
    model.kv_bytes_per_token = kv_bytes_for_shape(/*num_layers=*/28, /*hidden_size=*/4096, /*fp16*/ 2);
    double weight_bytes = 6.05e9 * 2;
    model.kv_capacity_tokens = static_cast<int64_t>((0.9 * kA100Bytes - weight_bytes) / model.kv_bytes_per_token);
  } else if (name == "vicuna-13b-2xa100") {
    model.source = "paper constants (InferCept, ICML 2024): Vicuna-13B, 2x A100, T_fwd = 0.0279 ms/token + 15.4 ms";
    model.forward.slope_s_per_token = 0.0279e-3;
    model.forward.intercept_s = 15.4e-3;
    model.kv_bytes_per_token = kv_bytes_for_shape(/*num_layers=*/40, /*hidden_size=*/5120, /*fp16*/ 2);
    double weight_bytes = 13.0e9 * 2;
    model.kv_capacity_tokens = static_cast<int64_t>((0.9 * 2 * kA100Bytes - weight_bytes) / model.kv_bytes_per_token);
  } else {
    throw InvalidArgumentError("unknown built-in profile '" + name +
                               "'; expected gptj-6b-a100 or vicuna-13b-2xa100, optionally with +attn");
  }
  // Two GPUs with tensor parallelism move half the KV each over their own links.
  double num_links = name == "vicuna-13b-2xa100" ? 2 : 1;
  model.swap.slope_s_per_token = model.kv_bytes_per_token / (kPcieBytesPerS * num_links);
  model.swap.intercept_s = 0;
  return model;
}

}  // namespace infercept
