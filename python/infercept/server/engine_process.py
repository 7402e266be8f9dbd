"""The engine core in its own process, and the client the HTTP server holds of it.

``infercept serve`` (by default) runs two processes. The engine process
(``python -c`` running :func:`main`) builds the ``LLMEngine`` and its server-side
tools from an :class:`EngineSpec` and runs an :class:`~infercept.server.engine_loop.EngineCore`
loop: drain commands, step, send updates. The server process runs uvicorn, the handlers,
the paused-context store and the metrics registry, and holds an :class:`EngineProcessClient`,
which has the interface of :class:`~infercept.server.engine_loop.EngineLoop`; it never builds
or steps an engine (it loads the tokenizer only, to render chat templates and count tokens).

Transport: two ZeroMQ PUSH/PULL pairs over ``ipc://`` sockets in a private temporary
directory, one per direction; every message is a msgspec Struct encoded as MessagePack (no
pickle: a peer can send data, never code). The spec goes on the command line as JSON.
Detokenization stays in the engine process: each :class:`Update` carries the request's
whole text so far (the engine's incremental detokenizer made it), as in the in-thread mode.

Order: both directions are single FIFO pipes, so the reply to an ``add`` (the request id)
reaches the client before any update of that request; the client registers the request's
queue when it reads the reply, before the handler resumes.

Death: the client watches the engine process through a pidfd (a poll of ``waitpid`` where
there is none). When it exits unasked, ``is_alive`` turns false (``/health`` answers 503),
every open request ends with ``Update.engine_died`` (503 for a non-streaming request, an
error event for a stream), pending commands raise :class:`EngineDeadError`, and so does
every new request (503). The engine process dies with its parent (``PR_SET_PDEATHSIG`` and a
parent check while idle) and ignores SIGINT: the server stops it with a ``Shutdown``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any, Union

import msgspec
import zmq
import zmq.asyncio

from infercept._core import UnknownRequestError
from infercept.engine import EngineConfig
from infercept.process_death import die_with_parent
from infercept.sampling import SamplingParams
from infercept.server.engine_loop import (EngineCore, EngineDeadError, EngineInfo, EngineStats,
                                          RequestHandle, Update, metrics_observer)
from infercept.server.metrics import ServerMetrics

log = logging.getLogger("infercept.server")

# How long the idle engine process waits for a command before checking its parent (ms).
_IDLE_POLL_MS = 50
# How often the client polls for the engine's exit where there is no pidfd (s).
_EXIT_POLL_S = 0.1
# Default wait for the engine process to load its model (a first start may profile costs).
DEFAULT_STARTUP_TIMEOUT_S = 900.0


# ---- messages --------------------------------------------------------------------------

class EngineSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How the engine process builds its engine: data only (tools are named, not sent).

    Attributes:
        config: The engine's configuration.
        tool_paths: Server-side tools as ``module:attr`` targets (see ``tool_plugins``).
        entry_point_tools: Also load the ``infercept.tools`` entry points.
        tool_errors: ``LLMEngine``'s ``tool_errors`` ('return': a failing tool's error is
            the tool output the model sees).
        startup_timeout_s: How long the server waits for the engine to be ready.
    """

    config: EngineConfig = msgspec.field(default_factory=EngineConfig)
    tool_paths: list[str] = msgspec.field(default_factory=list)
    entry_point_tools: bool = False
    tool_errors: str = "return"
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S


class Add(msgspec.Struct, tag=True):
    call_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    client_tools: list[str]
    use_tools: bool
    cache_salt: str | None
    predicted_output_tokens: int | None = None


class Resume(msgspec.Struct, tag=True):
    call_id: int
    request_id: int
    token_ids: list[int]
    params: SamplingParams
    client_tools: list[str]
    predicted_output_tokens: int | None = None


class Abort(msgspec.Struct, tag=True):
    request_id: int


class GetStats(msgspec.Struct, tag=True):
    call_id: int


class Shutdown(msgspec.Struct, tag=True):
    pass


Command = Union[Add, Resume, Abort, GetStats, Shutdown]


class Ready(msgspec.Struct, tag=True):
    info: EngineInfo


class StartupFailed(msgspec.Struct, tag=True):
    message: str


