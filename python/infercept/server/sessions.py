"""Paused contexts: requests held for a client's tool round trip, found again by token prefix.

When a chat completion ends on a client-side tool call, its engine request stays paused (the
policy preserves, swaps or discards its KV) and is kept here under a time-to-live. A later
request matches it when its rendered prompt tokens start with the paused request's whole
context (prompt + output): the engine then resumes with exactly the remaining tokens (the end
of the assistant turn, the tool result, the next assistant header), so the context the model
sees is token for token the one a fresh prefill would build. Anything else is a fallback.

A follow-up only ever matches a context paused under the same ``cache_salt`` (tenant
isolation: another tenant's request neither resumes nor, by claiming it, aborts the context).

A context held for the Responses API names its response (``response_id``): only a follow-up
naming that response by ``previous_response_id`` (:meth:`take_response`) or sending back the
output of its call (:meth:`take_response_call`) takes it, never a chat request by token prefix.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class PausedContext:
    """One paused engine request.

    Attributes:
        request_id: The engine's id.
        context_token_ids: Prompt and output tokens so far (what a continuation must start with).
        tool_call_ids: The ids of the tool calls the paused response returned.
        session_id: The client's session id (``session_id`` extra field), if any.
        expires_at_s: Monotonic time after which the context is dropped.
        cache_salt: The request's ``cache_salt``; only a follow-up with the same one matches.
        response_id: The Responses API response that handed the call out, or None (chat).
    """

    request_id: int
    context_token_ids: tuple[int, ...]
    tool_call_ids: tuple[str, ...]
    session_id: str | None
    expires_at_s: float
    cache_salt: str | None = None
    response_id: str | None = None


@dataclass(frozen=True)
class Match:
    """Outcome of looking up a follow-up request.

    Attributes:
        context: The paused context to resume, or None (run a normal prefill).
        resume_token_ids: The tokens to append on resume (the follow-up's tokens past the
            paused context); empty when there is no match.
        stale: Paused contexts to abort: expired ones, and one the request claimed (by session
            id or tool call id) but whose tokens did not match.
    """

    context: PausedContext | None
    resume_token_ids: tuple[int, ...] = ()
    stale: tuple[PausedContext, ...] = ()


class PausedContextStore:
    """Paused contexts under a time-to-live, plus the raw text of the tool calls handed out.

    Not thread-safe: used from the event loop only.

    Args:
        ttl_s: How long a paused context waits for its continuation.
        max_contexts: At most this many are held; adding one more evicts the oldest.
        clock: Monotonic seconds (injectable for tests).
    """

    def __init__(self, ttl_s: float = 120.0, max_contexts: int = 256,
                 clock: Callable[[], float] = time.monotonic,
                 max_call_texts: int = 10_000) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s={ttl_s} must be > 0")
        if max_contexts < 1:
            raise ValueError(f"max_contexts={max_contexts} must be >= 1")
        self.ttl_s = ttl_s
        self.max_contexts = max_contexts
        self._clock = clock
        self._contexts: OrderedDict[int, PausedContext] = OrderedDict()
        self._call_texts: OrderedDict[str, str] = OrderedDict()
        self._max_call_texts = max_call_texts

    def __len__(self) -> int:
        return len(self._contexts)

    def add(self, request_id: int, context_token_ids: Sequence[int],
            tool_call_ids: Sequence[str], session_id: str | None = None,
            cache_salt: str | None = None, response_id: str | None = None
            ) -> list[PausedContext]:
        """Holds a paused request; returns contexts evicted to stay within ``max_contexts``."""
        self._contexts[request_id] = PausedContext(
            request_id, tuple(context_token_ids), tuple(tool_call_ids), session_id,
            self._clock() + self.ttl_s, cache_salt, response_id)
        evicted = []
        while len(self._contexts) > self.max_contexts:
            evicted.append(self._contexts.popitem(last=False)[1])
        return evicted

    def expire(self) -> list[PausedContext]:
        """Removes and returns the contexts whose time-to-live has passed."""
        now = self._clock()
        expired = [c for c in self._contexts.values() if c.expires_at_s <= now]
        for context in expired:
            del self._contexts[context.request_id]
        return expired

    def take_response(self, response_id: str) -> PausedContext | None:
        """Removes and returns the context held for ``response_id``, if any (call
        :meth:`expire` first to leave expired ones out)."""
        for context in self._contexts.values():
            if context.response_id == response_id:
                del self._contexts[context.request_id]
                return context
        return None

    def take_response_call(self, tool_call_ids: Sequence[str], cache_salt: str | None = None
                           ) -> PausedContext | None:
        """Removes and returns the context a Responses API response held for one of
        ``tool_call_ids`` under ``cache_salt``, if any (for clients that send the whole
        conversation back instead of ``previous_response_id``)."""
        wanted = set(tool_call_ids)
        for context in self._contexts.values():
            if (context.response_id is not None and context.cache_salt == cache_salt
                    and wanted & set(context.tool_call_ids)):
                del self._contexts[context.request_id]
                return context
        return None

    def contexts(self) -> list[PausedContext]:
        """The contexts held now (a copy; expired ones may be among them until the sweep)."""
        return list(self._contexts.values())

    def take_all(self) -> list[PausedContext]:
        contexts = list(self._contexts.values())
        self._contexts.clear()
        return contexts

    def take_match(self, token_ids: Sequence[int], session_id: str | None = None,
                   tool_call_ids: Sequence[str] = (), cache_salt: str | None = None) -> Match:
        """Finds and removes the paused context a request continues.

        Only contexts paused under ``cache_salt`` are considered. A context matches when
        ``token_ids`` is longer than its context and starts with it. With a session id (or
        tool result ids naming one of the context's calls), only that context is considered,
        and a mismatch makes it stale: the conversation moved on without it. Without either,
        any held context whose tokens prefix the request matches (the longest wins).
        """
        stale = self.expire()
        tokens = tuple(token_ids)
        same_salt = [c for c in self._contexts.values()
                     if c.cache_salt == cache_salt and c.response_id is None]
        claimed = [c for c in same_salt
                   if (session_id is not None and c.session_id == session_id)
                   or set(c.tool_call_ids) & set(tool_call_ids)]
        candidates = claimed or ([] if session_id is not None else same_salt)
        best: PausedContext | None = None
        for context in candidates:
            n = len(context.context_token_ids)
            if len(tokens) > n and tokens[:n] == context.context_token_ids and (
                    best is None or n > len(best.context_token_ids)):
                best = context
        if best is None:
            for context in claimed:
                del self._contexts[context.request_id]
            return Match(None, (), tuple(stale) + tuple(claimed))
        del self._contexts[best.request_id]
        return Match(best, tokens[len(best.context_token_ids):], tuple(stale))

    # ---- the exact text of the calls handed out ------------------------------------------

    def remember_call_text(self, call_id: str, text: str) -> None:
        """Keeps the generated text of a tool call, to render it back exactly as generated."""
        self._call_texts[call_id] = text
        while len(self._call_texts) > self._max_call_texts:
            self._call_texts.popitem(last=False)

    def call_text(self, call_id: str) -> str | None:
        return self._call_texts.get(call_id)


@dataclass(frozen=True)
class Conversation:
    """What ties a request to paused contexts (its session id and its tenant's cache salt) and
    what it asks of the scheduler (its predicted output, for the ranked queue)."""

    session_id: str | None
    cache_salt: str | None
    predicted_output_tokens: int | None = None
