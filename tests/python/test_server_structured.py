"""Structured outputs through the server, with the official ``openai`` client on 127.0.0.1:
``tool_choice`` required and named give schema-valid calls, ``response_format`` JSON validates,
rejected schemas are 400s, and a call made under a grammar resumes its paused context.

Greedy decoding, small ``max_tokens``, and each batch of prompts sent concurrently so it
shares the engine's steps.
"""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from infercept.engine import EngineConfig, LLMEngine  # noqa: E402
from infercept.server import ServerConfig, create_app  # noqa: E402
from infercept.server.few_shot import CALCULATOR as FEW_SHOT_CALCULATOR  # noqa: E402
from infercept.server.few_shot import FEW_SHOT  # noqa: E402
from infercept.server.metrics import parse_metrics  # noqa: E402
from infercept.server.protocol import NamedToolChoice, ResponseFormat  # noqa: E402
from infercept.server.structured import structured_output_for  # noqa: E402
from server_harness import ThreadServer, openai_client  # noqa: E402

MODEL = "smollm2-structured"
# Every string parameter has a maxLength, as a tool author bounds an argument: the grammar
# then bounds the call, so each one closes within max_tokens. (Without one SmolLM2-135M can
# loop inside a string, "1000000...", until max_tokens: docs/structured_outputs.md.)
CALCULATOR = {"type": "function", "function": {
    **FEW_SHOT_CALCULATOR["function"], "parameters": {"type": "object", "properties": {
        "expression": {"type": "string", "maxLength": 32}}, "required": ["expression"]}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 32},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "maxLength": 32},
        "max_results": {"type": "integer", "minimum": 1, "maximum": 10}},
        "required": ["query"]}}}
TOOLS = [CALCULATOR, WEATHER, SEARCH]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTIONS = [
    "What is 17 * 23?", "How warm is it in Paris right now?", "Find news about solar panels.",
    "Compute 2 to the power of 10.", "Is it raining in Tokyo?", "Who won the 2018 world cup?",
    "What's 1234 + 4321?", "Weather in Lima in fahrenheit please.", "Search for a pancake recipe.",
    "Divide 100 by 7.", "Tell me about the weather in Oslo.", "How tall is Mount Everest?",
    "What is the square root of 144?", "Should I bring an umbrella in London today?",
    "Find the population of Canada.", "Calculate 15% of 80.", "Hello! How are you?",
    "Write a poem about cats.", "What is the capital of Peru?", "Convert 5 miles to km.",
]
# Bounded like the tools' arguments, so every answer closes within max_tokens.
ANSWER = {"type": "object", "properties": {
    "answer": {"type": "string", "maxLength": 24},
    "confidence_percent": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["answer", "confidence_percent"], "additionalProperties": False}
ANSWER_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER,
                                                        "strict": True}}


@pytest.fixture(scope="module")
def server():
    engine = LLMEngine(EngineConfig(max_model_len=2048), tool_errors="return")
    app = create_app(engine, ServerConfig(served_model_name=MODEL, paused_ttl_s=300.0))
    with ThreadServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with openai_client(server, timeout_s=600) as c:
        yield c


def _gather(server, requests):
    """Sends ``requests`` (kwargs of chat.completions.create) at once; returns the responses."""
    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused",
                                      max_retries=0, timeout=900) as c:
            return await asyncio.gather(*(c.chat.completions.create(
                model=MODEL, temperature=0, **kwargs) for kwargs in requests))
    return asyncio.run(main())


def _metric(server, name: str) -> float:
    return parse_metrics(httpx.get(f"{server.url}/metrics", timeout=30).text)[name]


def _assert_one_valid_call(response, names: set[str]) -> None:
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


# ---- the grammar a request asks for ----------------------------------------------------------

def test_only_required_named_and_json_formats_build_a_grammar():
    tools = [CALCULATOR, WEATHER]
    json_format = ResponseFormat.model_validate(ANSWER_FORMAT)
    assert structured_output_for(None, "auto", tools) is None
    assert structured_output_for(None, None, tools) is None
    assert structured_output_for(ResponseFormat(type="text"), "required", []) is None
    required = structured_output_for(None, "required", tools).grammar
    assert "calculator" in required and "get_weather" in required
    named = structured_output_for(None, NamedToolChoice.model_validate(
        {"type": "function", "function": {"name": "get_weather"}}), tools).grammar
    assert "get_weather" in named and "calculator" not in named
    assert "start: tool_call | answer" in structured_output_for(json_format, "auto", tools).grammar
    assert "tool_call" not in structured_output_for(json_format, "none", tools).grammar


# ---- tool_choice -----------------------------------------------------------------------------

