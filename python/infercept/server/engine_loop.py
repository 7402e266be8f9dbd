"""The engine's step loop and what the HTTP handlers hold of it.

``LLMEngine`` is single-threaded. :class:`EngineCore` wraps it with the per-request
bookkeeping every front end needs: which requests someone listens to, an immutable
:class:`Update` per changed request after each step, token totals, and the latencies of the
histograms of :class:`~infercept.server.metrics.ServerMetrics` (handed to an ``observe``
callback, so they can cross a process boundary).

Two front ends drive it with the same asyncio interface for the handlers (``add``,
``resume``, ``abort``, ``stats``, ``is_alive``, ``start``, ``close``):

- :class:`EngineLoop` (here): the core on a thread of the server process; commands reach it
  through a queue, updates come back with ``loop.call_soon_threadsafe``.
- :class:`~infercept.server.engine_process.EngineProcessClient`: the core in its own process
  (``engine_process.py``), over ZeroMQ with msgspec messages. ``infercept serve``'s default.
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
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from infercept._core import UnknownRequestError
from infercept.engine import LLMEngine, RequestOutput
from infercept.engine.logits_processors import TokenLogprob
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
    """A request's state after a step, as the handlers see it (a copy: plain data, also sent between processes).

    Attributes:
        request_id: The engine's id.
        text: Everything after the prompt (generated text and spliced tool outputs).
        num_generated_tokens: Tokens the model sampled since the request was added.
        finished, finish_reason, error: As in ``RequestOutput``.
        paused: Waiting on a client-side tool; ``tool_name``/``tool_arguments`` describe
            the call and ``context_token_ids`` is the whole context (prompt + output).
        num_cached_tokens: Prompt tokens whose KV came from the engine's prefix cache (0
            from an engine without one).
        engine_died: The request ended because the engine (its process or thread) stopped:
            the server answers 503, not 500.
        logprobs: The logprob entries of the tokens sampled since the request's previous
            update (``RequestOutput.logprobs``; empty unless its params ask for them).
        prompt_logprobs: ``RequestOutput.prompt_logprobs``, carried once: by the first
            update with a sampled token of a request whose params ask for them.
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
    engine_died: bool = False
    logprobs: tuple[tuple[int, float, tuple[tuple[int, float], ...]], ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @classmethod
    def of(cls, output: RequestOutput, logprobs_from: int = 0,
           with_prompt_logprobs: bool = False) -> Update:
        paused = output.paused and not output.finished
        call = output.intercepts[-1] if paused else None
        return cls(output.request_id, output.text, output.num_generated_tokens, output.finished,
                   output.finish_reason, paused, output.error,
                   call.name if call else None, dict(call.arguments) if call else None,
                   tuple(output.prompt_token_ids) + tuple(output.token_ids) if paused else None,
                   getattr(output, "num_cached_tokens", 0),
                   logprobs=tuple(output.logprobs[logprobs_from:]),
                   prompt_logprobs=(tuple(output.prompt_logprobs) if with_prompt_logprobs
                                    and output.prompt_logprobs is not None else None))


@dataclass
class RequestHandle:
    """What a handler holds for one engine request.

    Attributes:
        request_id: The engine's id.
        updates: Updates in order; the last one has ``finished`` or ``paused`` set.
        text_offset: Characters of ``Update.text`` that precede this HTTP request's answer
            (non-zero for a resumed context: earlier turns and the tool result).
        generated_offset: Generated tokens that precede this HTTP request's answer.
        logprobs: This answer's logprob entries so far, gathered by ``app.next_update``.
        prompt_logprobs: The prompt's logprob entries once an update brought them.
        pending: Updates already taken off ``updates`` and to be read again first (a
            handler that waited for the first one).
    """

    request_id: int
    updates: asyncio.Queue[Update]
    text_offset: int = 0
    generated_offset: int = 0
    logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]] = field(
        default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    pending: deque[Update] = field(default_factory=deque)


class EngineDeadError(RuntimeError):
    """The engine (its thread or process) has stopped; the server answers 503."""


@dataclass(frozen=True)
class EngineStats:
    """What ``/metrics`` reads of the engine, taken between two steps.

    Attributes:
        stats: ``LLMEngine.stats``.
        generation_tokens_total, prompt_tokens_total: Tokens sampled / submitted so far.
        generation_tokens_per_s: Sampled over the last ``_RATE_WINDOW_S`` seconds.
    """

    stats: dict[str, float]
    generation_tokens_total: int
    prompt_tokens_total: int
    generation_tokens_per_s: float


@dataclass(frozen=True)
class EngineInfo:
    """What the server needs to know of its engine at start-up (sent by the engine process).

    Attributes:
        model_name: The model file's name (clients may ask for it).
        model_path: Where the model lives (the server loads its tokenizer from there).
        max_model_len: Longest context in tokens.
        tool_schemas: The server-side tools, as OpenAI function schemas.
        num_device_blocks, num_host_blocks: The KV pools' sizes in blocks.
        block_bytes: Bytes of one KV block.
    """

    model_name: str
    model_path: str
    max_model_len: int
    tool_schemas: list[dict[str, Any]]
    num_device_blocks: int
    num_host_blocks: int
    block_bytes: int

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineInfo:
        from infercept.model.loader import resolve_model_path

        stats = engine.stats
        block_bytes = (engine.model.config.kv_bytes_per_token(engine.config.torch_dtype)
                       * engine.config.block_size)
        return cls(engine.model_name, str(resolve_model_path(engine.config.model)),
                   engine.max_model_len, list(engine.tools.to_openai()),
                   int(stats["num_free_device_blocks"]), int(stats["num_free_host_blocks"]),
                   int(block_bytes))


class Observer(Protocol):
    """Takes one latency observation: ``name`` is a histogram attribute of ServerMetrics
    ('time_to_first_token', 'inter_token_latency', 'e2e_request_latency',
    'request_queue_time', 'tool_time'); ``kind`` labels 'tool_time' only."""

    def __call__(self, name: str, value_s: float, kind: str | None = None) -> None: ...


@dataclass
class _Timing:
    """One request's clock where the engine runs (``time.monotonic`` seconds).

    Attributes:
        segment_start_s: When its add (or latest resume) ran on the engine.
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


def add_request_takes(engine: Any, name: str) -> bool:
    """Whether ``engine.add_request`` takes the keyword ``name``: ``cache_salt`` (engines with a
    prefix cache), ``predicted_output_tokens`` (engines that can rank their queue by it)."""
    return name in inspect.signature(engine.add_request).parameters


class EngineCore:
    """An ``LLMEngine`` and its per-request bookkeeping; single-threaded, like the engine.

    Args:
        engine: The engine; only this core calls it.
        emit: Takes each :class:`Update` of a request someone listens to (added or resumed
            and not yet finished or paused), in order.
        observe: Takes the latency observations (None: not observed).
    """

    def __init__(self, engine: LLMEngine, emit: Callable[[Update], None],
                 observe: Observer | None = None) -> None:
        self.engine = engine
        self._emit = emit
        self._observe_fn = observe
        self._accepts_cache_salt = add_request_takes(engine, "cache_salt")
        self._accepts_predictions = add_request_takes(engine, "predicted_output_tokens")
        self._timings: dict[int, _Timing] = {}
        self._live: set[int] = set()  # requests whose updates are emitted
        self._num_generated: dict[int, int] = {}
        self._num_logprobs_sent: dict[int, int] = {}
        self.num_generated_tokens_total = 0
        self.num_prompt_tokens_total = 0
        self._rate_samples: deque[tuple[float, int]] = deque()
        self.num_step_errors = 0

    # ---- commands ------------------------------------------------------------------------

    def add(self, prompt_token_ids: Sequence[int], params: SamplingParams,
            client_tools: Sequence[str] = (), use_tools: bool = True,
            cache_salt: str | None = None, predicted_output_tokens: int | None = None) -> int:
        """Adds a request and listens to it; returns its id (ValueError: refused)."""
        tokens = list(prompt_token_ids)
        extra: dict[str, Any] = {}
        if self._accepts_cache_salt and cache_salt:
            extra["cache_salt"] = cache_salt
        if self._accepts_predictions and predicted_output_tokens is not None:
            extra["predicted_output_tokens"] = predicted_output_tokens
        request_id = self.engine.add_request(prompt_token_ids=tokens, params=params,
                                             use_tools=use_tools, client_tools=tuple(client_tools),
                                             **extra)
        self._live.add(request_id)
        self._num_generated[request_id] = 0
        self._num_logprobs_sent[request_id] = 0
        self._timings[request_id] = _Timing(time.monotonic())
        self.num_prompt_tokens_total += len(tokens)
        return request_id

    def resume(self, request_id: int, token_ids: Sequence[int], params: SamplingParams,
               client_tools: Sequence[str] = (),
               predicted_output_tokens: int | None = None) -> tuple[int, int]:
        """Resumes a paused request and listens to it again.

        Returns:
            (characters of text, generated tokens) before this segment. A request with no room
            left after ``token_ids`` finishes at once: its final update is emitted here.

        Raises:
            ValueError, UnknownRequestError: The request is gone or not paused for the caller.
        """
        tokens = list(token_ids)
        if self._accepts_predictions and predicted_output_tokens is not None:
            # Before the resume: the continuation is queued under the new key.
            self.engine.set_predicted_output_tokens(request_id, predicted_output_tokens)
        self.engine.resume(request_id, token_ids=tokens, params=params,
                           client_tools=tuple(client_tools))
        output = self.engine.get(request_id)
        self.num_prompt_tokens_total += len(tokens)
        timing = self._timings.setdefault(request_id, _Timing(0.0))
        timing.segment_start_s, timing.last_token_s = time.monotonic(), None
        timing.has_first_token = False
        self._observe_tool_times(output, timing)
        if output.finished:  # no room left after the tool output
            self._emit(Update.of(output))
            self._finish(request_id)
        else:
            self._live.add(request_id)
            self._num_generated[request_id] = output.num_generated_tokens
            self._num_logprobs_sent[request_id] = len(output.logprobs)
        return len(output.text), output.num_generated_tokens

    def abort(self, request_id: int) -> None:
        """Aborts a request (live or paused) and frees its blocks; no-op if it is gone."""
        self._live.discard(request_id)
        self._num_generated.pop(request_id, None)
        self._num_logprobs_sent.pop(request_id, None)
        self._timings.pop(request_id, None)
        try:
            self.engine.abort(request_id)
            self.engine.release(request_id)
        except UnknownRequestError:
            pass  # finished and released meanwhile

    def stats(self) -> EngineStats:
        return EngineStats(dict(self.engine.stats), self.num_generated_tokens_total,
                           self.num_prompt_tokens_total, self.generation_tokens_per_s())

    def generation_tokens_per_s(self) -> float:
        samples = list(self._rate_samples)
        if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
            return 0.0
        return (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])

    # ---- stepping ------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> None:
        """One engine step; its updates are emitted. A failing step fails what was live (the
        core keeps serving)."""
        step_start_s = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed")
            self.num_step_errors += 1
            self.fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
            return
        self._dispatch(outputs, step_start_s)

    def fail_all(self, message: str) -> None:
        """Ends every live request with ``message`` (finish_reason 'error')."""
        for request_id in list(self._live):
            self._emit(Update(request_id, "", 0, True, "error", False, message))
            try:
                self.engine.abort(request_id)
                self.engine.release(request_id)
            except Exception:
                pass
            self._timings.pop(request_id, None)
        self._live.clear()

    def shutdown(self) -> None:
        """Fails what is live and stops the engine's tool runtime."""
        self.fail_all("the server is shutting down")
        try:
            self.engine.shutdown()
        except Exception:
            log.exception("engine shutdown failed")

    def _dispatch(self, outputs: list[RequestOutput], step_start_s: float) -> None:
        now = time.monotonic()
        for output in outputs:
            request_id = output.request_id
            previous = self._num_generated.get(request_id, 0)
            num_new_tokens = max(0, output.num_generated_tokens - previous)
            self.num_generated_tokens_total += num_new_tokens
            self._num_generated[request_id] = output.num_generated_tokens
            # The prompt's logprobs ride on the request's first sampled token's update.
            update = Update.of(output, self._num_logprobs_sent.get(request_id, 0),
                               with_prompt_logprobs=previous == 0 < output.num_generated_tokens)
            self._num_logprobs_sent[request_id] = len(output.logprobs)
            timing = self._timings.get(request_id)
            if timing is not None and self._observe_fn is not None:
                self._observe(output, update, timing, num_new_tokens, step_start_s, now)
            if request_id in self._live:
                self._emit(update)
            if update.finished:
                self._finish(request_id)
            elif update.paused:
                self._live.discard(request_id)  # the paused store owns it now
        self._rate_samples.append((now, self.num_generated_tokens_total))
        while self._rate_samples and self._rate_samples[0][0] < now - _RATE_WINDOW_S:
            self._rate_samples.popleft()

    def _observe(self, output: RequestOutput, update: Update, timing: _Timing,
                 num_new_tokens: int, step_start_s: float, now: float) -> None:
        """Observes this step's latencies of one request."""
        observe = self._observe_fn
        assert observe is not None
        self._observe_tool_times(output, timing)
        if num_new_tokens:  # sampled before any pause this output reports
            if not timing.has_first_token:
                timing.has_first_token = True
                observe("time_to_first_token", now - timing.segment_start_s)
                observe("request_queue_time", max(0.0, step_start_s - timing.segment_start_s))
            elif timing.last_token_s is not None:
                observe("inter_token_latency", now - timing.last_token_s)
            timing.last_token_s = now
        if len(output.intercepts) != timing.num_intercepts:
            timing.num_intercepts = len(output.intercepts)
            timing.last_token_s = None  # the next gap holds a tool call
        ended_normally = update.finished and update.finish_reason not in ("abort", "error")
        if ended_normally or update.paused:
            observe("e2e_request_latency", now - timing.segment_start_s)

    def _observe_tool_times(self, output: RequestOutput, timing: _Timing) -> None:
        """Observes the durations of the tool calls that ended since the last look."""
        if self._observe_fn is None:
            return
        intercepts = output.intercepts
        while (timing.num_timed_intercepts < len(intercepts)
               and intercepts[timing.num_timed_intercepts].duration_s is not None):
            record = intercepts[timing.num_timed_intercepts]
            self._observe_fn("tool_time", record.duration_s,
                             TOOL_KINDS.get(record.kind, record.kind))
            timing.num_timed_intercepts += 1

    def _finish(self, request_id: int) -> None:
        self._live.discard(request_id)
        self._num_generated.pop(request_id, None)
        self._num_logprobs_sent.pop(request_id, None)
        self._timings.pop(request_id, None)
        try:
            self.engine.release(request_id)
        except Exception:  # already released
            pass


def metrics_observer(metrics: ServerMetrics) -> Observer:
    """An observer into ``metrics``' histograms (prometheus_client metrics are thread-safe)."""

    def observe(name: str, value_s: float, kind: str | None = None) -> None:
        histogram = getattr(metrics, name)
        (histogram.labels(kind) if kind is not None else histogram).observe(value_s)

    return observe


class EngineLoop:
    """An :class:`EngineCore` on a daemon thread of the server process; all methods are
    called from the event loop (the in-thread mode: ``infercept serve --no-engine-process``).

    Args:
        engine: The engine; nothing else may call it while the loop runs.
        metrics: Where to observe latencies (None: not observed).
    """

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.core = EngineCore(engine, self._emit,
                               metrics_observer(metrics) if metrics is not None else None)
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._subscribers: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Update]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="infercept-engine", daemon=True)

    # ---- lifecycle (event loop side) -----------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the thread, aborting what is live and stopping the engine's tool runtime."""
        self._stop.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout_s)

    async def close(self) -> None:
        await asyncio.to_thread(self.stop)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_generated_tokens_total(self) -> int:
        return self.core.num_generated_tokens_total

    @property
    def num_prompt_tokens_total(self) -> int:
        return self.core.num_prompt_tokens_total

    @property
    def num_step_errors(self) -> int:
        return self.core.num_step_errors

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
                  cache_salt: str | None = None,
                  predicted_output_tokens: int | None = None) -> RequestHandle:
        """Queues a request; its updates arrive on the returned handle.

        ``cache_salt`` keeps the request's prefix-cache entries apart from other salts'; it is
        not passed to an engine without a prefix cache (nothing is shared there).
        ``predicted_output_tokens`` ranks the request where the engine ranks its queue.
        """
        updates: asyncio.Queue[Update] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        tokens, tools = list(prompt_token_ids), tuple(client_tools)

        def add(engine: LLMEngine) -> int:
            request_id = self.core.add(tokens, params, tools, use_tools, cache_salt,
                                       predicted_output_tokens)
            self._subscribers[request_id] = (loop, updates)
            return request_id

        return RequestHandle(await self.call(add), updates)

    async def resume(self, request_id: int, token_ids: Sequence[int], params: SamplingParams, *,
                     client_tools: Iterable[str] = (),
                     predicted_output_tokens: int | None = None) -> RequestHandle:
        """Continues a request paused on a client tool by appending ``token_ids`` (with a new
        prediction of its remaining output, when given).

        Raises:
            ValueError, UnknownRequestError: The request is gone or not paused for the caller.
        """
        updates: asyncio.Queue[Update] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        tokens, tools = list(token_ids), tuple(client_tools)

        def resume(engine: LLMEngine) -> tuple[int, int]:
            self._subscribers[request_id] = (loop, updates)  # before: it may finish at once
            try:
                return self.core.resume(request_id, tokens, params, tools,
                                        predicted_output_tokens)
            except Exception:
                self._subscribers.pop(request_id, None)
                raise

        text_offset, generated_offset = await self.call(resume)
        return RequestHandle(request_id, updates, text_offset, generated_offset)

    def abort(self, request_id: int) -> None:
        """Aborts a request (live or paused) and frees its blocks; no-op if it is gone."""

        def abort() -> None:
            self._subscribers.pop(request_id, None)
            self.core.abort(request_id)

        self._commands.put(abort)

    async def stats(self) -> EngineStats:
        return await self.call(lambda engine: self.core.stats())

    def generation_tokens_per_s(self) -> float:
        return self.core.generation_tokens_per_s()

    # ---- the thread ----------------------------------------------------------------------

    def _emit(self, update: Update) -> None:
        subscriber = self._subscribers.get(update.request_id)
        if subscriber is None:
            return
        if update.finished or update.paused:
            del self._subscribers[update.request_id]
        loop, updates = subscriber
        try:
            loop.call_soon_threadsafe(updates.put_nowait, update)
        except RuntimeError:  # the event loop has closed
            pass

    def _run(self) -> None:
        core = self.core
        while not self._stop.is_set():
            busy = core.has_unfinished()
            self._drain_commands(block=not busy)
            if self._stop.is_set() or not core.has_unfinished():
                continue
            core.step()
        core.shutdown()

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
