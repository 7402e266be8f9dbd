// The request state machine (request.h) and its token accounting.
#include "infercept/request.h"

#include <gtest/gtest.h>

#include <set>
#include <string>
#include <utility>
#include <vector>

#include "infercept/errors.h"

namespace infercept {
namespace {

using S = RequestState;

const std::vector<S> kAllStates = {S::kWaiting,   S::kRunning,    S::kPreserved,   S::kSwappingOut, S::kSwapped,
                                   S::kDiscarded, S::kSwappingIn, S::kRecomputing, S::kFinished,    S::kAborted};

// The specification: every legal move, and nothing else.
const std::set<std::pair<S, S>> kLegal = {
    // A new request starts computing; a vllm-resumed one (KV discarded) starts by recomputing.
    {S::kWaiting, S::kRunning},
    {S::kWaiting, S::kRecomputing},
    {S::kWaiting, S::kSwappingIn},  // admitted with a prefix cached on the host
    // Running: a tool call pauses it (preserve, swap or discard), memory pressure preempts it,
    // or it ends.
    {S::kRunning, S::kPreserved},
    {S::kRunning, S::kSwappingOut},
    {S::kRunning, S::kDiscarded},
    {S::kRunning, S::kFinished},
    // Recomputing: done rebuilding, or preempted. It has not sampled, so no tool call or end.
    {S::kRecomputing, S::kRunning},
    {S::kRecomputing, S::kSwappingOut},
    {S::kRecomputing, S::kDiscarded},
    // Preserved: min-waste may later swap or discard it; a resume runs it from its blocks.
    {S::kPreserved, S::kSwappingOut},
    {S::kPreserved, S::kDiscarded},
    {S::kPreserved, S::kRunning},
    // Swapping out: finished moving, resumed halfway (swap the moved part back), discarded, or
    // resumed before any block moved (back to preserved).
    {S::kSwappingOut, S::kSwapped},
    {S::kSwappingOut, S::kSwappingIn},
    {S::kSwappingOut, S::kDiscarded},
    {S::kSwappingOut, S::kPreserved},
    {S::kSwapped, S::kSwappingIn},
    {S::kSwapped, S::kDiscarded},
    {S::kSwapped, S::kSwappingOut},  // shared device blocks became its own
    // Discarded: resumed with recompute, or re-queued as new under vllm.
    {S::kDiscarded, S::kRecomputing},
    {S::kDiscarded, S::kRunning},
    {S::kDiscarded, S::kWaiting},
    {S::kDiscarded, S::kSwappingIn},  // what it let go is cached on the host
    // Swapping in: back on the device (then recomputing if it still owes discarded KV), or
    // reclaimed for memory.
    {S::kSwappingIn, S::kRunning},
    {S::kSwappingIn, S::kRecomputing},
    {S::kSwappingIn, S::kDiscarded},
    {S::kSwappingIn, S::kSwappingOut},
};

bool is_live(S state) { return state != S::kFinished && state != S::kAborted; }

TEST(RequestState, EveryLegalTransitionIsAccepted) {
  for (const auto& [from, to] : kLegal) {
    EXPECT_TRUE(can_transition(from, to)) << to_string(from) << " -> " << to_string(to);
    Request r;
    r.state = from;
    EXPECT_NO_THROW(r.transition(to)) << to_string(from) << " -> " << to_string(to);
    EXPECT_EQ(r.state, to);
  }
}

TEST(RequestState, AnyLiveStateCanBeAborted) {
  for (S from : kAllStates) {
    if (!is_live(from)) continue;
    EXPECT_TRUE(can_transition(from, S::kAborted)) << to_string(from);
  }
}

TEST(RequestState, EveryOtherTransitionIsRejectedWithAStateError) {
  for (S from : kAllStates) {
    for (S to : kAllStates) {
      bool legal = kLegal.count({from, to}) != 0 || (is_live(from) && to == S::kAborted);
      if (legal) continue;
      EXPECT_FALSE(can_transition(from, to)) << to_string(from) << " -> " << to_string(to);
      Request r;
      r.state = from;
      EXPECT_THROW(r.transition(to), StateError) << to_string(from) << " -> " << to_string(to);
      EXPECT_EQ(r.state, from) << "a rejected transition must leave the state unchanged";
    }
  }
}

TEST(RequestState, TerminalStatesAreFinal) {
  for (S from : {S::kFinished, S::kAborted}) {
    for (S to : kAllStates) EXPECT_FALSE(can_transition(from, to)) << to_string(from) << " -> " << to_string(to);
  }
}

TEST(RequestState, RejectedTransitionNamesTheRequestAndBothStates) {
  Request r;
  r.id = 42;
  r.state = S::kSwapped;
  try {
    r.transition(S::kRunning);  // swapped KV must come back in first
    FAIL() << "swapped -> running must be rejected";
  } catch (const StateError& e) {
    std::string message = e.what();
    EXPECT_NE(message.find("42"), std::string::npos) << message;
    EXPECT_NE(message.find("swapped"), std::string::npos) << message;
    EXPECT_NE(message.find("running"), std::string::npos) << message;
  }
}

TEST(RequestState, PredicatesClassifyEveryState) {
  const std::set<S> intercepted = {S::kPreserved, S::kSwappingOut, S::kSwapped, S::kDiscarded};
  const std::set<S> computing = {S::kRunning, S::kRecomputing};
  const std::set<S> terminal = {S::kFinished, S::kAborted};
  for (S state : kAllStates) {
    EXPECT_EQ(is_intercepted(state), intercepted.count(state) != 0) << to_string(state);
    EXPECT_EQ(is_computing(state), computing.count(state) != 0) << to_string(state);
    EXPECT_EQ(is_terminal(state), terminal.count(state) != 0) << to_string(state);
  }
}

TEST(RequestState, NamesAreTheOnesPythonSees) {
  const std::vector<std::string> names = {"waiting",     "running",   "preserved", "swapping_out", "swapped",
                                          "discarded",   "swapping_in", "recomputing", "finished", "aborted"};
  for (size_t i = 0; i < kAllStates.size(); ++i) EXPECT_EQ(to_string(kAllStates[i]), names[i]);
}

// ---- token accounting ---------------------------------------------------------------------

TEST(RequestTokens, ContextIsPromptPlusGeneratedPlusToolTokens) {
  BlockTable kv;
  Request r;
  r.kv = &kv;
  r.num_prompt_tokens = 100;
  r.num_generated_tokens = 7;
  r.num_tool_tokens = 20;
  EXPECT_EQ(r.num_tokens(), 127);
}

TEST(RequestTokens, ComputedTokensAreTheKvHeldAndTheRestIsUncomputed) {
  BlockTable kv;
  Request r;
  r.kv = &kv;
  r.num_prompt_tokens = 100;
  r.num_generated_tokens = 1;  // just sampled: its KV is written by the next step
  kv.num_tokens = 100;
  EXPECT_EQ(r.num_computed_tokens(), 100);
  EXPECT_EQ(r.num_uncomputed_tokens(), 1);
  // The tool returns 20 tokens and the KV was discarded: all 121 must be computed, 100 again.
  r.num_tool_tokens = 20;
  kv.num_tokens = 0;
  kv.num_tokens_to_recompute = 100;
  EXPECT_EQ(r.num_computed_tokens(), 0);
  EXPECT_EQ(r.num_uncomputed_tokens(), 121);
}

TEST(RequestTokens, NewRequestDefaults) {
  Request r;
  EXPECT_EQ(r.state, S::kWaiting);
  EXPECT_FALSE(r.tool_pending);
  EXPECT_LT(r.expected_duration_s, 0) << "no estimate until the caller gives one";
  EXPECT_EQ(r.num_intercepts, 0);
  EXPECT_EQ(r.num_preemptions, 0);
  EXPECT_EQ(r.waste.total_byte_s(), 0);
}

}  // namespace
}  // namespace infercept
