"""FastAPI routes of the OpenAI-compatible server.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both
streaming over SSE or not), ``/v1/responses`` (``responses.py``), ``GET /health`` and
``GET /metrics`` (Prometheus text). With an
API key configured, every ``/v1`` route needs ``Authorization: Bearer <key>``; ``/health`` and
``/metrics`` stay open (probes and scrapers).

A chat completion that ends on a call to one of the request's ``tools`` returns
``finish_reason="tool_calls"`` and leaves its engine request paused in the
:class:`~infercept.server.sessions.PausedContextStore`; the follow-up carrying the tool result
resumes it when its tokens continue the paused context exactly (see ``sessions.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from infercept._core import UnknownRequestError
from infercept.engine import LLMEngine
from infercept.sampling import SamplingParams
from infercept.server import protocol as p
from infercept.server.chat_format import ChatRenderer, ContentStreamer, split_tool_call
from infercept.server.engine_loop import (EngineDeadError, EngineInfo, EngineLoop, RequestHandle,
                                          Update)
from infercept.server.engine_process import EngineProcessClient, EngineSpec
from infercept.server.logprobs import LogprobFormatter, join_completion_logprobs
from infercept.server.metrics import CONTENT_TYPE, EngineSnapshot, ServerMetrics
from infercept.server.response_store import (DEFAULT_MAX_STORED_RESPONSE_BYTES,
                                             DEFAULT_MAX_STORED_RESPONSES,
                                             DEFAULT_STORED_RESPONSE_TTL_S)
from infercept.server.sessions import PausedContext, PausedContextStore
from infercept.server.structured import StructuredRequestError, structured_output_for
from infercept.structured_output import StructuredOutput

log = logging.getLogger("infercept.server")

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


async def _merged(streams: Sequence[AsyncIterator[Any]]) -> AsyncIterator[Any]:
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


@dataclass
class ServerConfig:
    """Server options.

    Attributes:
        served_model_name: The ``model`` clients ask for (the engine's model file name is
            accepted too).
        paused_ttl_s: How long a context paused on a client tool waits for its follow-up.
        max_paused_contexts: Paused contexts held at most (the oldest is dropped beyond).
        tool_prompt: Describe ``tools`` in the system message when the chat template does
            not render them (None: decide from the template).
        api_key: The bearer token every ``/v1`` route requires (None: no authentication).
        stored_response_ttl_s: How long ``/v1/responses`` keeps a stored response.
        max_stored_responses: Stored responses kept at most (the oldest is dropped beyond).
        max_stored_response_bytes: Their JSON adds up to at most this many bytes.
    """

    served_model_name: str = "default"
    paused_ttl_s: float = 120.0
    max_paused_contexts: int = 256
    tool_prompt: bool | None = None
    api_key: str | None = None
    stored_response_ttl_s: float = DEFAULT_STORED_RESPONSE_TTL_S
    max_stored_responses: int = DEFAULT_MAX_STORED_RESPONSES
    max_stored_response_bytes: int = DEFAULT_MAX_STORED_RESPONSE_BYTES


class BadRequestError(Exception):
    """A request the server refuses with 400 (the message names the value and the limit)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class _EngineStreamingResponse(StreamingResponse):
    """Closes its generator however the response ends, so an unfinished request is aborted."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass  # the client went away; the generator's cleanup aborts the request
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


class OpenAIServer:
    """The server's state: engine client, paused contexts, metrics. Routes call into it.

    Args:
        engine: An :class:`EngineSpec`: the engine runs in its own process (built there;
            this blocks until it is ready). An ``LLMEngine``: it runs on a thread of this
            process (the in-thread mode).
    """

    def __init__(self, engine: LLMEngine | EngineSpec, config: ServerConfig | None = None
                 ) -> None:
        self.config = config = config or ServerConfig()
        # ``engine`` (tokenizer, parser, model_name, max_model_len) and ``engine_loop`` (add,
        # resume, abort, stats) are what the handlers use, the same in both modes.
        self.engine_loop: EngineLoop | EngineProcessClient
        if isinstance(engine, EngineSpec):
            client = EngineProcessClient(engine)
            info, self.engine = client.info, client.frontend
        else:
            info, self.engine = EngineInfo.of(engine), engine
        self.metrics = ServerMetrics(num_device_blocks=info.num_device_blocks,
                                     num_host_blocks=info.num_host_blocks,
                                     block_bytes=info.block_bytes)
        if isinstance(engine, EngineSpec):
            client.metrics = self.metrics
            self.engine_loop = client
        else:
            self.engine_loop = EngineLoop(engine, self.metrics)
        self.store = PausedContextStore(config.paused_ttl_s, config.max_paused_contexts)
        self.renderer = ChatRenderer(self.engine.tokenizer, self.store.call_text,
                                     config.tool_prompt)
        self.model_names = {config.served_model_name, info.model_name}
        self.logprob_format = LogprobFormatter(self.engine.tokenizer)
        self.server_tool_schemas = info.tool_schemas
        self._expiry_task: asyncio.Task[None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self.engine_loop.start()
        self._expiry_task = asyncio.create_task(self._expire_forever())

    async def stop(self) -> None:
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry_task
        await self.engine_loop.close()

    async def _expire_forever(self) -> None:
        period_s = min(1.0, self.config.paused_ttl_s / 4)
        while True:
            await asyncio.sleep(period_s)
            self._drop(self.store.expire(), outcome="expired")

    def _drop(self, contexts: Sequence[PausedContext], outcome: str | None = None) -> None:
        """Aborts paused contexts, counting them under ``outcome`` when one is given."""
        for context in contexts:
            self.engine_loop.abort(context.request_id)
        if outcome is not None:
            self.metrics.count_paused_context(outcome, len(contexts))

    # ---- shared pieces -------------------------------------------------------------------

    def check_model(self, model: str) -> None:
        if model not in self.model_names:
            raise BadRequestError(
                f"The model {model!r} does not exist; this server serves "
                f"{self.config.served_model_name!r}", param="model", code="model_not_found")

    def sampling_params(self, req: p._SamplingFields, num_prompt_tokens: int,
                        max_tokens: int | None,
                        structured_output: StructuredOutput | None = None) -> SamplingParams:
        """The request's sampling; raises BadRequestError past the context length."""
        max_len = self.engine.max_model_len
        if num_prompt_tokens >= max_len:
            raise BadRequestError(
                f"This model's maximum context length is {max_len} tokens, but the prompt has "
                f"{num_prompt_tokens} tokens", param="messages", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = max_len - num_prompt_tokens
        elif num_prompt_tokens + max_tokens > max_len:
            raise BadRequestError(
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
                f"prompt, {max_tokens} for the completion); reduce the prompt or max_tokens",
                param="max_tokens", code="context_length_exceeded")
        try:
            return SamplingParams(
                temperature=1.0 if req.temperature is None else req.temperature,
                top_k=-1 if req.top_k is None else req.top_k,
                top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
                max_tokens=max_tokens, stop=req.stop_list, ignore_eos=req.ignore_eos,
                structured_output=structured_output, logprobs=req.num_logprobs,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=(1.0 if req.repetition_penalty is None
                                    else req.repetition_penalty),
                logit_bias=req.logit_bias_ids, min_tokens=req.min_tokens)
        except ValueError as exc:
            raise BadRequestError(str(exc)) from None

    @staticmethod
    def structured_output(req: p._SamplingFields, tool_choice: Any = None,
                          tools: Sequence[p.ToolDefinition] | None = None
                          ) -> StructuredOutput | None:
        """The grammar ``response_format`` and ``tool_choice`` ask for (server/structured.py)."""
        try:
            return structured_output_for(req.response_format, tool_choice,
                                         [t.model_dump(exclude_none=True) for t in tools or []])
        except StructuredRequestError as exc:
            raise BadRequestError(str(exc), param=exc.param) from None

    async def next_final(self, handle: RequestHandle, request: Request) -> Update:
        """Waits for the request to finish or pause; aborts it if the client goes away."""
        try:
            while True:
                update = await next_update(handle, request)
                if update is None:
                    raise ClientDisconnect()
                if update.finished or update.paused:
                    return update
        except (ClientDisconnect, asyncio.CancelledError):
            self.abort_for_disconnect(handle)
            raise

    @staticmethod
    def generation_failed(update: Update) -> JSONResponse | None:
        """The 500 response for a request the engine ended with an error (503 when the
        engine itself stopped), else None."""
        if update.finish_reason != "error":
            return None
        if update.engine_died:
            return _engine_unavailable(update.error or "the engine stopped")
        return JSONResponse(p.error_body(update.error or "generation failed",
                                         error_type="server_error"), status_code=500)

    def abort_for_disconnect(self, handle: RequestHandle) -> None:
        self.metrics.client_disconnects.inc()
        self.engine_loop.abort(handle.request_id)

    # ---- chat ----------------------------------------------------------------------------

    async def chat(self, req: p.ChatCompletionRequest, request: Request) -> Any:
        self.check_model(req.model)
        choice = req.tool_choice
        client_tools = [t.function.name for t in req.tools or []]
        schemas = [t.model_dump(exclude_none=True) for t in req.tools or []]
        if choice == "none":
            client_tools, schemas = [], []
        elif isinstance(choice, p.NamedToolChoice):
            client_tools = [choice.function.name]
            schemas = [s for s in schemas if s["function"]["name"] == choice.function.name]
        is_followup = req.messages[-1].role == "tool"
        if req.n > 1 and (client_tools or is_followup):
            # Each choice could pause on its own call; one follow-up cannot resume n contexts.
            raise BadRequestError(f"n={req.n} is not supported with tools or tool results "
                                  "(n > 1 needs tool_choice='none' or no tools)", param="n")
        try:
            # A request's own tool shadows a server tool of the same name (the engine runs
            # client tools first).
            server_schemas = [s for s in self.server_tool_schemas
                              if s["function"]["name"] not in client_tools]
            prompt_ids = self.renderer.render(req.messages, schemas + server_schemas)
        except ValueError as exc:
            raise BadRequestError(str(exc), param="messages") from None
        params = self.sampling_params(req, len(prompt_ids), req.completion_limit,
                                      self.structured_output(req, choice, req.tools))
        result_ids = [m.tool_call_id for m in req.messages if m.role == "tool" and m.tool_call_id]
        conversation = _Conversation(req.session_id, req.cache_salt)
        handle, num_reused = await self._start(prompt_ids, params, client_tools, conversation,
                                               result_ids, is_followup)
        handles = await self._add_siblings(handle, prompt_ids, params, req.n, client_tools,
                                           conversation, request)
        response_id = p.new_id("chatcmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _EngineStreamingResponse(
                self._stream_chat(handles, request, response_id, req.model, len(prompt_ids),
                                  num_reused, conversation, include_usage,
                                  req.num_logprobs is not None),
                media_type="text/event-stream")
        updates = await self.next_finals(handles, request)
        for update in updates:
            if (failed := self.generation_failed(update)) is not None:
                return failed
        choices = []
        for index, (handle, update) in enumerate(zip(handles, updates)):
            content, tool_calls, finish = self._chat_ending(
                update, update.text[handle.text_offset:], conversation)
            logprobs = (self.logprob_format.chat(handle.logprobs)
                        if req.num_logprobs is not None else None)
            choices.append(p.chat_choice(index, content, tool_calls, finish, logprobs))
        usage = p.usage(len(prompt_ids),
                        sum(u.num_generated_tokens - h.generated_offset
                            for h, u in zip(handles, updates)),
                        _num_cached_tokens(updates[0], num_reused))
        return p.chat_completion(response_id, req.model, choices, usage)

    async def _add_siblings(self, first: RequestHandle, prompt_ids: list[int],
                            params: SamplingParams, n: int, client_tools: list[str],
                            conversation: _Conversation, request: Request
                            ) -> list[RequestHandle]:
        """The n - 1 other choices of a prompt, added once the first has prefilled it, so
        they find its blocks in the prefix cache instead of computing them again (as
        ``LLM.generate`` does). Choice i samples with ``SamplingParams.for_choice(i)``."""
        if n == 1:
            return [first]
        update = await next_update(first, request)
        if update is None:
            self.abort_for_disconnect(first)
            raise ClientDisconnect()
        first.pending.append(update)
        handles = [first]
        try:
            for i in range(1, n):
                handles.append(await self._add(prompt_ids, params.for_choice(i), client_tools,
                                               conversation.cache_salt))
        except BaseException:
            for handle in handles:
                self.engine_loop.abort(handle.request_id)
            raise
        return handles

    async def next_finals(self, handles: Sequence[RequestHandle], request: Request
                          ) -> list[Update]:
        """Every choice's final update; all are aborted if the client goes away."""
        if len(handles) == 1:
            return [await self.next_final(handles[0], request)]
        try:
            return list(await asyncio.gather(*(self.next_final(h, request) for h in handles)))
        except BaseException:
            for handle in handles:
                self.engine_loop.abort(handle.request_id)
            raise

    async def _start(self, prompt_ids: list[int], params: SamplingParams,
                     client_tools: list[str], conversation: _Conversation,
                     result_ids: list[str], is_followup: bool) -> tuple[RequestHandle, int]:
        """Resumes the paused context the request continues, or adds a new request.

        Returns:
            The handle, and the tokens of the paused context it resumed (0 for a new request).
        """
        self._drop(self.store.expire(), outcome="expired")
        salt = conversation.cache_salt
        if not is_followup:  # only a tool result continues a paused context
            return await self._add(prompt_ids, params, client_tools, salt), 0
        match = self.store.take_match(prompt_ids, conversation.session_id, result_ids,
                                      cache_salt=salt)
        self._drop(match.stale)
        if match.context is not None:
            try:
                handle = await self.engine_loop.resume(
                    match.context.request_id, match.resume_token_ids, params,
                    client_tools=client_tools)
            except (ValueError, UnknownRequestError) as exc:
                log.warning("resuming paused request %d failed (%s); prefilling instead",
                            match.context.request_id, exc)
                self.engine_loop.abort(match.context.request_id)
            else:
                num_reused = len(match.context.context_token_ids)
                self.metrics.count_paused_context("reused")
                self.metrics.reused_prompt_tokens.inc(num_reused)
                return handle, num_reused
        self.metrics.count_paused_context("fallback")
        return await self._add(prompt_ids, params, client_tools, salt), 0

    async def _add(self, prompt_ids: list[int], params: SamplingParams,
                   client_tools: list[str], cache_salt: str | None) -> RequestHandle:
        try:
            return await self.engine_loop.add(prompt_ids, params, client_tools=client_tools,
                                              cache_salt=cache_salt)
        except ValueError as exc:
            raise BadRequestError(str(exc)) from None

    def _chat_ending(self, update: Update, answer: str, conversation: _Conversation
                     ) -> tuple[str | None, list[dict[str, Any]] | None, str]:
        """(content, tool_calls, finish_reason); holds the context of a client tool call."""
        if not update.paused:
            return answer, None, p.FINISH_REASONS.get(update.finish_reason or "stop", "stop")
        content, call = split_tool_call(answer, self.engine.parser)
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        if call is not None:
            self.store.remember_call_text(call_id, call.raw)
        assert update.context_token_ids is not None
        self._drop(self.store.add(update.request_id, update.context_token_ids, [call_id],
                                  conversation.session_id, conversation.cache_salt),
                   outcome="evicted")
        self.metrics.count_paused_context("held")
        arguments = json.dumps(update.tool_arguments or {})
        return (content or None, [p.tool_call_json(call_id, update.tool_name or "", arguments)],
                "tool_calls")

    async def _stream_chat(self, handles: list[RequestHandle], request: Request,
                           response_id: str, model: str, num_prompt_tokens: int,
                           num_reused: int, conversation: _Conversation, include_usage: bool,
                           with_logprobs: bool) -> AsyncIterator[str]:
        for index in range(len(handles)):
            yield _sse(p.chat_chunk(response_id, model, {"role": "assistant", "content": ""},
                                    index=index))
        streams = [self._chat_choice_events(h, i, request, response_id, model, conversation,
                                            with_logprobs) for i, h in enumerate(handles)]
        num_completion_tokens, cached = 0, 0
        # Closed however this generator ends, so every unsettled choice is aborted at once.
        async with contextlib.aclosing(_merged(streams)) as events:
            async for kind, value in events:
                if kind == "chunk":
                    yield _sse(value)
                elif kind == "error":
                    yield _sse(value)
                    return
                elif kind == "done":
                    update, handle = value
                    num_completion_tokens += (update.num_generated_tokens
                                              - handle.generated_offset)
                    if handle is handles[0]:
                        cached = _num_cached_tokens(update, num_reused)
        if include_usage:
            usage = p.usage(num_prompt_tokens, num_completion_tokens, cached)
            yield _sse(p.chat_chunk(response_id, model, None, usage_json=usage))
        yield _sse("[DONE]")

    async def _chat_choice_events(self, handle: RequestHandle, index: int, request: Request,
                                  response_id: str, model: str, conversation: _Conversation,
                                  with_logprobs: bool) -> AsyncIterator[tuple[str, Any]]:
        """One choice's stream: ('chunk', chunk JSON)..., then ('done', (update, handle)) or
        ('error', error JSON); aborts its request if closed before it settles."""
        settled = False  # the engine request finished or paused: nothing to abort
        num_logprobs_sent = 0

        def chunk(delta: dict[str, Any], finish: str | None = None) -> tuple[str, Any]:
            nonlocal num_logprobs_sent
            logprobs = None
            if with_logprobs:
                logprobs = self.logprob_format.chat(handle.logprobs[num_logprobs_sent:])
                num_logprobs_sent = len(handle.logprobs)
            return "chunk", p.chat_chunk(response_id, model, delta, finish, index=index,
                                         logprobs=logprobs)

        try:
            streamer = ContentStreamer()
            while True:
                update = await next_update(handle, request)
                if update is None:
                    return
                answer = update.text[handle.text_offset:]
                if update.finished and update.finish_reason == "error":
                    settled = True
                    yield "error", p.error_body(update.error or "generation failed",
                                                error_type="server_error")
                    return
                if update.finished or update.paused:
                    settled = True
                    content, tool_calls, finish = self._chat_ending(update, answer,
                                                                    conversation)
                    piece = (content or "")[streamer.num_emitted:]
                    if piece:
                        yield chunk({"content": piece})
                    if tool_calls:
                        deltas = [{**c, "index": i} for i, c in enumerate(tool_calls)]
                        yield chunk({"tool_calls": deltas})
                    yield chunk({}, finish)
                    yield "done", (update, handle)
                    return
                piece = streamer.delta(answer)
                if piece:
                    yield chunk({"content": piece})
        finally:
            if not settled:
                self.abort_for_disconnect(handle)

    # ---- completions ---------------------------------------------------------------------

    async def complete(self, req: p.CompletionRequest, request: Request) -> Any:
        self.check_model(req.model)
        try:
            prompt = req.single_prompt()
        except ValueError as exc:
            raise BadRequestError(str(exc), param="prompt") from None
        prompt_ids = (self.engine.tokenizer.encode(prompt) if isinstance(prompt, str)
                      else list(prompt))
        if not prompt_ids:
            raise BadRequestError("prompt is empty: it must hold at least one token",
                                  param="prompt")
        params = self.sampling_params(req, len(prompt_ids), req.max_tokens,
                                      self.structured_output(req))
        with_logprobs = req.num_logprobs is not None
        if req.echo and with_logprobs:
            # OpenAI's echo with logprobs scores the prompt too (choice 0 computes it).
            params = dataclasses.replace(params, prompt_logprobs=req.num_logprobs)
        conversation = _Conversation(None, req.cache_salt)
        handle, _ = await self._start(prompt_ids, params, [], conversation, [], False)
        handles = await self._add_siblings(handle, prompt_ids, params, req.n, [], conversation,
                                           request)
        response_id = p.new_id("cmpl")
        echo = (self.engine.tokenizer.decode(prompt_ids) if isinstance(prompt, list)
                else prompt) if req.echo else ""

        def echo_logprobs() -> dict[str, Any] | None:
            """The echoed prompt's logprobs (choice 0's, the same for every choice)."""
            if not (echo and with_logprobs) or handles[0].prompt_logprobs is None:
                return None
            return self.logprob_format.prompt(handles[0].prompt_logprobs, prompt_ids)

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _EngineStreamingResponse(
                self._stream_completion(handles, request, response_id, req.model,
                                        len(prompt_ids), echo, include_usage, with_logprobs,
                                        echo_logprobs),
                media_type="text/event-stream")
        updates = await self.next_finals(handles, request)
        for update in updates:
            if (failed := self.generation_failed(update)) is not None:
                return failed
        choices = []
        for index, (handle, update) in enumerate(zip(handles, updates)):
            logprobs = None
            if with_logprobs:
                logprobs = self.logprob_format.completion(handle.logprobs, len(echo))
                if (prompt_part := echo_logprobs()) is not None:
                    logprobs = join_completion_logprobs(prompt_part, logprobs)
            choices.append(p.completion_choice(
                index, echo + update.text,
                p.FINISH_REASONS.get(update.finish_reason or "stop", "stop"), logprobs))
        usage = p.usage(len(prompt_ids), sum(u.num_generated_tokens for u in updates),
                        updates[0].num_cached_tokens)
        return p.completion(response_id, req.model, None, None, usage, choices=choices)

    async def _stream_completion(self, handles: list[RequestHandle], request: Request,
                                 response_id: str, model: str, num_prompt_tokens: int,
                                 echo: str, include_usage: bool, with_logprobs: bool,
                                 echo_logprobs: Callable[[], dict[str, Any] | None]
                                 ) -> AsyncIterator[str]:
        streams = [self._completion_choice_events(h, i, request, response_id, model, echo,
                                                  with_logprobs, echo_logprobs)
                   for i, h in enumerate(handles)]
        num_completion_tokens, cached = 0, 0
        async with contextlib.aclosing(_merged(streams)) as events:
            async for kind, value in events:
                if kind == "chunk":
                    yield _sse(value)
                elif kind == "error":
                    yield _sse(value)
                    return
                elif kind == "done":
                    num_completion_tokens += value.num_generated_tokens
                    if value.request_id == handles[0].request_id:
                        cached = value.num_cached_tokens
        if include_usage:
            usage = p.usage(num_prompt_tokens, num_completion_tokens, cached)
            yield _sse(p.completion(response_id, model, None, None, usage))
        yield _sse("[DONE]")

    async def _completion_choice_events(self, handle: RequestHandle, index: int,
                                        request: Request, response_id: str, model: str,
                                        echo: str, with_logprobs: bool,
                                        echo_logprobs: Callable[[], dict[str, Any] | None]
                                        ) -> AsyncIterator[tuple[str, Any]]:
        """One choice's stream, as ``_chat_choice_events``; an echo comes first, with the
        prompt's logprobs when asked (so it waits for the first update, which brings them)."""
        settled = False
        num_sent = 0  # characters of text sent
        num_logprobs_sent = 0
        logprob_offset = len(echo)  # text_offset of the next entry: the tokens' own strings

        def chunk(text: str, finish: str | None = None) -> tuple[str, Any]:
            nonlocal num_logprobs_sent, logprob_offset
            logprobs = None
            if with_logprobs:
                entries = handle.logprobs[num_logprobs_sent:]
                logprobs = self.logprob_format.completion(entries, logprob_offset)
                num_logprobs_sent = len(handle.logprobs)
                logprob_offset += sum(len(t) for t in logprobs["tokens"])
            return "chunk", p.completion(response_id, model, text, finish, index=index,
                                         logprobs=logprobs)

        try:
            if echo:
                logprobs = None
                if with_logprobs:
                    first = await next_update(handle, request)
                    if first is None:
                        return
                    handle.pending.appendleft(first)
                    logprobs = echo_logprobs()
                yield "chunk", p.completion(response_id, model, echo, None, index=index,
                                            logprobs=logprobs)
            while True:
                update = await next_update(handle, request)
                if update is None:
                    return
                if update.finished and update.finish_reason == "error":
                    settled = True
                    yield "error", p.error_body(update.error or "generation failed",
                                                error_type="server_error")
                    return
                piece, num_sent = update.text[num_sent:], max(num_sent, len(update.text))
                if update.finished:
                    settled = True
                    yield chunk(piece, p.FINISH_REASONS.get(update.finish_reason or "stop",
                                                            "stop"))
                    yield "done", update
                    return
                if piece:
                    yield chunk(piece)
        finally:
            if not settled:
                self.abort_for_disconnect(handle)

    # ---- observability -------------------------------------------------------------------

    async def metrics_text(self) -> bytes:
        try:
            engine = await self.engine_loop.stats()
        except EngineDeadError:  # the HTTP side's series stay readable; the engine's read 0
            return self.metrics.render(EngineSnapshot({}, num_paused_contexts=len(self.store)))
        return self.metrics.render(EngineSnapshot(
            engine.stats, num_paused_contexts=len(self.store),
            generation_tokens_total=engine.generation_tokens_total,
            prompt_tokens_total=engine.prompt_tokens_total,
            generation_tokens_per_s=engine.generation_tokens_per_s))


@dataclass(frozen=True)
class _Conversation:
    """What ties a request to paused contexts: its session id and its tenant's cache salt."""

    session_id: str | None
    cache_salt: str | None


def _engine_unavailable(message: str) -> JSONResponse:
    """503: the engine stopped (its process died); ``/health`` says so too."""
    return JSONResponse(p.error_body(message, code="engine_unavailable",
                                     error_type="service_unavailable"), status_code=503)


def _num_cached_tokens(update: Update, num_reused: int) -> int:
    """``usage.prompt_tokens_details.cached_tokens``: the resumed paused context, or else the
    prompt tokens the engine's prefix cache held."""
    return num_reused if num_reused else update.num_cached_tokens


class _StatusCounter:
    """ASGI middleware counting responses by endpoint and status (streaming-safe)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class _BearerAuth:
    """ASGI middleware: every ``/v1`` route needs ``Authorization: Bearer <api_key>``.

    The key is compared in constant time; a missing or wrong one gets OpenAI's 401 body.
    """

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self._api_key = api_key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/v1" or path.startswith("/v1/")):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._api_key):
            await self.app(scope, receive, send)
            return
        message = ("Missing API key: send it as 'Authorization: Bearer <key>'" if not header
                   else "Incorrect API key provided")
        response = JSONResponse(p.error_body(message, code="invalid_api_key"), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", detail.get("msg", ""))
        return f"malformed JSON body: {reason}", None
    parts, first_param = [], None
    for error in errors:
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        first_param = first_param or param
        value = error.get("input")
        shown = f" (got {json.dumps(value)[:200]})" if value is not None and not isinstance(
            value, dict) else ""
        parts.append(f"{param or 'body'}: {error.get('msg', 'invalid')}{shown}")
    return "invalid request: " + "; ".join(parts), first_param


def create_app(engine: LLMEngine | EngineSpec, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (see :class:`OpenAIServer`); the engine process
    (or thread) runs for the app's lifespan."""
    server = OpenAIServer(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="InferCept", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(p.error_body(message, param), status_code=400)

    @app.exception_handler(BadRequestError)
    async def _bad(request: Request, exc: BadRequestError) -> JSONResponse:
        return JSONResponse(p.error_body(str(exc), exc.param, exc.code), status_code=400)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return _engine_unavailable(str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(p.error_body(str(exc.detail), error_type="not_found_error"
                                         if exc.status_code == 404 else "invalid_request_error"),
                            status_code=exc.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = server.engine_loop.is_alive
        if alive:
            return JSONResponse({"status": "ok"})
        reason = getattr(server.engine_loop, "dead_reason", None) or "the engine stopped"
        return JSONResponse({"status": "engine stopped", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await server.metrics_text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": server.config.served_model_name, "object": "model", "created": 0,
            "owned_by": "infercept", "root": server.engine.model_name,
            "max_model_len": server.engine.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: p.ChatCompletionRequest, request: Request) -> Any:
        return await server.chat(req, request)

    @app.post("/v1/completions")
    async def completions(req: p.CompletionRequest, request: Request) -> Any:
        return await server.complete(req, request)

    # Imported here: responses.py builds on this module's OpenAIServer.
    from infercept.server.responses import add_routes as add_responses_routes
    app.state.responses = add_responses_routes(app, server)

    if server.config.api_key:
        app.add_middleware(_BearerAuth, api_key=server.config.api_key)
    app.add_middleware(_StatusCounter, metrics=server.metrics)  # outermost: counts the 401s too
    return app
