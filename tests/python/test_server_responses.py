"""``/v1/responses`` against the official ``openai`` client on 127.0.0.1.

One real uvicorn server (SmolLM2-135M, CPU) runs in a thread for the module, as in
test_server.py. The tool prompts are the few-shot calculator conversation as Responses items
(``few_shot.FEW_SHOT_INPUT``): greedy, the 135M model answers them with a calculator call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from infercept.engine import EngineConfig  # noqa: E402
from infercept.server import EngineSpec, ServerConfig, create_app  # noqa: E402
from infercept.server.chat_format import ChatRenderer  # noqa: E402
from infercept.server.few_shot import (CALCULATOR, CALCULATOR_FUNCTION, FEW_SHOT,  # noqa: E402
                                       FEW_SHOT_INPUT, FEW_SHOT_INSTRUCTIONS)
from infercept.server.protocol import ChatMessage  # noqa: E402
from infercept.server.response_store import ResponseStore, StoredResponse  # noqa: E402
from infercept.server.sessions import PausedContextStore  # noqa: E402
from infercept.server.responses_protocol import input_messages  # noqa: E402
from infercept.tools.calculator import calculate  # noqa: E402
from server_harness import ThreadServer, openai_client, metrics, wait_idle  # noqa: E402

MODEL = "smollm2-responses"
# cached_tokens is counted exactly below (a resumed context, else 0): prefix cache off.
HAS_PREFIX_CACHE = "enable_prefix_caching" in {f.name for f in dataclasses.fields(EngineConfig)}
NO_PREFIX_CACHE = {"enable_prefix_caching": False} if HAS_PREFIX_CACHE else {}
REUSED = 'infercept_paused_context_total{outcome="reused"}'
FALLBACK = 'infercept_paused_context_total{outcome="fallback"}'
HELD = 'infercept_paused_context_total{outcome="held"}'
EXPIRED = 'infercept_paused_context_total{outcome="expired"}'


def _question(a: int, b: int) -> list[dict]:
    return [*FEW_SHOT_INPUT, {"role": "user", "content": f"What is {a} + {b}?"}]


def _tool_kwargs() -> dict:
    return dict(model=MODEL, instructions=FEW_SHOT_INSTRUCTIONS, tools=[CALCULATOR_FUNCTION],
                temperature=0)


@pytest.fixture(scope="module")
def server():
    engine = EngineSpec(config=EngineConfig(policy="infercept", max_model_len=2048,
                                            **NO_PREFIX_CACHE), tool_errors="abort")
    app = create_app(engine, ServerConfig(served_model_name=MODEL, paused_ttl_s=300.0))
    with ThreadServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with openai_client(server) as c:
        yield c


def _calculator_call(response) -> object:
    """The response's one output function call (checked to be the expected calculator)."""
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1, response.output
    assert calls[0].name == "calculator" and calls[0].call_id.startswith("call_")
    return calls[0]


# ---- pieces without a server -------------------------------------------------------------

def test_input_items_render_like_the_chat_messages(tokenizer):
    renderer = ChatRenderer(tokenizer, lambda call_id: None)
    question = {"role": "user", "content": "What is 12 + 30?"}
    chat = renderer.render([ChatMessage(**m) for m in [*FEW_SHOT, question]], [CALCULATOR])
    items = [ChatMessage(role="system", content=FEW_SHOT_INSTRUCTIONS),
             *input_messages([*FEW_SHOT_INPUT, question])]
    assert renderer.render(items, [CALCULATOR]) == chat
    parts = input_messages([{"type": "message", "role": "user",
                             "content": [{"type": "input_text", "text": "a"},
                                         {"type": "input_text", "text": "b"}]}])
    assert [(m.role, m.content) for m in parts] == [("user", "ab")]
    with pytest.raises(ValueError, match=r"input\[0\]\.type 'reasoning'"):
        input_messages([{"type": "reasoning", "summary": []}])
    with pytest.raises(ValueError, match=r"input\[1\]\.content\[0\].*'input_image'"):
        input_messages(["x" and {"role": "user", "content": "x"},
                        {"role": "user", "content": [{"type": "input_image"}]}])


