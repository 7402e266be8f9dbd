"""A calculator tool schema and a few-shot chat that teach a small model the tool-call format.

SmolLM2-135M calls tools reliably only after worked examples; the server tests and the load
test send the same ones, so their prompts (and greedy outputs) stay the same.
"""

CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}


def _call(expression: str) -> str:
    return ('<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call>'
            % expression)


FEW_SHOT = [
    {"role": "system", "content": "You are a helpful assistant. To do arithmetic, call the "
                                  "calculator tool."},
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": _call("3 + 4")},
    {"role": "tool", "content": "7"},
    {"role": "assistant", "content": "The answer is 7."},
    {"role": "user", "content": "What is 10 * 5?"},
    {"role": "assistant", "content": _call("10 * 5")},
    {"role": "tool", "content": "50"},
    {"role": "assistant", "content": "The answer is 50."},
]


# ---- the same, for the Responses API ---------------------------------------------------------

# The calculator in the Responses (flat) tool format.
CALCULATOR_FUNCTION = {"type": "function", **CALCULATOR["function"]}
# The few-shot system message, sent as ``instructions``.
FEW_SHOT_INSTRUCTIONS = FEW_SHOT[0]["content"]


def _few_shot_items() -> list[dict]:
    """FEW_SHOT after its system message as Responses input items: each call a
    ``function_call`` and its result a ``function_call_output`` (they render to the same
    prompt tokens as the chat messages)."""
    items: list[dict] = []
    for message in FEW_SHOT[1:]:
        if message["role"] == "assistant" and message["content"].startswith("<tool_call>"):
            expression = message["content"].split('"expression": "')[1].split('"')[0]
            call_id = f"call_fewshot{len(items)}"
            items.append({"type": "function_call", "call_id": call_id, "name": "calculator",
                          "arguments": '{"expression": "%s"}' % expression})
        elif message["role"] == "tool":
            items.append({"type": "function_call_output", "call_id": items[-1]["call_id"],
                          "output": message["content"]})
        else:
            items.append({"role": message["role"], "content": message["content"]})
    return items


FEW_SHOT_INPUT = _few_shot_items()
