"""Two engine replicas on a local Ray Serve, behind one OpenAI endpoint (infercept.deploy).

Real Ray (``ray.init`` on this machine), two replicas of the embedded SmolLM2 (small KV pool,
half a CPU and one thread each), the official ``openai`` client on Ray's HTTP proxy. Each
reply names the replica that sent it (``x-infercept-replica``); each replica's own /metrics
is read through the ingress's handle, pinned to that replica (``/replicas/{id}/metrics``).

1. Tool round trips, chat (tool_call_id) and Responses (previous_response_id, one first turn
   streamed), four at once: each follow-up resumes in place on the replica that paused it;
   each replica's ``reused`` counter moves by its own conversations, ``fallback`` not at all.
2. The ingress is killed while two conversations are paused: the new ingress's router
   rebuilds its table from the keys the replicas report (their routing stats), and both
   follow-ups still resume in place.
3. One replica is killed (``ray.kill`` of its actor) while conversations are paused on both:
   its conversations fall back to a prefill elsewhere (the Responses one through the mirrored
   stored response) and still answer; the survivor's resume in place.
"""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from infercept.server import ServerConfig  # noqa: E402
from infercept.server.few_shot import (CALCULATOR, CALCULATOR_FUNCTION, FEW_SHOT,  # noqa: E402
                                       FEW_SHOT_INPUT, FEW_SHOT_INSTRUCTIONS)
from infercept.server.metrics import parse_metrics  # noqa: E402

# Ray and its dependencies warn about their own deprecations; they are not this test's.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

MODEL = "smollm2-ray"
REUSED = 'infercept_paused_context_total{outcome="reused"}'
FALLBACK = 'infercept_paused_context_total{outcome="fallback"}'
HELD = 'infercept_paused_context_total{outcome="held"}'
# The conversations run at once: chat follow-ups name the call by tool_call_id, Responses ones
# by previous_response_id (one first turn streamed).
APIS = ("responses", "chat", "responses-stream", "chat")
# Small engines: 96 MiB of device KV each (about 2,000 tokens of SmolLM2), no prefix cache so
# a fallback is a whole prefill.
ENGINE = dict(model=None, policy="infercept", tool_paths=[], entry_point_tools=False,
              max_model_len=2048, kv_cache_bytes=96 * 2**20, enable_prefix_caching=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint():
    from ray import serve

    from infercept.deploy.serve_app import build_app, start_mirror

    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by Ray's workers (and the mirror's)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             namespace="infercept-deploy-test")
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServerConfig(served_model_name=MODEL, paused_ttl_s=600.0)
        mirror = start_mirror(config, name="infercept-test-mirror")
        serve.run(build_app(ENGINE, config, num_replicas=2, num_cpus_per_replica=0.5,
                            mirror_name=mirror), name="infercept", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = threads


@pytest.fixture(scope="module")
def client(endpoint):
    with openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0,
                       timeout=300) as c:
        yield c


def _replicas(endpoint: str) -> dict[str, str]:
    """Live replica id -> its Ray actor name."""
    listed = httpx.get(f"{endpoint}/replicas", timeout=120).json()["replicas"]
    return {r["id"]: r["actor_name"] for r in listed}


