"""``/v1/responses``: OpenAI's Responses API over the engine, with paused-context resume.

``POST /v1/responses`` renders ``instructions`` + the stored conversation of
``previous_response_id`` + ``input`` with the chat template (the chat endpoint's renderer) and
runs it. A response that ends on a call to one of the request's function ``tools`` keeps its
engine request paused (the policy preserves, swaps or discards its KV), held for that response
id in the :class:`~infercept.server.sessions.PausedContextStore`. The follow-up that names the
response by ``previous_response_id`` and carries the ``function_call_output`` resumes that
request in place. The request is found by id (the response's; or the call's, for a client that
sends the whole conversation back instead), and the tokens appended are the follow-up's
rendering past the paused context (the end of the assistant turn, the tool output, the next
assistant header). When the paused request is gone (its time-to-live passed, it was evicted) or
the rendering does not extend it (other ``instructions`` or ``tools``), the stored conversation
is prefilled instead (through the engine's prefix cache when it has one).

``GET`` and ``DELETE /v1/responses/{id}`` read and drop stored responses
(:class:`~infercept.server.response_store.ResponseStore`); ``store=false`` stores nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from infercept._core import UnknownRequestError
from infercept.sampling import SamplingParams
from infercept.server import protocol as p
from infercept.server import responses_protocol as rp
from infercept.server.errors import BadRequestError
from infercept.server.openai_server import OpenAIServer
from infercept.server.streaming import EngineStreamingResponse, SettledUpdates
from infercept.server.chat_format import ContentStreamer, split_tool_call
from infercept.server.engine_loop import RequestHandle, Update
from infercept.server.protocol import ChatMessage
from infercept.server.response_store import ResponseStore, StoredResponse
from infercept.server.sessions import PausedContext

log = logging.getLogger("infercept.server")


@dataclass
class _Turn:
    """One ``POST /v1/responses`` after validation and rendering.

    Attributes:
        response_id: The new response's id.
        created_at: Unix seconds.
        conversation: The messages this response continues (history and input, no
            instructions): what it stores, followed by its output.
        prompt_ids: The rendered prompt (instructions, conversation, assistant header).
        num_input_tokens: Prompt tokens the request stands for (the paused context plus the
            appended tokens on a resume).
        num_reused: Tokens of a resumed paused context (0 for a prefill).
    """

    response_id: str
    created_at: float
    conversation: list[ChatMessage]
    prompt_ids: list[int]
    num_input_tokens: int = 0
    num_reused: int = 0


@dataclass(frozen=True)
class _Ending:
    """What a finished or paused engine request becomes: the output text and function call."""

    content: str
    call_id: str | None = None
    call_name: str = ""
    call_arguments: str = "{}"
    call_text: str | None = None
    status: str = "completed"
    incomplete_reason: str | None = None


class ResponsesAPI:
    """The Responses endpoints; the engine, renderer and paused contexts are ``server``'s."""

    def __init__(self, server: OpenAIServer) -> None:
        self.server = server
        config = server.config
        self.responses = ResponseStore(config.stored_response_ttl_s, config.max_stored_responses,
                                       config.max_stored_response_bytes)

    # ---- create --------------------------------------------------------------------------

    async def create(self, req: rp.ResponsesRequest, request: Request) -> Any:
        server = self.server
        server.check_model(req.model)
        self._expire()
        previous: StoredResponse | None = None
        if req.previous_response_id is not None:
            previous = self.responses.get(req.previous_response_id)
            if previous is None or previous.cache_salt != req.cache_salt:
                raise _bad_previous_id(req.previous_response_id, self.responses.ttl_s)
        try:
            new_messages = rp.input_messages(req.input)
        except ValueError as exc:
            raise BadRequestError(str(exc), param="input") from None
        history = [ChatMessage.model_validate(m) for m in previous.messages] if previous else []
        for call_id, text in (previous.call_texts if previous else {}).items():
            server.store.remember_call_text(call_id, text)
        turn = _Turn(rp.new_item_id("resp"), time.time(), history + new_messages, [])
        schemas = req.chat_tool_schemas()
        client_tools = [s["function"]["name"] for s in schemas]
        server_schemas = [s for s in server.server_tool_schemas
                          if s["function"]["name"] not in client_tools]
        instructions = ([ChatMessage(role="system", content=req.instructions)]
                        if req.instructions else [])
        try:
            turn.prompt_ids = server.renderer.render(instructions + turn.conversation,
                                                     schemas + server_schemas)
        except ValueError as exc:
            raise BadRequestError(str(exc), param="input") from None
        params = server.sampling_params(req, len(turn.prompt_ids), req.max_output_tokens)
        handle = await self._start(turn, previous, new_messages, params, client_tools,
                                   req.cache_salt, req.predicted_output_tokens)
        if req.stream:
            return EngineStreamingResponse(self._stream(turn, req, handle, request),
                                           media_type="text/event-stream")
        update = await server.next_final(handle, request)
        if (failed := server.generation_failed(update)) is not None:
            return failed
        ending = self._ending(update, update.text[handle.text_offset:], turn, req)
        output = _output_items(ending, rp.new_item_id("msg"), rp.new_item_id("fc"))
        body = rp.response_json(turn.response_id, req, turn.created_at, ending.status, output,
                                self._usage(turn, update, handle), ending.incomplete_reason)
        self._store(turn, req, ending, body)
        return body

    async def _start(self, turn: _Turn, previous: StoredResponse | None,
                     new_messages: Sequence[ChatMessage], params: SamplingParams,
                     client_tools: list[str], cache_salt: str | None,
                     predicted_output_tokens: int | None = None) -> RequestHandle:
        """Resumes the previous response's paused request, or adds a new one."""
        server = self.server
        server._drop(server.store.expire(), outcome="expired")
        result_ids = [m.tool_call_id for m in new_messages if m.role == "tool" and m.tool_call_id]
        answers_call = previous is not None and previous.paused_call_id in result_ids
        if previous is not None:
            context = server.store.take_response(previous.response_id)
        else:  # the whole conversation sent back: the call's id names the paused request
            context = server.store.take_response_call(result_ids, cache_salt)
        if context is not None:
            handle = await self._resume(context, turn, params, client_tools,
                                        predicted_output_tokens)
            if handle is not None:
                return handle
        if answers_call or context is not None:
            server.metrics.count_paused_context("fallback")
        turn.num_input_tokens = len(turn.prompt_ids)
        return await server._add(turn.prompt_ids, params, client_tools, cache_salt,
                                 predicted_output_tokens)

    async def _resume(self, context: PausedContext, turn: _Turn, params: SamplingParams,
                      client_tools: list[str], predicted_output_tokens: int | None = None
                      ) -> RequestHandle | None:
        """Resumes ``context`` with the prompt's tokens past it; None (and the context
        aborted) when the prompt does not extend it or the engine refuses."""
        server = self.server
        paused, prompt = context.context_token_ids, turn.prompt_ids
        if len(prompt) <= len(paused) or tuple(prompt[:len(paused)]) != paused:
            log.info("response %s: the follow-up does not extend paused request %d (other "
                     "instructions or tools?); prefilling instead", context.response_id,
                     context.request_id)
            server.engine_loop.abort(context.request_id)
            return None
        try:
            handle = await server.engine_loop.resume(
                context.request_id, prompt[len(paused):], params, client_tools=client_tools,
                predicted_output_tokens=predicted_output_tokens)
        except (ValueError, UnknownRequestError) as exc:
            log.warning("resuming paused request %d failed (%s); prefilling instead",
                        context.request_id, exc)
            server.engine_loop.abort(context.request_id)
            return None
        turn.num_input_tokens, turn.num_reused = len(prompt), len(paused)
        server.metrics.count_paused_context("reused")
        server.metrics.reused_prompt_tokens.inc(len(paused))
        return handle

    # ---- endings -------------------------------------------------------------------------

    def _ending(self, update: Update, answer: str, turn: _Turn, req: rp.ResponsesRequest
                ) -> _Ending:
        """The output of a finished or paused request; holds a paused one for the response
        (or aborts it when nothing is stored to name it)."""
        server = self.server
        if not update.paused:
            reason = update.finish_reason or "stop"
            status = {"length": "incomplete", "abort": "cancelled"}.get(reason, "completed")
            return _Ending(answer, status=status,
                           incomplete_reason="max_output_tokens" if reason == "length" else None)
        content, call = split_tool_call(answer, server.engine.parser)
        ending = _Ending(content, rp.new_item_id("call"), update.tool_name or "",
                         json.dumps(update.tool_arguments or {}), call.raw if call else None)
        if not req.store:
            server.engine_loop.abort(update.request_id)
            return ending
        assert update.context_token_ids is not None and ending.call_id is not None
        if ending.call_text is not None:
            server.store.remember_call_text(ending.call_id, ending.call_text)
        server._drop(server.store.add(update.request_id, update.context_token_ids,
                                      [ending.call_id], cache_salt=req.cache_salt,
                                      response_id=turn.response_id), outcome="evicted")
        server.metrics.count_paused_context("held")
        return ending

    def _usage(self, turn: _Turn, update: Update, handle: RequestHandle) -> dict[str, Any]:
        num_output_tokens = update.num_generated_tokens - handle.generated_offset
        return rp.usage(turn.num_input_tokens, num_output_tokens,
                        turn.num_reused or update.num_cached_tokens)

    def _store(self, turn: _Turn, req: rp.ResponsesRequest, ending: _Ending,
               body: dict[str, Any]) -> None:
        if not req.store:
            return
        assistant: dict[str, Any] = {"role": "assistant", "content": ending.content or None}
        if ending.call_id is not None:
            assistant["tool_calls"] = [p.tool_call_json(ending.call_id, ending.call_name,
                                                        ending.call_arguments)]
        stored = StoredResponse(
            turn.response_id, body,
            [m.model_dump(exclude_none=True) for m in turn.conversation] + [assistant],
            {ending.call_id: ending.call_text} if ending.call_id and ending.call_text else {},
            ending.call_id if ending.status == "completed" else None, req.cache_salt)
        self._forget(self.responses.put(stored), outcome="evicted")

    # ---- streaming -----------------------------------------------------------------------

    async def _stream(self, turn: _Turn, req: rp.ResponsesRequest, handle: RequestHandle,
                      request: Request) -> AsyncIterator[str]:
        """The event stream of one response (OpenAI's event types and order)."""
        server = self.server
        events = _EventWriter()
        message_id, call_item_id = rp.new_item_id("msg"), rp.new_item_id("fc")
        message_open = False

        def open_message() -> list[str]:
            return [events.write("response.output_item.added", output_index=0,
                                 item=rp.message_item(message_id, "", "in_progress")),
                    events.write("response.content_part.added", item_id=message_id,
                                 output_index=0, content_index=0, part=rp.output_text_part(""))]

        def text_delta(piece: str) -> str:
            return events.write("response.output_text.delta", item_id=message_id, output_index=0,
                                content_index=0, delta=piece, logprobs=[])

        async with SettledUpdates(handle, request, server.abort_for_disconnect) as updates:
            snapshot = rp.response_json(turn.response_id, req, turn.created_at, "in_progress",
                                        [], None)
            yield events.write("response.created", response=snapshot)
            yield events.write("response.in_progress", response=snapshot)
            streamer = ContentStreamer()
            async for update in updates:
                answer = update.text[handle.text_offset:]
                if update.finished and update.finish_reason == "error":
                    error = {"code": "server_error",
                             "message": update.error or "generation failed"}
                    failed = rp.response_json(turn.response_id, req, turn.created_at, "failed",
                                              [], None, error=error)
                    yield events.write("response.failed", response=failed)
                    return
                if not (update.finished or update.paused):
                    piece = streamer.delta(answer)
                    if piece:
                        if not message_open:
                            message_open = True
                            for event in open_message():
                                yield event
                        yield text_delta(piece)
                    continue
                ending = self._ending(update, answer, turn, req)
                piece = ending.content[streamer.num_emitted:]
                if piece or (ending.content and not message_open):
                    if not message_open:
                        message_open = True
                        for event in open_message():
                            yield event
                    if piece:
                        yield text_delta(piece)
                output = _output_items(ending, message_id, call_item_id)
                if message_open:
                    message = output[0]
                    yield events.write("response.output_text.done", item_id=message_id,
                                       output_index=0, content_index=0, text=ending.content,
                                       logprobs=[])
                    yield events.write("response.content_part.done", item_id=message_id,
                                       output_index=0, content_index=0,
                                       part=message["content"][0])
                    yield events.write("response.output_item.done", output_index=0, item=message)
                if ending.call_id is not None:
                    index, call = len(output) - 1, output[-1]
                    yield events.write("response.output_item.added", output_index=index,
                                       item={**call, "arguments": "", "status": "in_progress"})
                    yield events.write("response.function_call_arguments.delta",
                                       item_id=call_item_id, output_index=index,
                                       delta=ending.call_arguments)
                    yield events.write("response.function_call_arguments.done",
                                       item_id=call_item_id, output_index=index,
                                       arguments=ending.call_arguments)
                    yield events.write("response.output_item.done", output_index=index,
                                       item=call)
                body = rp.response_json(turn.response_id, req, turn.created_at, ending.status,
                                        output, self._usage(turn, update, handle),
                                        ending.incomplete_reason)
                self._store(turn, req, ending, body)
                final_type = ("response.incomplete" if ending.status == "incomplete"
                              else "response.completed")
                yield events.write(final_type, response=body)
                return

    # ---- stored responses ----------------------------------------------------------------

    def get(self, response_id: str) -> JSONResponse | dict[str, Any]:
        self._expire()
        stored = self.responses.get(response_id)
        if stored is None:
            return _not_found(response_id, self.responses.ttl_s)
        return stored.response

    def delete(self, response_id: str) -> JSONResponse | dict[str, Any]:
        self._expire()
        stored = self.responses.delete(response_id)
        if stored is None:
            return _not_found(response_id, self.responses.ttl_s)
        self._forget([stored])
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    def adopt(self, stored: StoredResponse) -> None:
        """Stores a response another server stored (a replica taking over the conversations
        of one that died, ``infercept.deploy``). No request of this server is paused for it,
        so a follow-up answering its call is prefilled (and counted ``fallback``)."""
        self._forget(self.responses.put(stored), outcome="evicted")

    def _expire(self) -> None:
        self._forget(self.responses.expire(), outcome="expired")

    def _forget(self, dropped: Sequence[StoredResponse], outcome: str | None = None) -> None:
        """Aborts the paused requests of responses no longer stored."""
        for stored in dropped:
            if stored.paused_call_id is None:
                continue
            context = self.server.store.take_response(stored.response_id)
            if context is not None:
                self.server._drop([context], outcome=outcome)


