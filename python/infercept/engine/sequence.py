"""The engine's Python-side record of one request: its tokens, text and pending pauses.

The native scheduler counts tokens and owns blocks; this record holds what it does not: the
token ids themselves, the decoded text, the sampling parameters and the open intercept. The
two agree on one invariant: ``len(token_ids)`` is the request's context length in the core.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from infercept.engine.detokenizer import IncrementalDetokenizer
from infercept.engine.outputs import InterceptRecord, RequestOutput
from infercept.engine.stop import StopDecision, check_stop
from infercept.model import Tokenizer
from infercept.sampling import SamplingParams, ScriptedIntercept
from infercept.tools.parser import ParseResult, ToolCallError, ToolCallParser, find_new_call


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
        parsed_chars: Text length the tool-call parser has already searched.
        checked_chars: Text length already searched for stop strings.
        paused_at_s: When the open intercept began.
        rewrite_from: Where ``token_ids`` stops agreeing with the core's copy: the last
            sampled token was re-tokenized (``trim_after``), and the core learns the new tail
            with the next resume. None when they agree.
    """

    output: RequestOutput
    params: SamplingParams
    token_ids: list[int]
    generated: list[int] = field(default_factory=list)
    server_tools: bool = False
    client_tools: frozenset[str] = frozenset()
    scripted: deque[ScriptedIntercept] = field(default_factory=deque)
    parse_from: int = 0
    parsed_chars: int = 0
    checked_chars: int = 0
    paused_at_s: float = 0.0
    rewrite_from: int | None = None
    # Owns output.token_ids and output.text's growth; built on the first output token.
    _detokenizer: IncrementalDetokenizer | None = field(default=None, repr=False)
    _cut_at_stop_string: bool = False

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

    def _append_output(self, token_ids: list[int], tokenizer: Tokenizer) -> None:
        """Feeds the tokens just added to the context to the detokenizer, which decodes only a
        window of the last few and owns ``output.token_ids``."""
        if self._detokenizer is None:
            self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
            self.output.token_ids = self._detokenizer.token_ids
            token_ids = self.token_ids[self.num_prompt_tokens:]
        self._detokenizer.append(token_ids)
        self.output.text = self._detokenizer.text

    def append_sampled(self, token_id: int, tokenizer: Tokenizer, now_s: float,
                       max_model_len: int) -> StopDecision:
        """Adds a sampled token and decides whether the request stops on it."""
        self.token_ids.append(token_id)
        self.generated.append(token_id)
        self.output.num_generated_tokens = len(self.generated)
        if self.output.first_token_s is None:
            self.output.first_token_s = now_s
        self._append_output([token_id], tokenizer)
        decision = check_stop(self.generated, self.output.text, self.params,
                              tokenizer.eos_token_id, self.checked_chars)
        self.checked_chars = len(self.output.text)
        if not decision.should_stop and len(self.token_ids) >= max_model_len:
            decision = StopDecision(True, "length", self.output.text)
        if decision.stop_string is not None:
            self._cut_at_stop_string = True
            self.output.text = decision.text
        elif decision.should_stop:
            decision = StopDecision(True, decision.reason, self._final_text())
        return decision

    def find_tool_call(self, parser: ToolCallParser, errors_are_text: bool = False
                       ) -> ParseResult | None:
        """Returns the first complete tool call past ``parse_from``, or None.

        The parser is fed only the text that arrived since its last search; a call found moves
        ``parse_from`` past it.

        Args:
            parser: Finds calls in the text.
            errors_are_text: A malformed call is not a call: its close tag is text, and the
                call ends at a later one (under a grammar still in force the close tag sits
                inside a JSON string the grammar keeps open).
        """
        text = self.output.text
        if len(text) == self.parsed_chars:
            return None
        found = find_new_call(parser, text, self.parse_from, self.parsed_chars)
        self.parsed_chars = len(text)
        if isinstance(found, ToolCallError) and errors_are_text:
            # Searched up to the ignored close tag; the call may still end past it.
            self.parsed_chars = found.span[1]
            return None
        if found is not None:
            # Text past the call was not searched for a second one yet.
            self.parse_from = self.parsed_chars = found.span[1]
        return found

    def trim_after(self, end: int, tokenizer: Tokenizer) -> None:
        """Drops text the last sampled token carried past offset ``end`` of ``output.text``.

        A token can straddle the end of a tool call ("</tool_call" + "><"); the tool's output
        must follow the call, not the stray characters. The last sampled token's KV is not
        computed yet (it is the next step's input), so it can be re-tokenized freely; the
        scheduler learns the changed count when the request resumes.
        """
        excess = len(self.output.text) - end
        if excess <= 0:
            return
        piece = tokenizer.decode(self.token_ids[-1:], skip_special_tokens=True)
        if excess >= len(piece):
            return  # the stray text is not all in the last token: leave the tokens as sampled
        replacement = tokenizer.encode(piece[:len(piece) - excess], add_special_tokens=False)
        if not replacement:
            return
        if self.rewrite_from is None:
            self.rewrite_from = len(self.token_ids) - 1
        self.token_ids[-1:] = replacement
        assert self._detokenizer is not None  # the last sampled token went through it
        self._detokenizer.replace_last(replacement)
        self.output.text = self._detokenizer.text
        self.parsed_chars = min(self.parsed_chars, len(self.output.text))

    def append_tool_tokens(self, token_ids: list[int], tokenizer: Tokenizer) -> tuple[list[int], int]:
        """Splices a tool's output into the context; searches for stops and calls resume after it.

        Returns:
            The tokens the core must append and how many of its last tokens they replace (a
            re-tokenized last sampled token), for ``Scheduler.resume``.
        """
        start = len(self.token_ids) if self.rewrite_from is None else self.rewrite_from
        num_replaced = 0 if self.rewrite_from is None else 1
        self.token_ids.extend(token_ids)
        self._append_output(token_ids, tokenizer)
        self.parse_from = self.parsed_chars = self.checked_chars = len(self.output.text)
        self.rewrite_from = None
        return self.token_ids[start:], num_replaced

    def _final_text(self) -> str:
        """The output text once no token follows: held-back bytes show as a full decode does."""
        if self._detokenizer is not None and not self._cut_at_stop_string:
            self._detokenizer.flush()
            self.output.text = self._detokenizer.text
        return self.output.text

    def finish(self, reason: str, now_s: float, error: str | None = None) -> None:
        self._final_text()
        self.output.finished = True
        self.output.paused = False
        self.output.finish_reason = reason  # type: ignore[assignment]
        self.output.finish_s = now_s
        self.output.error = error
