"""What a request does to its logits before sampling: min_tokens, logit_bias and the penalties,
and the log-probabilities it asks to see.

Order, as vLLM v1's sampler: the grammar mask (``structured.py``, applied first by the
runner), then min_tokens (EOS and stop tokens at -inf) and logit_bias, then
repetition_penalty, then frequency and presence penalties. Logprobs are the log_softmax of
the logits after all of these, before temperature, top-k and top-p.

Per-token cost stays off the requests that use none of this: a request gets a row of the
batch-wide counts tensor only when it has a penalty, and each step touches only those rows
with one gather, one scatter-add and a few elementwise ops over ``[P, V]`` (P penalized rows).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from infercept.sampling import SamplingParams

# (token id, logprob) of one alternative; a sampled token's entry is
# (token id, logprob, its top alternatives in descending order).
TopLogprob = tuple[int, float]
TokenLogprob = tuple[int, float, tuple[TopLogprob, ...]]


@dataclass
class _RequestState:
    params: SamplingParams
    num_sampled: int = 0        # tokens sampled since the request was added
    slot: int | None = None     # its row of the counts tensors (penalized requests only)


class LogitsProcessors:
    """Per-request logit processing over one batch, and the logprobs of the sampled tokens.

    Args:
        vocab_size: Columns of the logits.
        eos_token_ids: What min_tokens masks besides a request's ``stop_token_ids``.
        device: Where the logits (and the counts tensors) live.
    """

    def __init__(self, vocab_size: int, eos_token_ids: Iterable[int], device: torch.device
                 ) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted({int(t) for t in eos_token_ids})
        self.device = device
        self._states: dict[int, _RequestState] = {}
        # counts[slot, v]: times token v was sampled (this segment); seen[slot, v]: v is in the
        # prompt, a tool output or an earlier segment (repetition_penalty's "previous tokens").
        self._counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)
        self._seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self._free_slots: list[int] = []

    # ---- per-request state -------------------------------------------------------------------

    def add(self, request_id: int, params: SamplingParams, prompt_token_ids: Sequence[int]
            ) -> None:
        """Registers a request and, when it has penalties, its prompt's tokens."""
        state = _RequestState(params)
        self._states[request_id] = state
        if params.has_penalties:
            state.slot = self._take_slot()
            self.note_context(request_id, prompt_token_ids)

    def set_params(self, request_id: int, params: SamplingParams,
                   context_token_ids: Sequence[int]) -> None:
        """New sampling from a resume on. The whole context so far counts as prompt (a
        follow-up request sees the earlier turns as its prompt); the counts start again."""
        state = self._states.get(request_id)
        if state is None:
            return
        state.params = params
        if not params.has_penalties:
            if state.slot is not None:
                self._free_slots.append(state.slot)
                state.slot = None
            return
        if state.slot is None:
            state.slot = self._take_slot()
        else:
            self._counts[state.slot].zero_()
            self._seen[state.slot].zero_()
        self.note_context(request_id, context_token_ids)

    def note_context(self, request_id: int, token_ids: Sequence[int]) -> None:
        """Tokens added to the context that were not sampled (prompt, tool output)."""
        state = self._states.get(request_id)
        if state is None or state.slot is None or not token_ids:
            return
        ids = torch.tensor(list(token_ids), dtype=torch.int64, device=self.device)
        self._seen[state.slot, ids] = True

    def has_slot(self, request_id: int) -> bool:
        state = self._states.get(request_id)
        return state is not None and state.slot is not None

    def remove(self, request_id: int) -> None:
        state = self._states.pop(request_id, None)
        if state is not None and state.slot is not None:
            self._free_slots.append(state.slot)

    def _take_slot(self) -> int:
        if not self._free_slots:
            old = self._counts.shape[0]
            new = max(8, 2 * old)
            self._counts = torch.cat([self._counts, torch.zeros(
                new - old, self.vocab_size, dtype=torch.int32, device=self.device)])
            self._seen = torch.cat([self._seen, torch.zeros(
                new - old, self.vocab_size, dtype=torch.bool, device=self.device)])
            self._free_slots.extend(range(new - 1, old - 1, -1))
        slot = self._free_slots.pop()
        self._counts[slot].zero_()
        self._seen[slot].zero_()
        return slot

    # ---- the step ----------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor, request_ids: Sequence[int]) -> None:
        """Applies min_tokens, logit_bias and the penalties in place.

        Args:
            logits: ``[B, V]`` float logits, one row per entry of ``request_ids``.
            request_ids: The rows' requests (each registered with ``add``).
        """
        states = [self._states[r] for r in request_ids]
        mask_rows: list[int] = []
        mask_cols: list[int] = []
        bias_rows: list[int] = []
        bias_cols: list[int] = []
        bias_values: list[float] = []
        penalized: list[int] = []
        for row, state in enumerate(states):
            params = state.params
            if state.num_sampled < params.min_tokens:
                stops = {*self.eos_token_ids, *params.stop_token_ids}
                mask_rows += [row] * len(stops)
                mask_cols += sorted(stops)
            if params.logit_bias:
                bias_rows += [row] * len(params.logit_bias)
                bias_cols += params.logit_bias.keys()
                bias_values += params.logit_bias.values()
            if state.slot is not None and params.has_penalties:
                penalized.append(row)
        device = logits.device
        if bias_rows:
            logits.index_put_((torch.tensor(bias_rows, device=device),
                               torch.tensor(bias_cols, device=device)),
                              torch.tensor(bias_values, dtype=logits.dtype, device=device),
                              accumulate=True)
        if mask_rows:
            logits[torch.tensor(mask_rows, device=device),
                   torch.tensor(mask_cols, device=device)] = float("-inf")
        if penalized:
            self._apply_penalties(logits, penalized, [states[r] for r in penalized])

    def _apply_penalties(self, logits: torch.Tensor, rows: list[int],
                         states: list[_RequestState]) -> None:
        device = logits.device
        row_index = torch.tensor(rows, device=device)                                  # [P]
        slots = torch.tensor([s.slot for s in states], device=self.device)            # [P]
        counts = self._counts.index_select(0, slots).to(device)                        # [P, V]
        generated = counts > 0                                                         # [P, V]
        seen = self._seen.index_select(0, slots).to(device) | generated                # [P, V]

        def column(values: list[float]) -> torch.Tensor:                               # [P, 1]
            return torch.tensor(values, dtype=logits.dtype, device=device).unsqueeze(1)

        penalized = logits.index_select(0, row_index)                                  # [P, V]
        repetition = column([s.params.repetition_penalty for s in states])
        # HF/vLLM: a seen token's positive logit is divided by the penalty, a negative one
        # multiplied, so a penalty > 1 always makes it less likely.
        penalized = torch.where(seen, torch.where(penalized > 0, penalized / repetition,
                                                  penalized * repetition), penalized)
        frequency = column([s.params.frequency_penalty for s in states])
        presence = column([s.params.presence_penalty for s in states])
        penalized = penalized - frequency * counts - presence * generated
        logits.index_copy_(0, row_index, penalized)

    def accept(self, request_ids: Sequence[int], token_ids: Sequence[int]) -> None:
        """Counts the tokens just sampled (one per request)."""
        slots: list[int] = []
        tokens: list[int] = []
        for request_id, token in zip(request_ids, token_ids):
            state = self._states[request_id]
            state.num_sampled += 1
            if state.slot is not None:
                slots.append(state.slot)
                tokens.append(token)
        if slots:
            self._counts.index_put_((torch.tensor(slots, device=self.device),
                                     torch.tensor(tokens, device=self.device)),
                                    torch.ones(len(slots), dtype=torch.int32, device=self.device),
                                    accumulate=True)

    def logprobs(self, logits: torch.Tensor, request_ids: Sequence[int],
                 token_ids: Sequence[int]) -> dict[int, TokenLogprob]:
        """The sampled tokens' logprobs and top alternatives, for the requests that ask.

        Args:
            logits: ``[B, V]`` processed logits (what the sampler saw before temperature).
            request_ids, token_ids: The rows' requests and the tokens they sampled.

        Returns:
            request id -> (token id, logprob, top ``params.logprobs`` (id, logprob) pairs).
        """
        rows = [i for i, r in enumerate(request_ids)
                if self._states[r].params.logprobs is not None]
        if not rows:
            return {}
        device = logits.device
        row_index = torch.tensor(rows, device=device)
        logprobs = torch.log_softmax(logits.index_select(0, row_index).float(), dim=1)  # [L, V]
        chosen = torch.tensor([token_ids[i] for i in rows], device=device)
        chosen_lp = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()         # [L]
        k = max(self._states[request_ids[i]].params.logprobs or 0 for i in rows)
        top_ids: list[list[int]] = [[] for _ in rows]
        top_lps: list[list[float]] = [[] for _ in rows]
        if k:
            # Most likely first.
            values, ids = torch.topk(logprobs, k, dim=1)                                 # [L, k]
            top_ids, top_lps = ids.tolist(), values.tolist()
        out: dict[int, TokenLogprob] = {}
        for j, row in enumerate(rows):
            request_id = request_ids[row]
            num_top = self._states[request_id].params.logprobs or 0
            top = tuple(zip(top_ids[j][:num_top], top_lps[j][:num_top]))
            out[request_id] = (int(token_ids[row]), float(chosen_lp[j]), top)
        return out
