"""The engine in its own process: the server sees it die (503s, never a hang) and reports a
failed start; the in-thread mode still serves.

A real uvicorn server on 127.0.0.1 with the official ``openai`` client, as in test_server.py;
the engine process is killed with SIGKILL (``os.kill``), as an out-of-memory kill would.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("zmq")
pytest.importorskip("msgspec")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from infercept.cli import build_parser  # noqa: E402
from infercept.engine import EngineConfig, LLMEngine  # noqa: E402
from infercept.server import EngineSpec, ServerConfig, create_app  # noqa: E402
from infercept.server.engine_loop import EngineLoop  # noqa: E402
from infercept.server.engine_process import EngineProcessClient  # noqa: E402
from server_harness import ThreadServer  # noqa: E402

MODEL = "smollm2-test"
# Long enough that both requests are still generating when the engine is killed.
LONG = {"max_tokens": 400, "temperature": 0, "extra_body": {"ignore_eos": True}}
# Everything must be answered this soon after the kill (generous: the CI machine is shared).
ANSWER_WITHIN_S = 15.0


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def test_a_killed_engine_process_fails_open_and_new_requests_with_503():
    spec = EngineSpec(config=EngineConfig(policy="infercept", max_model_len=512,
                                          enable_prefix_caching=False), tool_errors="abort")
    app = create_app(spec, ServerConfig(served_model_name=MODEL))
    engine = app.state.server.engine_loop
    assert isinstance(engine, EngineProcessClient) and engine.pid != os.getpid()
    with ThreadServer(app) as server, _client(server) as client:
        assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}
        messages = [{"role": "user", "content": "Count from one to one hundred."}]
        streaming = threading.Event()
        killed_at: list[float] = []

        def stream() -> tuple[str, BaseException | None, float]:
            text = ""
            try:
                for chunk in client.chat.completions.create(model=MODEL, messages=messages,
                                                            stream=True, **LONG):
                    if chunk.choices and chunk.choices[0].delta.content:
                        text += chunk.choices[0].delta.content
                        streaming.set()
            except openai.APIError as exc:
                return text, exc, time.monotonic()
            return text, None, time.monotonic()

        def whole() -> tuple[BaseException | None, float]:
            try:
                client.chat.completions.create(model=MODEL, messages=messages, **LONG)
            except openai.APIError as exc:
                return exc, time.monotonic()
            return None, time.monotonic()

        with ThreadPoolExecutor(2) as pool:
            streamed, completed = pool.submit(stream), pool.submit(whole)
            assert streaming.wait(120), "the stream sent no text"
            killed_at.append(time.monotonic())
            os.kill(engine.pid, signal.SIGKILL)
            text, stream_error, stream_end = streamed.result(60)
            whole_error, whole_end = completed.result(60)

        # The open stream (its 200 went out with the first chunk) ends on an error event
        # naming the cause; the open non-streaming request gets 503. Neither hangs.
        assert text and stream_error is not None
        assert "engine process" in str(stream_error) and "SIGKILL" in str(stream_error)
        assert isinstance(whole_error, openai.InternalServerError)
        assert whole_error.status_code == 503 and "SIGKILL" in str(whole_error)
        assert max(stream_end, whole_end) - killed_at[0] < ANSWER_WITHIN_S

        health = httpx.get(f"{server.url}/health", timeout=30)
        assert health.status_code == 503 and "SIGKILL" in health.json()["reason"]
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError) as new:
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
        assert new.value.status_code == 503 and new.value.body["code"] == "engine_unavailable"
        with pytest.raises(openai.InternalServerError):  # a new stream: 503 before any chunk
            client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                           max_tokens=2)
        assert time.monotonic() - start < ANSWER_WITHIN_S
        # The HTTP layer's own series stay scrapable.
        assert httpx.get(f"{server.url}/metrics", timeout=30).status_code == 200


def test_a_failed_start_is_reported():
    # (A clean stop, Shutdown and exit code 0, is checked as test_server.py's server stops.)
    with pytest.raises(RuntimeError, match="failed to start: ValueError.*module:attr"):
        EngineProcessClient(EngineSpec(tool_paths=["no_such_tool_path"]))


def test_the_in_thread_mode_still_serves():
    engine = LLMEngine(EngineConfig(max_model_len=256))
    app = create_app(engine, ServerConfig(served_model_name=MODEL))
    assert isinstance(app.state.server.engine_loop, EngineLoop)
    with ThreadServer(app) as server, _client(server) as client:
        answer = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2,
                                           temperature=0)
        assert answer.usage.completion_tokens == 2
        assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}


def test_serve_runs_the_engine_in_its_own_process_by_default():
    parser = build_parser()
    assert parser.parse_args(["serve"]).engine_process is True
    assert parser.parse_args(["serve", "--no-engine-process"]).engine_process is False
