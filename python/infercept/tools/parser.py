"""Finds tool calls in generated text.

Two conventions: the ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` tags that
Hermes/Qwen-style chat templates teach models, and a user pattern (a stop string or a regex)
with a user function that turns the matched text into a call. Both are streaming-friendly:
``find`` on a growing text returns None until a call is complete, so the engine can intercept
on the very token that closes it.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol


@dataclass(frozen=True)
class ToolCall:
    """A complete, well-formed tool call.

    Attributes:
        name: Name of the tool to run.
        arguments: Keyword arguments for the tool.
        span: ``(start, end)`` character offsets of the call's text in the searched text.
        raw: The call's text, ``text[start:end]``.
    """

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    span: tuple[int, int] = (0, 0)
    raw: str = ""


@dataclass(frozen=True)
class ToolCallError:
    """A complete but malformed call: a record for the engine, never an exception.

    Attributes:
        message: What is wrong, e.g. the JSON decoder's message.
        span: ``(start, end)`` character offsets of the call's text.
        raw: The call's text.
    """

    message: str
    span: tuple[int, int]
    raw: str


ParseResult = ToolCall | ToolCallError


class ToolCallParser(Protocol):
    """What the engine needs from a parser."""

    def find(self, text: str, start: int = 0) -> ParseResult | None:
        """Returns the first complete call in ``text[start:]``, or None if there is none.

        A parser whose ``find`` also takes ``new_from`` (text before it was searched by an
        earlier call that returned None) is fed only the new text; see ``find_new_call``.
        """


@lru_cache(maxsize=None)
def _takes_new_from(parser_type: type) -> bool:
    try:
        return "new_from" in inspect.signature(parser_type.find).parameters
    except (TypeError, ValueError):
        return False


def find_new_call(parser: ToolCallParser, text: str, start: int, new_from: int) -> ParseResult | None:
    """Calls ``parser.find`` on a text that grew past ``new_from`` since the last search.

    Args:
        parser: The parser; it gets ``new_from`` when its ``find`` accepts it.
        text: The text so far.
        start: Where calls may start (the end of the previous call).
        new_from: Length of the text at the previous search, which found no complete call.

    Returns:
        What ``parser.find`` returns.
    """
    if _takes_new_from(type(parser)):
        return parser.find(text, start, new_from=new_from)  # type: ignore[call-arg]
    return parser.find(text, start)


def call_from_json(body: str, span: tuple[int, int], raw: str) -> ParseResult:
    """Parses ``{"name": ..., "arguments": {...}}`` into a call or an error record.

    ``arguments`` may be missing (no arguments) or a JSON-encoded object string, as in the
    OpenAI API's ``function.arguments``.

    Args:
        body: The JSON text.
        span: Character span of the call, copied into the result.
        raw: Text of the call, copied into the result.

    Returns:
        A ToolCall, or a ToolCallError saying what is malformed.
    """
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        return ToolCallError(f"tool call is not valid JSON: {exc}", span, raw)
    if not isinstance(obj, dict):
        return ToolCallError(f"tool call must be a JSON object, got {type(obj).__name__}",
                             span, raw)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCallError(f"tool call needs a non-empty string 'name', got {name!r}", span, raw)
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            return ToolCallError(f"tool call 'arguments' string is not valid JSON: {exc}",
                                 span, raw)
    if not isinstance(arguments, dict):
        return ToolCallError(
            f"tool call 'arguments' must be an object, got {type(arguments).__name__}", span, raw
        )
    return ToolCall(name, arguments, span, raw)


class TagParser:
    """Finds ``<tool_call>JSON</tool_call>`` calls; whitespace around the JSON is ignored."""

    def __init__(self, open_tag: str = "<tool_call>", close_tag: str = "</tool_call>") -> None:
        """Creates a parser for the given tags.

        Args:
            open_tag: Text that opens a call.
            close_tag: Text that closes a call.

        Raises:
            ValueError: A tag is empty.
        """
        if not open_tag or not close_tag:
            raise ValueError(f"tags must be non-empty, got {open_tag!r} and {close_tag!r}")
        self.open_tag = open_tag
        self.close_tag = close_tag

    def find(self, text: str, start: int = 0, new_from: int = 0) -> ParseResult | None:
        """Returns the first complete call in ``text[start:]``.

        Args:
            text: The generated text so far.
            start: Where to search from, e.g. the end of the previous call.
            new_from: Text before this offset was searched (from ``start``) and held no close
                tag; only a close tag ending past it is looked for, so a growing text costs
                its new characters per call, not its length.

        Returns:
            The call or its error record; None while no call is complete.
        """
        close_at = text.find(self.close_tag, max(start, new_from - len(self.close_tag) + 1))
        if close_at < 0:
            return None
        end = close_at + len(self.close_tag)
        # The nearest open tag before the close tag, so stray text before it is just text.
        open_at = text.rfind(self.open_tag, start, close_at)
        if open_at < 0:
            return ToolCallError(f"{self.close_tag!r} without a preceding {self.open_tag!r}",
                                 (start, end), text[start:end])
        body = text[open_at + len(self.open_tag):close_at].strip()
        return call_from_json(body, (open_at, end), text[open_at:end])


class PatternParser:
    """Finds calls by a user regex (or a literal stop string) and a user mapping function.

    The pattern should end in a delimiter: on a growing text, ``\\d+`` would match "12"
    before the "3" of "123" has been generated.
    """

    def __init__(self, pattern: str | re.Pattern[str],
                 to_call: Callable[[re.Match[str]], tuple[str, dict[str, Any]]],
                 literal: bool = False) -> None:
        """Creates a parser.

        Args:
            pattern: Regular expression, or a literal stop string when ``literal`` is True.
            to_call: Maps a match to ``(tool_name, arguments)``; an exception it raises
                becomes a ToolCallError.
            literal: Treat ``pattern`` as plain text.

        Raises:
            ValueError: The pattern is empty or not a valid regex.
        """
        if isinstance(pattern, str):
            if not pattern:
                raise ValueError("pattern must be non-empty")
            try:
                pattern = re.compile(re.escape(pattern) if literal else pattern)
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a valid regex: {exc}") from exc
        self.pattern = pattern
        self.to_call = to_call

    def find(self, text: str, start: int = 0) -> ParseResult | None:
        """Returns the first match in ``text[start:]``, mapped to a call.

        Args:
            text: The generated text so far.
            start: Where to search from, e.g. the end of the previous call.

        Returns:
            The call or its error record; None while nothing matches.
        """
        match = self.pattern.search(text, start)
        if match is None:
            return None
        span, raw = match.span(), match.group(0)
        try:
            name, arguments = self.to_call(match)
        except Exception as exc:  # A user mapping bug must not kill the engine.
            return ToolCallError(
                f"mapping {raw!r} to a tool call failed: {type(exc).__name__}: {exc}", span, raw)
        if not isinstance(name, str) or not name or not isinstance(arguments, dict):
            return ToolCallError(
                f"mapping must return (name: str, arguments: dict), got ({name!r}, "
                f"{arguments!r})", span, raw)
        return ToolCall(name, arguments, span, raw)
