"""Stored responses: what ``previous_response_id``, ``GET`` and ``DELETE /v1/responses/{id}``
find, bounded in count and bytes and expiring.

A stored response keeps its ``response`` JSON and the conversation through its output (chat
messages, the request's ``instructions`` left out: each request brings its own, as OpenAI's
do). A response that ended on a function call also names its engine request, which stays
paused in the :class:`~infercept.server.sessions.PausedContextStore` under its own (shorter)
time-to-live; the conversation here outlives it, so a late follow-up is re-rendered and
prefilled instead.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Defaults (``ServerConfig`` fields of the same names; README "Responses API").
DEFAULT_MAX_STORED_RESPONSES = 1024
DEFAULT_MAX_STORED_RESPONSE_BYTES = 64 * 1024 * 1024
DEFAULT_STORED_RESPONSE_TTL_S = 3600.0


@dataclass
class StoredResponse:
    """One stored response.

    Attributes:
        response_id: ``resp_…``.
        response: The ``response`` JSON, as ``GET`` returns it.
        messages: The conversation through this response's output, as chat message dicts.
        call_texts: The generated text of each function call it handed out, by call id (so a
            re-render repeats the model's own tokens).
        paused_call_id: The call its engine request is paused on, or None.
        cache_salt: The request's ``cache_salt``; only a follow-up with the same one names it.
        expires_at_s: Monotonic time after which it is dropped.
        num_bytes: Its size as counted against the byte bound (the JSON of both).
    """

    response_id: str
    response: dict[str, Any]
    messages: list[dict[str, Any]]
    call_texts: dict[str, str] = field(default_factory=dict)
    paused_call_id: str | None = None
    cache_salt: str | None = None
    expires_at_s: float = 0.0
    num_bytes: int = 0


class ResponseStore:
    """Stored responses by id, oldest evicted first past ``max_responses`` or ``max_bytes``.

    Not thread-safe: used from the event loop only.

    Args:
        ttl_s: How long a stored response lives.
        max_responses: At most this many are kept.
        max_bytes: Their JSON adds up to at most this many bytes (one larger than this is not
            stored at all).
        clock: Monotonic seconds (injectable for tests).
    """

    def __init__(self, ttl_s: float = DEFAULT_STORED_RESPONSE_TTL_S,
                 max_responses: int = DEFAULT_MAX_STORED_RESPONSES,
                 max_bytes: int = DEFAULT_MAX_STORED_RESPONSE_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0:
            raise ValueError(f"stored_response_ttl_s={ttl_s} must be > 0")
        if max_responses < 1:
            raise ValueError(f"max_stored_responses={max_responses} must be >= 1")
        if max_bytes < 1:
            raise ValueError(f"max_stored_response_bytes={max_bytes} must be >= 1")
        self.ttl_s, self.max_responses, self.max_bytes = ttl_s, max_responses, max_bytes
        self._clock = clock
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()
        self.num_bytes = 0

    def __len__(self) -> int:
        return len(self._responses)

    def put(self, stored: StoredResponse) -> list[StoredResponse]:
        """Stores ``stored``; returns the responses dropped for it (expired or evicted), and
        ``stored`` itself when it alone is over ``max_bytes``."""
        stored.num_bytes = len(json.dumps(stored.response)) + len(json.dumps(stored.messages))
        if stored.num_bytes > self.max_bytes:
            return self.expire() + [stored]
        stored.expires_at_s = self._clock() + self.ttl_s
        dropped = self.expire()
        if (old := self._responses.pop(stored.response_id, None)) is not None:
            self.num_bytes -= old.num_bytes
        self._responses[stored.response_id] = stored
        self.num_bytes += stored.num_bytes
        while len(self._responses) > self.max_responses or self.num_bytes > self.max_bytes:
            dropped.append(self._pop_oldest())
        return dropped

    def response_ids(self) -> list[str]:
        """The ids stored now, oldest first (expired ones may be among them until expire())."""
        return list(self._responses)

    def get(self, response_id: str) -> StoredResponse | None:
        """The live response of that id, or None (never stored, deleted, expired or evicted)."""
        stored = self._responses.get(response_id)
        if stored is None or stored.expires_at_s <= self._clock():
            return None
        return stored

    def delete(self, response_id: str) -> StoredResponse | None:
        stored = self._responses.pop(response_id, None)
        if stored is not None:
            self.num_bytes -= stored.num_bytes
        return stored

    def expire(self) -> list[StoredResponse]:
        """Removes and returns the responses whose time-to-live has passed."""
        now = self._clock()
        expired = [s for s in self._responses.values() if s.expires_at_s <= now]
        for stored in expired:
            self.delete(stored.response_id)
        return expired

    def _pop_oldest(self) -> StoredResponse:
        stored = self._responses.popitem(last=False)[1]
        self.num_bytes -= stored.num_bytes
        return stored
