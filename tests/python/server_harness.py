"""A real uvicorn server on 127.0.0.1 in a thread, and what the server tests ask of it (the
official openai client, the /metrics samples, waiting until it is idle)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import uvicorn

from infercept.server.metrics import parse_metrics


class ThreadServer:
    """Serves ``app`` on a free loopback port while the ``with`` block runs."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@contextlib.contextmanager
def openai_client(server: ThreadServer, timeout_s: float = 120) -> Iterator[openai.OpenAI]:
    """The official client on ``server``'s /v1, no retries (a failure must show)."""
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                       timeout=timeout_s) as client:
        yield client


def metrics(server: ThreadServer) -> dict[str, float]:
    """Every sample of the server's /metrics, by name with labels."""
    return parse_metrics(httpx.get(f"{server.url}/metrics", timeout=30).text)


def wait_idle(server: ThreadServer, timeout_s: float = 30.0) -> dict[str, float]:
    """Waits until no request runs, waits or is paused and every device block is free."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(server)
        idle = (m['infercept_requests{state="running"}'] == 0
                and m['infercept_requests{state="waiting"}'] == 0
                and m['infercept_requests{state="intercepted"}'] == 0
                and m['infercept_kv_blocks{state="used",tier="device"}'] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)
