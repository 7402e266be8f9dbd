#include "infercept/request.h"

#include <string>

#include "infercept/errors.h"

namespace infercept {

const char* to_string(RequestState state) {
  switch (state) {
    case RequestState::kWaiting: return "waiting";
    case RequestState::kRunning: return "running";
    case RequestState::kPreserved: return "preserved";
    case RequestState::kSwappingOut: return "swapping_out";
    case RequestState::kSwapped: return "swapped";
    case RequestState::kDiscarded: return "discarded";
    case RequestState::kSwappingIn: return "swapping_in";
    case RequestState::kRecomputing: return "recomputing";
    case RequestState::kFinished: return "finished";
    case RequestState::kAborted: return "aborted";
  }
  return "unknown";
}

bool can_transition(RequestState from, RequestState to) {
  using S = RequestState;
  if (is_terminal(from)) return false;
  if (to == S::kAborted) return true;
  switch (from) {
    case S::kWaiting:
      // Swapping in: admitted with a prefix cached on the host.
      return to == S::kRunning || to == S::kRecomputing || to == S::kSwappingIn;
    case S::kRunning:
    case S::kRecomputing:
      // Recomputing requests can be preempted but never intercepted or finished: they have not
      // sampled since they resumed.
      if (to == S::kPreserved || to == S::kFinished) return from == S::kRunning;
      // Recomputing becomes running once its KV is rebuilt; running to running is no move.
      if (to == S::kRunning) return from == S::kRecomputing;
      return to == S::kSwappingOut || to == S::kDiscarded;
    case S::kPreserved:
      return to == S::kSwappingOut || to == S::kDiscarded || to == S::kRunning;
    case S::kSwappingOut:
      // Back to preserved when the tool returns before any block has moved.
      return to == S::kSwapped || to == S::kSwappingIn || to == S::kDiscarded || to == S::kPreserved;
    case S::kSwapped:
      // Back to swapping out: device blocks it shared became its own when the others let go.
      return to == S::kSwappingIn || to == S::kDiscarded || to == S::kSwappingOut;
    case S::kDiscarded:
      return to == S::kRecomputing || to == S::kRunning || to == S::kWaiting || to == S::kSwappingIn;
    case S::kSwappingIn:
      // Back to recomputing when it was preempted halfway through a recompute; back out to the
      // host when memory pressure evicts it before it has fully arrived.
      return to == S::kRunning || to == S::kRecomputing || to == S::kDiscarded || to == S::kSwappingOut;
    default:
      return false;
  }
}

void Request::transition(RequestState to) {
  if (!can_transition(state, to)) {
    throw StateError("request " + std::to_string(id) + " cannot go from " + to_string(state) +
                     " to " + to_string(to));
  }
  state = to;
}

}  // namespace infercept