class Reply(msgspec.Struct, tag=True):
    """The answer to a command with a ``call_id``: ``value`` or an error.

    ``error_type`` names the exception the client raises again ('ValueError',
    'UnknownRequestError'; anything else becomes a RuntimeError)."""

    call_id: int
    value: Any = None
    error_type: str | None = None
    error: str | None = None


class Outputs(msgspec.Struct, tag=True):
    """What one step (or a batch of commands) changed.

    Attributes:
        updates: Updates of the requests someone listens to, in order.
        observations: Latency observations, ``(histogram, seconds, kind or None)``.
        generation_tokens_total, prompt_tokens_total, generation_tokens_per_s: The core's
            token counters after the step.
    """

    updates: list[Update]
    observations: list[tuple[str, float, Union[str, None]]]
    generation_tokens_total: int
    prompt_tokens_total: int
    generation_tokens_per_s: float


Event = Union[Ready, StartupFailed, Reply, Outputs]

_ERRORS: dict[str, type[Exception]] = {"ValueError": ValueError,
                                       "UnknownRequestError": UnknownRequestError}


# ---- the engine process ----------------------------------------------------------------

def build_engine_from_spec(spec: EngineSpec) -> Any:
    """The spec's ``LLMEngine`` with its tools (imported here: the server side never does)."""
    from infercept.engine import LLMEngine
    from infercept.server.tool_plugins import load_tools

    tools = load_tools(spec.tool_paths, spec.entry_point_tools)
    return LLMEngine(spec.config, tools=tools, tool_errors=spec.tool_errors)


class _EngineProcess:
    """The engine process's loop: commands in, updates out, between steps."""

    def __init__(self, spec: EngineSpec, input_address: str, output_address: str) -> None:
        self.context = zmq.Context()
        self.input = self.context.socket(zmq.PULL)
        self.input.bind(input_address)
        self.output = self.context.socket(zmq.PUSH)
        self.output.setsockopt(zmq.SNDHWM, 0)  # never drop or block on the updates
        self.output.bind(output_address)
        self.spec = spec
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(Command)
        self.updates: list[Update] = []
        self.observations: list[tuple[str, float, str | None]] = []
        self.stopping = False

    def send(self, event: Event) -> None:
        self.output.send(self.encoder.encode(event), copy=False)

    def run(self) -> int:
        parent = os.getppid()
        try:
            engine = build_engine_from_spec(self.spec)
        except Exception as exc:
            log.exception("the engine failed to start")
            self.send(StartupFailed(f"{type(exc).__name__}: {exc}"))
            self.close()
            return 1
        core = EngineCore(engine, self.updates.append,
                          lambda name, value_s, kind=None: self.observations.append(
                              (name, value_s, kind)))
        self.send(Ready(EngineInfo.of(engine)))
        while not self.stopping:
            busy = core.has_unfinished()
            if self.input.poll(0 if busy else _IDLE_POLL_MS):
                self.drain(core)
            elif not busy and os.getppid() != parent:
                log.warning("the server process is gone; the engine process stops")
                break
            self.flush(core)
            if not self.stopping and core.has_unfinished():
                core.step()
                self.flush(core)
        core.shutdown()
        self.flush(core)
        self.close()
        return 0

    def drain(self, core: EngineCore) -> None:
        """Runs every queued command; each one with a ``call_id`` is answered at once."""
        while True:
            try:
                frame = self.input.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            command = self.decoder.decode(frame.buffer)
            if isinstance(command, Abort):
                core.abort(command.request_id)
            elif isinstance(command, Shutdown):
                self.stopping = True
                return
            else:
                self.send(self.answer(core, command))

    @staticmethod
    def answer(core: EngineCore, command: Add | Resume | GetStats) -> Reply:
        try:
            if isinstance(command, Add):
                value: Any = core.add(command.prompt_token_ids, command.params,
                                      command.client_tools, command.use_tools,
                                      command.cache_salt, command.predicted_output_tokens)
            elif isinstance(command, Resume):
                value = core.resume(command.request_id, command.token_ids, command.params,
                                    command.client_tools, command.predicted_output_tokens)
            else:
                value = core.stats()
        except Exception as exc:  # raised again in the awaiting handler
            return Reply(command.call_id, error_type=type(exc).__name__, error=str(exc))
        return Reply(command.call_id, value)

    def flush(self, core: EngineCore) -> None:
        if not self.updates and not self.observations:
            return
        self.send(Outputs(self.updates[:], self.observations[:], core.num_generated_tokens_total,
                          core.num_prompt_tokens_total, core.generation_tokens_per_s()))
        self.updates.clear()
        self.observations.clear()

    def close(self) -> None:
        self.input.close(linger=0)
        self.output.close(linger=2000)  # let the last updates out
        self.context.term()