def _counters(endpoint: str, replica: str) -> dict[str, float]:
    reply = httpx.get(f"{endpoint}/replicas/{replica}/metrics", timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-infercept-replica"] == replica
    return parse_metrics(reply.text)


class _Conversation:
    """One calculator question: a first turn that ends on a tool call, then the result."""

    def __init__(self, client: openai.OpenAI, a: int, b: int, api: str) -> None:
        self.client, self.a, self.b, self.api = client, a, b, api
        # A salt of its own: no conversation shares another's prefix, so first turns are placed
        # by load, not by the prefix an earlier one left on a replica.
        self.salt = {"cache_salt": f"conversation-{a}-{b}"}
        self.first_replica = self.follow_up_replica = ""
        self.answer = ""

    def first_turn(self) -> _Conversation:
        if self.api == "chat":
            self.messages = [*FEW_SHOT, {"role": "user",
                                         "content": f"What is {self.a} + {self.b}?"}]
            raw = self.client.chat.completions.with_raw_response.create(
                model=MODEL, messages=self.messages, tools=[CALCULATOR], temperature=0,
                max_tokens=40, extra_body=self.salt)
            self.first = raw.parse()
            assert self.first.choices[0].finish_reason == "tool_calls", self.first
        else:
            request = dict(
                model=MODEL, instructions=FEW_SHOT_INSTRUCTIONS, tools=[CALCULATOR_FUNCTION],
                input=[*FEW_SHOT_INPUT, {"role": "user",
                                         "content": f"What is {self.a} + {self.b}?"}],
                temperature=0, max_output_tokens=40, extra_body=self.salt)
            if self.api == "responses-stream":  # the call's ids are learned from the stream
                with self.client.responses.with_streaming_response.create(
                        stream=True, **request) as raw:
                    events = list(raw.parse())
                self.first = next(e.response for e in events if e.type == "response.completed")
            else:
                raw = self.client.responses.with_raw_response.create(**request)
                self.first = raw.parse()
            assert [i.type for i in self.first.output][-1] == "function_call", self.first
        self.first_replica = raw.headers["x-infercept-replica"]
        return self

    def follow_up(self) -> _Conversation:
        result = str(self.a + self.b)
        if self.api == "chat":
            message = self.first.choices[0].message
            raw = self.client.chat.completions.with_raw_response.create(
                model=MODEL, tools=[CALCULATOR], temperature=0, max_tokens=12,
                extra_body=self.salt,
                messages=[*self.messages, message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": message.tool_calls[0].id,
                           "content": result}])
            self.answer = raw.parse().choices[0].message.content or ""
        else:
            call = self.first.output[-1]
            raw = self.client.responses.with_raw_response.create(
                model=MODEL, instructions=FEW_SHOT_INSTRUCTIONS, tools=[CALCULATOR_FUNCTION],
                previous_response_id=self.first.id, temperature=0, max_output_tokens=12,
                extra_body=self.salt,
                input=[{"type": "function_call_output", "call_id": call.call_id,
                        "output": result}])
            self.answer = raw.parse().output_text
        self.follow_up_replica = raw.headers["x-infercept-replica"]
        return self


def _all(pool: ThreadPoolExecutor, calls) -> list:
    return [f.result(600) for f in [pool.submit(c) for c in calls]]


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_follow_ups_resume_on_the_replica_that_paused_them(endpoint, client):
    replicas = list(_replicas(endpoint))
    assert len(replicas) == 2
    before = {r: _counters(endpoint, r) for r in replicas}
    conversations = [_Conversation(client, 10 + i, 20 + 3 * i, api)
                     for i, api in enumerate(APIS)]
    with ThreadPoolExecutor(4) as pool:
        _all(pool, [c.first_turn for c in conversations])
        _all(pool, [c.follow_up for c in conversations])
    assert {c.first_replica for c in conversations} == set(replicas), (
        "the load balancer put every first turn on one replica")
    for c in conversations:
        assert c.follow_up_replica == c.first_replica, (c.api, c.first_replica)
        assert str(c.a + c.b) in c.answer, (c.api, c.answer)
    for r in replicas:
        after = _counters(endpoint, r)
        mine = sum(c.first_replica == r for c in conversations)
        assert _delta(after, before[r], HELD) == mine
        assert _delta(after, before[r], REUSED) == mine  # resumed in place, each of them
        assert _delta(after, before[r], FALLBACK) == 0
    routed = parse_metrics(httpx.get(f"{endpoint}/metrics", timeout=60).text)
    assert routed['infercept_router_requests_total{reason="context"}'] >= 4

    # A new question on a chat conversation's prefix (its salt, the few-shot turns) goes to
    # the replica that served that prefix.
    chat = conversations[1]
    prefix = 'infercept_router_requests_total{reason="prefix"}'
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[*FEW_SHOT, {"role": "user", "content": "What is 2 + 2?"}],
        tools=[CALCULATOR], temperature=0, max_tokens=2, extra_body=chat.salt)
    assert raw.headers["x-infercept-replica"] == chat.first_replica
    after = parse_metrics(httpx.get(f"{endpoint}/metrics", timeout=60).text)
    assert after[prefix] == routed[prefix] + 1


