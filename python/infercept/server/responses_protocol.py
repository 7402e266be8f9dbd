"""The Responses API wire format (``POST /v1/responses``): the request model, input items to
chat messages, and the response and streaming-event JSON.

Field names follow OpenAI's (the ``openai`` package's ``types/responses``). Input items become
the chat endpoint's :class:`~infercept.server.protocol.ChatMessage` so both endpoints render a
conversation with the same :class:`~infercept.server.chat_format.ChatRenderer`: a
``function_call`` item joins the assistant message before it as a ``tool_calls`` entry, a
``function_call_output`` item is a ``tool`` message.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from infercept.server.protocol import (ChatMessage, FunctionCall, FunctionDefinition,
                                       ToolCallMessage, _SamplingFields)

# Roles an input message may have (a tool result is a function_call_output item instead).
_MESSAGE_ROLES = ("user", "assistant", "system", "developer")
# Content part types whose text the server reads.
_TEXT_PARTS = ("input_text", "output_text", "text")


def new_item_id(prefix: str) -> str:
    """OpenAI-style ids: ``resp_…``, ``msg_…``, ``fc_…``, ``call_…``."""
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class FunctionTool(FunctionDefinition):
    """``tools[i]`` in the Responses (flat) format: ``{"type": "function", "name", ...}``."""

    type: Literal["function"]


class NamedFunctionChoice(BaseModel):
    """``tool_choice={"type": "function", "name": ...}``."""

    type: Literal["function"]
    name: str


class ResponsesRequest(_SamplingFields):
    """``POST /v1/responses``.

    ``temperature``, ``top_p``, ``stream``, ``cache_salt`` and the other sampling fields are
    the chat endpoint's; ``max_output_tokens`` bounds the generated tokens.
    """

    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    previous_response_id: str | None = None
    store: bool = True
    max_output_tokens: int | None = Field(default=None, ge=1)
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _check_tools(self) -> ResponsesRequest:
        names = [t.name for t in self.tools or []]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"tools: duplicate function names {duplicates}")
        choice = self.tool_choice
        if isinstance(choice, NamedFunctionChoice) and choice.name not in names:
            raise ValueError(f"tool_choice names function {choice.name!r}, which is not in tools "
                             f"({', '.join(names) or 'none given'})")
        if choice == "required" and not names:
            raise ValueError("tool_choice='required' needs at least one entry in tools")
        return self

    def chat_tool_schemas(self) -> list[dict[str, Any]]:
        """The tools ``tool_choice`` leaves callable, in the chat format the renderer takes."""
        choice = self.tool_choice
        tools = [] if choice == "none" else [
            t for t in self.tools or []
            if not isinstance(choice, NamedFunctionChoice) or t.name == choice.name]
        return [{"type": "function",
                 "function": t.model_dump(exclude_none=True, exclude={"type"})} for t in tools]

    def tool_choice_json(self) -> str | dict[str, str]:
        choice = self.tool_choice or "auto"
        return choice if isinstance(choice, str) else choice.model_dump()


def _text_of(content: Any, where: str) -> str:
    """The text of a message's ``content``: a string, or text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string or a list of parts, got "
                         f"{type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.content[{j}]: only text parts ({', '.join(_TEXT_PARTS)}) "
                             f"are supported, got {kind!r}")
        texts.append(part["text"])
    return "".join(texts)


def input_messages(items: str | Sequence[dict[str, Any]]) -> list[ChatMessage]:
    """The chat messages of a request's ``input``.

    Raises:
        ValueError: An item the server cannot take (names its index and what is wrong).
    """
    if isinstance(items, str):
        return [ChatMessage(role="user", content=items)]
    messages: list[ChatMessage] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _MESSAGE_ROLES:
                raise ValueError(f"{where}.role must be one of {', '.join(_MESSAGE_ROLES)}, got "
                                 f"{role!r}")
            messages.append(ChatMessage(role=role, content=_text_of(item.get("content"), where)))
        elif kind == "function_call":
            missing = [k for k in ("call_id", "name") if not isinstance(item.get(k), str)]
            if missing:
                raise ValueError(f"{where} (function_call) needs string field(s) "
                                 f"{', '.join(missing)}")
            call = ToolCallMessage(id=item["call_id"], function=FunctionCall(
                name=item["name"], arguments=item.get("arguments") or "{}"))
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":  # one assistant turn
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise ValueError(f"{where} (function_call_output) needs a string call_id")
            messages.append(ChatMessage(role="tool", tool_call_id=item["call_id"],
                                        content=_text_of(item.get("output"), where)))
        else:
            raise ValueError(f"{where}.type {kind!r} is not supported; send message, "
                             "function_call or function_call_output items")
    if not messages:
        raise ValueError("input is empty: it must hold at least one item")
    return messages


# ---- output ----------------------------------------------------------------------------------

def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [] if status == "in_progress" else [output_text_part(text)]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": content}


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str,
                       status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def usage(input_tokens: int, output_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def response_json(response_id: str, req: ResponsesRequest, created_at: float, status: str,
                  output: list[dict[str, Any]], usage_json: dict[str, Any] | None,
                  incomplete_reason: str | None = None,
                  error: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``response`` object; the request's settings are echoed as OpenAI does."""
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status,
        "completed_at": time.time() if status in ("completed", "incomplete") else None,
        "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {}, "model": req.model, "output": output,
        "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id, "store": req.store,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "text": {"format": {"type": "text"}}, "tool_choice": req.tool_choice_json(),
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
        "truncation": "disabled", "usage": usage_json, "user": req.user,
    }
