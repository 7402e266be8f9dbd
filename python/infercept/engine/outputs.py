"""What the engine reports about a request: its text so far, its tool calls and intercepts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["eos", "stop", "length", "abort", "error"]


@dataclass
class InterceptRecord:
    """One pause of a request: a tool call (server- or client-side) or a scripted intercept.

    Attributes:
        kind: 'tool' (a server tool ran), 'client' (the caller runs it and resumes), or
            'scripted' (a SamplingParams intercept).
        after_tokens: Generated tokens when the request paused.
        name: The tool's name ('' for scripted intercepts).
        arguments: The call's arguments as parsed.
        expected_duration_s: The estimate the scheduler was given (None: it estimates).
        duration_s: How long the pause lasted (None while paused).
        output: The text appended on resume (None while paused or on error).
        error: Why the call failed, if it did.
        kv_actions: The states the request's KV went through while paused, in order:
            'preserved', 'swapping_out', 'swapped', 'discarded', ... (the policy's decisions).
    """

    kind: Literal["tool", "client", "scripted"]
    after_tokens: int
    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    expected_duration_s: float | None = None
    duration_s: float | None = None
    output: str | None = None
    error: str | None = None
    kv_actions: list[str] = field(default_factory=list)


@dataclass
class RequestOutput:
    """A request's state as the engine last reported it.

    Attributes:
        request_id: The engine's id for the request.
        prompt: The prompt text, when the request was given as text.
        prompt_token_ids: The prompt's tokens.
        text: Everything after the prompt: generated text with tool outputs spliced in where
            they were appended (cut before a matched stop string).
        token_ids: The tokens of ``text``: generated and tool tokens, in order.
        num_generated_tokens: Tokens the model sampled (tool tokens excluded).
        finished: Whether the request is done (finished, aborted or failed).
        finish_reason: Why it finished; None while it runs or is paused.
        paused: Waiting for the caller to run a client-side tool and call ``resume``.
        intercepts: Every pause, in order; the last one is the open call while ``paused``.
        error: What went wrong when ``finish_reason`` is 'error'.
        arrival_s, first_token_s, finish_s: Engine-clock timestamps (seconds).
        tool_time_s: Seconds spent paused.
        num_cached_tokens: Prompt tokens whose KV came from the prefix cache (not prefilled).
        logprobs: With ``SamplingParams.logprobs`` set, one entry per sampled token (tool
            tokens have none): ``(token_id, logprob, ((top_id, top_logprob), ...))``, the top
            ``logprobs`` alternatives most likely first (see ``logits_processors.py`` for
            which logits they are taken from).
        prompt_logprobs: With ``SamplingParams.prompt_logprobs`` set, once the prompt is
            prefilled: one entry per prompt token, ``None`` for the first, else ``(token_id,
            logprob, top)`` as in ``logprobs`` (the raw model's log_softmax).
        other_choices: With ``SamplingParams.n > 1`` in the LLM API, the prompt's choices
            1..n-1 (this output is choice 0); see ``choices``.
    """

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    num_generated_tokens: int = 0
    finished: bool = False
    finish_reason: FinishReason | None = None
    paused: bool = False
    intercepts: list[InterceptRecord] = field(default_factory=list)
    error: str | None = None
    arrival_s: float = 0.0
    first_token_s: float | None = None
    finish_s: float | None = None
    tool_time_s: float = 0.0
    num_cached_tokens: int = 0
    logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]] = field(default_factory=list)
    prompt_logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]] | None] | None = None
    other_choices: list[RequestOutput] = field(default_factory=list)

    @property
    def choices(self) -> list[RequestOutput]:
        """The prompt's ``n`` completions in order: this one, then ``other_choices``."""
        return [self, *self.other_choices]

    @property
    def tool_calls(self) -> list[InterceptRecord]:
        """The intercepts that were tool calls (server- or client-side)."""
        return [i for i in self.intercepts if i.kind != "scripted"]