def test_response_store_bounds_count_bytes_and_time():
    now = [0.0]
    store = ResponseStore(ttl_s=10.0, max_responses=2, max_bytes=300, clock=lambda: now[0])

    def stored(i: int, size: int = 10) -> StoredResponse:
        return StoredResponse(f"resp_{i}", {"id": f"resp_{i}", "pad": "x" * size}, [])

    assert store.put(stored(1)) == [] and store.put(stored(2)) == []
    assert [s.response_id for s in store.put(stored(3))] == ["resp_1"]  # count bound
    assert store.get("resp_1") is None and store.get("resp_2") is not None
    assert [s.response_id for s in store.put(stored(4, 250))] == ["resp_2", "resp_3"]  # bytes
    assert store.num_bytes == store.get("resp_4").num_bytes <= 300
    assert [s.response_id for s in store.put(stored(5, 500))] == ["resp_5"]  # alone too big
    assert store.get("resp_5") is None and len(store) == 1
    now[0] = 10.0
    assert store.get("resp_4") is None
    assert [s.response_id for s in store.expire()] == ["resp_4"] and store.num_bytes == 0
    with pytest.raises(ValueError, match="max_stored_responses=0"):
        ResponseStore(max_responses=0)


def test_contexts_held_for_a_response_are_taken_by_its_id_or_call_id_only():
    store = PausedContextStore(ttl_s=10.0)
    store.add(1, [5, 6], ["call_a"], response_id="resp_1")
    store.add(2, [5, 6], ["call_b"], cache_salt="tenant", response_id="resp_2")
    # A chat request with the same tokens and call id does not match them.
    miss = store.take_match([5, 6, 7], tool_call_ids=["call_a"])
    assert miss.context is None and not miss.stale and len(store) == 2
    assert store.take_response_call(["call_b"]) is None  # another salt
    assert store.take_response_call(["call_x", "call_b"], cache_salt="tenant").request_id == 2
    assert store.take_response("resp_2") is None
    assert store.take_response("resp_1").request_id == 1 and len(store) == 0


# ---- endpoints ---------------------------------------------------------------------------

def test_plain_text_response(client):
    out = client.responses.create(model=MODEL, input="Name a color.", max_output_tokens=10,
                                  temperature=0)
    assert out.object == "response" and out.id.startswith("resp_") and out.model == MODEL
    assert out.status in ("completed", "incomplete")
    assert [item.type for item in out.output] == ["message"]
    assert out.output[0].role == "assistant" and out.output_text
    assert out.usage.output_tokens <= 10 and out.usage.input_tokens > 0
    assert out.usage.input_tokens_details.cached_tokens == 0
    if out.status == "incomplete":
        assert out.incomplete_details.reason == "max_output_tokens"


def test_function_call_round_trip_resumes_the_paused_request(server, client):
    # A prediction of the remaining output rides on both turns (the FCFS engine keeps it).
    first = client.responses.create(input=_question(12, 30), max_output_tokens=40,
                                    extra_body={"predicted_output_tokens": 30}, **_tool_kwargs())
    assert first.status == "completed"
    call = _calculator_call(first)
    assert json.loads(call.arguments) == {"expression": "12 + 30"}
    before = metrics(server)
    assert before["infercept_paused_contexts"] >= 1

    result = {"type": "function_call_output", "call_id": call.call_id, "output": "42"}
    resumed = client.responses.create(previous_response_id=first.id, input=[result],
                                      max_output_tokens=12,
                                      extra_body={"predicted_output_tokens": 10}, **_tool_kwargs())
    after = metrics(server)
    assert (after[REUSED], after[FALLBACK]) == (before[REUSED] + 1, before[FALLBACK])
    # The paused context (prompt and the call) was not prefilled again.
    assert resumed.usage.input_tokens_details.cached_tokens == (
        first.usage.input_tokens + first.usage.output_tokens)
    assert resumed.previous_response_id == first.id

    # The same conversation sent whole, unstored: a fresh prefill gives the same answer.
    conversation = [*_question(12, 30), *[item.model_dump(exclude_none=True)
                                          for item in first.output], result]
    fresh = client.responses.create(input=conversation, max_output_tokens=12, store=False,
                                    **_tool_kwargs())
    assert metrics(server)[REUSED] == after[REUSED]
    assert fresh.usage.input_tokens_details.cached_tokens == 0
    assert fresh.usage.input_tokens == resumed.usage.input_tokens
    assert resumed.output_text == fresh.output_text and "42" in resumed.output_text
    assert resumed.status == fresh.status
    wait_idle(server)


