"""The engine's prefix cache through the server: cached_tokens, cache_salt, /metrics.

Skipped on an engine without a prefix cache (``EngineConfig.enable_prefix_caching``).
"""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from infercept.engine import EngineConfig  # noqa: E402
from infercept.server import EngineSpec, ServerConfig, create_app  # noqa: E402
from infercept.server.metrics import parse_metrics  # noqa: E402
from server_harness import ThreadServer, openai_client  # noqa: E402

if "enable_prefix_caching" not in {f.name for f in dataclasses.fields(EngineConfig)}:
    pytest.skip("this engine build has no prefix cache", allow_module_level=True)

MODEL = "smollm2-prefix"
# Several blocks of 16 tokens, so that full blocks get cached.
PROMPT = "The quick brown fox jumps over the lazy dog while the cat watches. " * 8


@pytest.fixture(scope="module")
def server():
    engine = EngineSpec(config=EngineConfig(policy="infercept", max_model_len=1024,
                                            enable_prefix_caching=True), tool_errors="abort")
    with ThreadServer(create_app(engine, ServerConfig(served_model_name=MODEL))) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with openai_client(server) as c:
        yield c


def _complete(client, salt: str):
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                     extra_body={"cache_salt": salt})


def test_a_repeated_prompt_is_served_from_the_cache_of_its_own_salt_only(server, client):
    first = _complete(client, "tenant-a")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = _complete(client, "tenant-a")
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens
    assert again.choices[0].text == first.choices[0].text  # cached KV, same greedy answer
    other = _complete(client, "tenant-b")
    assert other.usage.prompt_tokens_details.cached_tokens == 0

    metrics = parse_metrics(httpx.get(f"{server.url}/metrics", timeout=30).text)
    assert metrics["infercept_prefix_cache_hits_total"] >= cached
    assert metrics["infercept_prefix_cache_queries_total"] >= metrics[
        "infercept_prefix_cache_hits_total"]


def test_chat_reports_cached_tokens_for_a_repeated_conversation(client):
    messages = [{"role": "system", "content": PROMPT},
                {"role": "user", "content": "Which animal watches?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                           temperature=0)
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                           temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert again.choices[0].message.content == first.choices[0].message.content


def test_n_choices_share_the_prompt_through_the_prefix_cache(server, client):
    # A prompt nobody sent before (its own salt): choice 0 prefills it, and the other two
    # choices are added once it has, so their prompt blocks come from the cache.
    def hits() -> float:
        return parse_metrics(httpx.get(f"{server.url}/metrics", timeout=30).text)[
            "infercept_prefix_cache_hits_total"]

    before = hits()
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=1.0,
                                    seed=5, n=3, extra_body={"cache_salt": "n-choices"})
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.prompt_tokens_details.cached_tokens == 0  # choice 0 computed the prompt
    full_blocks = out.usage.prompt_tokens // 16 * 16
    # Each sibling found every full block of the prompt but the one holding its last token
    # (the last token is always computed, to sample from).
    shared = (out.usage.prompt_tokens - 1) // 16 * 16
    assert full_blocks >= 64 and hits() - before >= 2 * shared
