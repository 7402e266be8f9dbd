"""``POST /v1/completions``: the handler (``echo`` and the prompt's logprobs included) and
its per-choice streams (mixed into :class:`OpenAIServer`)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from infercept.server import protocol as p
from infercept.server.engine_loop import RequestHandle, Update
from infercept.server.errors import BadRequestError
from infercept.server.logprobs import join_completion_logprobs
from infercept.server.sessions import Conversation
from infercept.server.streaming import (EngineStreamingResponse, SettledUpdates, next_update,
                                        stream_choices)


class CompletionHandlers:
    """The completions endpoint's methods of
    :class:`~infercept.server.openai_server.OpenAIServer`."""


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
        conversation = Conversation(None, req.cache_salt, req.predicted_output_tokens)
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
            return EngineStreamingResponse(
                self._stream_completion(handles, request, response_id, req.model,
                                        len(prompt_ids), echo, include_usage, with_logprobs,
                                        echo_logprobs),
                media_type="text/event-stream")
        updates = await self.finished_choices(handles, request)
        if isinstance(updates, JSONResponse):
            return updates
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

        def count_done(update: Update) -> None:
            nonlocal num_completion_tokens, cached
            num_completion_tokens += update.num_generated_tokens
            if update.request_id == handles[0].request_id:
                cached = update.num_cached_tokens

        def usage_chunk() -> dict[str, Any] | None:
            if not include_usage:
                return None
            usage = p.usage(num_prompt_tokens, num_completion_tokens, cached)
            return p.completion(response_id, model, None, None, usage)

        async with contextlib.aclosing(stream_choices(streams, count_done, usage_chunk)) as lines:
            async for line in lines:
                yield line

    async def _completion_choice_events(self, handle: RequestHandle, index: int,
                                        request: Request, response_id: str, model: str,
                                        echo: str, with_logprobs: bool,
                                        echo_logprobs: Callable[[], dict[str, Any] | None]
                                        ) -> AsyncIterator[tuple[str, Any]]:
        """One choice's stream, as ``_chat_choice_events``; an echo comes first, with the
        prompt's logprobs when asked (so it waits for the first update, which brings them)."""
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

        async with SettledUpdates(handle, request, self.abort_for_disconnect) as updates:
            if echo:
                logprobs = None
                if with_logprobs:
                    # A peek, put back for the loop below (which has not started yet).
                    first = await next_update(handle, request)
                    if first is None:
                        return
                    handle.pending.appendleft(first)
                    logprobs = echo_logprobs()
                yield "chunk", p.completion(response_id, model, echo, None, index=index,
                                            logprobs=logprobs)
            async for update in updates:
                if update.finished and update.finish_reason == "error":
                    yield "error", p.error_body(update.error or "generation failed",
                                                error_type="server_error")
                    return
                piece, num_sent = update.text[num_sent:], max(num_sent, len(update.text))
                if update.finished:
                    yield chunk(piece, p.FINISH_REASONS.get(update.finish_reason or "stop",
                                                            "stop"))
                    yield "done", update
                    return
                if piece:
                    yield chunk(piece)