def test_streaming_events_parse_with_the_client(client):
    kwargs = dict(model=MODEL, input="Name a color.", max_output_tokens=60, temperature=0)
    full = client.responses.create(**kwargs)
    assert full.status == "completed"  # the stream helper's final response needs it
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    expected_head = ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"]
    assert types[:4] == expected_head
    assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas and "".join(deltas) == full.output_text == final.output_text
    assert final.usage.output_tokens == full.usage.output_tokens
    assert final.output[0].id == events[2].item.id

    # Cut short by max_output_tokens: OpenAI's response.incomplete ends the stream.
    short = list(client.responses.create(**{**kwargs, "max_output_tokens": 2}, stream=True))
    assert short[-1].type == "response.incomplete"
    assert short[-1].response.status == "incomplete"
    assert short[-1].response.incomplete_details.reason == "max_output_tokens"
    assert short[-1].response.usage.output_tokens == 2


def test_streamed_function_call_then_streamed_resume(server, client):
    stream = client.responses.create(input=_question(7, 8), max_output_tokens=40, stream=True,
                                     **_tool_kwargs())
    events = list(stream)
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.output_text.delta" not in types  # the call is not shown as text
    assert types[-5:-1] == ["response.output_item.added", "response.function_call_arguments.delta",
                            "response.function_call_arguments.done", "response.output_item.done"]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == {"expression": "7 + 8"}
    response = events[-1].response
    call = _calculator_call(response)
    assert call.arguments == done.arguments and call.id == done.item_id
    before = metrics(server)

    result = {"type": "function_call_output", "call_id": call.call_id, "output": "15"}
    with client.responses.stream(previous_response_id=response.id, input=[result],
                                 max_output_tokens=12, **_tool_kwargs()) as follow_up:
        text = "".join(e.delta for e in follow_up if e.type == "response.output_text.delta")
        final = follow_up.get_final_response()
    assert metrics(server)[REUSED] == before[REUSED] + 1
    assert text == final.output_text and "15" in text
    assert final.usage.input_tokens_details.cached_tokens == (
        response.usage.input_tokens + response.usage.output_tokens)
    wait_idle(server)


def test_an_expired_paused_request_falls_back_to_a_prefill(server, client):
    store = server.app.state.server.store
    before = metrics(server)
    ttl_s, store.ttl_s = store.ttl_s, 0.5
    try:
        first = client.responses.create(input=_question(12, 30), max_output_tokens=40,
                                        **_tool_kwargs())
    finally:
        store.ttl_s = ttl_s
    call = _calculator_call(first)
    idle = wait_idle(server)  # the sweep aborts the paused request and frees its blocks
    assert idle[EXPIRED] == before[EXPIRED] + 1 and idle["infercept_paused_contexts"] == 0

    result = {"type": "function_call_output", "call_id": call.call_id, "output": "42"}
    late = client.responses.create(previous_response_id=first.id, input=[result],
                                   max_output_tokens=12, **_tool_kwargs())
    after = metrics(server)
    assert (after[FALLBACK], after[REUSED]) == (idle[FALLBACK] + 1, idle[REUSED])
    assert late.usage.input_tokens_details.cached_tokens == 0
    fresh = client.responses.create(
        input=[*_question(12, 30), call.model_dump(exclude_none=True), result],
        max_output_tokens=12, store=False, **_tool_kwargs())
    assert late.output_text == fresh.output_text and "42" in late.output_text
    assert late.usage.input_tokens == fresh.usage.input_tokens


def test_a_text_turn_continues_a_stored_conversation(client):
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=8,
                                    temperature=0)
    second = client.responses.create(model=MODEL, previous_response_id=first.id,
                                     input="What is my name?", max_output_tokens=8,
                                     temperature=0)
    whole = client.responses.create(
        model=MODEL, store=False, max_output_tokens=8, temperature=0,
        input=[{"role": "user", "content": "My name is Ada."},
               {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "What is my name?"}])
    assert second.output_text == whole.output_text
    assert second.usage.input_tokens == whole.usage.input_tokens


