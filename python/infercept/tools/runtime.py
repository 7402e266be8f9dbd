"""Runs tool calls concurrently while the engine keeps stepping.

An asyncio event loop on a background thread awaits async tools directly and runs sync tools
on a thread pool, so calls overlap each other and the engine's forward passes. The engine
only ever calls ``submit`` and ``poll``, neither of which waits for a tool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import itertools
import json
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from infercept.tools.parser import ToolCall
from infercept.tools.registry import Tool, ToolRegistry, UnknownToolError


@dataclass(frozen=True)
class ToolResult:
    """A finished call.

    Attributes:
        request_id: The request that made the call.
        name: The tool's name.
        output: The tool's output as text ("" on error).
        duration_s: Seconds from ``submit`` to the end of the call.
        error: What went wrong (unknown tool, exception, timeout), or None on success.
    """

    request_id: Hashable
    name: str
    output: str
    duration_s: float
    error: str | None = None


@dataclass
class _Pending:
    call_id: int
    future: concurrent.futures.Future[None] | None = None


def _to_text(output: Any) -> str:
    if output is None:
        return ""
    if isinstance(output, str):
        return output
    try:
        return json.dumps(output)
    except (TypeError, ValueError):
        return str(output)


class ToolRuntime:
    """Runs tool calls in the background and hands back finished ones.

    A timed-out or cancelled sync tool cannot be stopped from outside its thread: its result
    is dropped, but it keeps a pool thread until it returns.
    """

    def __init__(self, registry: ToolRegistry, max_workers: int = 16) -> None:
        """Starts the background event loop.

        Args:
            registry: Where calls look up their tool.
            max_workers: Number of threads for sync tools.

        Raises:
            ValueError: max_workers is below 1.
        """
        if max_workers < 1:
            raise ValueError(f"max_workers={max_workers} is below the minimum 1")
        self._registry = registry
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers, thread_name_prefix="infercept-tool")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="infercept-tool-loop", daemon=True)
        self._thread.start()
        self._cond = threading.Condition()  # guards everything below
        self._pending: dict[Hashable, _Pending] = {}
        self._results: list[ToolResult] = []
        self._call_ids = itertools.count()
        self._closed = False

    def submit(self, request_id: Hashable, call: ToolCall) -> None:
        """Starts a call and returns at once; its result comes back through ``poll``.

        An unknown tool name is not raised here: it comes back as an error result.

        Args:
            request_id: The request making the call; it may have one call in flight.
            call: The parsed call.

        Raises:
            RuntimeError: The runtime was shut down.
            ValueError: The request already has a call in flight.
        """
        submitted_s = time.monotonic()
        with self._cond:
            if self._closed:
                raise RuntimeError("ToolRuntime is shut down")
            if request_id in self._pending:
                raise ValueError(f"request {request_id!r} already has a tool call in flight")
            pending = _Pending(next(self._call_ids))
            self._pending[request_id] = pending
            pending.future = asyncio.run_coroutine_threadsafe(
                self._run(request_id, pending.call_id, call, submitted_s), self._loop)

    def poll(self) -> list[ToolResult]:
        """Returns the calls finished since the last poll, without waiting."""
        with self._cond:
            results, self._results = self._results, []
        return results

    def wait(self, timeout_s: float | None = None) -> bool:
        """Blocks until a result is ready to poll, e.g. when every request is paused.

        Args:
            timeout_s: Longest wait in seconds; None waits indefinitely.

        Returns:
            Whether a result is ready.
        """
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._results), timeout_s)

    def cancel(self, request_id: Hashable) -> bool:
        """Drops a request's call in flight (e.g. the request was aborted); no result follows.

        Returns:
            Whether the request had a call in flight.
        """
        with self._cond:
            pending = self._pending.pop(request_id, None)
        if pending is None:
            return False
        pending.future.cancel()
        return True

    @property
    def num_in_flight(self) -> int:
        """Number of calls submitted and not yet finished or cancelled."""
        with self._cond:
            return len(self._pending)

    def shutdown(self) -> None:
        """Cancels calls in flight and stops the loop and the pool. Safe to call twice."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            p.future.cancel()
        # Let the cancellations run before stopping, so no task is destroyed while pending.
        asyncio.run_coroutine_threadsafe(self._drain(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> ToolRuntime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    async def _drain(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, request_id: Hashable, call_id: int, call: ToolCall,
                   submitted_s: float) -> None:
        output, error = "", None
        try:
            tool = self._registry.get(call.name)
            # asyncio.timeout tells its own expiry apart from a TimeoutError the tool raised.
            async with asyncio.timeout(tool.timeout_s) as deadline:
                output = _to_text(await self._invoke(tool, call.arguments))
        except UnknownToolError as exc:
            error = str(exc)
        except TimeoutError as exc:
            error = (f"tool {call.name!r} timed out after {float(tool.timeout_s)} s"
                     if deadline.expired() else f"tool {call.name!r} raised TimeoutError: {exc}")
        except Exception as exc:  # A failing tool is the model's problem, not the engine's.
            error = f"tool {call.name!r} raised {type(exc).__name__}: {exc}"
        result = ToolResult(request_id, call.name, output, time.monotonic() - submitted_s, error)
        with self._cond:
            pending = self._pending.get(request_id)
            if pending is None or pending.call_id != call_id:
                return  # cancelled
            del self._pending[request_id]
            self._results.append(result)
            self._cond.notify_all()

    async def _invoke(self, tool: Tool, arguments: dict[str, Any]) -> Any:
        if tool.is_async:
            return await tool.fn(**arguments)
        output = await self._loop.run_in_executor(
            self._executor, functools.partial(tool.fn, **arguments))
        # A plain function may still return an awaitable (e.g. a lambda wrapping a coroutine).
        return await output if inspect.isawaitable(output) else output
