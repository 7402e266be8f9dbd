"""Augmented-LLM workloads: requests that pause for tools, and the trace they come from.

A workload request is a prompt followed by a chain of segments. In each segment the model
decodes some tokens and then (except in the last) calls a tool, which runs for a while and
returns tokens that are appended to the context before decoding continues.

The trace format is the one the InferCept paper (arXiv 2402.01869) replays, published as
`merged_exp_uniform.json` with the MARS codebase: a JSON object mapping request id -> list of
segments, each either token counts

    {"prompt_tokens": P, "completion_tokens": C, "api_time": T, "api_token_length": R}

(`prompt_tokens` is the whole context when the segment starts) or text

    {"prompt": str, "completion": str, "api_token": str, "api_time": T}

(`prompt` is likewise the whole conversation so far: in the shipped file every later prompt
is exactly the previous prompt + completion + api_token). `api_time` is the intercept
duration in seconds. See `shared/workloads/README.md` for the statistics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

# Kinds the loader can tell apart; the first three come as token counts, the rest as text.
TOKEN_COUNT_KINDS = ("math", "qa", "virtual_env")
TEXT_KINDS = ("chatbot", "image", "tts")
# Fallback kinds for requests without an intercept to judge by: named after their shape.
SHAPE_KINDS = ("token", "text")

# Estimated characters per token when no tokenizer is given: Llama-style and GPT BPE
# vocabularies average about 4 characters per token on English prose.
CHARS_PER_TOKEN_ESTIMATE = 4

# Upper bounds (s) on a request's longest intercept that separate the token-count kinds: a
# calculator answers in microseconds, an ALFWorld step in ~0.05-0.11 s, a Wikipedia lookup
# in ~0.3-1 s.
_MATH_MAX_TOOL_S = 0.01
_VIRTUAL_ENV_MAX_TOOL_S = 0.2

# The instruction the trace's image and TTS requests send to their tool.
_IMAGE_INSTRUCTION = "generate an image"
_TTS_INSTRUCTION = "convert this to text to speech"


class Tokenizer(Protocol):
    """What load_trace needs of a tokenizer (e.g. a Hugging Face one)."""

    def encode(self, text: str) -> list: ...


@dataclass(frozen=True)
class Segment:
    """One stretch of decoding, ended by an intercept unless it is the request's last.

    Attributes:
        completion_tokens: tokens the model decodes in this segment (at least 1).
        tool_duration_s: how long the intercept (tool call) takes; None for the last segment.
        tool_tokens: tokens the tool returns, appended to the context on resume; 0 for the
            last segment.
        tool: the tool's name (agent workloads; per-tool policies such as Continuum's TTL
            learn durations by it); None when the trace does not say, and for the last segment.
    """

    completion_tokens: int
    tool_duration_s: float | None = None
    tool_tokens: int = 0
    tool: str | None = None

    def __post_init__(self) -> None:
        if self.completion_tokens < 1:
            raise ValueError(f"completion_tokens={self.completion_tokens} must be >= 1")
        if self.tool_tokens < 0:
            raise ValueError(f"tool_tokens={self.tool_tokens} must be >= 0")
        if self.tool_duration_s is None:
            if self.tool_tokens != 0:
                raise ValueError(f"tool_tokens={self.tool_tokens} without a tool call")
            if self.tool is not None:
                raise ValueError(f"tool={self.tool!r} without a tool call")
        elif not (math.isfinite(self.tool_duration_s) and self.tool_duration_s >= 0):
            raise ValueError(f"tool_duration_s={self.tool_duration_s} must be finite and >= 0")


@dataclass(frozen=True)
class WorkloadRequest:
    """A request template (or, with `arrival_s` set, an arrival) of an augmented workload.

    Attributes:
        request_id: unique id.
        kind: one of TOKEN_COUNT_KINDS, TEXT_KINDS or SHAPE_KINDS.
        prompt_tokens: tokens of the user prompt.
        segments: every segment but the last ends in an intercept.
        arrival_s: arrival time in seconds from the start of the run.
        app: the application the request belongs to; requests of one app start with the same
            ``shared_prefix_tokens`` tokens (its system prompt and tool schemas). "" for none.
        shared_prefix_tokens: how many of ``prompt_tokens`` are the app's shared prefix (0: the
            prompt is the request's own, as in the paper's trace).
    """

    request_id: str
    kind: str
    prompt_tokens: int
    segments: tuple[Segment, ...]
    arrival_s: float = 0.0
    app: str = ""
    shared_prefix_tokens: int = 0

    def __post_init__(self) -> None:
        where = f"request {self.request_id}"
        if self.prompt_tokens < 1:
            raise ValueError(f"{where}: prompt_tokens={self.prompt_tokens} must be >= 1")
        if not self.segments:
            raise ValueError(f"{where}: has no segments")
        if not 0 <= self.shared_prefix_tokens <= self.prompt_tokens:
            raise ValueError(f"{where}: shared_prefix_tokens={self.shared_prefix_tokens} must be in "
                             f"[0, prompt_tokens={self.prompt_tokens}]")
        if self.shared_prefix_tokens and not self.app:
            raise ValueError(f"{where}: shared_prefix_tokens={self.shared_prefix_tokens} needs an app "
                             "whose programs share it")
        if self.segments[-1].tool_duration_s is not None:
            raise ValueError(f"{where}: the last segment must not call a tool")
        for index, segment in enumerate(self.segments[:-1]):
            if segment.tool_duration_s is None:
                raise ValueError(f"{where}: segment {index} is not the last but calls no tool")

    @property
    def num_intercepts(self) -> int:
        return len(self.segments) - 1

    @property
    def num_output_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.segments)

    @property
    def total_tool_time_s(self) -> float:
        return sum(s.tool_duration_s for s in self.segments[:-1])

    @property
    def max_context_tokens(self) -> int:
        """Context length when the request finishes: prompt + completions + tool returns."""
        return self.prompt_tokens + sum(s.completion_tokens + s.tool_tokens for s in self.segments)


def load_trace(path: str | os.PathLike, tokenizer: Tokenizer | None = None) -> list[WorkloadRequest]:
    """Loads an augmented-LLM trace (format in the module docstring), in file order.

    Token-count segments: the request's prompt is the first segment's `prompt_tokens`. A later
    segment's `prompt_tokens` must be at least the context so far (prompt + earlier completions
    and tool returns); any excess is text the file did not count elsewhere and is added to the
    previous tool return.

    Text segments: the request's prompt is the first segment's `prompt`. A later `prompt` that
    repeats the context so far (previous prompt + completion + api_token, as in the shipped
    file) adds only what follows that context; a later `prompt` that does not repeat it is all
    new text. Added text is counted once, with the previous tool return.

    Text is counted with `len(tokenizer.encode(text))` (so special tokens the tokenizer adds
    are counted: pass one that adds none for exact lengths). Without a tokenizer the count is
    estimated as ceil(len(text) / 4), which is at least 1 for non-empty text: Llama-style and
    GPT BPE tokenizers average about 4 characters per token on English (SmolLM2's gives 4.2 on
    this trace's text), and the paper's counts came from its model's own tokenizer, so only the
    scale has to be right.

    A trailing tool call (the shipped file's virtual_env, image and TTS requests end with one)
    is kept as an intercept and followed by a one-token last segment: the model has to read the
    tool's return before it can finish, and one decode step is the least that takes (the
    paper's replay likewise pauses on such calls and resumes the request). A negative
    `api_token_length` on that trailing call is read as 0: 4 ALFWorld requests have -2 there,
    apparently to make the episode end at the recording model's context window (every ALFWorld
    request's raw counts add up to 2049 tokens).

    The kind is inferred from the content: image and TTS requests send "Generate an image" /
    "Convert this to text to speech" to their tool, other text requests are chatbot; token-count
    requests are classified by their longest intercept (math < 0.01 s, virtual_env < 0.2 s, qa
    otherwise). On the shipped file this agrees with the file's grouping for all but one QA
    request, whose only lookup took 0 s and reads as math. A request without an intercept gets
    its shape, "token" or "text".

    Args:
        path: the JSON trace.
        tokenizer: anything with `encode(str) -> list`; None estimates from characters.

    Returns:
        The requests, with arrival_s = 0.

    Raises:
        ValueError: the file is missing or not JSON, or a request is malformed; the message
            names the request id, the segment and the field.
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw_trace = json.load(f)
    except FileNotFoundError as e:
        raise ValueError(f"trace file {os.fspath(path)!r} does not exist") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"trace file {os.fspath(path)!r} is not valid JSON: {e}") from e
    if not isinstance(raw_trace, dict):
        raise ValueError(f"trace file {os.fspath(path)!r}: top level must map request id -> segments")
    return [_parse_request(str(request_id), raw, tokenizer) for request_id, raw in raw_trace.items()]


def _parse_request(request_id: str, raw_segments: Any, tokenizer: Tokenizer | None) -> WorkloadRequest:
    if not isinstance(raw_segments, list) or not raw_segments:
        raise ValueError(f"request {request_id}: must be a non-empty list of segments")
    for index, raw in enumerate(raw_segments):
        if not isinstance(raw, dict):
            raise ValueError(f"request {request_id}: segment {index} must be an object")
    # The first segment decides the shape; the parsers then require it of every segment.
    first = raw_segments[0]
    if "prompt_tokens" in first or "completion_tokens" in first:
        prompt_tokens, columns = _parse_token_segments(request_id, raw_segments)
    elif "prompt" in first or "completion" in first:
        prompt_tokens, columns = _parse_text_segments(request_id, raw_segments, tokenizer)
    else:
        raise ValueError(
            f"request {request_id}: segment 0 has fields {sorted(first)}; a segment needs "
            "'prompt_tokens' and 'completion_tokens', or 'prompt' and 'completion'"
        )
    segments = []
    for index, fields in enumerate(zip(*columns)):
        try:
            segments.append(Segment(*fields))
        except ValueError as e:
            raise ValueError(f"request {request_id}: segment {index}: {e}") from e
    if segments[-1].tool_duration_s is not None:
        segments.append(Segment(completion_tokens=1))
    return WorkloadRequest(request_id, _infer_kind(raw_segments, segments), prompt_tokens, tuple(segments))


# Per-segment columns: (completion_tokens, tool_duration_s, tool_tokens), one entry a segment.
_Columns = tuple[list[int], list[float | None], list[int]]


def _parse_token_segments(request_id: str, raw_segments: list[dict]) -> tuple[int, _Columns]:
    completion_tokens: list[int] = []
    tool_durations_s: list[float | None] = []
    tool_tokens: list[int] = []
    context_tokens = 0
    for index, raw in enumerate(raw_segments):
        where = (request_id, index)
        segment_context_tokens = _count_field(raw, "prompt_tokens", where)
        if index == 0:
            prompt_tokens = segment_context_tokens
        else:
            added_tokens = segment_context_tokens - context_tokens
            if added_tokens < 0:
                raise _segment_error(
                    where,
                    f"field 'prompt_tokens'={segment_context_tokens} is less than the context so far "
                    f"({context_tokens} tokens)",
                )
            tool_tokens[-1] += added_tokens
        completion_tokens.append(_count_field(raw, "completion_tokens", where))
        is_last = index == len(raw_segments) - 1
        tool_durations_s.append(_tool_duration_s(raw, "api_token_length", where, is_last))
        returned_tokens = 0
        if tool_durations_s[-1] is not None:
            returned_tokens = max(0, _count_field(raw, "api_token_length", where, allow_negative=is_last))
        tool_tokens.append(returned_tokens)
        context_tokens = segment_context_tokens + completion_tokens[-1] + returned_tokens
    return prompt_tokens, (completion_tokens, tool_durations_s, tool_tokens)


def _parse_text_segments(
    request_id: str, raw_segments: list[dict], tokenizer: Tokenizer | None
) -> tuple[int, _Columns]:
    completion_tokens: list[int] = []
    tool_durations_s: list[float | None] = []
    tool_tokens: list[int] = []
    context_text = ""
    for index, raw in enumerate(raw_segments):
        where = (request_id, index)
        prompt = _text_field(raw, "prompt", where)
        if index == 0:
            prompt_tokens = _count_text(prompt, tokenizer)
        else:
            added_text = prompt[len(context_text):] if prompt.startswith(context_text) else prompt
            tool_tokens[-1] += _count_text(added_text, tokenizer)
        completion = _text_field(raw, "completion", where)
        completion_tokens.append(_count_text(completion, tokenizer))
        tool_durations_s.append(_tool_duration_s(raw, "api_token", where, index == len(raw_segments) - 1))
        tool_text = _text_field(raw, "api_token", where) if tool_durations_s[-1] is not None else ""
        tool_tokens.append(_count_text(tool_text, tokenizer))
        context_text = prompt + completion + tool_text
    return prompt_tokens, (completion_tokens, tool_durations_s, tool_tokens)


def _tool_duration_s(raw: dict, returned_field: str, where: tuple[str, int], is_last: bool) -> float | None:
    """Returns the segment's `api_time`, or None if it calls no tool (allowed only last)."""
    if "api_time" not in raw:
        if not is_last:
            raise _segment_error(where, "is not the last but has no field 'api_time'")
        if returned_field in raw:
            raise _segment_error(where, f"has field '{returned_field}' but no 'api_time'")
        return None
    if returned_field not in raw:
        raise _segment_error(where, f"has field 'api_time' but no '{returned_field}'")
    duration_s = raw["api_time"]
    is_number = isinstance(duration_s, (int, float)) and not isinstance(duration_s, bool)
    if not (is_number and math.isfinite(duration_s)):
        raise _segment_error(where, f"field 'api_time'={duration_s!r} is not a finite number")
    if duration_s < 0:
        raise _segment_error(where, f"field 'api_time'={duration_s} is negative")
    return float(duration_s)


def _count_field(raw: dict, field: str, where: tuple[str, int], allow_negative: bool = False) -> int:
    if field not in raw:
        raise _segment_error(where, f"has no field '{field}'")
    value = raw[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _segment_error(where, f"field '{field}'={value!r} is not an integer")
    if value < 0 and not allow_negative:
        raise _segment_error(where, f"field '{field}'={value} is negative")
    return value


def _text_field(raw: dict, field: str, where: tuple[str, int]) -> str:
    value = raw.get(field)
    if not isinstance(value, str):
        raise _segment_error(where, f"field '{field}' must be a string, got {value!r}")
    return value


def _segment_error(where: tuple[str, int], message: str) -> ValueError:
    """where: (request_id, segment index)."""
    request_id, index = where
    return ValueError(f"request {request_id}: segment {index} {message}")


def _count_text(text: str, tokenizer: Tokenizer | None) -> int:
    if tokenizer is not None:
        return len(tokenizer.encode(text)) if text else 0
    return -(-len(text) // CHARS_PER_TOKEN_ESTIMATE)


def _infer_kind(raw_segments: list[dict], segments: list[Segment]) -> str:
    is_text = "prompt" in raw_segments[0]
    durations_s = [s.tool_duration_s for s in segments[:-1]]
    if not durations_s:
        return SHAPE_KINDS[1] if is_text else SHAPE_KINDS[0]
    if is_text:
        instructions = [raw.get("api_token", "").strip().lower() for raw in raw_segments]
        if any(text.startswith(_IMAGE_INSTRUCTION) for text in instructions):
            return "image"
        if any(text.startswith(_TTS_INSTRUCTION) for text in instructions):
            return "tts"
        return "chatbot"
    longest_s = max(durations_s)
    if longest_s < _MATH_MAX_TOOL_S:
        return "math"
    if longest_s < _VIRTUAL_ENV_MAX_TOOL_S:
        return "virtual_env"
    return "qa"


def poisson_arrivals(
    requests: Sequence[WorkloadRequest], rate_rps: float, duration_s: float, seed: int
) -> list[WorkloadRequest]:
    """Replays templates as a Poisson arrival process.

    Inter-arrival times are exponential with mean 1 / rate_rps; every arrival in
    [0, duration_s) draws its template uniformly with replacement. Both come from one
    `numpy.random.default_rng(seed)`, alternately, so the result depends only on the
    arguments.

    Args:
        requests: templates (their arrival_s is ignored).
        rate_rps: mean arrivals per second, > 0.
        duration_s: length of the arrival window, > 0.
        seed: generator seed.

    Returns:
        Copies of templates in arrival order, with arrival_s set and request_id
        f"{template_id}#{i}" for the i-th arrival.

    Raises:
        ValueError: no templates, or a rate or duration that is not positive.
    """
    if not requests:
        raise ValueError("poisson_arrivals needs at least one request template")
    if not rate_rps > 0:
        raise ValueError(f"rate_rps={rate_rps} must be > 0")
    if not duration_s > 0:
        raise ValueError(f"duration_s={duration_s} must be > 0")
    rng = np.random.default_rng(seed)
    arrivals: list[WorkloadRequest] = []
    arrival_s = float(rng.exponential(1.0 / rate_rps))
    while arrival_s < duration_s:
        template = requests[int(rng.integers(len(requests)))]
        arrivals.append(
            dataclasses.replace(
                template, request_id=f"{template.request_id}#{len(arrivals)}", arrival_s=arrival_s
            )
        )
        arrival_s += float(rng.exponential(1.0 / rate_rps))
    return arrivals


def scale_to_context(requests: Sequence[WorkloadRequest], max_context_tokens: int) -> list[WorkloadRequest]:
    """Shrinks requests whose max_context_tokens exceeds a context window, e.g. a small model's.

    Each nonzero count x (prompt, completions, tool returns) becomes
    1 + floor((x - 1) * (limit - n) / (total - n)), where n is the number of nonzero counts and
    total their sum: every count keeps at least 1 token and shrinks by about the same factor,
    and the new total is at most the limit. Zero tool returns stay 0; segments, tool durations
    and arrival times are unchanged. Requests that already fit are returned as they are.

    Args:
        requests: the requests.
        max_context_tokens: the context window in tokens.

    Returns:
        The requests, in order, each with max_context_tokens <= the limit.

    Raises:
        ValueError: a request has more nonzero counts than the limit, so it cannot fit; or it
            has a shared prefix (scaling each request by its own factor would un-share it:
            :func:`infercept.bench.agents.generate_programs` scales agent programs instead).
    """
    scaled = []
    for request in requests:
        total_tokens = request.max_context_tokens
        if total_tokens <= max_context_tokens:
            scaled.append(request)
            continue
        if request.shared_prefix_tokens:
            raise ValueError(
                f"request {request.request_id}: has a {request.shared_prefix_tokens}-token prefix shared "
                f"with app {request.app!r}; scale agent programs with "
                "generate_programs(..., max_context_tokens=...) so the prefix stays shared")
        counts = [request.prompt_tokens] + [
            x for s in request.segments for x in (s.completion_tokens, s.tool_tokens)
        ]
        num_nonzero = sum(1 for x in counts if x > 0)
        if num_nonzero > max_context_tokens:
            raise ValueError(
                f"request {request.request_id}: needs at least {num_nonzero} tokens (one per prompt, "
                f"completion and tool return), more than max_context_tokens={max_context_tokens}"
            )

        def shrink(x: int) -> int:
            if x == 0:
                return 0
            return 1 + (x - 1) * (max_context_tokens - num_nonzero) // (total_tokens - num_nonzero)

        segments = tuple(
            dataclasses.replace(s, completion_tokens=shrink(s.completion_tokens),
                                tool_tokens=shrink(s.tool_tokens))
            for s in request.segments
        )
        scaled.append(
            dataclasses.replace(request, prompt_tokens=shrink(request.prompt_tokens), segments=segments)
        )
    return scaled
