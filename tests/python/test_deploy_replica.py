"""The replica adapter of infercept.deploy without Ray: the OpenAI server app called in
process with RoutedRequests (the embedded SmolLM2 on a thread), its replies' keys, and a
stored response taken over from the mirror by a second replica."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from infercept.deploy.affinity import call_key, request_keys, response_key  # noqa: E402
from infercept.deploy.messages import ReplyHead, ReplyKeys, RoutedRequest  # noqa: E402
from infercept.deploy.replica import MirrorStore, ReplicaServer  # noqa: E402
from infercept.engine import EngineConfig, LLMEngine  # noqa: E402
from infercept.server import ServerConfig, create_app  # noqa: E402
from infercept.server.few_shot import (CALCULATOR, CALCULATOR_FUNCTION, FEW_SHOT,  # noqa: E402
                                       FEW_SHOT_INPUT, FEW_SHOT_INSTRUCTIONS)
from infercept.server.metrics import parse_metrics  # noqa: E402

MODEL = "smollm2-replica"
FALLBACK = 'infercept_paused_context_total{outcome="fallback"}'
REUSED = 'infercept_paused_context_total{outcome="reused"}'


class _Mirror:
    """The ResponseMirror protocol over a MirrorStore in this process."""

    def __init__(self) -> None:
        self.store = MirrorStore(600.0, 100, 2**24)

    async def get(self, response_id):
        return self.store.get(response_id)

    async def put(self, stored):
        self.store.put(stored)

    async def delete(self, response_id):
        self.store.delete(response_id)


def _replica(name: str, mirror: _Mirror, model, tokenizer) -> ReplicaServer:
    # Each replica its own engine (KV pools, scheduler, server state) over the module's weights:
    # read-only, so sharing them changes nothing but one load less.
    engine = LLMEngine(EngineConfig(max_model_len=2048, kv_cache_bytes=64 * 2**20,
                                    enable_prefix_caching=False), model=model, tokenizer=tokenizer)
    return ReplicaServer(create_app(engine, ServerConfig(served_model_name=MODEL)), name,
                         mirror)


async def _call(replica: ReplicaServer, method: str, path: str, body: dict | None = None
                ) -> tuple[ReplyHead, bytes, list[str], list]:
    data = json.dumps(body).encode() if body is not None else b""
    routed = RoutedRequest(method, path, headers=[("content-type", "application/json")],
                           body=data, context_keys=request_keys(method, path, body))
    items = [item async for item in replica.forward(routed)]
    head, keys = items[0], [i for i in items if isinstance(i, ReplyKeys)]
    assert isinstance(head, ReplyHead) and head.replica == replica.replica and len(keys) == 1
    # The keys come before the last chunk (so the ingress knows them before the client
    # sees the end of the reply).
    assert items.index(keys[0]) == len(items) - 2 or items[-1] is keys[0]
    chunks = b"".join(i for i in items if isinstance(i, bytes))
    return head, chunks, keys[0].keys, items


def test_replies_hand_out_keys_and_a_dead_replicas_response_is_taken_over(model, tokenizer):
    async def main():
        mirror = _Mirror()
        one, two = (_replica("one", mirror, model, tokenizer),
                    _replica("two", mirror, model, tokenizer))
        try:
            question = {"role": "user", "content": "What is 12 + 30?"}
            # Chat, streamed: the call id is learned from the stream's chunks.
            head, chunks, keys, _ = await _call(one, "POST", "/v1/chat/completions", {
                "model": MODEL, "messages": [*FEW_SHOT, question], "tools": [CALCULATOR],
                "temperature": 0, "max_tokens": 40, "stream": True})
            assert head.status == 200 and b"tool_calls" in chunks
            assert len(keys) == 1 and keys[0].startswith("call:call_")
            chat_call = keys[0]
            # Responses: the response id and the call id.
            head, chunks, keys, _ = await _call(one, "POST", "/v1/responses", {
                "model": MODEL, "instructions": FEW_SHOT_INSTRUCTIONS,
                "tools": [CALCULATOR_FUNCTION], "temperature": 0, "max_output_tokens": 40,
                "input": [*FEW_SHOT_INPUT, question]})
            first = json.loads(chunks)
            call = first["output"][-1]
            assert head.status == 200 and call["type"] == "function_call"
            assert keys == [response_key(first["id"]), call_key(call["call_id"])]
            assert mirror.store.get(first["id"]) is not None  # mirrored before the reply ends
            # What the replica reports holding (its routing stats): both paused calls and the
            # stored response.
            assert set(keys) | {chat_call} <= set(one.held_keys())

            # Replica one is gone; replica two takes the follow-up from the mirror.
            await one.stop()
            head, chunks, keys, _ = await _call(two, "POST", "/v1/responses", {
                "model": MODEL, "instructions": FEW_SHOT_INSTRUCTIONS,
                "tools": [CALCULATOR_FUNCTION], "temperature": 0, "max_output_tokens": 12,
                "previous_response_id": first["id"],
                "input": [{"type": "function_call_output", "call_id": call["call_id"],
                           "output": "42"}]})
            assert head.status == 200, chunks
            assert "42" in json.loads(chunks)["output"][0]["content"][0]["text"]
            _, text, _, _ = await _call(two, "GET", "/metrics")
            counters = parse_metrics(text.decode())
            assert counters[FALLBACK] == 1 and counters[REUSED] == 0
            # An unknown id is still a 400 (nothing in the mirror either).
            head, _, keys, _ = await _call(two, "POST", "/v1/responses", {
                "model": MODEL, "input": "hi", "previous_response_id": "resp_nope"})
            assert head.status == 400 and keys == []
        finally:
            await one.stop()
            await two.stop()

    asyncio.run(main())
