"""The server's state and the pieces its endpoints share: the engine client (in-process loop
or engine process), paused contexts, metrics, sampling params from a request, and adding a
request (resuming a paused context, or n sibling choices). The endpoints' handlers are in
``chat.py``, ``completions.py`` and ``responses.py``; the routes in ``app.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from infercept._core import UnknownRequestError
from infercept.engine import LLMEngine
from infercept.sampling import SamplingParams
from infercept.server import protocol as p
from infercept.server.chat import ChatHandlers
from infercept.server.chat_format import ChatRenderer
from infercept.server.completions import CompletionHandlers
from infercept.server.engine_loop import (EngineDeadError, EngineInfo, EngineLoop, RequestHandle,
                                          Update)
from infercept.server.engine_process import EngineProcessClient, EngineSpec
from infercept.server.errors import BadRequestError, engine_unavailable
from infercept.server.logprobs import LogprobFormatter
from infercept.server.metrics import EngineSnapshot, ServerMetrics
from infercept.server.response_store import (DEFAULT_MAX_STORED_RESPONSE_BYTES,
                                             DEFAULT_MAX_STORED_RESPONSES,
                                             DEFAULT_STORED_RESPONSE_TTL_S)
from infercept.server.sessions import Conversation, PausedContext, PausedContextStore
from infercept.server.streaming import next_update
from infercept.server.structured import StructuredRequestError, structured_output_for
from infercept.structured_output import StructuredOutput

log = logging.getLogger("infercept.server")


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


class OpenAIServer(ChatHandlers, CompletionHandlers):
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
            return engine_unavailable(update.error or "the engine stopped")
        return JSONResponse(p.error_body(update.error or "generation failed",
                                         error_type="server_error"), status_code=500)

    def abort_for_disconnect(self, handle: RequestHandle) -> None:
        self.metrics.client_disconnects.inc()
        self.engine_loop.abort(handle.request_id)

    # ---- adding requests -----------------------------------------------------------------

    async def _add_siblings(self, first: RequestHandle, prompt_ids: list[int],
                            params: SamplingParams, n: int, client_tools: list[str],
                            conversation: Conversation, request: Request
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
                                               conversation.cache_salt,
                                               conversation.predicted_output_tokens))
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

    async def finished_choices(self, handles: Sequence[RequestHandle], request: Request
                               ) -> list[Update] | JSONResponse:
        """Every choice's final update, or the error response of the first that failed."""
        updates = await self.next_finals(handles, request)
        for update in updates:
            if (failed := self.generation_failed(update)) is not None:
                return failed
        return updates

    async def _start(self, prompt_ids: list[int], params: SamplingParams,
                     client_tools: list[str], conversation: Conversation,
                     result_ids: list[str], is_followup: bool) -> tuple[RequestHandle, int]:
        """Resumes the paused context the request continues, or adds a new request.

        Returns:
            The handle, and the tokens of the paused context it resumed (0 for a new request).
        """
        self._drop(self.store.expire(), outcome="expired")
        salt, predicted = conversation.cache_salt, conversation.predicted_output_tokens
        if not is_followup:  # only a tool result continues a paused context
            return await self._add(prompt_ids, params, client_tools, salt, predicted), 0
        match = self.store.take_match(prompt_ids, conversation.session_id, result_ids,
                                      cache_salt=salt)
        self._drop(match.stale)
        if match.context is not None:
            try:
                handle = await self.engine_loop.resume(
                    match.context.request_id, match.resume_token_ids, params,
                    client_tools=client_tools, predicted_output_tokens=predicted)
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
        return await self._add(prompt_ids, params, client_tools, salt, predicted), 0

    async def _add(self, prompt_ids: list[int], params: SamplingParams,
                   client_tools: list[str], cache_salt: str | None,
                   predicted_output_tokens: int | None = None) -> RequestHandle:
        try:
            return await self.engine_loop.add(prompt_ids, params, client_tools=client_tools,
                                              cache_salt=cache_salt,
                                              predicted_output_tokens=predicted_output_tokens)
        except ValueError as exc:
            raise BadRequestError(str(exc)) from None

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
