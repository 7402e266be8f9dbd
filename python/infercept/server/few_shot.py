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
