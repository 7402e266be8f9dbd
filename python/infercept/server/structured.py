"""The grammar a chat or completion request's ``tool_choice`` and ``response_format`` ask for.

A tool call is the text the server's parser reads (``tools/parser.py``'s TagParser, the
format ``chat_format.py`` renders): ``<tool_call>{"name": N, "arguments": {...}}</tool_call>``,
with ``arguments`` following the tool's ``parameters`` schema and an optional newline inside
each tag (the Hermes prompt writes one). So:

- ``tool_choice="required"``: the answer is one call to one of the request's ``tools`` (not
  the server's own tools: the client asked for a call it will see);
- a named function: one call to it;
- ``"auto"`` (or none given) with tools: free text, unless ``response_format`` is JSON, in
  which case the answer is a call or the JSON;
- ``response_format`` ``json_object`` / ``json_schema``: the JSON (``strict`` or not, the
  schema is enforced).

The grammar governs the answer of this HTTP request only: a tool call's grammar ends at the
call, and the follow-up carrying the tool result brings its own ``tool_choice`` and
``response_format`` (docs/structured_outputs.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from infercept.server.chat_format import CLOSE_TAG, OPEN_TAG
from infercept.server.protocol import NamedToolChoice, ResponseFormat
from infercept.structured_output import (StructuredOutput, check_grammar, json_schema_lark,
                                         lark_string)

# A function without ``parameters`` takes none: its arguments are ``{}``.
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


class StructuredRequestError(ValueError):
    """A tool schema or response format the grammar compiler rejects (a 400 naming ``param``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    return {"type": "object", "properties": {
        "name": {"const": function["name"]},
        "arguments": function.get("parameters") or _NO_PARAMETERS},
        "required": ["name", "arguments"], "additionalProperties": False}


def tool_call_lark(tools: Sequence[dict[str, Any]]) -> str:
    """Lark rules (root ``tool_call``) for one call to one of ``tools`` (OpenAI tool dicts)."""
    alternatives = "\n    | ".join(json_schema_lark(_call_schema(t)) for t in tools)
    return (f"tool_call: {lark_string(OPEN_TAG)} \"\\n\"? call \"\\n\"? {lark_string(CLOSE_TAG)}\n"
            f"call: {alternatives}\n")


def _check_tools(tools: Sequence[dict[str, Any]], indices: Sequence[int]) -> None:
    from llguidance import LLMatcher

    for tool, index in zip(tools, indices):
        try:
            check_grammar(LLMatcher.grammar_from_json_schema(_call_schema(tool)), "tool schema")
        except ValueError as exc:
            raise StructuredRequestError(f"tools[{index}].function.parameters: {exc}",
                                         f"tools.{index}.function.parameters") from None


def _answer_lark(response_format: ResponseFormat | None) -> str | None:
    """``answer`` rule for a JSON response format, or None for free text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return f"answer: {json_schema_lark({'type': 'object'})}\n"
    assert response_format.json_schema is not None  # the protocol model checks it
    schema = response_format.json_schema.schema_ or {"type": "object"}
    try:
        StructuredOutput(json_schema=schema)  # compiles and checks it alone
    except ValueError as exc:
        raise StructuredRequestError(f"response_format.json_schema.schema: {exc}",
                                     "response_format.json_schema.schema") from None
    return f"answer: {json_schema_lark(schema)}\n"


def structured_output_for(response_format: ResponseFormat | None,
                          tool_choice: str | NamedToolChoice | None = None,
                          tools: Sequence[dict[str, Any]] = ()) -> StructuredOutput | None:
    """The request's constraint, or None when its answer is free.

    Args:
        response_format: The request's ``response_format``.
        tool_choice: ``"none"``, ``"auto"``, ``"required"``, a named function, or None.
        tools: The request's ``tools`` (OpenAI dicts, as sent); server-side tools are never
            in a grammar.

    Raises:
        StructuredRequestError: A tool's parameters or the response schema is rejected.
    """
    forced = tool_choice == "required" or isinstance(tool_choice, NamedToolChoice)
    indices = list(range(len(tools))) if tool_choice != "none" else []
    if isinstance(tool_choice, NamedToolChoice):
        indices = [i for i in indices if tools[i]["function"]["name"] == tool_choice.function.name]
    offers_tools = bool(indices)
    forced = forced and offers_tools  # the protocol refuses a forced call without tools
    tools = [tools[i] for i in indices]
    answer = _answer_lark(response_format)  # checked even when a forced call comes first
    if offers_tools and (forced or answer is not None):  # tools in a grammar: check each
        _check_tools(tools, indices)
    if forced:  # the call is this answer; response_format applies to the follow-up's
        lark = "start: tool_call\n" + tool_call_lark(tools)
    elif answer is not None and offers_tools:
        lark = "start: tool_call | answer\n" + tool_call_lark(tools) + answer
    elif answer is not None:
        lark = "start: answer\n" + answer
    else:
        return None
    try:
        return StructuredOutput(grammar=lark)
    except ValueError as exc:  # each piece passed alone; their combination did not
        raise StructuredRequestError(str(exc), "tools" if offers_tools else "response_format"
                                     ) from None