def test_get_delete_and_unknown_ids(server, client):
    out = client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=4,
                                  temperature=0)
    got = client.responses.retrieve(out.id)
    assert got.id == out.id and got.output_text == out.output_text
    assert got.usage.output_tokens == out.usage.output_tokens
    client.responses.delete(out.id)
    with pytest.raises(openai.NotFoundError, match=out.id):
        client.responses.retrieve(out.id)
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.responses.delete(out.id)

    unstored = client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=4,
                                       temperature=0, store=False)
    with pytest.raises(openai.NotFoundError, match="store=false"):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError, match="resp_nope.*not found") as unknown:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_nope")
    assert unknown.value.param == "previous_response_id"
    assert unknown.value.code == "previous_response_not_found"

    # Deleting a response that ended on a call aborts its paused request.
    paused = client.responses.create(input=_question(9, 4), max_output_tokens=40,
                                     **_tool_kwargs())
    _calculator_call(paused)
    assert metrics(server)["infercept_paused_contexts"] >= 1
    client.responses.delete(paused.id)
    idle = wait_idle(server)
    assert idle["infercept_paused_contexts"] == 0
    assert idle['infercept_kv_blocks{state="used",tier="device"}'] == 0


def test_an_expired_stored_response_is_unknown(server, client):
    responses = server.app.state.responses.responses
    ttl_s, responses.ttl_s = responses.ttl_s, 0.2
    try:
        out = client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=2,
                                      temperature=0)
    finally:
        responses.ttl_s = ttl_s
    time.sleep(0.3)
    with pytest.raises(openai.BadRequestError, match="expired"):
        client.responses.create(model=MODEL, input="hi", previous_response_id=out.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(out.id)


def test_bad_requests_get_400(client):
    with pytest.raises(openai.BadRequestError, match="function") as bad_tool:
        client.responses.create(model=MODEL, input="hi", tools=[{"type": "web_search"}])
    assert bad_tool.value.param.startswith("tools.0")
    with pytest.raises(openai.BadRequestError, match=r"input\[0\]") as bad_item:
        client.responses.create(model=MODEL, input=[{"type": "item_reference", "id": "x"}])
    assert bad_item.value.param == "input"
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.responses.create(model=MODEL, input="hi", tools=[CALCULATOR_FUNCTION],
                                tool_choice={"type": "function", "name": "other"})
    with pytest.raises(openai.BadRequestError, match="no-such-model"):
        client.responses.create(model="no-such-model", input="hi")


def test_the_whole_conversation_sent_back_resumes_by_call_id(server, client):
    first = client.responses.create(input=_question(5, 6), max_output_tokens=40,
                                    **_tool_kwargs())
    call = _calculator_call(first)
    before = metrics(server)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "11"}
    conversation = [*_question(5, 6), call.model_dump(exclude_none=True), result]
    resumed = client.responses.create(input=conversation, max_output_tokens=12,
                                      **_tool_kwargs())
    assert metrics(server)[REUSED] == before[REUSED] + 1
    assert resumed.usage.input_tokens_details.cached_tokens == (
        first.usage.input_tokens + first.usage.output_tokens)
    fresh = client.responses.create(input=conversation, max_output_tokens=12, store=False,
                                    **_tool_kwargs())
    assert fresh.usage.input_tokens_details.cached_tokens == 0
    assert resumed.output_text == fresh.output_text
    wait_idle(server)


def test_a_follow_up_that_changes_the_prompt_falls_back_and_frees_the_request(server, client):
    first = client.responses.create(input=_question(3, 3), max_output_tokens=40,
                                    **_tool_kwargs())
    call = _calculator_call(first)
    before = metrics(server)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "6"}
    other = {**_tool_kwargs(), "instructions": "Answer briefly."}
    out = client.responses.create(previous_response_id=first.id, input=[result],
                                  max_output_tokens=6, **other)
    client.responses.delete(out.id)  # frees its request, should it have ended on a call
    after = wait_idle(server)
    assert (after[FALLBACK], after[REUSED]) == (before[FALLBACK] + 1, before[REUSED])
    assert out.usage.input_tokens_details.cached_tokens == 0
    assert after["infercept_paused_contexts"] == 0  # the first's request was aborted


