"""The engine on its own thread, with an asyncio interface for the HTTP handlers.

``LLMEngine`` is single-threaded. One thread owns it: it runs commands the handlers queue
(add, resume, abort, read stats) between steps, steps while any request can make progress,
and pushes an immutable :class:`Update` per changed request into that request's asyncio
queue with ``loop.call_soon_threadsafe``. Handlers never touch the engine. The same thread
times each request's tokens for the latency histograms of
:class:`~infercept.server.metrics.ServerMetrics`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from infercept._core import UnknownRequestError
from infercept.engine import LLMEngine, RequestOutput
from infercept.sampling import SamplingParams
from infercept.server.metrics import TOOL_KINDS, ServerMetrics

log = logging.getLogger("infercept.server")
T = TypeVar("T")

# How long the idle thread waits for a command before looking at the engine again.
_IDLE_POLL_S = 0.05
# Window of the tokens/s gauge.
_RATE_WINDOW_S = 10.0


@dataclass(frozen=True)
class Update:
    """A request's state after a step, as the handlers see it (copied off the engine thread).

    Attributes:
        request_id: The engine's id.
        text: Everything after the prompt (generated text and spliced tool outputs).
        num_generated_tokens: Tokens the model sampled since the request was added.
        finished, finish_reason, error: As in ``RequestOutput``.
        paused: Waiting on a client-side tool; ``tool_name``/``tool_arguments`` describe
            the call and ``context_token_ids`` is the whole context (prompt + output).
        num_cached_tokens: Prompt tokens whose KV came from the engine's prefix cache (0
            from an engine without one).
    """

    request_id: int
    text: str
    num_generated_tokens: int
    finished: bool
    finish_reason: str | None
    paused: bool
    error: str | None = None
    tool_name: str | None = None
    tool_arguments: dict[str, Any] | None = None
    context_token_ids: tuple[int, ...] | None = None
    num_cached_tokens: int = 0

    @classmethod
    def of(cls, output: RequestOutput) -> Update:
        paused = output.paused and not output.finished
        call = output.intercepts[-1] if paused else None
        return cls(output.request_id, output.text, output.num_generated_tokens, output.finished,
                   output.finish_reason, paused, output.error,
                   call.name if call else None, dict(call.arguments) if call else None,
                   tuple(output.prompt_token_ids) + tuple(output.token_ids) if paused else None,
                   getattr(output, "num_cached_tokens", 0))


@dataclass
class RequestHandle:
    """What a handler holds for one engine request.

    Attributes:
        request_id: The engine's id.
        updates: Updates in order; the last one has ``finished`` or ``paused`` set.
        text_offset: Characters of ``Update.text`` that precede this HTTP request's answer
            (non-zero for a resumed context: earlier turns and the tool result).
        generated_offset: Generated tokens that precede this HTTP request's answer.
    """

    request_id: int
    updates: asyncio.Queue[Update]
    text_offset: int = 0
    generated_offset: int = 0


class EngineDeadError(RuntimeError):
    """The engine thread has stopped."""


@dataclass
class _Timing:
    """One request's clock on the engine thread (``time.monotonic`` seconds).

    Attributes:
        segment_start_s: When its add (or latest resume) ran on the engine thread.
        last_token_s: When its latest token was sampled; None before the segment's first one
            and right after a tool call (that gap is tool time, not inter-token latency).
        has_first_token: The segment has sampled a token (its TTFT was observed).
        num_timed_intercepts: Intercepts whose duration was observed already.
        num_intercepts: Intercepts seen so far (a new one resets ``last_token_s``).
    """

    segment_start_s: float
    last_token_s: float | None = None
    has_first_token: bool = False
    num_timed_intercepts: int = 0
    num_intercepts: int = 0


def accepts_cache_salt(engine: Any) -> bool:
    """Whether ``engine.add_request`` takes ``cache_salt`` (engines with a prefix cache)."""
    return "cache_salt" in inspect.signature(engine.add_request).parameters


class EngineLoop:
    """Owns an ``LLMEngine`` on a daemon thread; all methods are called from the event loop.

    Args:
        engine: The engine; nothing else may call it while the loop runs.
        metrics: Where to observe latencies (None: not observed).
    """

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self._accepts_cache_salt = accepts_cache_salt(engine)
        self._timings: dict[int, _Timing] = {}
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._subscribers: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Update]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="infercept-engine", daemon=True)
        self._num_generated: dict[int, int] = {}
        self.num_generated_tokens_total = 0
        self.num_prompt_tokens_total = 0
        self._rate_samples: deque[tuple[float, int]] = deque()
        self.num_step_errors = 0

    # ---- lifecycle (event loop side) -----------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the thread, aborting what is live and stopping the engine's tool runtime."""
        self._stop.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout_s)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # ---- commands (event loop side) ------------------------------------------------------

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Runs ``fn(engine)`` on the engine thread between steps and returns its result."""
        if not self.is_alive:
            raise EngineDeadError("the engine thread is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def command() -> None:
            try:
                result, error = fn(self.engine), None
            except Exception as exc:  # handed back to the awaiting handler
                result, error = None, exc
            loop.call_soon_threadsafe(settle, result, error)

        self._commands.put(command)
        return await future

    async def add(self, prompt_token_ids: Sequence[int], params: SamplingParams, *,
                  client_tools: Iterable[str] = (), use_tools: bool = True,
                  cache_salt: str | None = None) -> RequestHandle:
        """Queues a request; its updates arrive on the returned handle.

        ``cache_salt`` keeps the request's prefix-cache entries apart from other salts'; it is
        not passed to an engine without a prefix cache (nothing is shared there).
        """
        updates: asyncio.Queue[Update] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        tokens, tools = list(prompt_token_ids), tuple(client_tools)
        salt = {"cache_salt": cache_salt} if self._accepts_cache_salt and cache_salt else {}

        def add(engine: LLMEngine) -> int:
            request_id = engine.add_request(prompt_token_ids=tokens, params=params,
                                            use_tools=use_tools, client_tools=tools, **salt)
            self._subscribers[request_id] = (loop, updates)
            self._num_generated[request_id] = 0
            self._timings[request_id] = _Timing(time.monotonic())
            self.num_prompt_tokens_total += len(tokens)
            return request_id

        return RequestHandle(await self.call(add), updates)

    async def resume(self, request_id: int, token_ids: Sequence[int], params: SamplingParams, *,
                     client_tools: Iterable[str] = ()) -> RequestHandle:
        """Continues a request paused on a client tool by appending ``token_ids``.

        Raises:
            ValueError, UnknownRequestError: The request is gone or not paused for the caller.
        """
        updates: asyncio.Queue[Update] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        tokens, tools = list(token_ids), tuple(client_tools)

        def resume(engine: LLMEngine) -> tuple[int, int]:
            engine.resume(request_id, token_ids=tokens, params=params, client_tools=tools)
            output = engine.get(request_id)
            self.num_prompt_tokens_total += len(tokens)
            timing = self._timings.setdefault(request_id, _Timing(0.0))
            timing.segment_start_s, timing.last_token_s = time.monotonic(), None
            timing.has_first_token = False
            self._observe_tool_times(output, timing)
            if output.finished:  # no room left after the tool output
                loop.call_soon_threadsafe(updates.put_nowait, Update.of(output))
                self._finish(request_id)
            else:
                self._subscribers[request_id] = (loop, updates)
                self._num_generated[request_id] = output.num_generated_tokens
            return len(output.text), output.num_generated_tokens

        text_offset, generated_offset = await self.call(resume)
        return RequestHandle(request_id, updates, text_offset, generated_offset)

    def abort(self, request_id: int) -> None:
        """Aborts a request (live or paused) and frees its blocks; no-op if it is gone."""

        def abort() -> None:
            self._subscribers.pop(request_id, None)
            self._num_generated.pop(request_id, None)
            self._timings.pop(request_id, None)
            try:
                self.engine.abort(request_id)
                self.engine.release(request_id)
            except UnknownRequestError:
                pass  # finished and released meanwhile

        self._commands.put(abort)

    # ---- stats (event loop side) ---------------------------------------------------------

    def generation_tokens_per_s(self) -> float:
        samples = list(self._rate_samples)
        if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
            return 0.0
        return (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])

    # ---- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            busy = engine.has_unfinished()
            self._drain_commands(block=not busy)
            if self._stop.is_set() or not engine.has_unfinished():
                continue
            step_start_s = time.monotonic()
            try:
                outputs = engine.step()
            except Exception as exc:  # keep serving: fail what was live, carry on
                log.exception("engine step failed")
                self.num_step_errors += 1
                self._fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
                continue
            self._dispatch(outputs, step_start_s)
        self._fail_all("the server is shutting down")
        try:
            engine.shutdown()
        except Exception:
            log.exception("engine shutdown failed")

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=_IDLE_POLL_S) if block else \
                self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, outputs: list[RequestOutput], step_start_s: float) -> None:
        now = time.monotonic()
        for output in outputs:
            request_id = output.request_id
            previous = self._num_generated.get(request_id, 0)
            num_new_tokens = max(0, output.num_generated_tokens - previous)
            self.num_generated_tokens_total += num_new_tokens
            self._num_generated[request_id] = output.num_generated_tokens
            subscriber = self._subscribers.get(request_id)
            update = Update.of(output)
            timing = self._timings.get(request_id)
            if timing is not None and self.metrics is not None:
                self._observe(self.metrics, output, update, timing, num_new_tokens,
                              step_start_s, now)
            if subscriber is not None:
                loop, updates = subscriber
                try:
                    loop.call_soon_threadsafe(updates.put_nowait, update)
                except RuntimeError:  # the event loop has closed
                    pass
            if update.finished:
                self._finish(request_id)
            elif update.paused:
                self._subscribers.pop(request_id, None)  # the paused store owns it now
        self._rate_samples.append((now, self.num_generated_tokens_total))
        while self._rate_samples and self._rate_samples[0][0] < now - _RATE_WINDOW_S:
            self._rate_samples.popleft()

    def _observe(self, metrics: ServerMetrics, output: RequestOutput, update: Update,
                 timing: _Timing, num_new_tokens: int, step_start_s: float, now: float) -> None:
        """Observes this step's latencies of one request into the histograms."""
        self._observe_tool_times(output, timing)
        if num_new_tokens:  # sampled before any pause this output reports
            if not timing.has_first_token:
                timing.has_first_token = True
                metrics.time_to_first_token.observe(now - timing.segment_start_s)
                metrics.request_queue_time.observe(
                    max(0.0, step_start_s - timing.segment_start_s))
            elif timing.last_token_s is not None:
                metrics.inter_token_latency.observe(now - timing.last_token_s)
            timing.last_token_s = now
        if len(output.intercepts) != timing.num_intercepts:
            timing.num_intercepts = len(output.intercepts)
            timing.last_token_s = None  # the next gap holds a tool call
        ended_normally = update.finished and update.finish_reason not in ("abort", "error")
        if ended_normally or update.paused:
            metrics.e2e_request_latency.observe(now - timing.segment_start_s)

    def _observe_tool_times(self, output: RequestOutput, timing: _Timing) -> None:
        """Observes the durations of the tool calls that ended since the last look."""
        if self.metrics is None:
            return
        intercepts = output.intercepts
        while (timing.num_timed_intercepts < len(intercepts)
               and intercepts[timing.num_timed_intercepts].duration_s is not None):
            record = intercepts[timing.num_timed_intercepts]
            self.metrics.tool_time.labels(TOOL_KINDS.get(record.kind, record.kind)).observe(
                record.duration_s)
            timing.num_timed_intercepts += 1

    def _finish(self, request_id: int) -> None:
        self._subscribers.pop(request_id, None)
        self._num_generated.pop(request_id, None)
        self._timings.pop(request_id, None)
        try:
            self.engine.release(request_id)
        except Exception:  # already released
            pass

    def _fail_all(self, message: str) -> None:
        for request_id, (loop, updates) in list(self._subscribers.items()):
            update = Update(request_id, "", 0, True, "error", False, message)
            try:
                loop.call_soon_threadsafe(updates.put_nowait, update)
            except RuntimeError:
                pass
            try:
                self.engine.abort(request_id)
                self.engine.release(request_id)
            except Exception:
                pass
            self._timings.pop(request_id, None)
        self._subscribers.clear()
