#include "infercept/output_lengths.h"

#include <algorithm>
#include <string>

#include "infercept/errors.h"

namespace infercept {

int32_t OutputLengths::length_bucket(int32_t num_prompt_tokens) {
  if (num_prompt_tokens <= 0) {
    throw InvalidArgumentError("num_prompt_tokens must be > 0, got " + std::to_string(num_prompt_tokens));
  }
  // floor(2 log2 n): the octave's bit, then whether n is past its sqrt(2) point.
  const int32_t octave = 31 - __builtin_clz(static_cast<uint32_t>(num_prompt_tokens));
  const double upper_half = static_cast<double>(uint64_t{1} << octave) * 1.4142135623730951;
  return 2 * octave + (static_cast<double>(num_prompt_tokens) >= upper_half ? 1 : 0);
}

void OutputLengths::record(BlockHash program_class, int32_t num_prompt_tokens,
                           const std::vector<int32_t>& turn_outputs) {
  const auto bucket = static_cast<size_t>(length_bucket(num_prompt_tokens));  // throws on <= 0
  if (turn_outputs.empty()) return;
  for (int32_t tokens : turn_outputs) {
    if (tokens < 0) {
      throw InvalidArgumentError("a turn's output must be >= 0 tokens, got " + std::to_string(tokens));
    }
  }
  ++num_programs_;
  teach(all_, turn_outputs);
  if (buckets_.size() <= bucket) buckets_.resize(bucket + 1);
  teach(buckets_[bucket], turn_outputs);
  if (program_class == 0) return;
  if (classes_.count(program_class) == 0 && classes_.size() >= kMaxClasses) forget_oldest();
  Table& table = classes_[program_class];
  teach(table, turn_outputs);
  table.last_taught = num_programs_;
}

void OutputLengths::teach(Table& table, const std::vector<int32_t>& turn_outputs) {
  const auto num_turns = static_cast<int32_t>(turn_outputs.size());
  if (table.turns.size() < static_cast<size_t>(std::min(num_turns, kMaxTurns))) {
    table.turns.resize(static_cast<size_t>(std::min(num_turns, kMaxTurns)));
  }
  // Remaining work from turn k = the suffix sum; turns past kMaxTurns - 1 each teach the last
  // bucket (a long program reaches it several times, once per turn it has there).
  double remaining = 0;
  for (int32_t k = num_turns - 1; k >= 0; --k) {
    remaining += turn_outputs[static_cast<size_t>(k)];
    Turn& turn = table.turns[static_cast<size_t>(std::min(k, kMaxTurns - 1))];
    ++turn.num_samples;
    const double weight = 1.0 / static_cast<double>(std::min(turn.num_samples, kWindow));
    turn.mean_tokens += (remaining - turn.mean_tokens) * weight;
  }
}

double OutputLengths::mean_at(const Table& table, int32_t turn) {
  const size_t k = static_cast<size_t>(std::min(turn, kMaxTurns - 1));
  if (k >= table.turns.size() || table.turns[k].num_samples < kMinSamples) return -1;
  return table.turns[k].mean_tokens;
}

double OutputLengths::predict(BlockHash program_class, int32_t num_prompt_tokens, int32_t turn) const {
  if (turn < 0) throw InvalidArgumentError("turn must be >= 0, got " + std::to_string(turn));
  const auto bucket = static_cast<size_t>(length_bucket(num_prompt_tokens));
  if (program_class != 0) {
    auto it = classes_.find(program_class);
    if (it != classes_.end()) {
      const double own = mean_at(it->second, turn);
      if (own >= 0) return own;
    }
  }
  if (bucket < buckets_.size()) {
    const double by_length = mean_at(buckets_[bucket], turn);
    if (by_length >= 0) return by_length;
  }
  return mean_at(all_, turn);
}

void OutputLengths::forget_oldest() {
  auto oldest = std::min_element(classes_.begin(), classes_.end(), [](const auto& a, const auto& b) {
    return a.second.last_taught < b.second.last_taught;
  });
  classes_.erase(oldest);
}

}  // namespace infercept
