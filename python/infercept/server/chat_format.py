"""Conversations to prompt tokens, and generated text back to content plus a tool call.

The chat template renders the messages; what templates disagree on is normalized here:
an assistant turn with ``tool_calls`` becomes its content followed by each call's text (the
exact text the model generated when the server handed the call out, else a canonical
``<tool_call>{"name": ..., "arguments": ...}</tool_call>``), so the rendered continuation of a
paused request repeats its tokens and can resume it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from infercept.model import Tokenizer
from infercept.server.protocol import ChatMessage
from infercept.tools import ToolCall, ToolCallParser

OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"

# For templates that do not render ``tools`` themselves (SmolLM2's, for one): the Hermes
# convention, appended to the system message.
TOOL_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def canonical_call_text(name: str, arguments: str) -> str:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` for an OpenAI tool call.

    Raises:
        ValueError: ``arguments`` is not a JSON object.
    """
    try:
        parsed = json.loads(arguments or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"function.arguments {arguments!r} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"function.arguments {arguments!r} must encode a JSON object")
    return f"{OPEN_TAG}{json.dumps({'name': name, 'arguments': parsed})}{CLOSE_TAG}"


class ChatRenderer:
    """Renders OpenAI messages into prompt tokens with the model's chat template.

    Args:
        tokenizer: The engine's tokenizer (its template renders the messages).
        call_text: Looks up the generated text of a tool call id the server handed out.
        tool_prompt: Describe tools in the system message when the template ignores them
            (None: only if the template ignores ``tools``).
    """

    def __init__(self, tokenizer: Tokenizer, call_text: Callable[[str], str | None],
                 tool_prompt: bool | None = None) -> None:
        self.tokenizer = tokenizer
        self._call_text = call_text
        if tool_prompt is None:
            tool_prompt = not self._template_renders_tools()
        self.tool_prompt = tool_prompt

    def _template_renders_tools(self) -> bool:
        probe = [{"role": "user", "content": "x"}]
        schema = [{"type": "function", "function": {"name": "probe_tool_name",
                                                    "parameters": {"type": "object"}}}]
        try:
            return "probe_tool_name" in self.tokenizer.render_chat(probe, tools=schema)
        except Exception:  # a template that rejects tools renders none
            return False

    def to_template_messages(self, messages: Sequence[ChatMessage],
                             tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Plain ``{"role", "content", ...}`` dicts any template accepts.

        Raises:
            ValueError: A message the server cannot render (names the message index).
        """
        out: list[dict[str, Any]] = []
        for i, message in enumerate(messages):
            try:
                text = message.text()
                if message.role == "assistant" and message.tool_calls:
                    text += "".join(self._call_text(c.id) or canonical_call_text(
                        c.function.name, c.function.arguments) for c in message.tool_calls)
            except ValueError as exc:
                raise ValueError(f"messages[{i}]: {exc}") from None
            role = "system" if message.role == "developer" else message.role
            entry: dict[str, Any] = {"role": role, "content": text}
            if message.role == "tool" and message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
            if message.name is not None:
                entry["name"] = message.name
            out.append(entry)
        if tools and self.tool_prompt:
            block = TOOL_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}"}
            else:
                out.insert(0, {"role": "system", "content": block})
        return out

    def render(self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] = ()
               ) -> list[int]:
        """Prompt tokens of the conversation, ending with the assistant header."""
        plain = self.to_template_messages(messages, tools)
        return self.tokenizer.apply_chat_template(plain, tools=list(tools) or None)


def split_tool_call(text: str, parser: ToolCallParser) -> tuple[str, ToolCall | None]:
    """Splits an answer that ends in a client tool call into (content before it, the call).

    Server-side calls before it stay in the content. Returns ``(text, None)`` without a call.
    """
    last: ToolCall | None = None
    position = 0
    while (found := parser.find(text, position)) is not None:
        if isinstance(found, ToolCall):
            last = found
        position = found.span[1]
    if last is None:
        return text, None
    return text[:last.span[0]], last


class ContentStreamer:
    """Streams answer text while holding back what may become a tool call.

    Text from an unclosed ``<tool_call>`` (or a partial one at the end) is held until the call
    closes (a server tool: shown) or the request pauses on it (a client tool: never shown as
    content).
    """

    def __init__(self) -> None:
        self.num_emitted = 0

    @staticmethod
    def safe_end(text: str) -> int:
        """Length of the prefix of ``text`` that cannot be part of an unfinished call."""
        position = 0
        while (opened := text.find(OPEN_TAG, position)) >= 0:
            closed = text.find(CLOSE_TAG, opened)
            if closed < 0:
                return opened
            position = closed + len(CLOSE_TAG)
        for k in range(min(len(OPEN_TAG) - 1, len(text) - position), 0, -1):
            if text.endswith(OPEN_TAG[:k]):
                return len(text) - k
        return len(text)

    def delta(self, text: str, final: bool = False) -> str:
        """New content to send for the answer text so far (all of it when ``final``)."""
        end = len(text) if final else max(self.num_emitted, self.safe_end(text))
        piece = text[self.num_emitted:end]
        self.num_emitted = max(self.num_emitted, end)
        return piece

