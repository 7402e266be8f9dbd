"""The OpenAI-compatible server against the official ``openai`` client on 127.0.0.1.

One real uvicorn server (SmolLM2-135M, CPU) runs in a thread for the module. Greedy sampling
and small ``max_tokens`` keep it fast; the tool prompts are few-shot, which is what makes the
135M model call ``calculator`` reliably.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from infercept.cli import build_parser  # noqa: E402
from infercept.engine import EngineConfig  # noqa: E402
from infercept.server import EngineSpec, ServerConfig, create_app  # noqa: E402
from infercept.server.chat_format import ContentStreamer  # noqa: E402
from infercept.server.few_shot import CALCULATOR, FEW_SHOT  # noqa: E402
from infercept.server.sessions import PausedContextStore  # noqa: E402
from infercept.server.tool_plugins import load_tool_path  # noqa: E402
from server_harness import ThreadServer, openai_client, metrics, wait_idle  # noqa: E402

MODEL = "smollm2-test"
# These tests count cached_tokens exactly: a resumed paused context, else nothing. An engine
# with a prefix cache would add its own hits on repeated conversations, so it is off here
# (test_server_prefix_cache.py serves with it on).
NO_PREFIX_CACHE = ({"enable_prefix_caching": False}
                   if "enable_prefix_caching" in {f.name for f in dataclasses.fields(EngineConfig)}
                   else {})


def _question(a: int, b: int) -> list[dict]:
    return [*FEW_SHOT, {"role": "user", "content": f"What is {a} + {b}?"}]


@pytest.fixture(scope="module")
def server():
    # The default mode: the engine in its own process, built there from the spec.
    engine = EngineSpec(config=EngineConfig(policy="infercept", max_model_len=2048,
                                            **NO_PREFIX_CACHE),
                        tool_paths=["infercept.tools:calculator_tool"], tool_errors="return")
    app = create_app(engine, ServerConfig(served_model_name=MODEL, paused_ttl_s=300.0))
    with ThreadServer(app) as running:
        yield running
    # Stopping the server stops the engine process cleanly (a Shutdown message, not a kill).
    assert app.state.server.engine_loop.process.wait(30) == 0


@pytest.fixture(scope="module")
def client(server):
    with openai_client(server) as c:
        yield c


# ---- pieces without a server -------------------------------------------------------------

def test_store_matches_by_token_prefix_and_expires():
    now = [0.0]
    store = PausedContextStore(ttl_s=10.0, clock=lambda: now[0])
    store.add(1, [5, 6, 7], ["call_a"])
    store.add(2, [5, 9], ["call_b"], session_id="s")
    miss = store.take_match([5, 6, 8, 1])
    assert miss.context is None and not miss.stale and len(store) == 2
    hit = store.take_match([5, 6, 7, 1, 2])
    assert hit.context.request_id == 1 and hit.resume_token_ids == (1, 2)
    # Claimed by session id but the tokens moved on: stale, to abort; no match.
    claimed = store.take_match([5, 6, 7, 1], session_id="s")
    assert claimed.context is None and [c.request_id for c in claimed.stale] == [2]
    store.add(3, [1, 2], ["call_c"])
    now[0] = 11.0
    expired = store.take_match([1, 2, 3])
    assert expired.context is None and [c.request_id for c in expired.stale] == [3]


def test_content_streamer_holds_back_tool_calls():
    streamer = ContentStreamer()
    assert streamer.delta("Sure <to") == "Sure "
    assert streamer.delta("Sure <tool_call>{\"na") == ""
    assert streamer.delta("Sure <tool_call>{}</tool_call> ok") == "<tool_call>{}</tool_call> ok"
    assert streamer.delta("Sure <tool_call>{}</tool_call> ok <", final=True) == " <"


def test_server_tools_load_from_module_paths():
    tools = load_tool_path("infercept.tools:calculator_tool")
    assert [t.name for t in tools] == ["calculator"]
    with pytest.raises(ValueError, match="module:attr"):
        load_tool_path("infercept.tools")
    with pytest.raises(ValueError, match="no attribute"):
        load_tool_path("infercept.tools:nope")
    with pytest.raises(ValueError, match="not a Tool"):
        load_tool_path("infercept.server.protocol:_FUNCTION_NAME_PATTERN")


def test_serve_cli_parses():
    args = build_parser().parse_args(["serve", "--model", "default", "--policy", "infercept",
                                      "--port", "9", "--tools", "a:b"])
    assert (args.model, args.policy, args.port, args.tools) == ("default", "infercept", 9, ["a:b"])
    assert (args.api_key, args.enable_prefix_caching) == (None, None)
    args = build_parser().parse_args(["serve", "--api-key", "k", "--no-enable-prefix-caching"])
    assert (args.api_key, args.enable_prefix_caching) == ("k", False)
    assert args.rank_s_per_predicted_token == 0.0  # FCFS unless asked
    args = build_parser().parse_args(["serve", "--rank-s-per-predicted-token", "0.2"])
    assert args.rank_s_per_predicted_token == 0.2
    # What cmd_serve builds from it; a bad rate fails before the engine process starts.
    from infercept.server import engine_spec
    assert engine_spec("default", "infercept",
                       rank_s_per_predicted_token=0.2).config.rank_s_per_predicted_token == 0.2
    with pytest.raises(ValueError, match="rank_s_per_predicted_token=-1"):
        engine_spec("default", "infercept", rank_s_per_predicted_token=-1.0)
    assert not args.learn_output_lengths
    args = build_parser().parse_args(["serve", "--rank-s-per-predicted-token", "0.2",
                                      "--learn-output-lengths"])
    assert args.learn_output_lengths
    assert engine_spec("default", "infercept", rank_s_per_predicted_token=0.2,
                       learn_output_lengths=True).config.learn_output_lengths
    with pytest.raises(ValueError, match="learn_output_lengths=True needs rank_s_per_predicted_token"):
        engine_spec("default", "infercept", learn_output_lengths=True)


def test_store_matches_only_contexts_of_the_same_cache_salt():
    store = PausedContextStore(ttl_s=10.0)
    store.add(1, [5, 6], ["call_a"], cache_salt="tenant-a")
    # Another tenant (or no salt) neither resumes it nor, by naming its call, makes it stale.
    for salt in ("tenant-b", None):
        other = store.take_match([5, 6, 7], tool_call_ids=["call_a"], cache_salt=salt)
        assert other.context is None and not other.stale and len(store) == 1
    hit = store.take_match([5, 6, 7], tool_call_ids=["call_a"], cache_salt="tenant-a")
    assert hit.context.request_id == 1 and hit.resume_token_ids == (7,)


# ---- endpoints ---------------------------------------------------------------------------

def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("infercept_requests", "infercept_kv_usage_ratio", "infercept_swap_bytes_total",
                 "infercept_waste_fraction", "infercept_generation_tokens_per_second",
                 "infercept_paused_context_total"):
        assert f"# TYPE {name} " in text


def test_completions_streaming_matches_non_streaming(client):
    kwargs = dict(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    full = client.completions.create(**kwargs)
    assert full.choices[0].finish_reason in ("length", "stop")
    assert full.usage.completion_tokens <= 8 and full.choices[0].text
    pieces = [chunk.choices[0].text for chunk in client.completions.create(stream=True, **kwargs)
              if chunk.choices]
    assert "".join(pieces) == full.choices[0].text


def test_chat_streaming_matches_non_streaming(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name a color."}],
                  max_tokens=10, temperature=0)
    full = client.chat.completions.create(**kwargs)
    message = full.choices[0].message
    assert message.role == "assistant" and message.content and not message.tool_calls
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kwargs)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_tool_round_trip_resumes_paused_context(server, client):
    messages = _question(12, 30)
    # With a prediction of the remaining output (kept by this FCFS engine, so nothing else
    # changes; test_engine.py checks the ranked key): it reaches the engine process on the add
    # and on the resume.
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[CALCULATOR],
                                           temperature=0, max_tokens=40,
                                           extra_body={"predicted_output_tokens": 30})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "12 + 30"}
    before = metrics(server)
    assert before["infercept_paused_contexts"] >= 1

    follow_up = [*messages, choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "42"}]
    resumed = client.chat.completions.create(model=MODEL, messages=follow_up, tools=[CALCULATOR],
                                             temperature=0, max_tokens=12,
                                             extra_body={"predicted_output_tokens": 10})
    after = metrics(server)
    reused = 'infercept_paused_context_total{outcome="reused"}'
    fallback = 'infercept_paused_context_total{outcome="fallback"}'
    assert after[reused] == before[reused] + 1
    assert after[fallback] == before[fallback]
    # The context through the tool call was not prefilled again.
    assert resumed.usage.prompt_tokens_details.cached_tokens == (
        first.usage.prompt_tokens + first.usage.completion_tokens)

    # The same conversation again: nothing is paused for it now, so it is a fresh prefill.
    fresh = client.chat.completions.create(model=MODEL, messages=follow_up, tools=[CALCULATOR],
                                           temperature=0, max_tokens=12)
    assert metrics(server)[fallback] == after[fallback] + 1
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert resumed.choices[0].message.content == fresh.choices[0].message.content
    assert resumed.choices[0].finish_reason == fresh.choices[0].finish_reason
    assert resumed.usage.prompt_tokens == fresh.usage.prompt_tokens
    assert "42" in resumed.choices[0].message.content
    wait_idle(server)


def test_streamed_tool_call_and_mismatched_follow_up_falls_back(server, client):
    messages = _question(7, 8)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages,
                                                 tools=[CALCULATOR], temperature=0,
                                                 max_tokens=40, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "<tool_call>" not in content  # the call goes out as tool_calls, not text
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].function.name == "calculator"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    before = metrics(server)

    # The client edits an earlier turn: the paused tokens no longer prefix the conversation.
    edited = [*FEW_SHOT, {"role": "user", "content": "What is 7 + 8 exactly?"},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": calls[0].id, "type": "function",
                   "function": {"name": "calculator", "arguments": calls[0].function.arguments}}]},
              {"role": "tool", "tool_call_id": calls[0].id, "content": "15"}]
    out = client.chat.completions.create(model=MODEL, messages=edited, tools=[CALCULATOR],
                                         temperature=0, max_tokens=8)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    after = wait_idle(server) if out.choices[0].finish_reason != "tool_calls" else metrics(server)
    fallback = 'infercept_paused_context_total{outcome="fallback"}'
    assert after[fallback] == before[fallback] + 1
    assert after['infercept_paused_context_total{outcome="reused"}'] == before[
        'infercept_paused_context_total{outcome="reused"}']


def test_expired_paused_context_is_freed_and_the_follow_up_still_answers(server, client):
    store = server.app.state.server.store
    expired = 'infercept_paused_context_total{outcome="expired"}'
    before = metrics(server)
    ttl_s, store.ttl_s = store.ttl_s, 0.5
    try:
        messages = _question(12, 30)
        first = client.chat.completions.create(model=MODEL, messages=messages, tools=[CALCULATOR],
                                               temperature=0, max_tokens=40)
    finally:
        store.ttl_s = ttl_s
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    idle = wait_idle(server)  # the expiry sweep aborts the paused request and frees its blocks
    assert idle[expired] == before[expired] + 1 and idle["infercept_paused_contexts"] == 0
    follow_up = [*messages, choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id,
                  "content": "42"}]
    late = client.chat.completions.create(model=MODEL, messages=follow_up, tools=[CALCULATOR],
                                          temperature=0, max_tokens=12)
    assert late.usage.prompt_tokens_details.cached_tokens == 0
    assert "42" in late.choices[0].message.content


def test_cache_salt_keeps_paused_contexts_apart(server, client):
    messages = _question(9, 4)
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[CALCULATOR],
                                           temperature=0, max_tokens=40,
                                           extra_body={"cache_salt": "tenant-a"})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    follow_up = [*messages, choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id,
                  "content": "13"}]
    reused = 'infercept_paused_context_total{outcome="reused"}'
    fallback = 'infercept_paused_context_total{outcome="fallback"}'
    before = metrics(server)

    # The same tokens and call id from another tenant: prefilled, and the context stays held.
    other = client.chat.completions.create(model=MODEL, messages=follow_up, tools=[CALCULATOR],
                                           temperature=0, max_tokens=4,
                                           extra_body={"cache_salt": "tenant-b"})
    middle = metrics(server)
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    assert (middle[reused], middle[fallback]) == (before[reused], before[fallback] + 1)
    assert middle["infercept_paused_contexts"] == before["infercept_paused_contexts"]

    own = client.chat.completions.create(model=MODEL, messages=follow_up, tools=[CALCULATOR],
                                         temperature=0, max_tokens=4,
                                         extra_body={"cache_salt": "tenant-a"})
    assert metrics(server)[reused] == middle[reused] + 1
    assert own.usage.prompt_tokens_details.cached_tokens == (
        first.usage.prompt_tokens + first.usage.completion_tokens)
    wait_idle(server)


def test_cache_salt_that_is_not_a_string_gets_400(client):
    with pytest.raises(openai.BadRequestError, match="cache_salt") as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, extra_body={"cache_salt": 12345})
    assert bad.value.param == "cache_salt" and "12345" in str(bad.value)
    with pytest.raises(openai.BadRequestError, match="non-empty string"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                  extra_body={"cache_salt": ""})
    ok = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0,
                                   extra_body={"cache_salt": "tenant-a"})
    assert ok.usage.prompt_tokens_details.cached_tokens == 0


def test_metrics_parse_as_prometheus_text_with_latency_histograms(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.chat.completions.create(model=MODEL, messages=_question(20, 22), temperature=0,
                                   max_tokens=48)  # runs the server-side calculator
    client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6,
                              temperature=0)
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def count(name: str, **labels: str) -> float:
        return sum(s.value for s in families[name].samples if s.name == f"{name}_count"
                   and labels.items() <= s.labels.items())

    for name in ("infercept_time_to_first_token_seconds", "infercept_inter_token_latency_seconds",
                 "infercept_e2e_request_latency_seconds", "infercept_request_queue_time_seconds",
                 "infercept_tool_time_seconds"):
        assert families[name].type == "histogram"
        assert count(name) > 0, name
    assert count("infercept_tool_time_seconds", kind="server") > 0
    for name in ("infercept_prefix_cache_queries", "infercept_prefix_cache_hits",
                 "infercept_prefix_cache_evicted_blocks", "infercept_prompt_tokens",
                 "infercept_generation_tokens", "infercept_paused_context"):
        assert families[name].type == "counter", name
    for name in ("infercept_prefix_cache_blocks", "infercept_num_requests_running",
                 "infercept_num_requests_waiting", "infercept_kv_cache_usage_perc"):
        assert families[name].type == "gauge", name
    assert families["infercept_generation_tokens"].samples[0].value > 0


def test_server_side_tool_runs_inside_one_completion(client):
    out = client.chat.completions.create(model=MODEL, messages=_question(20, 22), temperature=0,
                                         max_tokens=48)
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    assert "<tool_response>42</tool_response>" in choice.message.content


def test_concurrent_clients_with_mixed_tool_calls(server):
    num_clients = 32

    async def round_trip(c, i):
        messages = _question(i, 100)
        first = await c.chat.completions.create(model=MODEL, messages=messages,
                                                tools=[CALCULATOR], temperature=0, max_tokens=40)
        choice = first.choices[0]
        if choice.finish_reason != "tool_calls":
            return choice.finish_reason
        call = choice.message.tool_calls[0]
        follow_up = [*messages, choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": str(i + 100)}]
        second = await c.chat.completions.create(model=MODEL, messages=follow_up,
                                                 tools=[CALCULATOR], temperature=0, max_tokens=8)
        return second.choices[0].finish_reason

    async def server_tool(c, i):
        out = await c.chat.completions.create(model=MODEL, messages=_question(i, 7),
                                              temperature=0, max_tokens=40)
        return out.choices[0].finish_reason

    async def plain_stream(c, i):
        stream = await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Say the number {i}."}],
            temperature=0, max_tokens=8, stream=True)
        reasons = [chunk.choices[0].finish_reason async for chunk in stream
                   if chunk.choices and chunk.choices[0].finish_reason]
        return reasons[-1]

    async def plain_completion(c, i):
        out = await c.completions.create(model=MODEL, prompt=f"Count: {i},", max_tokens=8,
                                         temperature=0)
        return out.choices[0].finish_reason

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused",
                                      max_retries=0, timeout=300) as c:
            kinds = [round_trip, server_tool, plain_stream, plain_completion]
            before = metrics(server)
            reasons = await asyncio.gather(*(kinds[i % 4](c, i) for i in range(num_clients)))
            return before, reasons

    before, reasons = asyncio.run(main())
    assert len(reasons) == num_clients
    assert all(r in ("stop", "length") for r in reasons), reasons
    after = wait_idle(server)
    assert after['infercept_kv_blocks{state="used",tier="device"}'] == 0
    reused = 'infercept_paused_context_total{outcome="reused"}'
    assert after[reused] > before[reused]


def test_bad_requests_get_400_and_the_server_keeps_serving(server, client):
    raw = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": "x", "messages": [',
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400
    assert "malformed JSON" in raw.json()["error"]["message"]

    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model="no-such-model",
                                       messages=[{"role": "user", "content": "hi"}])
    assert "no-such-model" in str(unknown.value) and unknown.value.code == "model_not_found"

    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5000)
    assert "2048" in str(too_long.value) and "5000" in str(too_long.value)
    with pytest.raises(openai.BadRequestError, match="2048"):
        client.completions.create(model=MODEL, prompt=[1] * 2100, max_tokens=4)

    bad_schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
    with pytest.raises(openai.BadRequestError, match="parameters") as bad_tool:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       tools=[bad_schema])
    assert bad_tool.value.param == "tools.0.function.parameters"
    with pytest.raises(openai.BadRequestError, match="function"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "a b"}}])

    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=4, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert metrics(server)['infercept_http_requests_total{endpoint="/v1/chat/completions",'
                            'status="400"}'] >= 4


def test_client_disconnect_mid_stream_aborts_and_frees_blocks(server):
    wait_idle(server)
    before = metrics(server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            received = 0
            for line in lines:
                if line.startswith("data: ") and '"content"' in line:
                    received += 1
                if received >= 3:
                    break
            used = metrics(server)['infercept_kv_blocks{state="used",tier="device"}']
            assert used > 0  # the request holds blocks while it streams
    after = wait_idle(server)
    assert after["infercept_client_disconnects_total"] == (
        before["infercept_client_disconnects_total"] + 1)
    assert after['infercept_kv_blocks{state="used",tier="device"}'] == 0
    assert after['infercept_requests{state="running"}'] == 0


# ---- the sampling surface: logprobs, n, penalties, logit_bias, min_tokens, limits ----------

def test_completion_logprobs_equal_log_softmax_of_the_reference_logits(client, tokenizer):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch

    from infercept.weights.default import default_model_path

    prompt_ids = tokenizer.encode("The capital of France is")
    out = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=6, temperature=0,
                                    logprobs=3, extra_body={"ignore_eos": True})
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert "".join(logprobs.tokens) == out.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    path = default_model_path()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        generated = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=6,
                                       do_sample=False,
                                       attention_mask=torch.ones(1, len(prompt_ids)))[0]
        logits = reference(generated.unsqueeze(0)).logits[0, len(prompt_ids) - 1:-1]
    want = torch.log_softmax(logits, dim=1)
    for step, token_id in enumerate(generated[len(prompt_ids):].tolist()):
        assert logprobs.tokens[step] == tokenizer.decode([token_id])
        assert logprobs.token_logprobs[step] == pytest.approx(float(want[step, token_id]),
                                                              abs=2e-3)
        top = logprobs.top_logprobs[step]
        assert len(top) == 3 and max(top.values()) == pytest.approx(
            logprobs.token_logprobs[step], abs=1e-6)  # greedy took the most likely
        assert sorted(top.values(), reverse=True) == pytest.approx(
            torch.topk(want[step], 3).values.tolist(), abs=2e-3)
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt=prompt_ids, max_tokens=6, temperature=0, logprobs=3, stream=True,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.token_logprobs] == logprobs.token_logprobs
    assert [o for lp in streamed for o in lp.text_offset] == logprobs.text_offset


def test_completion_echo_returns_the_prompt_with_its_logprobs(client, tokenizer):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch

    from infercept.weights.default import default_model_path

    prompt = "The capital of France is Paris. The capital of Italy is"
    prompt_ids = tokenizer.encode(prompt)
    num_prompt = len(prompt_ids)
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2,
                  echo=True, extra_body={"ignore_eos": True})
    out = client.completions.create(**kwargs)
    choice, logprobs = out.choices[0], out.choices[0].logprobs
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == num_prompt + 3
    # OpenAI's shape: the first prompt token has no context, so no logprob and no alternatives.
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.tokens[:num_prompt] == [tokenizer.decode([t]) for t in prompt_ids]
    assert logprobs.text_offset[:num_prompt] == [
        sum(len(t) for t in logprobs.tokens[:i]) for i in range(num_prompt)]
    assert logprobs.text_offset[num_prompt] == len(prompt)
    path = default_model_path()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        want = torch.log_softmax(reference(torch.tensor([prompt_ids])).logits[0], dim=1)
    for position in range(1, num_prompt):
        row = want[position - 1]
        assert logprobs.token_logprobs[position] == pytest.approx(
            float(row[prompt_ids[position]]), abs=2e-3)
        top = logprobs.top_logprobs[position]
        assert len(top) == 2 and sorted(top.values(), reverse=True) == pytest.approx(
            torch.topk(row, 2).values.tolist(), abs=2e-3)
    # Streamed: the echo chunk carries the prompt's entries, then the tokens' follow.
    chunks = [c for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.token_logprobs] == logprobs.token_logprobs
    assert [o for lp in streamed for o in lp.text_offset] == logprobs.text_offset
    # Without logprobs echo only prepends the prompt; n > 1 echoes it on every choice.
    plain = client.completions.create(**{**kwargs, "logprobs": None})
    assert plain.choices[0].text == choice.text and plain.choices[0].logprobs is None
    both = client.completions.create(**{**kwargs, "n": 2})
    assert [c.logprobs.token_logprobs[:num_prompt] for c in both.choices] == [
        logprobs.token_logprobs[:num_prompt]] * 2
    assert all(c.text.startswith(prompt) for c in both.choices)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(**{**kwargs, "logprobs": 21})
    assert "logprobs" in str(refused.value) and "20" in str(refused.value)


def test_chat_logprobs_streamed_and_not(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name a color."}],
                  max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    full = client.chat.completions.create(**kwargs)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0.0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
        assert entry.bytes == list(entry.token.encode())
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(**{**kwargs, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_n_choices_seeded_per_choice_reproduce(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a fun fact."}],
                  max_tokens=12, temperature=1.0, seed=11, n=3)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in again.choices] == texts
    assert len(set(texts)) > 1  # seed, seed + 1, seed + 2: different draws
    # Choice 0 is what n=1 with the same seed samples.
    single = client.chat.completions.create(**{**kwargs, "n": 1})
    assert single.choices[0].message.content == texts[0]
    assert 3 <= first.usage.completion_tokens <= 3 * 12  # summed over the choices
    completions = client.completions.create(model=MODEL, prompt="Once upon a time", n=2,
                                            max_tokens=8, temperature=1.0, seed=3)
    assert [c.index for c in completions.choices] == [0, 1]
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", n=2,
                                            max_tokens=8, temperature=1.0, seed=3, stream=True))
    for index in (0, 1):
        streamed = "".join(c.choices[0].text for c in chunks
                           if c.choices and c.choices[0].index == index)
        assert streamed == completions.choices[index].text
    chat_chunks = list(client.chat.completions.create(stream=True, **kwargs))
    for index in range(3):
        streamed = "".join(c.choices[0].delta.content or "" for c in chat_chunks
                           if c.choices and c.choices[0].index == index)
        assert streamed == texts[index]


def test_penalties_logit_bias_and_min_tokens_over_the_wire(client, tokenizer):
    # An answer that repeats itself, so every penalty has something to act on.
    messages = [{"role": "user", "content": "Repeat the word hello ten times."}]
    # ignore_eos: 24 tokens whatever the model says, so a short answer is followed by repeats.
    kwargs = dict(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                  extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    for extra in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
                  {"extra_body": {"ignore_eos": True, "repetition_penalty": 1.8}}):
        penalized = client.chat.completions.create(**{**kwargs, **extra}).choices[0].message.content
        assert penalized != plain, extra
    banana = tokenizer.encode(" banana", add_special_tokens=False)[-1]
    forced = client.chat.completions.create(**{**kwargs, "max_tokens": 4},
                                            logit_bias={str(banana): 100})
    assert forced.choices[0].message.content == " banana" * 4
    short = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say only: yes"}], max_tokens=64,
        temperature=0)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 20
    longer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say only: yes"}], max_tokens=64,
        temperature=0, extra_body={"min_tokens": 20})
    assert longer.usage.completion_tokens >= 20


@pytest.mark.parametrize("kwargs, words", [
    ({"stop": [f"s{i}" for i in range(17)]}, ["17 stop sequences", "limit 16"]),
    ({"stop": "x" * 300}, ["300 characters", "limit 256"]),
    ({"logprobs": True, "top_logprobs": 21}, ["top_logprobs", "20"]),
    ({"top_logprobs": 2}, ["top_logprobs needs logprobs"]),
    ({"presence_penalty": 3.0}, ["presence_penalty", "2"]),
    ({"n": 17}, ["n", "16"]),
    ({"logit_bias": {"49152": 5}}, ["logit_bias token id 49152", "[0, 49152)"]),
    ({"logit_bias": {"abc": 5}}, ["logit_bias key 'abc'"]),
    ({"n": 2, "tools": [CALCULATOR]}, ["n=2 is not supported with tools"]),
    ({"extra_body": {"min_tokens": 50}, "max_tokens": 10}, ["min_tokens=50", "max_tokens=10"]),
    ({"extra_body": {"predicted_output_tokens": -1}}, ["predicted_output_tokens", "0"]),
    ({"extra_body": {"predicted_output_tokens": 2**31}},
     ["predicted_output_tokens", "2147483648"]),
])
def test_bad_sampling_values_are_400s_naming_value_and_limit(server, client, kwargs, words):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       **{"max_tokens": 4, **kwargs})
    for word in words:
        assert word in str(refused.value)
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")
