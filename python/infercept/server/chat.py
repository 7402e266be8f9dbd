"""``POST /v1/chat/completions``: the handler, its per-choice streams, and the ending that
holds a client tool call's paused context (mixed into :class:`OpenAIServer`, whose engine
loop, paused store, renderer and metrics it uses)."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from infercept.server import protocol as p
from infercept.server.chat_format import ContentStreamer, split_tool_call
from infercept.server.engine_loop import RequestHandle, Update
from infercept.server.errors import BadRequestError
from infercept.server.sessions import Conversation
from infercept.server.streaming import (EngineStreamingResponse, SettledUpdates, sse,
                                        stream_choices)


class ChatHandlers:
    """The chat endpoint's methods of :class:`~infercept.server.openai_server.OpenAIServer`."""

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
        conversation = Conversation(req.session_id, req.cache_salt, req.predicted_output_tokens)
        handle, num_reused = await self._start(prompt_ids, params, client_tools, conversation,
                                               result_ids, is_followup)
        handles = await self._add_siblings(handle, prompt_ids, params, req.n, client_tools,
                                           conversation, request)
        response_id = p.new_id("chatcmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EngineStreamingResponse(
                self._stream_chat(handles, request, response_id, req.model, len(prompt_ids),
                                  num_reused, conversation, include_usage,
                                  req.num_logprobs is not None),
                media_type="text/event-stream")
        updates = await self.finished_choices(handles, request)
        if isinstance(updates, JSONResponse):
            return updates
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
                        num_cached_tokens(updates[0], num_reused))
        return p.chat_completion(response_id, req.model, choices, usage)

    def _chat_ending(self, update: Update, answer: str, conversation: Conversation
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
                           num_reused: int, conversation: Conversation, include_usage: bool,
                           with_logprobs: bool) -> AsyncIterator[str]:
        for index in range(len(handles)):
            yield sse(p.chat_chunk(response_id, model, {"role": "assistant", "content": ""},
                                   index=index))
        streams = [self._chat_choice_events(h, i, request, response_id, model, conversation,
                                            with_logprobs) for i, h in enumerate(handles)]
        num_completion_tokens, cached = 0, 0

        def count_done(value: tuple[Update, RequestHandle]) -> None:
            nonlocal num_completion_tokens, cached
            update, handle = value
            num_completion_tokens += update.num_generated_tokens - handle.generated_offset
            if handle is handles[0]:
                cached = num_cached_tokens(update, num_reused)

        def usage_chunk() -> dict[str, Any] | None:
            if not include_usage:
                return None
            usage = p.usage(num_prompt_tokens, num_completion_tokens, cached)
            return p.chat_chunk(response_id, model, None, usage_json=usage)

        # Closed however this generator ends, so every unsettled choice is aborted at once.
        async with contextlib.aclosing(stream_choices(streams, count_done, usage_chunk)) as lines:
            async for line in lines:
                yield line

    async def _chat_choice_events(self, handle: RequestHandle, index: int, request: Request,
                                  response_id: str, model: str, conversation: Conversation,
                                  with_logprobs: bool) -> AsyncIterator[tuple[str, Any]]:
        """One choice's stream: ('chunk', chunk JSON)..., then ('done', (update, handle)) or
        ('error', error JSON); aborts its request if closed before it settles."""
        num_logprobs_sent = 0

        def chunk(delta: dict[str, Any], finish: str | None = None) -> tuple[str, Any]:
            nonlocal num_logprobs_sent
            logprobs = None
            if with_logprobs:
                logprobs = self.logprob_format.chat(handle.logprobs[num_logprobs_sent:])
                num_logprobs_sent = len(handle.logprobs)
            return "chunk", p.chat_chunk(response_id, model, delta, finish, index=index,
                                         logprobs=logprobs)

        streamer = ContentStreamer()
        async with SettledUpdates(handle, request, self.abort_for_disconnect) as updates:
            async for update in updates:
                answer = update.text[handle.text_offset:]
                if update.finished and update.finish_reason == "error":
                    yield "error", p.error_body(update.error or "generation failed",
                                                error_type="server_error")
                    return
                if update.finished or update.paused:
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


def num_cached_tokens(update: Update, num_reused: int) -> int:
    """``usage.prompt_tokens_details.cached_tokens``: the resumed paused context, or else the
    prompt tokens the engine's prefix cache held."""
    return num_reused if num_reused else update.num_cached_tokens
