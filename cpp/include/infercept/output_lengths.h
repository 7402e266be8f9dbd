#pragma once
// What finished programs went on to generate after each of their turns, per program class: the
// output-length predictor the ranked queue uses when the caller gives no prediction.
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "infercept/block_hash.h"

namespace infercept {

/// Learned online from finished programs (a program is one request across its tool calls; its
/// turn k is what it generated between intercepts k - 1 and k). For every class and turn k it
/// keeps the mean, over programs that reached turn k, of the tokens they generated from turn k
/// to their end: the expected remaining work of a program that has just reached turn k, which
/// is what a shortest-remaining-work ranking wants (LAMPS, arXiv 2410.18248, ranks by a learned
/// model's prediction of the same quantity). Three tables answer, the first with enough
/// programs at the turn winning:
///   1. the program's class, a content key of the prompt's head (Scheduler: the hash of its
///      first blocks, so programs of one app share it; 0: unknown, never a class);
///   2. its prompt length's bucket (half an octave wide): requests of one kind tend to arrive
///      with prompts of one size, and a counts-only request has nothing else;
///   3. all programs.
class OutputLengths {
 public:
  /// Turns from this one on share one entry (long programs are rare; their tail is one bucket).
  static constexpr int32_t kMaxTurns = 64;
  /// The mean weighs about the latest kWindow programs (an exponential average past that), so
  /// the prediction follows a workload that drifts.
  static constexpr int64_t kWindow = 256;
  /// Samples a table needs at a turn before its mean is trusted (a class's, else all classes').
  static constexpr int64_t kMinSamples = 3;
  /// Classes kept; past this the least recently taught is forgotten (bounded memory under
  /// prompts that never repeat).
  static constexpr size_t kMaxClasses = 4096;

  /// Learns from a finished program with a prompt of `num_prompt_tokens` (> 0):
  /// turn_outputs[k] = tokens generated in its turn k.
  void record(BlockHash program_class, int32_t num_prompt_tokens, const std::vector<int32_t>& turn_outputs);
  /// Expected tokens such a program generates from turn `turn` (>= 0) to its end; < 0 when no
  /// table has kMinSamples at that turn.
  double predict(BlockHash program_class, int32_t num_prompt_tokens, int32_t turn) const;
  /// The prompt-length bucket of a prompt: 2 log2(num_prompt_tokens), rounded down.
  static int32_t length_bucket(int32_t num_prompt_tokens);
  int64_t num_programs() const { return num_programs_; }
  size_t num_classes() const { return classes_.size(); }

 private:
  struct Turn {
    double mean_tokens = 0;
    int64_t num_samples = 0;  // programs that reached the turn (the last bucket: their turns there)
  };
  struct Table {
    std::vector<Turn> turns;  // [min(turn, kMaxTurns - 1)]
    int64_t last_taught = 0;  // num_programs_ when it last learned
  };
  static void teach(Table& table, const std::vector<int32_t>& turn_outputs);
  static double mean_at(const Table& table, int32_t turn);
  void forget_oldest();

  std::unordered_map<BlockHash, Table> classes_;
  std::vector<Table> buckets_;  // [length_bucket]: at most 62 (int32 prompts)
  Table all_;
  int64_t num_programs_ = 0;
};

}  // namespace infercept
