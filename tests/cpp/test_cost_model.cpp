// CostModel: T_fwd (affine, or interpolating measured points) and affine T_swap fitted from
// samples, persisted as JSON, and the swap budget N_i with T_swap(N_i) = T_fwd(B_i) (DESIGN.md §2).
#include "infercept/cost_model.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "infercept/errors.h"

namespace infercept {
namespace {

using Samples = std::vector<std::pair<double, double>>;

// Expects `call` to throw InvalidArgumentError whose message contains every one of `parts`.
template <typename Call>
void expect_invalid_argument_naming(Call call, const std::vector<std::string>& parts) {
  try {
    call();
    ADD_FAILURE() << "expected InvalidArgumentError";
  } catch (const InvalidArgumentError& e) {
    for (const std::string& part : parts) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << "'" << part << "' not in: " << e.what();
    }
  }
}

// A model with round numbers: T_fwd(n) = 10 ms + 0.1 ms/token, T_swap(n) = 2 ms + 7 us/token.
CostModel round_model() {
  CostModel model;
  model.name = "round";
  model.source = "test";
  model.forward.intercept_s = 10e-3;
  model.forward.slope_s_per_token = 0.1e-3;
  model.swap.intercept_s = 2e-3;
  model.swap.slope_s_per_token = 7e-6;
  model.kv_bytes_per_token = 1000;
  model.saturation_tokens = 256;
  model.kv_capacity_tokens = 100000;
  return model;
}

// ---- fitting ------------------------------------------------------------------------------

TEST(AffineFit, RecoversAnExactLine) {
  // seconds = 5 ms + 0.02 ms/token, sampled at 1, 64, 512 and 2048 tokens.
  Samples samples;
  for (double n : {1.0, 64.0, 512.0, 2048.0}) samples.emplace_back(n, 5e-3 + 0.02e-3 * n);
  AffineFit fit = AffineFit::fit(samples);
  EXPECT_NEAR(fit.intercept_s, 5e-3, 1e-12);
  EXPECT_NEAR(fit.slope_s_per_token, 0.02e-3, 1e-15);
  EXPECT_EQ(fit.samples, samples);
  EXPECT_NEAR(fit(1000), 5e-3 + 0.02, 1e-12);
}

TEST(AffineFit, IsTheLeastSquaresLineThroughNoisySamples) {
  // (0, 1), (1, 3), (2, 2), (3, 4): mean x = 1.5, mean y = 2.5, Sxx = 5, Sxy = 4
  // -> slope 0.8, intercept 2.5 - 0.8 * 1.5 = 1.3.
  AffineFit fit = AffineFit::fit({{0, 1}, {1, 3}, {2, 2}, {3, 4}});
  EXPECT_NEAR(fit.slope_s_per_token, 0.8, 1e-12);
  EXPECT_NEAR(fit.intercept_s, 1.3, 1e-12);
}

TEST(AffineFit, ClampsANegativeSlopeToZeroThroughTheMean) {
  // Timing noise around a flat line can fit a falling one; time never falls with more tokens.
  AffineFit fit = AffineFit::fit({{100, 0.012}, {200, 0.011}, {300, 0.010}});
  EXPECT_EQ(fit.slope_s_per_token, 0);
  EXPECT_NEAR(fit.intercept_s, 0.011, 1e-12);  // the mean of the samples
}

TEST(AffineFit, NeedsTwoDistinctTokenCounts) {
  expect_invalid_argument_naming([] { AffineFit::fit({}); }, {"0 samples"});
  expect_invalid_argument_naming([] { AffineFit::fit({{64, 0.01}}); }, {"1 samples"});
  // Repeats of one token count say nothing about the slope.
  expect_invalid_argument_naming([] { AffineFit::fit({{64, 0.01}, {64, 0.011}, {64, 0.012}}); }, {"3 samples"});
}

// ---- persistence --------------------------------------------------------------------------

TEST(CostModelJson, RoundTripsEveryField) {
  CostModel model = round_model();
  model.forward = AffineFit::fit({{1, 0.0101}, {512, 0.0612}});
  model.attention_s_per_context_token = 3e-9;
  model.forward_points = {{1, 0.045}, {4, 0.07}, {64, 0.14}};
  CostModel back = CostModel::from_json(model.to_json());
  EXPECT_EQ(back.name, model.name);
  EXPECT_EQ(back.source, model.source);
  EXPECT_DOUBLE_EQ(back.forward.intercept_s, model.forward.intercept_s);
  EXPECT_DOUBLE_EQ(back.forward.slope_s_per_token, model.forward.slope_s_per_token);
  EXPECT_EQ(back.forward.samples, model.forward.samples);
  EXPECT_EQ(back.forward_points, model.forward_points);
  EXPECT_DOUBLE_EQ(back.attention_s_per_context_token, model.attention_s_per_context_token);
  EXPECT_DOUBLE_EQ(back.swap.intercept_s, model.swap.intercept_s);
  EXPECT_DOUBLE_EQ(back.swap.slope_s_per_token, model.swap.slope_s_per_token);
  EXPECT_EQ(back.kv_bytes_per_token, model.kv_bytes_per_token);
  EXPECT_EQ(back.saturation_tokens, model.saturation_tokens);
  EXPECT_EQ(back.kv_capacity_tokens, model.kv_capacity_tokens);
}

TEST(CostModelJson, SaveThenLoadGivesTheSameModel) {
  const std::string path = ::testing::TempDir() + "infercept_cost_model_roundtrip.json";
  CostModel model = CostModel::builtin("gptj-6b-a100");
  model.save(path);
  CostModel back = CostModel::load(path);
  std::remove(path.c_str());
  EXPECT_EQ(back.to_json(), model.to_json());
}

TEST(CostModelJson, LoadingAMissingFileNamesThePath) {
  const std::string path = ::testing::TempDir() + "no_such_profile.json";
  expect_invalid_argument_naming([&] { CostModel::load(path); }, {path});
}

TEST(CostModelJson, LoadingABadFileNamesThePathAndTheField) {
  const std::string path = ::testing::TempDir() + "infercept_bad_profile.json";
  nlohmann::json j = nlohmann::json::parse(round_model().to_json());
  j.erase("swap");
  std::ofstream(path) << j.dump();
  expect_invalid_argument_naming([&] { CostModel::load(path); }, {path, "swap"});
  std::remove(path.c_str());
}

TEST(CostModelJson, MalformedJsonIsAnInvalidArgument) {
  expect_invalid_argument_naming([] { CostModel::from_json("{not json"); }, {"not valid JSON"});
  expect_invalid_argument_naming([] { CostModel::from_json("[1, 2]"); }, {"JSON object"});
}

TEST(CostModelJson, MissingFitNamesTheField) {
  nlohmann::json j = nlohmann::json::parse(round_model().to_json());
  j.erase("forward");
  expect_invalid_argument_naming([&] { CostModel::from_json(j.dump()); }, {"forward"});
  j = nlohmann::json::parse(round_model().to_json());
  j["swap"].erase("slope_s_per_token");
  expect_invalid_argument_naming([&] { CostModel::from_json(j.dump()); }, {"swap.slope_s_per_token"});
}

TEST(CostModelJson, NegativeCoefficientNamesTheFieldAndTheValue) {
  nlohmann::json j = nlohmann::json::parse(round_model().to_json());
  j["forward"]["slope_s_per_token"] = -0.5;
  expect_invalid_argument_naming([&] { CostModel::from_json(j.dump()); }, {"forward", "-0.5"});
}

TEST(CostModelJson, NonPositiveIntegerFieldsNameTheFieldAndTheValue) {
  for (const char* key : {"kv_bytes_per_token", "saturation_tokens", "kv_capacity_tokens"}) {
    nlohmann::json j = nlohmann::json::parse(round_model().to_json());
    j[key] = -7;
    expect_invalid_argument_naming([&] { CostModel::from_json(j.dump()); }, {key, "-7"});
    j[key] = 1.5;  // a fraction of a byte or token means a broken profile
    expect_invalid_argument_naming([&] { CostModel::from_json(j.dump()); }, {key, "1.5"});
  }
}

TEST(CostModelJson, NegativeAttentionTermNamesTheFieldAndTheValue) {
  nlohmann::json j = nlohmann::json::parse(round_model().to_json());
  j["attention_s_per_context_token"] = -1e-9;
  expect_invalid_argument_naming([&] { CostModel::from_json(j.dump()); },
                                 {"attention_s_per_context_token", "-1e-09"});
}

TEST(CostModelJson, AttentionTermIsOptional) {
  // Profiles written before the attention term existed still load, with the paper's model.
  nlohmann::json j = nlohmann::json::parse(round_model().to_json());
  j.erase("attention_s_per_context_token");
  EXPECT_EQ(CostModel::from_json(j.dump()).attention_s_per_context_token, 0);
}

TEST(CostModelJson, ForwardPointsAreOptional) {
  // Profiles without points (older ones, the paper's) keep the affine T_fwd.
  nlohmann::json j = nlohmann::json::parse(round_model().to_json());
  j.erase("forward_points");
  CostModel model = CostModel::from_json(j.dump());
  EXPECT_TRUE(model.forward_points.empty());
  EXPECT_DOUBLE_EQ(model.forward_time_s(100), 0.02);
}

TEST(CostModelJson, ForwardPointsThatDoNotAscendNameThePoint) {
  nlohmann::json j = nlohmann::json::parse(round_model().to_json());
  j["forward_points"] = {{1, 0.05}, {4, 0.04}};  // more tokens in less time: a broken profile
  expect_invalid_argument_naming([&] { CostModel::from_json(j.dump()); }, {"forward_points", "point 1"});
  j["forward_points"] = {{0, 0.05}, {4, 0.06}};
  expect_invalid_argument_naming([&] { CostModel::from_json(j.dump()); }, {"forward_points", "point 0"});
  j["forward_points"] = {{1, 0.05, 3}};
  expect_invalid_argument_naming([&] { CostModel::from_json(j.dump()); }, {"forward_points", "pairs"});
}

// ---- T_fwd from measured points -----------------------------------------------------------

TEST(ForwardPoints, InterpolateBetweenFlatBelowAndExtrapolatePast) {
  // A CPU forward: the fixed cost, then steep up to a few tokens, then shallower.
  CostModel model = round_model();
  model.forward_points = {{1, 0.045}, {4, 0.075}, {64, 0.135}};
  EXPECT_DOUBLE_EQ(model.forward_time_s(1), 0.045);
  EXPECT_DOUBLE_EQ(model.forward_time_s(2), 0.055);   // a third of the way to 4
  EXPECT_DOUBLE_EQ(model.forward_time_s(34), 0.105);  // half way from 4 to 64
  EXPECT_DOUBLE_EQ(model.forward_time_s(64), 0.135);
  EXPECT_DOUBLE_EQ(model.forward_time_s(124), 0.195);  // the last segment's 1 ms/token goes on
  EXPECT_DOUBLE_EQ(model.forward_time_s(0), 0.045);    // no cheaper than the smallest measured step
  // The attention term adds on top, and the swap budget follows the points.
  model.attention_s_per_context_token = 1e-5;
  EXPECT_DOUBLE_EQ(model.step_time_s(4, 1000), 0.085);
  EXPECT_EQ(model.swap_budget_tokens(4, 1000), static_cast<int64_t>((0.085 - 2e-3) / 7e-6));
}

// ---- built-in profiles --------------------------------------------------------------------

TEST(CostModelBuiltin, GptjOnOneA100UsesThePapersForwardFit) {
  CostModel model = CostModel::builtin("gptj-6b-a100");
  // T_fwd = 0.0463 ms/token + 10 ms.
  EXPECT_DOUBLE_EQ(model.forward.slope_s_per_token, 0.0463e-3);
  EXPECT_DOUBLE_EQ(model.forward.intercept_s, 10e-3);
  EXPECT_NEAR(model.forward_time_s(512), 10e-3 + 512 * 0.0463e-3, 1e-15);
  // M = K and V * 28 layers * 4096 hidden * 2 bytes (fp16) = 458,752 bytes per token.
  EXPECT_EQ(model.kv_bytes_per_token, 2 * 28 * 4096 * 2);
  // PCIe 4.0 x16 at 25 GB/s: 458,752 B / 25e9 B/s = 18.35 us per token, no fixed cost.
  EXPECT_DOUBLE_EQ(model.swap.slope_s_per_token, 458752 / 25e9);
  EXPECT_EQ(model.swap.intercept_s, 0);
  EXPECT_EQ(model.saturation_tokens, 512);
  // (0.9 * 80 GB - 6.05e9 params * 2 B) / 458,752 B = 130,571.6 tokens of KV.
  EXPECT_EQ(model.kv_capacity_tokens, 130571);
  EXPECT_EQ(model.attention_s_per_context_token, 0);
}

TEST(CostModelBuiltin, VicunaOnTwoA100sSplitsTheSwapOverTwoLinks) {
  CostModel model = CostModel::builtin("vicuna-13b-2xa100");
  // T_fwd = 0.0279 ms/token + 15.4 ms.
  EXPECT_DOUBLE_EQ(model.forward.slope_s_per_token, 0.0279e-3);
  EXPECT_DOUBLE_EQ(model.forward.intercept_s, 15.4e-3);
  // M = 2 * 40 layers * 5120 hidden * 2 bytes = 819,200 bytes per token, half per GPU link.
  EXPECT_EQ(model.kv_bytes_per_token, 2 * 40 * 5120 * 2);
  EXPECT_DOUBLE_EQ(model.swap.slope_s_per_token, 819200 / (2 * 25e9));
}

TEST(CostModelBuiltin, AttentionSuffixAddsAKvReadTerm) {
  CostModel plain = CostModel::builtin("gptj-6b-a100");
  CostModel attn = CostModel::builtin("gptj-6b-a100+attn");
  EXPECT_EQ(attn.name, "gptj-6b-a100+attn");
  // Each context token's 458,752 bytes read once per step at an assumed 1.5 TB/s.
  EXPECT_DOUBLE_EQ(attn.attention_s_per_context_token, 458752 / 1.5e12);
  EXPECT_DOUBLE_EQ(attn.forward.slope_s_per_token, plain.forward.slope_s_per_token);
  EXPECT_NEAR(attn.step_time_s(1, 10000) - plain.step_time_s(1, 10000), 10000.0 * 458752 / 1.5e12, 1e-15);
  // Two GPUs read their halves in parallel.
  EXPECT_DOUBLE_EQ(CostModel::builtin("vicuna-13b-2xa100+attn").attention_s_per_context_token,
                   819200 / (2 * 1.5e12));
}

TEST(CostModelBuiltin, EveryListedNameBuilds) {
  for (const std::string& name : CostModel::builtin_names()) {
    CostModel model = CostModel::builtin(name);
    EXPECT_EQ(model.name, name);
    EXPECT_FALSE(model.source.empty()) << name << ": every profile says where its numbers come from";
    EXPECT_GT(model.kv_bytes_per_token, 0) << name;
  }
}

TEST(CostModelBuiltin, UnknownNameIsAnInvalidArgumentNamingIt) {
  expect_invalid_argument_naming([] { CostModel::builtin("llama-70b-h100"); }, {"llama-70b-h100"});
  expect_invalid_argument_naming([] { CostModel::builtin("+attn"); }, {"+attn"});
}

// ---- swap budget --------------------------------------------------------------------------

TEST(SwapBudget, IsWhatTheForwardCanHide) {
  CostModel model = round_model();
  // T_fwd(100) = 10 ms + 100 * 0.1 ms = 20 ms; T_swap(N) = 2 ms + 7 us * N = 20 ms
  // -> N = 18 ms / 7 us = 2571.4 -> 2571 whole tokens.
  EXPECT_EQ(model.swap_budget_tokens(100), 2571);
  int64_t n = model.swap_budget_tokens(100);
  EXPECT_LE(model.swap_time_s(n), model.forward_time_s(100));
  EXPECT_GT(model.swap_time_s(n + 1), model.forward_time_s(100));
}

TEST(SwapBudget, GptjAtTheSaturationPoint) {
  CostModel model = CostModel::builtin("gptj-6b-a100");
  // T_fwd(512) = 10 ms + 512 * 0.0463 ms = 33.7056 ms; / 18.35008 us per token = 1836.8 -> 1836.
  EXPECT_EQ(model.swap_budget_tokens(512), 1836);
  // A lone decode: T_fwd(1) = 10.0463 ms -> 547.5 -> 547 tokens.
  EXPECT_EQ(model.swap_budget_tokens(1), 547);
}

TEST(SwapBudget, GrowsWithTheAttentionTerm) {
  CostModel model = round_model();
  model.attention_s_per_context_token = 1e-6;
  // 10,500 context tokens add 10.5 ms: T_fwd = 30.5 ms; (30.5 - 2) ms / 7 us = 4071.4 -> 4071.
  EXPECT_EQ(model.swap_budget_tokens(100, 10500), 4071);
}

TEST(SwapBudget, IsZeroWhenTheCopysFixedCostExceedsTheForward) {
  CostModel model = round_model();
  model.swap.intercept_s = 50e-3;  // longer than T_fwd(100) = 20 ms
  EXPECT_EQ(model.swap_budget_tokens(100), 0);
}

TEST(SwapBudget, FreeCopiesAreLimitedOnlyByCapacity) {
  CostModel model = round_model();
  model.swap.slope_s_per_token = 0;
  EXPECT_EQ(model.swap_budget_tokens(100), model.kv_capacity_tokens);
}

TEST(SwapTime, MovingNothingTakesNoTime) {
  // The swap fit's fixed cost applies only to a copy that happens.
  EXPECT_EQ(round_model().swap_time_s(0), 0);
  EXPECT_NEAR(round_model().swap_time_s(1000), 2e-3 + 7e-3, 1e-15);
}

}  // namespace
}  // namespace infercept