def test_a_restarted_ingress_rebuilds_its_table_from_the_replicas(endpoint, client):
    replicas = list(_replicas(endpoint))
    conversations = [_Conversation(client, 60 + i, 5 + i, api)
                     for i, api in enumerate(("chat", "responses"))]
    with ThreadPoolExecutor(2) as pool:
        _all(pool, [c.first_turn for c in conversations])
    before = {r: _counters(endpoint, r) for r in replicas}
    # The ingress (and the router and table in it) is killed; Ray Serve starts another,
    # whose table is empty until the replicas' routing stats (the keys they hold) arrive.
    ingress = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith("SERVE_REPLICA::infercept#Ingress#")]
    assert len(ingress) == 1
    ray.kill(ray.get_actor(ingress[0], namespace="serve"))
    deadline = time.monotonic() + 300
    while True:
        try:
            if set(_replicas(endpoint)) == set(replicas):
                break
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        assert time.monotonic() < deadline, "no ingress came back"
        time.sleep(1)
    with ThreadPoolExecutor(2) as pool:
        _all(pool, [c.follow_up for c in conversations])
    for c in conversations:
        assert c.follow_up_replica == c.first_replica, (c.api, c.first_replica)
        assert str(c.a + c.b) in c.answer, (c.api, c.answer)
    for r in replicas:
        mine = sum(c.first_replica == r for c in conversations)
        after = _counters(endpoint, r)
        assert _delta(after, before[r], REUSED) == mine
        assert _delta(after, before[r], FALLBACK) == 0


def test_killing_a_replica_loses_only_its_paused_contexts(endpoint, client):
    replicas = _replicas(endpoint)
    conversations = [_Conversation(client, 40 + i, 7 * i + 1, api)
                     for i, api in enumerate(APIS)]
    with ThreadPoolExecutor(4) as pool:
        _all(pool, [c.first_turn for c in conversations])
    assert {c.first_replica for c in conversations} == set(replicas)
    victim = conversations[0].first_replica
    survivor = next(r for r in replicas if r != victim)
    lost = [c for c in conversations if c.first_replica == victim]
    kept = [c for c in conversations if c.first_replica == survivor]
    before = _counters(endpoint, survivor)
    routed_before = parse_metrics(httpx.get(f"{endpoint}/metrics", timeout=60).text)

    ray.kill(ray.get_actor(replicas[victim], namespace="serve"), no_restart=True)
    with ThreadPoolExecutor(4) as pool:
        _all(pool, [c.follow_up for c in conversations])

    for c in conversations:
        assert str(c.a + c.b) in c.answer, (c.api, c.answer)
        assert c.follow_up_replica != victim
    for c in kept:  # unaffected: resumed in place
        assert c.follow_up_replica == survivor
    after = _counters(endpoint, survivor)
    assert _delta(after, before, REUSED) == len(kept)
    # The lost ones were prefilled: on the survivor, or on the victim's replacement if Ray
    # Serve had it running already.
    fallbacks = _delta(after, before, FALLBACK)
    for replica in {c.follow_up_replica for c in lost} - {survivor}:
        fallbacks += _counters(endpoint, replica).get(FALLBACK, 0.0)
    assert fallbacks == len(lost)
    routed = parse_metrics(httpx.get(f"{endpoint}/metrics", timeout=60).text)
    lost_key = 'infercept_router_requests_total{reason="lost"}'
    assert routed[lost_key] - routed_before[lost_key] == len(lost)
    assert victim not in _replicas(endpoint)