def test_required_and_named_tool_choice_give_calls_that_validate(server):
    # Required: any of the three tools, after the few-shot turns that show the call format.
    required = [dict(messages=[*FEW_SHOT, {"role": "user", "content": q}], tools=TOOLS,
                     tool_choice="required", max_tokens=128) for q in QUESTIONS]
    # Named: a plain question and nothing else, as a new user sends it.
    named = [dict(messages=[{"role": "user", "content": q}], tools=TOOLS, max_tokens=128,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
             for q in QUESTIONS]
    responses = _gather(server, required + named)
    for response in responses[:len(required)]:
        _assert_one_valid_call(response, set(PARAMETERS))
    for response in responses[len(required):]:
        _assert_one_valid_call(response, {"get_weather"})


def test_auto_tool_choice_stays_free(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a poem about cats."}],
        tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=16)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert not out.choices[0].message.tool_calls
    assert not out.choices[0].message.content.startswith("<tool_call>")


# ---- response_format -------------------------------------------------------------------------

def test_json_response_formats_on_chat_and_completions(server, client):
    questions = ["What is the capital of France?", "How many legs does a spider have?",
                 "What colour is the sky?"]
    chats = _gather(server, [dict(messages=[{"role": "user", "content": q}], max_tokens=64,
                                  response_format=ANSWER_FORMAT) for q in questions]
                    + [dict(messages=[{"role": "user", "content": "Give me a JSON object with a "
                                       "name and an age."}],  # any JSON object: one that closes
                            max_tokens=96, response_format={"type": "json_object"})])
    for out in chats[:3]:
        assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
        jsonschema.validate(json.loads(out.choices[0].message.content), ANSWER)
    assert isinstance(json.loads(chats[3].choices[0].message.content), dict)
    assert chats[3].choices[0].finish_reason == "stop"

    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": questions[0]}], temperature=0,
        max_tokens=64, response_format=ANSWER_FORMAT, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == chats[0].choices[0].message.content

    completion = client.completions.create(
        model=MODEL, prompt="Q: What is the capital of Italy?\nA (as JSON):", temperature=0,
        max_tokens=64, extra_body={"response_format": ANSWER_FORMAT})
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].text), ANSWER)


def test_a_schema_the_grammar_compiler_rejects_is_a_400(client):
    hi = [{"role": "user", "content": "hi"}]
    bad_format = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {
        "type": "object", "properties": {"a": {"type": "strnig"}}}}}
    with pytest.raises(openai.BadRequestError, match="Invalid type: strnig") as bad:
        client.chat.completions.create(model=MODEL, messages=hi, response_format=bad_format)
    assert bad.value.param == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError, match="Invalid type: strnig"):
        client.completions.create(model=MODEL, prompt="hi",
                                  extra_body={"response_format": bad_format})
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(("}}}}}
    with pytest.raises(openai.BadRequestError, match="unclosed group") as bad:
        client.chat.completions.create(model=MODEL, messages=hi, tools=[CALCULATOR, bad_tool],
                                       tool_choice="required")
    assert bad.value.param == "tools.1.function.parameters"
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(model=MODEL, messages=hi,
                                       response_format={"type": "json_schema"})
    ok = client.chat.completions.create(model=MODEL, messages=hi, tools=[CALCULATOR, bad_tool],
                                        tool_choice="auto", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")  # auto needs no grammar


# ---- pauses ----------------------------------------------------------------------------------

def test_a_required_call_pauses_and_the_follow_up_resumes_under_its_own_format(server):
    conversations = [[*FEW_SHOT, {"role": "user", "content": f"What is {a} + {b}?"}]
                     for a, b in ((12, 30), (7, 8))]
    firsts = _gather(server, [dict(messages=m, tools=[CALCULATOR], tool_choice="required",
                                   max_tokens=64) for m in conversations])
    for first in firsts:
        _assert_one_valid_call(first, {"calculator"})
    reused = 'infercept_paused_context_total{outcome="reused"}'
    before = _metric(server, reused)
    follow_ups = []
    for messages, first in zip(conversations, firsts):
        call = first.choices[0].message.tool_calls[0]
        follow_ups.append([*messages, first.choices[0].message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": "42"}])
    # One follow-up answers as the schema says (or calls again: auto with a JSON format
    # is a call or the JSON), the other freely. tool_choice='none' would drop the
    # tools from the prompt, which then no longer continues the paused context.
    json_answer, free_answer = _gather(server, [
        dict(messages=follow_ups[0], tools=[CALCULATOR], max_tokens=64,
             response_format=ANSWER_FORMAT),
        dict(messages=follow_ups[1], tools=[CALCULATOR], tool_choice="auto", max_tokens=16)])
    assert _metric(server, reused) == before + 2  # both resumed their paused context
    assert json_answer.usage.prompt_tokens_details.cached_tokens == (
        firsts[0].usage.prompt_tokens + firsts[0].usage.completion_tokens)
    if json_answer.choices[0].finish_reason == "tool_calls":  # what SmolLM2 does here
        _assert_one_valid_call(json_answer, {"calculator"})
    else:
        assert json_answer.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(json_answer.choices[0].message.content), ANSWER)
    assert free_answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
