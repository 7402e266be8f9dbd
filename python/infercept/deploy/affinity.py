"""Which replica a request belongs on: the keys a request names, the keys a reply hands out,
and the table that maps them to replicas. Plain Python (no Ray), so it is tested alone.

A paused context lives on exactly one replica. A request names it by one of three keys:

- ``session:<salt>:<id>``: the chat ``session_id`` extra field (scoped by ``cache_salt``, as the
  server scopes paused contexts);
- ``call:<id>``: a tool call id the server handed out (chat ``tool_call_id``, Responses
  ``function_call_output.call_id``);
- ``response:<id>``: a Responses API ``previous_response_id`` (and ``GET``/``DELETE
  /v1/responses/{id}``): the replica that stored the response holds its conversation, and its
  paused request when it ended on a call.

A reply hands keys out (the call ids and response ids in its body, the request's session id
when it ended on a tool call); the ingress learns them with the replica that sent the reply.
Prefixes: a hash chain over the request's messages (or fixed pieces of a completion prompt);
the replica that served a prefix is preferred for a request that extends it, because its
engine's prefix cache holds it.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

# A completion prompt is hashed in pieces of this many characters (or token ids).
PROMPT_PIECE = 128
# Keys and prefix hashes remembered at most (least recently used dropped beyond).
DEFAULT_MAX_KEYS = 100_000


def session_key(session_id: str, cache_salt: str | None) -> str:
    return f"session:{cache_salt or ''}:{session_id}"


def call_key(call_id: str) -> str:
    return f"call:{call_id}"


def response_key(response_id: str) -> str:
    return f"response:{response_id}"


def _hash(previous: str, piece: Any) -> str:
    text = json.dumps(piece, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(f"{previous}|{text}".encode(), digest_size=12).hexdigest()


def prefix_hashes(body: dict[str, Any], path: str) -> list[str]:
    """The request's prefix hashes, shortest prefix first (empty for other endpoints).

    Chat: the salt and tools, then one hash per message; Responses: the salt, instructions
    and tools, then one per input item (a string input is one item); completions: the salt,
    then one per PROMPT_PIECE characters or token ids of the prompt.
    """
    salt = body.get("cache_salt")
    if path.endswith("/chat/completions"):
        head, pieces = [salt, body.get("tools")], body.get("messages")
    elif path.endswith("/responses"):
        items = body.get("input")
        head = [salt, body.get("instructions"), body.get("tools")]
        pieces = [items] if isinstance(items, str) else items
    elif path.endswith("/completions"):
        prompt = body.get("prompt")
        head = [salt]
        pieces = ([prompt[i:i + PROMPT_PIECE] for i in range(0, len(prompt), PROMPT_PIECE)]
                  if isinstance(prompt, (str, list)) else None)
    else:
        return []
    if not isinstance(pieces, list):
        return []
    hashes, current = [], _hash("", head)
    for piece in pieces:
        current = _hash(current, piece)
        hashes.append(current)
    return hashes


def request_keys(method: str, path: str, body: dict[str, Any] | None) -> list[str]:
    """The paused-context keys a request names, most specific first."""
    if path.startswith("/v1/responses/") and method in ("GET", "DELETE"):
        return [response_key(path.rsplit("/", 1)[1])]
    if method != "POST" or not isinstance(body, dict):
        return []
    keys: list[str] = []
    if path.endswith("/chat/completions"):
        if isinstance(body.get("session_id"), str):
            keys.append(session_key(body["session_id"], body.get("cache_salt")))
        for message in reversed(_dicts(body.get("messages"))):  # the latest result first
            if message.get("role") == "tool" and isinstance(message.get("tool_call_id"), str):
                keys.append(call_key(message["tool_call_id"]))
    elif path.endswith("/responses"):
        if isinstance(body.get("previous_response_id"), str):
            keys.append(response_key(body["previous_response_id"]))
        items = body.get("input")
        for item in reversed(_dicts(items if isinstance(items, list) else None)):
            if item.get("type") == "function_call_output" and isinstance(item.get("call_id"),
                                                                          str):
                keys.append(call_key(item["call_id"]))
    return keys


def reply_keys(path: str, request_body: dict[str, Any] | None,
               reply_payloads: Iterable[dict[str, Any]]) -> list[str]:
    """The keys a reply handed out: its tool call ids and stored response id, and the
    request's session id when the reply ended on a call.

    Args:
        path: The request's path.
        request_body: The request's JSON (for its session id and salt).
        reply_payloads: The reply's JSON object, or each ``data:`` object of its event stream.
    """
    keys: list[str] = []
    for payload in reply_payloads:
        if path.endswith("/chat/completions"):
            for choice in _dicts(payload.get("choices")):
                part = choice.get("message") or choice.get("delta") or {}
                for call in _dicts(part.get("tool_calls") if isinstance(part, dict) else None):
                    if isinstance(call.get("id"), str):
                        keys.append(call_key(call["id"]))
        elif path.endswith("/responses"):
            # Streaming: the final event carries the whole response.
            response = payload.get("response") if "response" in payload else payload
            if not isinstance(response, dict) or response.get("object") != "response":
                continue
            if response.get("status") in ("in_progress", "queued"):
                continue
            if isinstance(response.get("id"), str):
                keys.append(response_key(response["id"]))
            for item in _dicts(response.get("output")):
                if item.get("type") == "function_call" and isinstance(item.get("call_id"), str):
                    keys.append(call_key(item["call_id"]))
    body = request_body or {}
    if (any(k.startswith("call:") for k in keys) and path.endswith("/chat/completions")
            and isinstance(body.get("session_id"), str)):
        keys.append(session_key(body["session_id"], body.get("cache_salt")))
    return keys


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


class AffinityTable:
    """Keys and prefix hashes -> the replica that holds them, for live replicas only.

    Replicas are named by a string (Ray Serve's replica unique id). Entries of a replica that
    is gone are dropped (:meth:`retain`, :meth:`forget`), so a request naming them is routed
    by load instead. Not thread-safe: used from one event loop.

    Args:
        max_keys: Keys remembered at most, and prefix hashes at most (LRU each).
    """

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys={max_keys} must be >= 1")
        self.max_keys = max_keys
        self._keys: OrderedDict[str, str] = OrderedDict()
        self._prefixes: OrderedDict[str, str] = OrderedDict()
        # Keys whose replica is gone (bounded): a request naming one is counted as lost.
        self._lost: OrderedDict[str, None] = OrderedDict()
        self.live: set[str] = set()
        # What the routing decided, by reason (the ingress's /metrics shows them).
        self.num_routed: dict[str, int] = {r: 0 for r in ROUTE_REASONS}
        self.num_dropped_keys = 0

    def __len__(self) -> int:
        return len(self._keys)

    def learn(self, replica: str, keys: Iterable[str]) -> None:
        for key in keys:
            self._keys[key] = replica
            self._keys.move_to_end(key)
            self._lost.pop(key, None)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)

    def learn_prefixes(self, replica: str, hashes: Sequence[str]) -> None:
        for h in hashes:
            self._prefixes[h] = replica
            self._prefixes.move_to_end(h)
        while len(self._prefixes) > self.max_keys:
            self._prefixes.popitem(last=False)

    def owner(self, keys: Sequence[str]) -> str | None:
        """The replica holding the first known key, or None."""
        for key in keys:
            replica = self._keys.get(key)
            if replica is not None:
                return replica
        return None

    def is_lost(self, keys: Sequence[str]) -> bool:
        """Whether a key of ``keys`` belonged to a replica that is gone."""
        return any(key in self._lost for key in keys)

    def prefix_owner(self, hashes: Sequence[str]) -> tuple[str | None, int]:
        """The replica that served the longest known prefix, and its length in pieces."""
        for n in range(len(hashes), 0, -1):
            replica = self._prefixes.get(hashes[n - 1])
            if replica is not None:
                return replica, n
        return None, 0

    def retain(self, replicas: Iterable[str]) -> None:
        """The live replicas are ``replicas``: the others' entries are dropped."""
        self.live = set(replicas)
        for table in (self._keys, self._prefixes):
            gone = [k for k, r in table.items() if r not in self.live]
            for k in gone:
                del table[k]
            if table is self._keys:
                self.num_dropped_keys += len(gone)
                self._lost.update(dict.fromkeys(gone))
                while len(self._lost) > self.max_keys:
                    self._lost.popitem(last=False)

    def forget(self, replica: str) -> None:
        """``replica`` died: its entries are dropped."""
        self.retain(self.live - {replica})


# Why a request went where it went: the replica holding its paused context or stored
# response (context), the one that served its prefix (prefix), the least loaded (load), a
# request that named a context on a replica that is gone (lost: routed by load), or one
# addressed to a replica by name (pinned: /replicas/{id}/...).
ROUTE_REASONS = ("context", "prefix", "load", "lost", "pinned")


# One table per (application, deployment) in this process: a deployment handle's router and
# the ingress that owns the handle share it.
_TABLES: dict[str, AffinityTable] = {}


def affinity_table(app_name: str, deployment_name: str) -> AffinityTable:
    """The table of that deployment's router in this process (made on first use)."""
    return _TABLES.setdefault(f"{app_name}#{deployment_name}", AffinityTable())