class _EventWriter:
    """Server-sent events, numbered as OpenAI numbers them (``sequence_number`` from 0)."""

    def __init__(self) -> None:
        self.sequence_number = 0

    def write(self, event_type: str, **fields: Any) -> str:
        payload = {"type": event_type, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {event_type}\ndata: {json.dumps(payload)}\n\n"


def _output_items(ending: _Ending, message_id: str, call_item_id: str) -> list[dict[str, Any]]:
    """The response's ``output``: a message when there is text, then the function call."""
    output = []
    if ending.content or ending.call_id is None:
        status = "incomplete" if ending.status == "incomplete" else "completed"
        output.append(rp.message_item(message_id, ending.content, status))
    if ending.call_id is not None:
        output.append(rp.function_call_item(call_item_id, ending.call_id, ending.call_name,
                                            ending.call_arguments))
    return output


def _bad_previous_id(response_id: str, ttl_s: float) -> BadRequestError:
    return BadRequestError(
        f"Previous response with id {response_id!r} not found: it was never stored (store="
        f"false), was deleted, or expired (stored responses live {ttl_s:g} s and are bounded "
        "in count and bytes)", param="previous_response_id", code="previous_response_not_found")


def _not_found(response_id: str, ttl_s: float) -> JSONResponse:
    return JSONResponse(p.error_body(
        f"Response with id {response_id!r} not found: it was never stored (store=false), was "
        f"deleted, or expired (stored responses live {ttl_s:g} s)", param="response_id",
        error_type="invalid_request_error"), status_code=404)


def add_routes(app: FastAPI, server: OpenAIServer) -> ResponsesAPI:
    """Registers ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{response_id}``."""
    api = ResponsesAPI(server)

    @app.post("/v1/responses")
    async def create_response(req: rp.ResponsesRequest, request: Request) -> Any:
        return await api.create(req, request)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> Any:
        return api.get(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> Any:
        return api.delete(response_id)

    return api
