"""Prompt logprobs (``SamplingParams.prompt_logprobs``): each prompt token's log-probability
given the tokens before it, gathered while the prompt is prefilled.

The logits at context position ``p`` predict the token at ``p + 1``, so a request asking for
them needs logits at every prompt position but the last (whose logits the sampler already
takes). The runner asks ``rows(plan)`` for the plan's flat rows that hold such positions, has
the model's head run on them as well, and hands their logits to ``record``; a position is kept
once (a discarded context's recompute, or a preemption's, computes it again and is skipped).
Values are the raw model's ``log_softmax``: no penalty, bias or grammar applies to a prompt
(as in vLLM). A request asking for them takes no prefix-cache hits until it has sampled
(``Scheduler.add_request(skip_reading_prefix_cache=True)``), or the cached positions would
have no logits; its blocks still feed the cache, so n > 1 siblings share them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from infercept._core import StepPlan
from infercept.engine.logits_processors import TokenLogprob


@dataclass
class _PromptState:
    token_ids: np.ndarray          # [L] int64 the prompt
    num_top: int                   # alternatives per position
    # entries[j]: token j's (id, logprob, top) once position j - 1 was computed; entry 0 stays
    # None (the first token has no context).
    entries: list[TokenLogprob | None] = field(default_factory=list)
    filled: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # [L - 1]


class PromptLogprobs:
    """The prompt logprobs of the requests that ask, keyed by request id."""

    def __init__(self) -> None:
        self._states: dict[int, _PromptState] = {}

    def add(self, request_id: int, num_top: int, prompt_token_ids: Sequence[int]) -> None:
        """Starts gathering a request's prompt logprobs (with ``num_top`` alternatives)."""
        tokens = np.asarray(prompt_token_ids, dtype=np.int64)
        self._states[request_id] = _PromptState(
            tokens, num_top, [None] * len(tokens), np.zeros(max(0, len(tokens) - 1), dtype=bool))

    def remove(self, request_id: int) -> None:
        """Forgets a request (no-op if unknown)."""
        self._states.pop(request_id, None)

    def take(self, request_id: int) -> list[TokenLogprob | None] | None:
        """The request's entries, one per prompt token (the first None), and forgets it; None
        for a request that did not ask."""
        state = self._states.pop(request_id, None)
        return None if state is None else state.entries

    def rows(self, plan: StepPlan) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
        """The flat rows of ``plan`` whose logits the asking requests still need.

        Returns:
            ``(rows, targets)``: ``rows`` is ``[R]`` int64 flat token rows; ``targets`` lists,
            in the same order, ``(request_id, positions)`` with ``positions`` the ``[r]``
            context positions of that request's rows (they sum to R).
        """
        if not self._states:
            return np.zeros(0, dtype=np.int64), []
        starts = plan.query_start
        positions = plan.positions
        all_rows, targets = [], []
        for i, request_id in enumerate(plan.request_ids.tolist()):
            state = self._states.get(request_id)
            if state is None or state.filled.all():
                continue
            flat = np.arange(starts[i], starts[i + 1], dtype=np.int64)
            pos = positions[flat]
            keep = pos < len(state.filled)
            keep[keep] = ~state.filled[pos[keep]]
            if keep.any():
                all_rows.append(flat[keep])
                targets.append((request_id, pos[keep]))
        if not all_rows:
            return np.zeros(0, dtype=np.int64), []
        return np.concatenate(all_rows), targets

    def record(self, logits: torch.Tensor, targets: list[tuple[int, np.ndarray]]) -> None:
        """Stores the logprobs of the next prompt tokens.

        Args:
            logits: ``[R, V]`` float32 raw logits of the rows ``rows`` returned.
            targets: What ``rows`` returned with them.
        """
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
        start = 0
        for request_id, positions in targets:
            state = self._states[request_id]
            rows = logprobs[start:start + len(positions)]  # [r, V]
            start += len(positions)
            next_ids = state.token_ids[positions + 1]  # [r]
            chosen = rows.gather(1, torch.from_numpy(next_ids).to(rows.device).unsqueeze(1))
            chosen_lp = chosen.squeeze(1).tolist()
            top_ids: list[list[int]] = [[] for _ in positions]
            top_lps: list[list[float]] = [[] for _ in positions]
            if state.num_top:
                top = torch.topk(rows, state.num_top, dim=1)
                top_ids, top_lps = top.indices.tolist(), top.values.tolist()
            for j, position in enumerate(positions.tolist()):
                state.entries[position + 1] = (int(next_ids[j]), float(chosen_lp[j]),
                                               tuple(zip(top_ids[j], top_lps[j])))
            state.filled[positions] = True