# The engine process's command (``-c``, not ``-m``: the package imports this module first).
_ENTRY = "import sys; from infercept.server.engine_process import main; sys.exit(main())"


def main(argv: Sequence[str] | None = None) -> int:
    """The engine process: ``python -c _ENTRY SPEC_JSON INPUT_ADDRESS OUTPUT_ADDRESS``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        print("usage: engine_process SPEC_JSON INPUT_ADDRESS OUTPUT_ADDRESS (started by "
              "infercept serve)", file=sys.stderr)
        return 2
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the server; it stops us
    logging.basicConfig(level=os.environ.get("INFERCEPT_ENGINE_LOG_LEVEL", "INFO").upper(),
                        format="engine: %(levelname)s %(name)s: %(message)s")
    spec = msgspec.json.decode(args[0], type=EngineSpec)
    return _EngineProcess(spec, args[1], args[2]).run()


# ---- the client (server process) -------------------------------------------------------

class EngineFrontend:
    """What the handlers read of the engine besides the client: tokenizer, tool-call parser,
    names and limits (``OpenAIServer.engine`` in the process mode)."""

    def __init__(self, info: EngineInfo, tokenizer: Any, parser: Any) -> None:
        self.info = info
        self.tokenizer, self.parser = tokenizer, parser
        self.model_name, self.max_model_len = info.model_name, info.max_model_len


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class EngineProcessClient:
    """Starts the engine process and talks to it; the handlers' interface of ``EngineLoop``.

    The constructor blocks until the engine is ready (it loads the model) and raises
    RuntimeError if it fails or exits first. :meth:`start` (on the server's event loop) starts
    reading its updates and watching it; all other methods run on that loop.

    Args:
        spec: What the engine process builds.
        metrics: Where the engine's latency observations go (settable later).
    """

    def __init__(self, spec: EngineSpec, metrics: ServerMetrics | None = None) -> None:
        self.spec = spec
        self.metrics = metrics
        self._dir = tempfile.mkdtemp(prefix="infercept-engine-")
        input_address, output_address = (f"ipc://{self._dir}/input", f"ipc://{self._dir}/output")
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Event)
        self._context = zmq.Context()
        # Input: connected before the engine binds, so nothing sent is refused; unbounded, so a
        # send from the event loop never blocks.
        self._input = self._context.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.connect(input_address)
        self._output_sync = self._context.socket(zmq.PULL)
        self._output_sync.setsockopt(zmq.RCVHWM, 0)
        self._output_sync.setsockopt(zmq.LINGER, 0)
        self._output_sync.connect(output_address)
        command = [sys.executable, "-c", _ENTRY, msgspec.json.encode(spec).decode(),
                   input_address, output_address]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        self.pid = self.process.pid
        try:
            self.info = self._wait_ready(spec.startup_timeout_s)
            self.frontend = self._frontend(self.info)
        except BaseException:
            self._kill()
            self._close_sockets()
            raise
        self._subscribers: dict[int, asyncio.Queue[Update]] = {}
        self._pending: dict[int, tuple[asyncio.Future[Any], Any]] = {}
        self._next_call_id = 0
        self._dead_reason: str | None = None
        self._stopping = False
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._pidfd: int | None = None
        self.num_generated_tokens_total = 0
        self.num_prompt_tokens_total = 0
        self._tokens_per_s = 0.0
        atexit.register(self._kill)  # an app that never started or stopped

    # ---- start-up (any thread) -----------------------------------------------------------

    def _wait_ready(self, timeout_s: float) -> EngineInfo:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._output_sync.poll(100):
                event = self._decoder.decode(self._output_sync.recv())
                if isinstance(event, Ready):
                    return event.info
                if isinstance(event, StartupFailed):
                    raise RuntimeError(f"the engine process failed to start: {event.message}")
                raise RuntimeError(f"the engine process sent {type(event).__name__} before "
                                   "it was ready")
            if self.process.poll() is not None:
                raise RuntimeError(f"the engine process (pid {self.pid}) "
                                   f"{_describe_exit(self.process.returncode)} during start-up "
                                   "(its log is above)")
        raise RuntimeError(f"the engine process was not ready within {timeout_s:g} s "
                           "(EngineSpec.startup_timeout_s)")

    def _frontend(self, info: EngineInfo) -> EngineFrontend:
        from infercept.model import Tokenizer
        from infercept.tools import TagParser

        return EngineFrontend(info, Tokenizer.from_path(info.model_path), TagParser())

    # ---- lifecycle (event loop) ----------------------------------------------------------

    def start(self) -> None:
        self._output = zmq.asyncio.Socket.from_socket(self._output_sync)
        self._reader = asyncio.create_task(self._read_forever(), name="infercept-engine-reader")
        self._watcher = asyncio.create_task(self._watch(), name="infercept-engine-watcher")

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stops the engine process (a Shutdown, then SIGKILL past ``timeout_s``)."""
        self._stopping = True
        if self.process.poll() is None:
            with contextlib.suppress(zmq.ZMQError):
                self._input.send(self._encoder.encode(Shutdown()), zmq.NOBLOCK)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.process.wait), timeout_s)
            except TimeoutError:
                log.warning("the engine process did not stop within %g s; killing it", timeout_s)
                self._kill()
        self._mark_dead("the server is shutting down")
        atexit.unregister(self._kill)
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._close_sockets()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Synchronous stop from outside the event loop (SIGTERM, then SIGKILL)."""
        self._stopping = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._kill()

    @property
    def is_alive(self) -> bool:
        return self._dead_reason is None and self.process.poll() is None

    @property
    def dead_reason(self) -> str | None:
        return self._dead_reason

    # ---- commands (event loop) -----------------------------------------------------------

    async def add(self, prompt_token_ids: Sequence[int], params: SamplingParams, *,
                  client_tools: Iterable[str] = (), use_tools: bool = True,
                  cache_salt: str | None = None,
                  predicted_output_tokens: int | None = None) -> RequestHandle:
        """Sends a request; its updates arrive on the returned handle (see EngineLoop.add)."""
        updates: asyncio.Queue[Update] = asyncio.Queue()
        call_id = self._new_call_id()
        request_id = await self._call(
            Add(call_id, list(prompt_token_ids), params, list(client_tools), use_tools,
                cache_salt, predicted_output_tokens), call_id, updates)
        return RequestHandle(request_id, updates)

    async def resume(self, request_id: int, token_ids: Sequence[int], params: SamplingParams, *,
                     client_tools: Iterable[str] = (),
                     predicted_output_tokens: int | None = None) -> RequestHandle:
        """Continues a paused request (see EngineLoop.resume)."""
        updates: asyncio.Queue[Update] = asyncio.Queue()
        call_id = self._new_call_id()
        text_offset, generated_offset = await self._call(
            Resume(call_id, request_id, list(token_ids), params, list(client_tools),
                   predicted_output_tokens), call_id, (request_id, updates))
        return RequestHandle(request_id, updates, text_offset, generated_offset)

    def abort(self, request_id: int) -> None:
        """Aborts a request (live or paused); no-op if it is gone or the engine is."""
        self._subscribers.pop(request_id, None)
        if self.is_alive:
            self._send(Abort(request_id))

    async def stats(self) -> EngineStats:
        call_id = self._new_call_id()
        value = await self._call(GetStats(call_id), call_id, None)
        return msgspec.convert(value, EngineStats)

    def generation_tokens_per_s(self) -> float:
        return self._tokens_per_s

    def _new_call_id(self) -> int:
        self._next_call_id += 1
        return self._next_call_id

    def _send(self, command: Command) -> None:
        self._input.send(self._encoder.encode(command), zmq.NOBLOCK, copy=False)

    async def _call(self, command: Command, call_id: int, subscribe: Any) -> Any:
        """Sends ``command`` and waits for its reply. ``subscribe`` is what the reader
        registers on a successful reply, before any update can follow: the updates queue of
        an Add, (request id, queue) of a Resume, or None."""
        if self._dead_reason is not None or self.process.poll() is not None:
            raise EngineDeadError(self._dead_reason or self._unexpected_exit())
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = (future, subscribe)
        try:
            self._send(command)
            return await future
        finally:
            if not future.cancelled():  # a cancelled one's reply is still to be read
                self._pending.pop(call_id, None)

    # ---- updates and death (event loop) --------------------------------------------------

    async def _read_forever(self) -> None:
        try:
            while True:
                frame = await self._output.recv(copy=False)
                self._handle(self._decoder.decode(frame.buffer))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("reading the engine process's messages failed")
            self._mark_dead(f"the engine process's messages could not be read "
                            f"({type(exc).__name__}: {exc})")
            self._kill()

    def _handle(self, event: Event) -> None:
        if isinstance(event, Outputs):
            for update in event.updates:
                updates = self._subscribers.get(update.request_id)
                if updates is None:
                    continue  # aborted meanwhile
                if update.finished or update.paused:
                    del self._subscribers[update.request_id]
                updates.put_nowait(update)
            if self.metrics is not None and event.observations:
                observe = metrics_observer(self.metrics)
                for name, value_s, kind in event.observations:
                    observe(name, value_s, kind)
            self.num_generated_tokens_total = event.generation_tokens_total
            self.num_prompt_tokens_total = event.prompt_tokens_total
            self._tokens_per_s = event.generation_tokens_per_s
        elif isinstance(event, Reply):
            pending = self._pending.pop(event.call_id, None)
            if pending is None:
                return
            future, subscribe = pending
            if future.done():  # its handler went away: nobody will read or abort the request
                if event.error_type is None and isinstance(subscribe, asyncio.Queue):
                    self._send(Abort(int(event.value)))
                elif event.error_type is None and isinstance(subscribe, tuple):
                    self._send(Abort(subscribe[0]))
                return
            if event.error_type is not None:
                error_type = _ERRORS.get(event.error_type)
                future.set_exception(error_type(event.error) if error_type else RuntimeError(
                    f"the engine failed: {event.error_type}: {event.error}"))
                return
            if isinstance(subscribe, asyncio.Queue):
                self._subscribers[int(event.value)] = subscribe
            elif isinstance(subscribe, tuple):
                self._subscribers[subscribe[0]] = subscribe[1]
            future.set_result(tuple(event.value) if isinstance(event.value, list)
                              else event.value)
        else:
            log.warning("unexpected message from the engine process: %s", type(event).__name__)

    async def _watch(self) -> None:
        """Returns when the engine process exits, after failing what waits on it."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            pidfd = None
        if pidfd is not None:
            exited = asyncio.get_running_loop().create_future()
            loop = asyncio.get_running_loop()
            loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
            try:
                await exited
            finally:
                loop.remove_reader(pidfd)
                os.close(pidfd)
        while self.process.poll() is None:
            await asyncio.sleep(_EXIT_POLL_S)
        if not self._stopping:
            message = self._unexpected_exit()
            log.error("%s", message)
            self._mark_dead(message)

    def _unexpected_exit(self) -> str:
        return (f"the engine process (pid {self.pid}) {_describe_exit(self.process.poll())}; "
                "the server cannot generate until it is restarted")

    def _mark_dead(self, message: str) -> None:
        """Ends every open request and pending command with ``message``."""
        if self._dead_reason is None:
            self._dead_reason = message
        for request_id, updates in list(self._subscribers.items()):
            updates.put_nowait(Update(request_id, "", 0, True, "error", False, message,
                                      engine_died=True))
        self._subscribers.clear()
        for future, _ in list(self._pending.values()):
            if not future.done():
                future.set_exception(EngineDeadError(message))

    def _kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)

    def _close_sockets(self) -> None:
        for sock in (self._input, self._output_sync):
            sock.close(linger=0)
        self._context.term()
        shutil.rmtree(self._dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
