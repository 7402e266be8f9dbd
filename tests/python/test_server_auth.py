"""API keys: bearer auth on every /v1 route of a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import importlib
import logging

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from infercept.engine import EngineConfig  # noqa: E402
from infercept.server import EngineSpec, ServerConfig, create_app  # noqa: E402
from infercept.server.metrics import parse_metrics  # noqa: E402
from server_harness import ThreadServer  # noqa: E402

# The module, not the ``serve`` function that infercept.server re-exports under its name.
serve_module = importlib.import_module("infercept.server.serve")

MODEL = "smollm2-auth"
API_KEY = "sk-test-4f1c9e"


@pytest.fixture(scope="module")
def server():
    engine = EngineSpec(config=EngineConfig(policy="infercept", max_model_len=512),
                        tool_errors="abort")
    app = create_app(engine, ServerConfig(served_model_name=MODEL, api_key=API_KEY))
    with ThreadServer(app) as running:
        yield running


def _client(server, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0,
                         timeout=120)


def test_wrong_key_is_refused_with_openai_authentication_error(server):
    with _client(server, "sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            client.models.list()
        assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=MODEL, max_tokens=2,
                                           messages=[{"role": "user", "content": "hi"}])
    # A prefix of the key, or the key with another scheme, is no better.
    with _client(server, API_KEY[:-1]) as client, pytest.raises(openai.AuthenticationError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    basic = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Basic {API_KEY}"})
    assert basic.status_code == 401


def test_missing_key_gets_401_with_an_openai_error_body(server):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/completions"), ("GET", "/v1/no-such-route")):
        response = httpx.request(method, f"{server.url}{path}", json={})
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
        assert "Authorization: Bearer" in error["message"]


def test_right_key_is_served(server):
    with _client(server, API_KEY) as client:
        assert [m.id for m in client.models.list().data] == [MODEL]
        out = client.chat.completions.create(model=MODEL, max_tokens=3, temperature=0,
                                             messages=[{"role": "user", "content": "hi"}])
        assert out.choices[0].finish_reason in ("stop", "length")


def test_health_and_metrics_stay_open(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    metrics = parse_metrics(httpx.get(f"{server.url}/metrics").text)
    assert metrics['infercept_http_requests_total{endpoint="/v1/models",status="401"}'] >= 1


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("::1", True),
    ("[::1]", True), ("0.0.0.0", False), ("::", False), ("192.168.1.5", False),
    ("example.com", False)])
def test_is_loopback(host, loopback):
    assert serve_module.is_loopback(host) is loopback


@pytest.mark.parametrize(("host", "api_key", "warns"), [
    ("0.0.0.0", None, True), ("0.0.0.0", "k", False), ("127.0.0.1", None, False)])
def test_serving_beyond_loopback_without_a_key_warns(monkeypatch, caplog, host, api_key, warns):
    import uvicorn

    monkeypatch.setattr(serve_module, "create_app", lambda engine, config: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    with caplog.at_level(logging.WARNING, logger="infercept.server"):
        serve_module.serve(None, host, 8000, ServerConfig(api_key=api_key))  # type: ignore
    assert any("WITHOUT an API key" in r.getMessage() for r in caplog.records) is warns
