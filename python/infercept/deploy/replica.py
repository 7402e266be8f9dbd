"""One engine replica: the unchanged OpenAI server app, called in process with a
:class:`RoutedRequest` instead of a socket (plain Python; ``serve_app`` wraps it in Ray).

The app (``create_app``) runs as it does under uvicorn: this class plays the ASGI server. It
streams the reply back as :mod:`messages` items and, before the last chunk, the keys the reply
handed out. Stored responses (``/v1/responses``) are copied to a :class:`ResponseMirror`
when a reply stores one, and copied back from it when a request names a response this replica
does not have (its replica died): the conversation is re-rendered and prefilled here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from infercept.deploy.affinity import call_key, reply_keys, response_key, session_key
from infercept.deploy.messages import ReplyHead, ReplyKeys, RoutedRequest
from infercept.server.response_store import ResponseStore, StoredResponse

log = logging.getLogger("infercept.deploy")

# How long a reply's app task may run on after its caller went away (it aborts the request).
_DRAIN_S = 5.0


class ResponseMirror(Protocol):
    """Where replicas keep a copy of every stored response (``serve_app`` backs it with one
    Ray actor holding a :class:`MirrorStore`)."""

    async def get(self, response_id: str) -> StoredResponse | None: ...

    async def put(self, stored: StoredResponse) -> None: ...

    async def delete(self, response_id: str) -> None: ...


class MirrorStore:
    """The mirror's contents: a :class:`ResponseStore` with the same bounds as a replica's."""

    def __init__(self, ttl_s: float, max_responses: int, max_bytes: int) -> None:
        self.store = ResponseStore(ttl_s, max_responses, max_bytes)

    def get(self, response_id: str) -> StoredResponse | None:
        return self.store.get(response_id)

    def put(self, stored: StoredResponse) -> None:
        self.store.put(stored)

    def delete(self, response_id: str) -> None:
        self.store.delete(response_id)


class ReplicaServer:
    """Runs routed requests through ``app`` (a ``create_app`` FastAPI app).

    Args:
        app: The server app; its lifespan (engine loop, expiry sweep) starts with the first
            request.
        replica: This replica's name (Ray Serve's replica unique id), sent with each reply.
        mirror: Where stored responses are copied (None: nowhere; a follow-up naming a
            response of a dead replica then gets 400 previous_response_not_found).
    """

    def __init__(self, app: Any, replica: str, mirror: ResponseMirror | None = None) -> None:
        self.app, self.replica, self.mirror = app, replica, mirror
        self._lifespan: contextlib.AbstractAsyncContextManager[Any] | None = None
        self._start_lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._start_lock:
            if self._lifespan is None:
                lifespan = self.app.router.lifespan_context(self.app)
                await lifespan.__aenter__()
                self._lifespan = lifespan

    async def stop(self) -> None:
        if self._lifespan is not None:
            lifespan, self._lifespan = self._lifespan, None
            await lifespan.__aexit__(None, None, None)

    def held_keys(self) -> list[str]:
        """The keys of what this replica holds: its paused contexts (session, call and
        response ids) and its stored responses. Reported to the routers, which rebuild their
        table from it (after an ingress restart, say)."""
        keys = []
        for context in self.app.state.server.store.contexts():
            if context.session_id is not None:
                keys.append(session_key(context.session_id, context.cache_salt))
            keys += [call_key(c) for c in context.tool_call_ids]
        keys += [response_key(r) for r in self._responses.responses.response_ids()]
        return keys

    @property
    def is_alive(self) -> bool:
        return bool(self.app.state.server.engine_loop.is_alive)

    # ---- one request ---------------------------------------------------------------------

    async def forward(self, req: RoutedRequest
                      ) -> AsyncIterator[ReplyHead | bytes | ReplyKeys]:
        """The reply to ``req``: a ReplyHead, the body's chunks, the ReplyKeys, the last chunk.

        Closing the generator early is the client going away: the app sees a disconnect and
        aborts the engine request.
        """
        await self.start()
        body = _json_object(req.body)
        await self._adopt_stored(req, body)
        messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        disconnected = asyncio.Event()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": req.body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            await messages.put(message)

        task = asyncio.create_task(self._run(_scope(req), receive, send, messages))
        try:
            start = await messages.get()
            if start is None or start["type"] != "http.response.start":
                yield ReplyHead(500, [("content-type", "application/json")], self.replica)
                yield json.dumps({"error": {"message": "the replica's server failed before "
                                            "answering", "type": "server_error"}}).encode()
                return
            headers = [(k.decode("latin-1"), v.decode("latin-1"))
                       for k, v in start.get("headers", [])]
            yield ReplyHead(start["status"], headers, self.replica)
            is_stream = any(k == "content-type" and v.startswith("text/event-stream")
                            for k, v in headers)
            payloads: list[dict[str, Any]] = []
            whole = bytearray()
            held: bytes | None = None  # the latest chunk: sent once the next one exists
            while (message := await messages.get()) is not None:
                if message["type"] != "http.response.body":
                    continue
                chunk = bytes(message.get("body", b""))
                if is_stream:
                    payloads.extend(_stream_payloads(req.path, chunk))
                else:
                    whole += chunk
                if not message.get("more_body", False):
                    break
                if held is not None:
                    yield held
                held = chunk
            else:
                chunk = b""
            if not is_stream and (obj := _json_object(bytes(whole))) is not None:
                payloads.append(obj)
            keys = reply_keys(req.path, body, payloads) if start["status"] == 200 else []
            await self._export_stored(req, keys)
            yield ReplyKeys(self.replica, keys)
            if held is not None:
                yield held
            if chunk:
                yield chunk
        finally:
            disconnected.set()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, _DRAIN_S)

    async def _run(self, scope: dict[str, Any], receive: Any, send: Any,
                   messages: asyncio.Queue[dict[str, Any] | None]) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception:  # Starlette has sent its 500 (or the stream was cut): log it
            log.exception("replica %s: %s %s failed", self.replica, scope["method"],
                          scope["path"])
        finally:
            await messages.put(None)

    # ---- stored responses across replicas ------------------------------------------------

    @property
    def _responses(self) -> Any:
        return self.app.state.responses  # server.responses.ResponsesAPI

    async def _adopt_stored(self, req: RoutedRequest, body: dict[str, Any] | None) -> None:
        """Copies the response ``req`` names from the mirror when this replica lacks it."""
        if self.mirror is None:
            return
        response_id = None
        if req.method == "POST" and req.path == "/v1/responses" and body is not None:
            response_id = body.get("previous_response_id")
        elif req.method == "GET" and req.path.startswith("/v1/responses/"):
            response_id = req.path.rsplit("/", 1)[1]
        if not isinstance(response_id, str) or self._responses.responses.get(response_id):
            return
        stored = await self.mirror.get(response_id)
        if stored is not None:
            log.info("replica %s: took over stored response %s from the mirror", self.replica,
                     response_id)
            self._responses.adopt(stored)

    async def _export_stored(self, req: RoutedRequest, keys: list[str]) -> None:
        """Copies the responses the reply stored to the mirror (a DELETE deletes there too)."""
        if self.mirror is None:
            return
        if req.method == "DELETE" and req.path.startswith("/v1/responses/"):
            await self.mirror.delete(req.path.rsplit("/", 1)[1])
            return
        for key in keys:
            if key.startswith("response:"):
                stored = self._responses.responses.get(key.split(":", 1)[1])
                if stored is not None:
                    await self.mirror.put(stored)


def _scope(req: RoutedRequest) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": req.method, "scheme": "http", "path": req.path,
            "raw_path": req.path.encode(), "query_string": req.query_string, "root_path": "",
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in req.headers],
            "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data) if data else None
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _stream_payloads(path: str, chunk: bytes) -> list[dict[str, Any]]:
    """The ``data:`` objects of an event-stream chunk that can hand keys out (chat chunks with
    tool calls; the final Responses event), parsed only when the chunk may hold one."""
    wanted = (b'"tool_calls"' if path.endswith("/chat/completions")
              else b'"response.completed"' if path.endswith("/responses") else None)
    if wanted is None or wanted not in chunk and b'"response.incomplete"' not in chunk:
        return []
    payloads = []
    for line in chunk.split(b"\n"):
        if line.startswith(b"data: "):
            obj = _json_object(line[6:])
            if obj is not None:
                payloads.append(obj)
    return payloads
