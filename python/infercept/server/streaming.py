"""Streaming pieces the endpoints share: a request's updates until it settles (aborting it when
its client goes first), the merge of n choices' event streams into one SSE response, and the
response class that aborts what it leaves.

Each endpoint turns one choice's engine updates into events, ``('chunk', json)``... then
``('done', value)`` or ``('error', json)`` (``chat.py``, ``completions.py``);
``stream_choices`` merges the n choices' events as they come into the SSE lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from infercept.server.engine_loop import RequestHandle, Update

# A handler waiting on the engine checks this often whether its client is still there.
_DISCONNECT_POLL_S = 0.5


async def next_update(handle: RequestHandle, request: Request) -> Update | None:
    """The request's next update, or None once the client has gone away (checked every
    _DISCONNECT_POLL_S while the engine has nothing new). Its logprobs join
    ``handle.logprobs`` (and its prompt logprobs ``handle.prompt_logprobs``)."""
    if handle.pending:
        return handle.pending.popleft()
    while True:
        try:
            update = await asyncio.wait_for(handle.updates.get(), _DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                return None
        else:
            handle.logprobs.extend(update.logprobs)
            if update.prompt_logprobs is not None:
                handle.prompt_logprobs = update.prompt_logprobs
            return update


class SettledUpdates:
    """One engine request's updates, up to and including the one that settles it (finished,
    failed or paused), as an async iterator; used as ``async with`` around everything a
    handler streams for the request. If the block is left before the request settled (the
    client went away, or the handler's own stream was closed), ``abort(handle)`` runs so the
    engine stops generating for nobody."""

    def __init__(self, handle: RequestHandle, request: Request,
                 abort: Callable[[RequestHandle], None]) -> None:
        self.handle, self.request, self.abort = handle, request, abort
        self.settled = False

    async def __aenter__(self) -> SettledUpdates:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if not self.settled:
            self.abort(self.handle)

    def __aiter__(self) -> SettledUpdates:
        return self

    async def __anext__(self) -> Update:
        if self.settled:
            raise StopAsyncIteration
        update = await next_update(self.handle, self.request)
        if update is None:  # the client has gone away
            raise StopAsyncIteration
        self.settled = update.finished or update.paused
        return update


async def merged(streams: Sequence[AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """The items of several async generators as they come (one per choice when n > 1)."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as stream:  # type: ignore[type-var]
            async for item in stream:
                yield item
        return
    queue: asyncio.Queue[Any] = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
        except Exception as exc:  # handed to the consumer
            await queue.put(exc)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream_choices(streams: Sequence[AsyncIterator[tuple[str, Any]]],
                         count_done: Callable[[Any], None],
                         final_chunk: Callable[[], dict[str, Any] | None]
                         ) -> AsyncIterator[str]:
    """The SSE lines of n choices' event streams, merged as they come.

    A ``('chunk', json)`` is sent; a ``('done', value)`` goes to ``count_done`` (each endpoint
    counts a finished choice its own way); an ``('error', json)`` is sent and ends the stream
    at once, before any usage or ``[DONE]``. Once every choice is done: ``final_chunk()``
    (the usage chunk; None sends nothing), then ``[DONE]``. Closed however it ends, it closes
    every choice's stream, so each unsettled choice aborts its request.
    """
    async with contextlib.aclosing(merged(streams)) as events:
        async for kind, value in events:
            if kind == "done":
                count_done(value)
                continue
            yield sse(value)
            if kind == "error":
                return
    if (chunk := final_chunk()) is not None:
        yield sse(chunk)
    yield sse("[DONE]")


class EngineStreamingResponse(StreamingResponse):
    """Closes its generator however the response ends, so an unfinished request is aborted."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass  # the client went away; the generator's cleanup aborts the request
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
