"""The engine's Python-side record of one request: its tokens, text and pending pauses.

The native scheduler counts tokens and owns blocks; this record holds what it does not: the
token ids themselves, the decoded text, the sampling parameters and the open intercept. The
two agree on one invariant: ``len(token_ids)`` is the request's context length in the core.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from infercept.engine.outputs import InterceptRecord, RequestOutput
from infercept.model import Tokenizer
from infercept.sampling import SamplingParams, ScriptedIntercept, StopDecision, check_stop


@dataclass
class Sequence:
    """One request as the engine tracks it.

    Attributes:
        output: What callers see; updated in place as the request advances.
        params: How it samples and stops.
        token_ids: The whole context: prompt, generated and tool tokens.
        generated: The tokens the model sampled (what ``max_tokens`` counts).
        server_tools: Whether calls to the engine's registered tools run inside the engine.
        client_tools: Tool names the caller runs itself (the request pauses for them).
        scripted: The scripted intercepts still ahead, by ``after_tokens``.
        parse_from: Offset in ``output.text`` where the search for the next tool call starts.
        checked_chars: Text length already searched for stop strings.
        paused_at_s: When the open intercept began.
    """

    output: RequestOutput
    params: SamplingParams
    token_ids: list[int]
    generated: list[int] = field(default_factory=list)
    server_tools: bool = False
    client_tools: frozenset[str] = frozenset()
    scripted: deque[ScriptedIntercept] = field(default_factory=deque)
    parse_from: int = 0
    checked_chars: int = 0
    paused_at_s: float = 0.0

    @property
    def request_id(self) -> int:
        return self.output.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.output.prompt_token_ids)

    @property
    def open_intercept(self) -> InterceptRecord | None:
        """The pause in progress, if any."""
        if self.output.intercepts and self.output.intercepts[-1].duration_s is None:
            return self.output.intercepts[-1]
        return None

    def refresh_text(self, tokenizer: Tokenizer) -> None:
        """Decodes everything after the prompt into ``output.text``."""
        self.output.token_ids = self.token_ids[self.num_prompt_tokens:]
        self.output.text = tokenizer.decode(self.output.token_ids, skip_special_tokens=True)

    def append_sampled(self, token_id: int, tokenizer: Tokenizer, now_s: float,
                       max_model_len: int) -> StopDecision:
        """Adds a sampled token and decides whether the request stops on it."""
        self.token_ids.append(token_id)
        self.generated.append(token_id)
        self.output.num_generated_tokens = len(self.generated)
        if self.output.first_token_s is None:
            self.output.first_token_s = now_s
        self.refresh_text(tokenizer)
        decision = check_stop(self.generated, self.output.text, self.params,
                              tokenizer.eos_token_id, self.checked_chars)
        self.checked_chars = len(self.output.text)
        if not decision.should_stop and len(self.token_ids) >= max_model_len:
            decision = StopDecision(True, "length", self.output.text)
        self.output.text = decision.text
        return decision

    def append_tool_tokens(self, token_ids: list[int], tokenizer: Tokenizer) -> None:
        """Splices a tool's output into the context; searches for stops and calls resume after it."""
        self.token_ids.extend(token_ids)
        self.refresh_text(tokenizer)
        self.parse_from = self.checked_chars = len(self.output.text)

    def finish(self, reason: str, now_s: float, error: str | None = None) -> None:
        self.output.finished = True
        self.output.paused = False
        self.output.finish_reason = reason  # type: ignore[assignment]
        self.output.finish_s = now_s
        self.output.error = error