def test_store_false_holds_nothing(server, client):
    before = wait_idle(server)
    out = client.responses.create(input=_question(2, 2), max_output_tokens=40, store=False,
                                  **_tool_kwargs())
    _calculator_call(out)
    after = wait_idle(server)
    assert after[HELD] == before[HELD] and after["infercept_paused_contexts"] == 0
    assert after['infercept_kv_blocks{state="used",tier="device"}'] == 0
    with pytest.raises(openai.BadRequestError, match="not found"):
        client.responses.create(model=MODEL, input="hi", previous_response_id=out.id)


def test_serve_cli_takes_the_storage_bounds():
    from infercept.cli import build_parser

    args = build_parser().parse_args(["serve", "--stored-response-ttl-s", "60",
                                      "--max-stored-responses", "5",
                                      "--max-stored-response-bytes", "1000"])
    assert (args.stored_response_ttl_s, args.max_stored_responses,
            args.max_stored_response_bytes) == (60.0, 5, 1000)
    # The defaults the CLI help and the README state.
    config = ServerConfig()
    assert (config.stored_response_ttl_s, config.max_stored_responses,
            config.max_stored_response_bytes) == (3600.0, 1024, 64 * 1024 * 1024)


@pytest.mark.parametrize("chained", [True, False], ids=["previous_response_id", "resend"])
def test_an_openai_agents_sdk_agent_completes_a_tool_task(server, chained):
    agents = pytest.importorskip("agents")
    calls: list[str] = []

    @agents.function_tool
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression."""
        calls.append(expression)
        return calculate(expression)

    async def run() -> object:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused",
                                      max_retries=0, timeout=120) as c:
            agent = agents.Agent(
                name="calculator agent", instructions=FEW_SHOT_INSTRUCTIONS, tools=[calculator],
                model=agents.OpenAIResponsesModel(model=MODEL, openai_client=c),
                model_settings=agents.ModelSettings(temperature=0, max_tokens=40))
            return await agents.Runner.run(
                agent, _question(12, 30), max_turns=4, auto_previous_response_id=chained,
                run_config=agents.RunConfig(tracing_disabled=True))

    before = metrics(server)
    result = asyncio.run(run())
    assert calls == ["12 + 30"]
    assert "42" in result.final_output
    assert metrics(server)[REUSED] == before[REUSED] + 1  # resumed in place either way
    wait_idle(server)


@pytest.mark.skipif(not HAS_PREFIX_CACHE, reason="this engine build has no prefix cache")
def test_with_the_prefix_cache_a_late_follow_up_prefills_from_it():
    engine = EngineSpec(config=EngineConfig(policy="infercept", max_model_len=2048,
                                            enable_prefix_caching=True), tool_errors="abort")
    app = create_app(engine, ServerConfig(served_model_name=MODEL, paused_ttl_s=0.5))
    with ThreadServer(app) as cached_server, openai.OpenAI(
            base_url=f"{cached_server.url}/v1", api_key="unused", max_retries=0,
            timeout=120) as c:
        first = c.responses.create(input=_question(12, 30), max_output_tokens=40,
                                   **_tool_kwargs())
        call = _calculator_call(first)
        idle = wait_idle(cached_server)  # expired: the request is aborted, its blocks cached
        assert idle[EXPIRED] == 1
        result = {"type": "function_call_output", "call_id": call.call_id, "output": "42"}
        late = c.responses.create(previous_response_id=first.id, input=[result],
                                  max_output_tokens=12, **_tool_kwargs())
        assert metrics(cached_server)[FALLBACK] == 1
        # Whole blocks of the paused context came from the cache; the rest was prefilled.
        block_size = engine.config.block_size
        cached = late.usage.input_tokens_details.cached_tokens
        context = first.usage.input_tokens + first.usage.output_tokens
        assert context - block_size <= cached <= context
        assert "42" in late.output_text
